//! One admitted socket: the takeover on connect, replay from `since`, then
//! the live loop that stores client messages and delivers session events in
//! seq order.
//!
//! Frames to the client go through a bounded queue that the connection's
//! task writes out between its other steps, so a client that stops reading
//! fills only its own queue: it is disconnected when the queue is full and
//! can resume later with `since`.
//! A heartbeat pings the client, drops a silent one, and re-checks the
//! credential, so expired, revoked and disabled logins lose their sockets.

use std::collections::VecDeque;
use std::sync::Arc;
use std::task::{Poll, ready};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::future::BoxFuture;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use governor::DefaultDirectRateLimiter;
use haven_protocol::{
    AWAY_HAND_BACK_MESSAGE, ChatMessage, ChatMode, ClientInput, ErrorCode, FrameError, MessageKind,
    RESUME_MESSAGE, RiskLevel, Role, Sender, ServerFrame, close_code, join_message, parse_client_frame,
};
use haven_safety::Earlier;
use haven_store::{
    Action, Actor, Appended, Committed, Flagged, HandBackOutcome, JoinOutcome, NewMessage, Origin,
    ResumeOutcome, SessionEvent, StoreError, TrailEntry,
};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{broadcast, watch};
use tokio::time::Instant;
use tracing::{Instrument, Span, field};

use super::delivery::{Delivery, Live, Mode};
use super::hub::{ConnectionGuard, Event, Queue, Revocation, RiskAlert, RiskFeed, Room, frame_text};
use super::queue::OnDuty;
use super::{Admitted, MAX_MESSAGE_BYTES, companion};
use crate::startup::AppState;

/// Messages read from the database per query while catching up.
const CATCH_UP_PAGE: i64 = 500;

/// How long a replay may wait for room in a full queue before the client
/// counts as not reading.
const REPLAY_PATIENCE: Duration = Duration::from_secs(10);

/// The window over which refused (rate-limited) messages are counted.
const REFUSAL_WINDOW: Duration = Duration::from_secs(10);
/// A side's typing signals are passed on at most this often.
const TYPING_INTERVAL: Duration = Duration::from_secs(1);

/// Runs an admitted connection until either side closes it.
///
/// Not an `async fn`: the returned future, which each socket's task holds
/// for its whole life, keeps only the [`Connection`] built here. An async
/// block keeps room for what it captures in every state, so the arguments
/// it moved into the connection would be held twice.
pub fn run(state: AppState, admitted: Admitted, socket: WebSocket) -> impl Future<Output = ()> + Send {
    // Shutdown waits for this socket to send its close frame.
    let running = state.tasks.token();
    let (sink, incoming) = socket.split();
    let span = tracing::info_span!(
        "chat",
        session_id = %admitted.session_id,
        role = admitted.role.as_str(),
        chat_mode = field::Empty,
    );
    let entered = span.enter();
    let open = crate::prometheus::OpenSocket::new(admitted.role.as_str());
    let room = state.hub.room(admitted.session_id);
    // Subscribe before reading anything, so no event committed from here
    // on can fall between the backlog and the live stream.
    let events = room.subscribe();
    let revocations = state.hub.watch_revocations();
    // Therapists hear about every session they can see being flagged.
    let risks = admitted.therapist.as_ref().map(|therapist| Box::new(state.hub.watch_risks(therapist.id)));
    // A reply already streaming is not joined halfway: this connection
    // gets it as the committed message.
    let skipped_reply = room.reply_in_flight();
    let (guard, connections) = room.connect();
    let outbound = Outbound::new(sink, state.limits.settings.outbound_queue);
    let messages = state.limits.message_limiter();
    let own = Sender::from(admitted.role);
    // Before the client arrives: its arrival may change the queue.
    let queue = (own == Sender::User).then(|| state.hub.watch_queue());
    let mut connection = Connection {
        state,
        admitted,
        incoming,
        outbound,
        guard,
        events,
        revocations,
        risks,
        queue,
        told_queue: None,
        on_duty: None,
        read_marked: 0,
        delivery: Delivery::new(own, skipped_reply),
        messages,
        typing_since: None,
        present: false,
        refusals: VecDeque::new(),
        last_heard: Instant::now(),
        spoke: false,
        storing: None,
    };
    drop(entered);
    async move {
        let _running = running;
        let _open = open;
        // Rare or one-off steps are boxed: each socket's task holds its
        // future for the connection's whole life, sized by its largest step.
        let stop = match Box::pin(connection.open(connections)).await {
            Ok(()) => {
                Box::pin(connection.mark_read()).await;
                connection.live().await
            }
            Err(stop) => stop,
        };
        // A message already handed to the database is still acked (if the
        // socket can take it), published and answered.
        if let Some(mut storing) = connection.storing.take() {
            let stored = (&mut storing.commit).await;
            let _ = connection.on_stored(storing, stored);
        }
        connection.stop_typing();
        Box::pin(connection.mark_read()).await;
        connection.depart();
        match stop {
            Stop::Close(code, reason) => {
                connection.outbound.close(Some(CloseFrame { code, reason: reason.into() })).await
            }
            Stop::Disconnected => connection.outbound.close(None).await,
            // Dropped with the connection, unsent.
            Stop::SlowConsumer => tracing::warn!("client is not reading: disconnected"),
        }
        tracing::info!("disconnected");
    }
    .instrument(span)
}

/// Why the connection loop stopped.
enum Stop {
    /// The peer closed or is gone; nothing more can be sent.
    Disconnected,
    /// The client stopped reading and its queue is full: drop it.
    SlowConsumer,
    /// Close with this code and reason.
    Close(u16, &'static str),
}

impl From<StoreError> for Stop {
    fn from(error: StoreError) -> Self {
        tracing::error!(error = %error, "database error on an open connection");
        Stop::Close(close_code::INTERNAL_ERROR, "service temporarily unavailable, reconnect")
    }
}

fn too_big() -> Stop {
    tracing::info!("message too big: closing");
    Stop::Close(close_code::MESSAGE_TOO_BIG, "message too big")
}

/// A frame that could not be read: too big (1009), not UTF-8 (1007), or a
/// broken connection.
fn read_failure(error: axum::Error) -> Stop {
    match error.into_inner().downcast::<tungstenite::Error>().map(|error| *error) {
        Ok(tungstenite::Error::Capacity(_)) => too_big(),
        Ok(tungstenite::Error::Utf8(_)) => {
            tracing::info!("invalid UTF-8: closing");
            Stop::Close(close_code::INVALID_PAYLOAD, "invalid UTF-8")
        }
        Ok(tungstenite::Error::Protocol(_)) => Stop::Close(close_code::PROTOCOL_ERROR, "protocol error"),
        _ => Stop::Disconnected,
    }
}

/// Waits for the queue to change; never, for a connection that is not
/// told of it (or when the queue is gone at shutdown).
async fn queue_changed(queue: &mut Option<watch::Receiver<Arc<Queue>>>) {
    if let Some(receiver) = queue
        && receiver.changed().await.is_ok()
    {
        return;
    }
    std::future::pending().await
}

/// Waits for the next risk alert; never, for a connection without alerts.
async fn next_alert(risks: &mut Option<Box<RiskFeed>>) -> Result<RiskAlert, RecvError> {
    match risks {
        Some(risks) => risks.recv().await,
        None => std::future::pending().await,
    }
}

/// Logs a flag that committed (levels only, never words); its crisis
/// message and alert are among the write's events.
fn log_flag(detected: RiskLevel, flagged: Flagged) {
    tracing::warn!(
        detected = detected.as_str(),
        session_level = flagged.level.as_str(),
        crisis_message = flagged.referred,
        "client message flagged by the crisis detector"
    );
}

/// Asks the language model for a second opinion on a client message, in
/// the background: it may raise the detector's level, never lower it.
fn ask_second_opinion(state: &AppState, room: &Arc<Room>, seq: i64, detected: RiskLevel, text: String) {
    let opinion = state.responder.assess_risk(&text);
    let tasks = state.tasks.clone();
    let (state, session_id) = (state.clone(), room.session_id);
    let task = async move {
        let opinion = opinion.await;
        tracing::debug!(
            detected = detected.as_str(),
            opinion = opinion.map_or("none given", RiskLevel::as_str),
            "second opinion received"
        );
        let Some(level) = opinion.filter(|level| *level > detected) else { return };
        let flag = state.escalation.second_opinion(level);
        match state.store.flag_risk(session_id, seq, flag).await {
            Ok(flagged) => {
                log_flag(level, flagged.outcome);
                state.hub.apply(flagged.events);
            }
            Err(error) => tracing::error!(error = %error, "the model's risk flag was not stored"),
        }
    };
    tasks.spawn(task.in_current_span());
}

/// The socket's sending half and the frames waiting for it, written by the
/// connection's own task between its other steps (a task and a queue of
/// their own per socket cost an idle socket about 1 KiB).
struct Outbound {
    sink: SplitSink<WebSocket, Message>,
    queue: VecDeque<Message>,
    capacity: usize,
    /// Frames were handed to the sink and not flushed yet.
    unflushed: bool,
}

impl Outbound {
    fn new(sink: SplitSink<WebSocket, Message>, capacity: usize) -> Self {
        Self { sink, queue: VecDeque::new(), capacity: capacity.max(1), unflushed: false }
    }

    /// Queues a frame without waiting: a full queue means the client stopped
    /// reading.
    fn push(&mut self, frame: Message) -> Result<(), Stop> {
        if self.queue.len() >= self.capacity {
            return Err(Stop::SlowConsumer);
        }
        self.queue.push_back(frame);
        Ok(())
    }

    /// Queues a frame of a replay, waiting a while for room.
    async fn push_patiently(&mut self, frame: Message) -> Result<(), Stop> {
        if self.queue.len() >= self.capacity {
            tokio::time::timeout(REPLAY_PATIENCE, self.write()).await.map_err(|_| Stop::SlowConsumer)??;
        }
        self.push(frame)
    }

    /// Nothing is waiting to be written.
    fn is_idle(&self) -> bool {
        self.queue.is_empty() && !self.unflushed
    }

    /// Writes everything queued, with one flush: under load, fewer system
    /// calls; when idle, each frame at once. Pending while the socket takes
    /// no more. Safe to drop at any await: a frame leaves the queue only as
    /// the sink takes it.
    fn write(&mut self) -> impl Future<Output = Result<(), Stop>> + '_ {
        std::future::poll_fn(|cx| {
            while !self.queue.is_empty() {
                ready!(self.sink.poll_ready_unpin(cx)).map_err(|_| Stop::Disconnected)?;
                let Some(frame) = self.queue.pop_front() else { break };
                self.sink.start_send_unpin(frame).map_err(|_| Stop::Disconnected)?;
                self.unflushed = true;
            }
            if self.unflushed {
                ready!(self.sink.poll_flush_unpin(cx)).map_err(|_| Stop::Disconnected)?;
                self.unflushed = false;
            }
            // A burst's slots are not kept by an idle socket.
            self.queue = VecDeque::new();
            Poll::Ready(Ok(()))
        })
    }

    /// Sends what is queued, then the close frame if any, within a bound.
    async fn close(mut self, frame: Option<CloseFrame>) {
        if let Some(frame) = frame {
            self.queue.push_back(Message::Close(Some(frame)));
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            if self.write().await.is_ok() {
                let _ = self.sink.close().await;
            }
        })
        .await;
    }
}

struct Connection {
    state: AppState,
    admitted: Admitted,
    incoming: SplitStream<WebSocket>,
    outbound: Outbound,
    /// Keeps this connection counted in its room.
    guard: ConnectionGuard,
    events: broadcast::Receiver<Arc<Event>>,
    revocations: broadcast::Receiver<Revocation>,
    /// Flagged sessions, for therapist connections only.
    risks: Option<Box<RiskFeed>>,
    /// The waiting queue, for client connections until a therapist joins.
    queue: Option<watch::Receiver<Arc<Queue>>>,
    /// The client's last `queue` frame: therapists online, chats ahead.
    told_queue: Option<(u32, u32)>,
    /// Counts a therapist's connection as them being online.
    on_duty: Option<Box<OnDuty>>,
    /// The seq a therapist's reading was last recorded at.
    read_marked: i64,
    /// What the client has been told.
    delivery: Delivery,
    /// When this side last said it is typing, while its indicator is shown.
    typing_since: Option<Instant>,
    /// This socket counts in its side's presence in the room.
    present: bool,
    /// This connection's message rate.
    messages: DefaultDirectRateLimiter,
    /// When messages were refused for going over the rate, within the window.
    refusals: VecDeque<Instant>,
    /// When the client last sent anything (a frame or a pong).
    last_heard: Instant,
    /// A message was stored from this connection since the last heartbeat.
    spoke: bool,
    /// The client message being committed, if any.
    storing: Option<Storing>,
}

/// A client message on its way to the database.
struct Storing {
    client_id: String,
    /// Its ack was sent already: a catch-up read the committed message
    /// from the database before the commit's own result came back, and the
    /// ack must precede the message.
    acked: bool,
    /// The detector's level for it.
    detected: RiskLevel,
    /// The text to ask the model about, when it gives second opinions.
    second_opinion: Option<String>,
    /// When its frame arrived, for the ack latency metric.
    received: Instant,
    commit: BoxFuture<'static, haven_store::Result<Committed<Appended>>>,
}

/// The commit in flight; never, when there is none.
async fn next_commit(storing: &mut Option<Storing>) -> haven_store::Result<Committed<Appended>> {
    match storing {
        Some(storing) => (&mut storing.commit).await,
        None => std::future::pending().await,
    }
}

impl Connection {
    /// The takeover (for therapists), the `mode` frame and the replay.
    async fn open(&mut self, connections: usize) -> Result<(), Stop> {
        let store = self.state.store.clone();
        let session = store
            .chat_session(self.admitted.session_id)
            .await?
            .ok_or(Stop::Close(close_code::POLICY_VIOLATION, "unknown session"))?;
        self.delivery.mode = Mode::of(&session);
        if let Some(therapist) = &self.admitted.therapist {
            let message = join_message(&therapist.name);
            let address = Some(self.admitted.address);
            let joined = store.join_as_therapist(session.id, therapist.id, &message, address).await?;
            match joined.outcome {
                JoinOutcome::Joined => {
                    self.delivery.mode = Mode::THERAPIST_JOINED;
                    tracing::info!(therapist_id = %therapist.id, "therapist connecting: mode set to THERAPIST_JOINED");
                    self.state.hub.apply(joined.events);
                    tracing::info!("join message sent");
                }
                JoinOutcome::AlreadyJoined => self.delivery.mode = Mode::THERAPIST_JOINED,
                JoinOutcome::ClaimedByOther => {
                    let reason = "session is assigned to another therapist";
                    tracing::warn!(reason, "connection rejected");
                    return Err(Stop::Close(close_code::POLICY_VIOLATION, reason));
                }
            }
        }
        Span::current().record("chat_mode", self.delivery.mode.chat_mode.as_str());
        tracing::info!(connections, "connected");
        if let Some(therapist) = &self.admitted.therapist {
            self.on_duty = Some(Box::new(OnDuty::start(&self.state, therapist.id)));
        }

        self.send(self.delivery.mode.frame())?;
        let own = Sender::from(self.admitted.role);
        let name = self.admitted.therapist.as_ref().map(|therapist| therapist.name.as_str());
        if let Some(arrived) = self.state.hub.arrive(self.guard.room(), own, name) {
            self.announce(arrived);
        }
        self.present = true;
        let other = if own == Sender::User { Sender::Therapist } else { Sender::User };
        if let Some(frame) = self.guard.room().presence_frame(other) {
            self.send(frame)?;
        }
        self.tell_queue()?;
        if own == Sender::User {
            self.send(ServerFrame::Sharing { shared: session.companion_shared })?;
        }
        // Messages up to `session.last_seq` come from the database (when asked
        // for with `since`); everything after it arrives as live events.
        match self.admitted.since {
            Some(since) => {
                self.delivery.last_seq = since.clamp(0, session.last_seq);
                self.catch_up(session.last_seq).await?;
            }
            None => self.delivery.last_seq = session.last_seq,
        }
        Ok(())
    }

    async fn live(&mut self) -> Stop {
        let shutdown = self.state.shutdown.clone();
        let period = Duration::from_secs(self.state.limits.settings.heartbeat_seconds.max(1));
        let mut heartbeat = tokio::time::interval_at(Instant::now() + period, period);
        loop {
            let step = tokio::select! {
                () = shutdown.cancelled() => {
                    return Stop::Close(close_code::GOING_AWAY, "server shutting down, reconnect with since");
                }
                stored = next_commit(&mut self.storing) => match self.storing.take() {
                    Some(storing) => self.on_stored(storing, stored),
                    None => Ok(()),
                },
                written = self.outbound.write(), if !self.outbound.is_idle() => written,
                incoming = self.incoming.next(), if self.storing.is_none() => {
                    self.last_heard = Instant::now();
                    match incoming {
                        Some(Ok(Message::Text(text))) if text.len() > MAX_MESSAGE_BYTES => return too_big(),
                        Some(Ok(Message::Binary(bytes))) if bytes.len() > MAX_MESSAGE_BYTES => return too_big(),
                        Some(Ok(Message::Text(text))) => match parse_client_frame(&text) {
                            Ok(ClientInput::ResumeCompanion) => Box::pin(self.resume_companion()).await,
                            parsed => self.on_frame(parsed),
                        },
                        Some(Ok(Message::Binary(_))) => self.refuse(ErrorCode::UnsupportedFrame, "send JSON text frames"),
                        // Pings are answered by the WebSocket layer itself.
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => Ok(()),
                        Some(Ok(Message::Close(_))) | None => return Stop::Disconnected,
                        Some(Err(error)) => return read_failure(error),
                    }
                }
                event = self.events.recv() => match event {
                    Ok(event) => self.deliver(event).await,
                    Err(RecvError::Lagged(missed)) => {
                        tracing::debug!(missed, "event stream lagged: catching up from the database");
                        Box::pin(self.resync()).await
                    }
                    Err(RecvError::Closed) => return Stop::Close(close_code::GOING_AWAY, "session closed"),
                },
                revoked = self.revocations.recv() => match revoked.map(|revocation| self.closed_by(revocation)) {
                    Ok(Some(reason)) => {
                        tracing::info!(reason, "revoked: closing");
                        return Stop::Close(close_code::POLICY_VIOLATION, reason);
                    }
                    // Missed revocations are caught by the heartbeat's re-check.
                    Ok(_) | Err(RecvError::Lagged(_)) => Ok(()),
                    Err(RecvError::Closed) => Ok(()),
                },
                alert = next_alert(&mut self.risks) => match alert {
                    Ok(alert) => self.alert(alert),
                    Err(RecvError::Lagged(missed)) => {
                        tracing::warn!(missed, "risk alerts lagged: the dashboard list has them");
                        Ok(())
                    }
                    Err(RecvError::Closed) => {
                        self.risks = None;
                        Ok(())
                    }
                },
                () = queue_changed(&mut self.queue) => self.tell_queue(),
                _ = heartbeat.tick() => Box::pin(self.beat(period)).await,
            };
            if let Err(stop) = step {
                return stop;
            }
        }
    }

    /// Tells a waiting client its place in the queue, if it changed. Once a
    /// therapist has taken the chat it is no longer waiting, for good.
    fn tell_queue(&mut self) -> Result<(), Stop> {
        let Some(queue) = &mut self.queue else { return Ok(()) };
        if self.delivery.mode.chat_mode == ChatMode::TherapistJoined {
            self.queue = None;
            return Ok(());
        }
        let place = {
            let queue = queue.borrow_and_update();
            queue.ahead.get(&self.admitted.session_id).map(|&ahead| (queue.therapists_online, ahead))
        };
        match place {
            Some((therapists_online, ahead)) if place != self.told_queue => {
                self.told_queue = place;
                self.send(ServerFrame::Queue { therapists_online, ahead })
            }
            _ => Ok(()),
        }
    }

    /// Tells a therapist about a flagged session they can see.
    fn alert(&mut self, alert: RiskAlert) -> Result<(), Stop> {
        self.send(ServerFrame::Risk { session_id: alert.session_id, level: alert.level })
    }

    /// The close reason, when a revocation concerns this connection: its
    /// credential, or its chat.
    fn closed_by(&self, revocation: Revocation) -> Option<&'static str> {
        let revoked = match revocation {
            Revocation::Login(hash) => hash == self.admitted.token_hash,
            Revocation::Therapist(id) => self.admitted.therapist.as_ref().is_some_and(|t| t.id == id),
            Revocation::Chat(session_id) => {
                return (session_id == self.admitted.session_id).then_some("chat erased");
            }
        };
        revoked.then_some("credential revoked")
    }

    /// Drops a client silent for two periods, re-checks the credential, pings.
    async fn beat(&mut self, period: Duration) -> Result<(), Stop> {
        if self.last_heard.elapsed() > 2 * period {
            tracing::info!("heartbeat timeout: closing");
            return Err(Stop::Close(close_code::GOING_AWAY, "heartbeat timeout"));
        }
        let store = &self.state.store;
        let hash = &self.admitted.token_hash;
        let valid = match self.admitted.role {
            // Only a therapist who wrote since the last beat counts as active;
            // an open but idle socket does not keep the login alive.
            Role::Therapist => store
                .therapist_by_token(
                    hash,
                    haven_store::now(),
                    self.state.settings.therapist_idle,
                    std::mem::take(&mut self.spoke),
                )
                .await
                .map(|therapist| therapist.is_some()),
            Role::User => store
                .session_for_client_token(hash)
                .await
                .map(|session| session == Some(self.admitted.session_id)),
        };
        match valid {
            Ok(false) => {
                tracing::info!("credential expired or revoked: closing");
                return Err(Stop::Close(close_code::POLICY_VIOLATION, "credential expired or revoked"));
            }
            // A database outage is not the client's fault: keep the socket.
            Err(error) => tracing::warn!(error = %error, "credential re-check failed"),
            Ok(true) => self.mark_read().await,
        }
        self.outbound.push(Message::Ping(Default::default()))
    }

    /// Records how far a therapist's page has been sent the chat, when it
    /// moved on since the last time: at connect, at each heartbeat and at
    /// the end. The appointments lists' unread counts follow.
    async fn mark_read(&mut self) {
        let Some(therapist) = &self.admitted.therapist else { return };
        let (session_id, seq) = (self.admitted.session_id, self.delivery.last_seq);
        if seq <= self.read_marked {
            return;
        }
        match self.state.store.mark_read(therapist.id, session_id, seq).await {
            Ok(()) => {
                self.read_marked = seq;
                self.announce(SessionEvent::Read { session_id });
            }
            Err(error) => tracing::warn!(error = %error, "could not record how far the therapist read"),
        }
    }

    /// A client frame: validate, screen, and start its commit. The result
    /// is handled by [`Connection::on_stored`] once committed; meanwhile
    /// this connection keeps delivering events (the join message among
    /// them) but reads no further frame, so its messages stay in order.
    fn on_frame(&mut self, parsed: Result<ClientInput, FrameError>) -> Result<(), Stop> {
        if let Ok(ClientInput::Typing { active }) = parsed {
            self.on_typing(active);
            return Ok(());
        }
        if self.messages.check().is_err() {
            let client_id = match parsed {
                Ok(ClientInput::Message(new)) => Some(new.client_id),
                _ => None,
            };
            return self.refuse_over_rate(client_id);
        }
        let new = match parsed {
            Ok(ClientInput::Message(new)) => new,
            Ok(ClientInput::Typing { .. } | ClientInput::ResumeCompanion) => return Ok(()),
            Err(error) => {
                tracing::info!(code = ?error.code, "frame refused");
                return self.send(error.into_frame());
            }
        };
        let received = Instant::now();
        let role = self.admitted.role;
        tracing::debug!("message received");
        // Every client message is screened before it is stored, with the
        // client's latest earlier messages, so a flag and its crisis message
        // commit with it; nothing here needs a language model, which gets
        // the same window for its second opinion.
        let earlier = if role == Role::User { self.guard.room().client_window() } else { Vec::new() };
        let earlier: Vec<&Earlier> = earlier.iter().map(|message| &**message).collect();
        let assessment = (role == Role::User).then(|| {
            let screened = Arc::new(Earlier::new(new.content.clone()));
            let assessment = self.state.escalation.screen(&screened, &earlier);
            self.guard.room().screened(screened);
            assessment
        });
        let detected = assessment.as_ref().map_or(RiskLevel::None, |(assessment, _)| assessment.level);
        let risk = assessment.and_then(|(_, flag)| flag);
        let second_opinion = (role == Role::User && self.state.settings.safety_second_opinion)
            .then(|| crate::safety::second_opinion_text(&earlier, &new.content));
        let client_id = new.client_id.clone();
        let store = self.state.store.clone();
        let session_id = self.admitted.session_id;
        let message =
            NewMessage { sender: role.into(), content: new.content, client_id: new.client_id, risk };
        let commit = Box::pin(async move { store.append_message(session_id, message).await });
        self.storing = Some(Storing { client_id, acked: false, detected, second_opinion, received, commit });
        Ok(())
    }

    /// The client's yes to the companion after a hand-back: stored as a
    /// `resume` message; the companion then answers a client message that
    /// came after the hand-back, if any. Counted against the message rate.
    async fn resume_companion(&mut self) -> Result<(), Stop> {
        if self.admitted.role != Role::User {
            return self.refuse(ErrorCode::NotAllowed, "only the client can ask the companion to continue");
        }
        if self.messages.check().is_err() {
            return self.refuse_over_rate(None);
        }
        let mut resumed = self.state.store.resume_companion(self.admitted.session_id, RESUME_MESSAGE).await;
        if matches!(resumed, Ok(Committed { outcome: ResumeOutcome::NotPaused, .. }))
            && self.delivery.mode.chat_mode == ChatMode::TherapistJoined
        {
            if !Box::pin(self.hand_back_while_away()).await? {
                return Ok(());
            }
            resumed = self.state.store.resume_companion(self.admitted.session_id, RESUME_MESSAGE).await;
        }
        match resumed {
            Ok(Committed { outcome: ResumeOutcome::Resumed { unanswered, seq, risk }, events }) => {
                tracing::info!("client chose to continue with the companion");
                self.state.hub.apply(events);
                if unanswered {
                    companion::spawn(&self.state, self.guard.room(), seq, risk);
                }
                Ok(())
            }
            Ok(Committed { outcome: ResumeOutcome::NotPaused, .. }) => {
                self.refuse(ErrorCode::NotPaused, "the companion is not waiting for an answer")
            }
            Err(error) => {
                tracing::error!(error = %error, "resume not stored");
                self.refuse(ErrorCode::Unavailable, "the companion could not be asked to continue; try again")
            }
        }
    }

    /// The client's `resume_companion` while a therapist is joined: once the
    /// therapist has had no socket open for the away time, hands the chat
    /// back on their behalf, as they would (the caller then resumes it, as
    /// after their hand-back). `false`: refused, and the client told why.
    async fn hand_back_while_away(&mut self) -> Result<bool, Stop> {
        let away = Duration::from_secs(self.state.limits.settings.therapist_away_seconds);
        if self.guard.room().therapist_away_for().is_none_or(|gone| gone < away) {
            let message = format!("the therapist is in the chat or left less than {} s ago", away.as_secs());
            self.refuse(ErrorCode::TherapistHere, &message)?;
            return Ok(false);
        }
        let store = self.state.store.clone();
        let session_id = self.admitted.session_id;
        let therapist_id = store.chat_session(session_id).await?.and_then(|session| session.therapist_id);
        let handed = match therapist_id {
            Some(therapist_id) => {
                // Asked for by the client, whose address is not recorded.
                let by = Origin::new(Actor::Client, None);
                store.hand_back(session_id, therapist_id, None, AWAY_HAND_BACK_MESSAGE, by).await?
            }
            None => return Ok(true),
        };
        if matches!(handed.outcome, HandBackOutcome::HandedBack) {
            tracing::info!("therapist away: chat handed back at the client's request");
            self.state.hub.apply(handed.events);
        }
        // Otherwise handed back or closed meanwhile: resuming says which.
        Ok(true)
    }

    /// A typing signal: passed on to the other side of the chat, here and on
    /// other instances, at most once per [`TYPING_INTERVAL`] while active
    /// (more are dropped, with no error: they carry nothing new). Not
    /// stored, and never seen by the companion.
    fn on_typing(&mut self, active: bool) {
        let now = Instant::now();
        if active && self.typing_since.is_some_and(|since| now.duration_since(since) < TYPING_INTERVAL) {
            return;
        }
        if !active && self.typing_since.is_none() {
            return;
        }
        self.typing_since = active.then_some(now);
        self.announce_typing(active);
    }

    /// Ends this side's typing indicator, if it is shown: at a stored
    /// message, and when the connection ends.
    fn stop_typing(&mut self) {
        if self.typing_since.take().is_some() {
            self.announce_typing(false);
        }
    }

    fn announce_typing(&self, active: bool) {
        self.announce(SessionEvent::Typing {
            session_id: self.admitted.session_id,
            sender: self.admitted.role.into(),
            active,
        });
    }

    /// This side's sockets here are all closed now, if this was the last.
    fn depart(&mut self) {
        if std::mem::take(&mut self.present) {
            let own = Sender::from(self.admitted.role);
            if let Some(departed) = self.state.hub.depart(self.guard.room(), own) {
                self.announce(departed);
            }
        }
    }

    fn announce(&self, event: SessionEvent) {
        super::announce(&self.state, event);
    }

    /// A client message's commit ended: ack, publish, escalate, and let the
    /// companion answer only if the session is still `BOT_ONLY`.
    fn on_stored(
        &mut self,
        storing: Storing,
        stored: haven_store::Result<Committed<Appended>>,
    ) -> Result<(), Stop> {
        let Storing { client_id, acked, detected, second_opinion, received, .. } = storing;
        let role = self.admitted.role;
        match stored {
            Ok(Committed {
                outcome: Appended::Stored { seq, chat_mode, companion_paused, risk, flagged },
                events,
            }) => {
                self.spoke = true;
                self.stop_typing();
                // The message is committed: it is published and answered even
                // if this client is already gone and never sees its ack.
                let acked = if acked {
                    Ok(())
                } else {
                    record_ack_latency(received);
                    self.send(ServerFrame::Ack { client_id, seq })
                };
                tracing::debug!(seq, chat_mode = chat_mode.as_str(), "message stored");
                if let Some(flagged) = flagged {
                    log_flag(detected, flagged);
                }
                let frame = self.state.hub.apply(events);
                if let Some(text) = second_opinion {
                    ask_second_opinion(&self.state, self.guard.room(), seq, detected, text);
                }
                if chat_mode == ChatMode::TherapistJoined {
                    tracing::debug!(chat_mode = chat_mode.as_str(), "companion will not respond");
                } else if companion_paused {
                    tracing::debug!(chat_mode = chat_mode.as_str(), "companion waits for the client's yes");
                } else if role == Role::User {
                    tracing::debug!(chat_mode = chat_mode.as_str(), "generating companion reply");
                    companion::spawn(&self.state, self.guard.room(), seq, risk);
                }
                match frame {
                    Some(frame) => acked.and_then(|()| self.send_own(seq, frame)),
                    None => acked,
                }
            }
            Ok(Committed { outcome: Appended::Closed, .. }) => {
                tracing::info!("message refused: the chat is closed");
                self.send(ServerFrame::Error {
                    code: ErrorCode::ChatClosed,
                    message: "this chat was closed by the therapist; the message was not stored".into(),
                    client_id: Some(client_id),
                })?;
                Err(Stop::Close(close_code::POLICY_VIOLATION, "chat closed"))
            }
            Ok(Committed { outcome: Appended::Duplicate { seq }, .. }) => {
                tracing::debug!(seq, "duplicate client_id: original ack sent again");
                if acked { Ok(()) } else { self.send(ServerFrame::Ack { client_id, seq }) }
            }
            Err(error) => {
                tracing::error!(error = %error, "message not stored");
                let frame = ServerFrame::Error {
                    code: ErrorCode::Unavailable,
                    message: "the message was not stored; send it again with the same client_id".into(),
                    client_id: Some(client_id),
                };
                self.send(frame)
            }
        }
    }

    /// A message over the rate: refused, not stored; it may be sent again
    /// later with the same `client_id`. Too many refusals close the socket.
    fn refuse_over_rate(&mut self, client_id: Option<String>) -> Result<(), Stop> {
        let now = Instant::now();
        while self.refusals.front().is_some_and(|first| now.duration_since(*first) > REFUSAL_WINDOW) {
            self.refusals.pop_front();
        }
        self.refusals.push_back(now);
        crate::limits::count_refusal("message_rate");
        if self.refusals.len() > self.state.limits.settings.refusals_before_close {
            tracing::warn!("rate limit exceeded repeatedly: closing");
            return Err(Stop::Close(close_code::POLICY_VIOLATION, "rate limit exceeded"));
        }
        tracing::info!("message refused: rate limited");
        self.send(ServerFrame::Error {
            code: ErrorCode::RateLimited,
            message: "too many messages; send it again later with the same client_id".into(),
            client_id,
        })
    }

    /// Sends this connection's own message right after its ack, in one
    /// write, when it is the next one the client needs and the session is
    /// `THERAPIST_JOINED`: then nothing but numbered messages reaches the
    /// connection, so no other tab could see it in a different place. Its
    /// event, coming back through the room, is then dropped as delivered.
    fn send_own(&mut self, seq: i64, frame: Utf8Bytes) -> Result<(), Stop> {
        if self.delivery.mode != Mode::THERAPIST_JOINED || seq != self.delivery.last_seq + 1 {
            return Ok(());
        }
        self.outbound.push(Message::Text(frame))?;
        self.delivery.last_seq = seq;
        Ok(())
    }

    fn refuse(&mut self, code: ErrorCode, message: &str) -> Result<(), Stop> {
        self.send(ServerFrame::Error { code, message: message.into(), client_id: None })
    }

    /// Sends an event's message in seq order, filling any gap from the
    /// database first and skipping what the client already has.
    async fn deliver(&mut self, event: Arc<Event>) -> Result<(), Stop> {
        match self.delivery.live(&event) {
            Live::Resync => return Box::pin(self.resync()).await,
            Live::Send => self.outbound.push(Message::Text(event.frame.clone()))?,
            Live::Skip => {}
        }
        if event.closes {
            tracing::info!("chat closed: closing");
            return Err(Stop::Close(close_code::POLICY_VIOLATION, "chat closed"));
        }
        if let Some(mode) = event.mode {
            self.tell_mode(mode)?;
        }
        if event.hands_back {
            self.leave_if_handed_back()?;
        }
        Ok(())
    }

    /// Sends every stored message with `last_seq < seq <= up_to`, reading
    /// what each is from its kind, never its text. A therapist's pages are
    /// recorded in the audit trail as reads, and hide what the client keeps
    /// private of the conversation with the companion.
    async fn catch_up(&mut self, up_to: i64) -> Result<(), Stop> {
        let (store, session_id) = (self.state.store.clone(), self.admitted.session_id);
        // The choice and the first join are fixed once a therapist is in.
        let session = match &self.admitted.therapist {
            Some(_) => Some(store.chat_session(session_id).await?.ok_or(StoreError::NotFound)?),
            None => None,
        };
        while self.delivery.last_seq < up_to {
            let (after, page) = (self.delivery.last_seq, (up_to - self.delivery.last_seq).min(CATCH_UP_PAGE));
            let messages = match (&self.admitted.therapist, &session) {
                (Some(therapist), Some(session)) => {
                    let read = TrailEntry::new(Actor::Therapist(therapist.id), Action::Read)
                        .address(Some(self.admitted.address));
                    let messages = store.read_messages(session_id, after, page, read).await?;
                    messages.into_iter().map(|message| session.for_therapists(message)).collect()
                }
                _ => store.messages_after(session_id, after, page).await?,
            };
            if messages.is_empty() {
                break;
            }
            for message in messages {
                self.ack_before_own(&message)?;
                self.delivery.stored(&message);
                let kind = message.kind;
                self.outbound
                    .push_patiently(Message::Text(frame_text(&ServerFrame::Message(message))))
                    .await?;
                // As live: the mode frame follows a message that changed
                // it, and the socket closes after the closing message. (A
                // therapist's socket leaves a chat handed back once the
                // replay ends in that mode: a later join may follow here.)
                if let Some(mode) = Mode::after(kind) {
                    self.tell_mode(mode)?;
                }
                if kind == MessageKind::Close {
                    tracing::info!("chat closed: closing");
                    return Err(Stop::Close(close_code::POLICY_VIOLATION, "chat closed"));
                }
            }
        }
        Ok(())
    }

    /// Sends the ack of this connection's message being committed before
    /// the message itself, when a catch-up finds it first.
    fn ack_before_own(&mut self, message: &ChatMessage) -> Result<(), Stop> {
        let own = Sender::from(self.admitted.role);
        let Some(storing) = self.storing.as_mut() else { return Ok(()) };
        if storing.acked || message.sender != own || message.client_id.as_ref() != Some(&storing.client_id) {
            return Ok(());
        }
        storing.acked = true;
        record_ack_latency(storing.received);
        let client_id = storing.client_id.clone();
        self.send(ServerFrame::Ack { client_id, seq: message.seq })
    }

    /// After missed events: everything stored since `last_seq`, and the mode.
    async fn resync(&mut self) -> Result<(), Stop> {
        let session = self
            .state
            .store
            .chat_session(self.admitted.session_id)
            .await?
            .ok_or(Stop::Close(close_code::GOING_AWAY, "session closed"))?;
        self.catch_up(session.last_seq).await?;
        self.tell_mode(Mode::of(&session))?;
        self.leave_if_handed_back()
    }

    fn tell_mode(&mut self, mode: Mode) -> Result<(), Stop> {
        if self.delivery.tell_mode(mode) {
            Span::current().record("chat_mode", mode.chat_mode.as_str());
            self.send(mode.frame())?;
        }
        Ok(())
    }

    /// A therapist's socket closes (1000) once the chat is handed back: its
    /// page offers to join again, which is a new join.
    fn leave_if_handed_back(&self) -> Result<(), Stop> {
        if self.admitted.role == Role::Therapist && self.delivery.mode.chat_mode == ChatMode::BotOnly {
            tracing::info!("chat handed back: closing the therapist's socket");
            return Err(Stop::Close(close_code::NORMAL, "handed back"));
        }
        Ok(())
    }

    fn send(&mut self, frame: ServerFrame) -> Result<(), Stop> {
        self.outbound.push(Message::Text(frame_text(&frame)))
    }
}

/// From a message's arrival to its ack, after its commit.
fn record_ack_latency(received: Instant) {
    metrics::histogram!("haven_ack_latency_seconds").record(received.elapsed().as_secs_f64());
}
