//! Companion replies: one generation at a time per session, streamed to
//! clients as `ai_delta` frames, committed only if the session is still
//! `BOT_ONLY`, and abandoned the moment a therapist takes over.
//!
//! Client messages that arrive while a reply is being generated do not
//! start replies of their own: when the current reply ends, one more reply
//! is generated, which sees (and answers) all of them.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures_util::StreamExt;
use haven_protocol::{ChatMessage, RiskLevel, Sender};
use haven_responder::{ReplyRequest, Responder, ResponderError, Turn};
use haven_store::{BotMessage, CurrentRisk, SessionEvent};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use super::hub::{Finished, Room};
use crate::safety::SafetyScript;
use crate::startup::AppState;

/// Told to the client when the model fails. A therapist can still join.
pub const UNAVAILABLE_NOTICE: &str = "The companion is unavailable right now. Your message is saved, and a therapist can still join this chat.";

/// Asks the companion to answer the session's newest messages, after a
/// commit that reported the session up to seq `through` and flagged as
/// `risk` says. The task is owned by the app's task tracker, so shutdown
/// waits for it.
pub fn spawn(state: &AppState, room: &Arc<Room>, through: i64, risk: Option<CurrentRisk>) {
    let Some(reply_id) = room.start_generation(through, risk) else {
        tracing::debug!("companion busy: the reply being generated will be followed by one more");
        return;
    };
    let task = run(state.clone(), room.clone(), reply_id);
    state.tasks.spawn(task.in_current_span());
}

async fn run(state: AppState, room: Arc<Room>, mut reply_id: Uuid) {
    // The newest client message the previous reply of this run saw.
    let mut answered_through = None;
    loop {
        let (outcome, seen) = generate(&state, &room, reply_id, answered_through).await;
        answered_through = seen.or(answered_through);
        let (finished, failed) = match outcome {
            Ok(finished) => (finished, false),
            Err(()) => (Finished::Abandoned, true),
        };
        // The partial text is withdrawn before the notice explains why.
        let abandoned = matches!(finished, Finished::Abandoned);
        let next = room.finish_generation(reply_id, finished);
        if abandoned {
            let cancelled = SessionEvent::Cancelled { session_id: room.session_id, reply_id };
            if let Err(error) = state.store.announce(cancelled).await {
                tracing::warn!(error = %error, "could not announce a cancelled reply");
            }
        }
        if failed {
            tell_unavailable(&state, &room).await;
        }
        match next {
            Some(next) => reply_id = next,
            None => return,
        }
    }
}

/// One reply: stream it, then commit it if the session is still `BOT_ONLY`.
/// `Err` means the model failed and the client should be told. Also returns
/// the seq of the newest client message the model was shown.
async fn generate(
    state: &AppState,
    room: &Arc<Room>,
    reply_id: Uuid,
    answered_through: Option<i64>,
) -> (Result<Finished, ()>, Option<i64>) {
    // What the commits told the room, and the flags since: the history
    // must reach the newest seq a commit reported, and the flag decides how
    // the companion may answer.
    let (last_seq, risk) = room.reply_inputs();
    let kept = room.recent_history(last_seq);
    let mut history = match kept {
        Some(history) => history,
        None => match state.store.recent_messages(room.session_id, HISTORY_MESSAGES as i64).await {
            Ok(messages) => {
                room.keep_history(&messages);
                messages
            }
            Err(error) => {
                tracing::error!(error = %error, "companion could not read the history");
                return (Ok(Finished::Abandoned), None);
            }
        },
    };
    // Client messages that arrived while the previous reply was generated
    // were stored before it; put them after it, where the model answers them.
    if let Some(through) = answered_through {
        let unanswered = |message: &ChatMessage| message.sender == Sender::User && message.seq > through;
        let (late, mut ordered): (Vec<_>, Vec<_>) = history.into_iter().partition(unanswered);
        ordered.extend(late);
        history = ordered;
    }
    let seen =
        history.iter().filter(|message| message.sender == Sender::User).map(|message| message.seq).max();
    let guidance = match risk {
        Some(risk) if risk.level >= RiskLevel::High => Guidance::SafetyScript,
        // Once per flag: the first reply after it checks in on safety.
        Some(risk) => {
            let last_reply = history.iter().rev().find(|m| m.sender == Sender::Ai).map(|m| m.created_at);
            let flagged_since = last_reply.is_none_or(|at| at < risk.last_flagged_at);
            if flagged_since { Guidance::CheckIn } else { Guidance::Free }
        }
        None => Guidance::Free,
    };
    (stream_reply(state, room, reply_id, history, guidance).await, seen)
}

/// How the session's safety flag shapes the next reply (docs/safety.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Guidance {
    Free,
    /// At `concern`, once after each flag: check in about safety.
    CheckIn,
    /// At `high` and `imminent`: the fixed safety script, never the model.
    SafetyScript,
}

async fn stream_reply(
    state: &AppState,
    room: &Arc<Room>,
    reply_id: Uuid,
    history: Vec<ChatMessage>,
    guidance: Guidance,
) -> Result<Finished, ()> {
    let request = ReplyRequest {
        history: history
            .into_iter()
            .map(|message| Turn { sender: message.sender, kind: message.kind, content: message.content })
            .collect(),
        check_in_on_safety: guidance == Guidance::CheckIn,
    };

    // At `high` and `imminent` the vetted script answers, never the model.
    let responder: &dyn Responder =
        if guidance == Guidance::SafetyScript { &SafetyScript } else { &*state.responder };
    let responder_name = responder.name();
    let silenced = room.silenced();
    let asked = std::time::Instant::now();
    let mut chunks = responder.reply(request);
    let mut text = String::new();
    loop {
        // Dropping `chunks` on takeover closes the provider request at once.
        let chunk = tokio::select! {
            biased;
            () = silenced.cancelled() => {
                tracing::info!("companion reply cancelled: therapist joined");
                return Ok(Finished::Abandoned);
            }
            chunk = chunks.next() => chunk,
        };
        match chunk {
            Some(Ok(delta)) => {
                if text.is_empty() {
                    metrics::histogram!("haven_companion_first_delta_seconds", "provider" => responder_name)
                        .record(asked.elapsed().as_secs_f64());
                }
                text.push_str(&delta);
                if !room.publish_delta(reply_id, delta.clone()) {
                    tracing::info!("companion reply cancelled: therapist joined");
                    return Ok(Finished::Abandoned);
                }
                // Connections on other instances sharing the database.
                let delta = SessionEvent::Delta { session_id: room.session_id, reply_id, delta };
                if let Err(error) = state.store.announce(delta).await {
                    tracing::warn!(error = %error, "could not announce a companion delta");
                }
            }
            Some(Err(error)) => {
                // The error names the failure only, never anyone's words.
                tracing::warn!(responder = responder_name, error = %error, "companion failed");
                provider_failed(responder_name, error.kind());
                return Err(());
            }
            None => break,
        }
    }
    if text.trim().is_empty() {
        tracing::warn!(responder = responder_name, error = "the model returned no text", "companion failed");
        provider_failed(responder_name, ResponderError::Empty.kind());
        return Err(());
    }

    // The check that the session is still BOT_ONLY is part of the insert's
    // transaction: a therapist who joined while we were generating wins.
    match state
        .store
        .append_if_bot_only(room.session_id, BotMessage::Reply { id: reply_id, content: text })
        .await
    {
        Ok(committed) => match committed.outcome {
            Some(message) => {
                tracing::debug!(seq = message.seq, responder = responder_name, "companion reply stored");
                metrics::histogram!("haven_companion_reply_seconds", "provider" => responder_name)
                    .record(asked.elapsed().as_secs_f64());
                state.hub.apply(committed.events);
                Ok(Finished::Committed)
            }
            None => {
                tracing::info!("companion reply discarded: therapist joined");
                Ok(Finished::Abandoned)
            }
        },
        Err(error) => {
            tracing::error!(error = %error, "companion reply not stored");
            Err(())
        }
    }
}

/// Stores and publishes the "companion unavailable" notice, unless a
/// therapist joined meanwhile.
async fn tell_unavailable(state: &AppState, room: &Arc<Room>) {
    let notice = BotMessage::Notice { content: UNAVAILABLE_NOTICE.to_owned() };
    match state.store.append_if_bot_only(room.session_id, notice).await {
        Ok(committed) => {
            state.hub.apply(committed.events);
        }
        Err(error) => tracing::error!(error = %error, "companion notice not stored"),
    }
}

/// How many of the latest messages the companion is shown at most; the
/// responder then keeps what fits its budget.
pub const HISTORY_MESSAGES: usize = 200;

/// The most message text a room keeps for the companion: many times the
/// responder's default budget (8,000 characters), and a bound on what a
/// chatty session holds in memory.
pub const HISTORY_BYTES: usize = 256 * 1024;

/// The companion's state in one session, in this process. Its room holds
/// it under one lock, and sends a delta, the takeover and the close while
/// holding it: once [`Companion::silence`] has run, no reply starts,
/// streams or is answered again, and nothing of the conversation is kept.
#[derive(Debug, Default)]
pub struct Companion {
    /// A therapist joined, the chat was handed back (until the client's
    /// yes), or the chat closed.
    silenced: bool,
    /// Cancelled when the companion is silenced; a new one after a resume.
    silencer: CancellationToken,
    /// The companion resumed after a hand-back with this `resume` message
    /// (its id is a v7 id, ordered by time): replies begun before it are
    /// not relayed.
    resumed_after: Option<Uuid>,
    /// The reply being generated, if any. One at a time per session.
    in_flight: Option<Uuid>,
    /// Client messages arrived while a reply was being generated; the next
    /// reply answers all of them.
    more_to_answer: bool,
    /// The session's latest messages, kept from the first reply until the
    /// companion is silenced, so that a reply need not read them from the
    /// database.
    history: Option<History>,
    /// The newest seq that a commit asking for a reply reported: the next
    /// reply's history reaches it.
    through: i64,
    /// The session's flag as the commits reported it and the flags raised
    /// since made it (their [`CurrentRisk::max`]): the one copy the replies
    /// read.
    risk: Option<CurrentRisk>,
}

impl Companion {
    /// Starts a reply to a commit that reported the session up to seq
    /// `through`, flagged as `risk` says, unless one is running (then it is
    /// asked to answer again when done) or the companion is silenced.
    /// Returns its id.
    pub fn start(&mut self, through: i64, risk: Option<CurrentRisk>) -> Option<Uuid> {
        self.through = self.through.max(through);
        if let Some(risk) = risk {
            self.note_risk(risk);
        }
        if self.silenced {
            return None;
        }
        if self.in_flight.is_some() {
            self.more_to_answer = true;
            return None;
        }
        let reply_id = Uuid::now_v7();
        self.in_flight = Some(reply_id);
        Some(reply_id)
    }

    /// Ends reply `reply_id`. Returns whether it was the reply in flight
    /// (not one that a takeover already withdrew), and the id of a
    /// follow-up reply to generate now, when client messages came meanwhile.
    pub fn finish(&mut self, reply_id: Uuid) -> (bool, Option<Uuid>) {
        let current = self.in_flight == Some(reply_id);
        if current {
            self.in_flight = None;
        }
        if self.silenced || !std::mem::take(&mut self.more_to_answer) {
            return (current, None);
        }
        let next = Uuid::now_v7();
        self.in_flight = Some(next);
        (current, Some(next))
    }

    /// Silences the companion (for good, unless the chat is handed back and
    /// the client says yes) and forgets the conversation. Returns the reply
    /// in flight, whose partial text must be withdrawn.
    pub fn silence(&mut self) -> Option<Uuid> {
        self.silenced = true;
        self.silencer.cancel();
        self.history = None;
        self.in_flight.take()
    }

    /// After a hand-back, the client's yes (its `resume` message, when
    /// known): replies may start again.
    pub fn resume(&mut self, resume_message: Option<Uuid>) {
        if self.silenced {
            self.silenced = false;
            self.silencer = CancellationToken::new();
        }
        self.resumed_after = self.resumed_after.max(resume_message);
    }

    /// A flag raised in the session, here or on another instance.
    pub fn note_risk(&mut self, risk: CurrentRisk) {
        self.risk = Some(self.risk.map_or(risk, |known| known.max(risk)));
    }

    /// What the next reply needs of the session: the seq its history must
    /// reach, and the session's flag.
    pub fn reply_inputs(&self) -> (i64, Option<CurrentRisk>) {
        (self.through, self.risk)
    }

    /// Cancelled when the companion is silenced.
    pub fn silenced_token(&self) -> CancellationToken {
        self.silencer.clone()
    }

    /// Whether a piece of reply `reply_id`, generated by another instance,
    /// may be relayed: not while silenced, nor of a reply begun before the
    /// last resume.
    pub fn may_relay(&self, reply_id: Uuid) -> bool {
        !self.silenced && self.resumed_after.is_none_or(|after| reply_id > after)
    }

    /// Whether reply `reply_id` may stream a delta now.
    pub fn may_stream(&self, reply_id: Uuid) -> bool {
        !self.silenced && self.in_flight == Some(reply_id)
    }

    pub fn in_flight(&self) -> Option<Uuid> {
        self.in_flight
    }

    /// Adds a committed message to the history, if kept.
    pub fn remember(&mut self, message: &ChatMessage) {
        if let Some(kept) = self.history.as_mut() {
            kept.add(message.clone());
        }
    }

    /// Starts keeping the history from the latest messages, read from the
    /// database, unless the companion is silenced.
    pub fn keep_history(&mut self, latest: &[ChatMessage]) {
        if self.silenced {
            return;
        }
        let kept = self.history.get_or_insert_default();
        for message in latest {
            kept.add(message.clone());
        }
    }

    /// The latest kept messages in seq order, reaching at least `last_seq`,
    /// when none is missing in between; else the caller reads them from the
    /// database. Kept messages always end the conversation: they start as
    /// its latest messages read from the database, and grow at the end.
    pub fn recent_history(&self, last_seq: i64) -> Option<Vec<ChatMessage>> {
        let kept = &self.history.as_ref()?.messages;
        let (&first, &last) = (kept.first_key_value()?.0, kept.last_key_value()?.0);
        let gapless = usize::try_from(last - first + 1).is_ok_and(|span| span == kept.len());
        (gapless && last >= last_seq).then(|| kept.values().cloned().collect())
    }
}

/// The companion's history in one room: the latest messages by seq, at
/// most [`HISTORY_MESSAGES`] of them and [`HISTORY_BYTES`] of text.
#[derive(Debug, Default)]
struct History {
    messages: BTreeMap<i64, ChatMessage>,
    /// The text of `messages`, in bytes.
    bytes: usize,
}

impl History {
    fn add(&mut self, message: ChatMessage) {
        self.bytes += message.content.len();
        if let Some(replaced) = self.messages.insert(message.seq, message) {
            self.bytes -= replaced.content.len();
        }
        while self.messages.len() > HISTORY_MESSAGES
            || (self.bytes > HISTORY_BYTES && self.messages.len() > 1)
        {
            if let Some((_, dropped)) = self.messages.pop_first() {
                self.bytes -= dropped.content.len();
            }
        }
    }
}

fn provider_failed(provider: &'static str, kind: &'static str) {
    metrics::counter!("haven_provider_errors_total", "provider" => provider, "kind" => kind).increment(1);
}
