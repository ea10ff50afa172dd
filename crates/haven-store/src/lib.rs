//! Haven's storage interface.
//!
//! Everything the server persists goes through [`Store`]: methods are named
//! for what the product does (`append_message`, `join_as_therapist`), and each
//! multi-step write is one transaction, so the invariants Haven promises —
//! gap-free seqs, `client_id` de-duplication, the atomic takeover — are kept by
//! the database rather than by the caller. [`SqliteStore`] is the embedded
//! default; [`PgStore`] serves several instances from one database. Both
//! run the same transaction scripts (`scripts.rs`), written once.

use std::net::IpAddr;

use async_trait::async_trait;
use haven_protocol::{ChatMessage, ChatMode, MessageKind, RiskLevel, Sender, api::AppointmentStatus};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

pub mod backup;
mod batch;
mod postgres;
mod rows;
mod scripts;
mod sqlite;
pub mod trail;

pub use postgres::PgStore;
pub use sqlite::SqliteStore;
pub use trail::{Action, Actor, Origin, TrailEntry, TrailFilter, TrailRecord};

/// Storage failures, as callers need to tell them apart.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    /// A uniqueness rule was broken, e.g. an e-mail address already in use.
    #[error("conflict: {0}")]
    Conflict(&'static str),
    /// The database could not be reached or failed; the operation had no effect.
    #[error("database unavailable")]
    Unavailable(#[source] sqlx::Error),
    /// The stored data does not make sense (e.g. an unknown enum value).
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        match error {
            sqlx::Error::RowNotFound => StoreError::NotFound,
            other => StoreError::Unavailable(other),
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A therapist account (without its password hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Therapist {
    pub id: Uuid,
    pub email: String,
    pub name: String,
    pub created_at: OffsetDateTime,
    /// A disabled account cannot log in and has no valid login.
    pub disabled: bool,
}

/// What a new therapist account is made of.
#[derive(Debug, Clone)]
pub struct NewTherapist {
    /// Already normalised (trimmed, lower case).
    pub email: String,
    pub name: String,
    /// An argon2id PHC string.
    pub password_hash: String,
}

/// A chat session together with its appointment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatSession {
    pub id: Uuid,
    pub appointment_id: Uuid,
    pub therapist_id: Option<Uuid>,
    pub status: AppointmentStatus,
    pub chat_mode: ChatMode,
    /// The seq of the newest message (0 when there is none).
    pub last_seq: i64,
    pub created_at: OffsetDateTime,
    pub last_message_at: Option<OffsetDateTime>,
    /// Closed by its therapist: off every list; its client credential only
    /// reads the transcript.
    pub closed_at: Option<OffsetDateTime>,
    /// Handed back by its therapist, and the client has not yet said yes to
    /// the companion: `BOT_ONLY`, but the companion stays silent.
    pub companion_paused: bool,
    /// The client's choice: may the therapist see the companion part (the
    /// messages before the first join)? `None` until they choose, which
    /// counts as no.
    pub companion_shared: Option<bool>,
    /// The seq of the first join message: the companion part ends there.
    pub first_join_seq: Option<i64>,
    /// Set once the safety detector flagged a client message; never cleared.
    pub risk: Option<RiskState>,
}

impl ChatSession {
    /// Whether message `seq` is hidden from therapists: part of the
    /// conversation with the companion before the first join, which the
    /// client has not chosen to share.
    pub fn hides_from_therapists(&self, seq: i64) -> bool {
        self.companion_shared != Some(true) && self.first_join_seq.is_none_or(|first| seq < first)
    }

    /// `message` as a therapist may see it: without its text, marked
    /// `private`, where [`ChatSession::hides_from_therapists`].
    pub fn for_therapists(&self, message: ChatMessage) -> ChatMessage {
        if self.hides_from_therapists(message.seq) {
            ChatMessage { content: String::new(), private: true, ..message }
        } else {
            message
        }
    }
}

/// The result of [`Store::set_companion_shared`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharingOutcome {
    /// Recorded, in the audit trail too; the [`SessionEvent::Sharing`] is
    /// among the write's events.
    Set,
    /// A therapist has joined: the choice is fixed; nothing was written.
    Joined,
}

/// What a therapist's list shows of a chat beyond its session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glance {
    /// Messages from the client and the companion after what the
    /// therapist has read.
    pub unread: i64,
    /// The newest message, if any.
    pub last: Option<ChatMessage>,
}

/// A session's safety flag: the highest level seen, when, and whether a
/// therapist has acknowledged it since.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RiskState {
    pub level: RiskLevel,
    pub first_flagged_at: OffsetDateTime,
    pub last_flagged_at: OffsetDateTime,
    /// The latest acknowledgement. A flag raised after it makes the session
    /// unacknowledged again.
    pub acknowledged_at: Option<OffsetDateTime>,
    pub acknowledged_by: Option<Uuid>,
}

impl RiskState {
    /// Flagged since the last acknowledgement (or never acknowledged).
    pub fn needs_attention(&self) -> bool {
        self.acknowledged_at.is_none_or(|at| at < self.last_flagged_at)
    }
}

/// What the safety detector found in a message, stored with it.
#[derive(Debug, Clone)]
pub struct RiskFlag {
    /// Above `none`.
    pub level: RiskLevel,
    /// The ids of the rules that fired (never the message's words).
    pub rules: Vec<String>,
    pub detector_version: String,
    /// A `system` message with crisis resources, appended after the flagged
    /// message when the session's level rises (not again for the same level).
    pub crisis_message: String,
}

/// What flagging did to the session. The crisis message and the alert
/// are among the write's [`SessionEvent`]s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flagged {
    /// The session's level after the flag (the highest so far).
    pub level: RiskLevel,
    /// The level rose, and the crisis message was appended.
    pub referred: bool,
    /// When the flag was raised.
    pub at: OffsetDateTime,
}

/// A session's safety flag as a write found it, in its transaction: the
/// highest level so far, and when a flag was last raised. The companion's
/// next reply is shaped by it (docs/safety.md). The level only rises, and
/// the time only moves on, so of two readings the later one is the
/// [`max`](CurrentRisk::max) of both, whichever arrived first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CurrentRisk {
    pub level: RiskLevel,
    pub last_flagged_at: OffsetDateTime,
}

impl CurrentRisk {
    /// What both readings together say: the higher level, the later flag.
    pub fn max(self, other: CurrentRisk) -> CurrentRisk {
        CurrentRisk {
            level: self.level.max(other.level),
            last_flagged_at: self.last_flagged_at.max(other.last_flagged_at),
        }
    }
}

/// The result of [`Store::acknowledge_risk`].
#[derive(Debug, Clone)]
pub enum AcknowledgeOutcome {
    Acknowledged(RiskState),
    /// The session has no flag; nothing was written.
    NotFlagged,
    /// The session is assigned to another therapist; nothing was written.
    NotYours,
}

/// One line of a session's safety audit trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    pub at: OffsetDateTime,
    pub kind: AuditKind,
    pub level: RiskLevel,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditKind {
    /// The detector (or the model's second opinion) flagged the message `seq`.
    Flagged {
        seq: i64,
        rules: Vec<String>,
        detector_version: String,
        /// Crisis resources were sent to the client with this flag.
        referred: bool,
    },
    /// A therapist acknowledged the flag, with an optional note.
    Acknowledged { therapist_id: Uuid, note: Option<String> },
}

/// Counts for reporting (e.g. SB 243's yearly count of crisis referrals).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SafetyReport {
    /// Crisis messages sent, by level, from the referral counter.
    pub referrals: Vec<(RiskLevel, i64)>,
    /// Flagged messages, by level, from the audit trail.
    pub flags: Vec<(RiskLevel, i64)>,
    /// Sessions flagged, and of those, the ones awaiting acknowledgement.
    pub flagged_sessions: i64,
    pub unacknowledged_sessions: i64,
}

/// A message from a connection, after validation.
#[derive(Debug, Clone)]
pub struct NewMessage {
    /// `user` or `therapist`: the role of the connection it came from.
    pub sender: Sender,
    pub content: String,
    pub client_id: String,
    /// Set when the safety detector flagged this (client) message: the flag is
    /// stored in the same transaction as the message.
    pub risk: Option<RiskFlag>,
}

/// A message written on the companion's side of a `BOT_ONLY` session.
#[derive(Debug, Clone)]
pub enum BotMessage {
    /// A companion reply; its `id` is the `reply_id` its deltas carried.
    Reply { id: Uuid, content: String },
    /// A `system` notice to the client.
    Notice { content: String },
}

/// The result of [`Store::append_message`].
#[derive(Debug, Clone)]
pub enum Appended {
    /// Committed now with this seq. `chat_mode`, `companion_paused` and
    /// `risk` are the session's in the same transaction, after the
    /// message's own flag if any: the companion's reply reads none of them
    /// again.
    Stored {
        seq: i64,
        chat_mode: ChatMode,
        companion_paused: bool,
        risk: Option<CurrentRisk>,
        flagged: Option<Flagged>,
    },
    /// This `client_id` was already stored for this sender; nothing was written.
    Duplicate { seq: i64 },
    /// The session was closed by its therapist; nothing was written.
    Closed,
}

/// What a committed write did to a session, as every instance sharing the
/// store must hear of it. Every write returns the events it committed, in
/// commit order; the server applies them to its sockets and dashboards
/// (`Hub::apply`), and [`PgStore`] sends exactly these to the other
/// instances, inside the transaction. Serialised, an event holds ids,
/// seqs, levels and kinds, never a message's text: a receiver reads the
/// message by its seq.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum SessionEvent {
    /// A message was committed; its kind says what it did to the session.
    Message {
        session_id: Uuid,
        seq: i64,
        kind: MessageKind,
        /// The message itself, where it was written; never serialised.
        #[serde(skip)]
        message: Option<Box<ChatMessage>>,
    },
    /// The safety detector flagged a client message; `level` is the
    /// session's level after it, raised `at`.
    Flagged {
        session_id: Uuid,
        level: RiskLevel,
        therapist_id: Option<Uuid>,
        /// From an instance of a release before this field: when it arrived.
        #[serde(with = "time::serde::rfc3339", default = "now")]
        at: OffsetDateTime,
    },
    /// A therapist acknowledged a session's flag.
    Acknowledged { session_id: Uuid },
    /// A therapist read further in a session: their unread count changed.
    Read { session_id: Uuid },
    /// A chat session was created.
    Created { session_id: Uuid },
    /// A chat session and everything in it were deleted: erased by its
    /// client, or expired. Its sockets close.
    Erased { session_id: Uuid },
    /// The client chose whether the therapist who joins sees the
    /// conversation with the companion.
    Sharing { session_id: Uuid, shared: bool },
    /// A piece of a companion reply being generated (not stored).
    Delta { session_id: Uuid, reply_id: Uuid, delta: String },
    /// A companion reply ended without a message (not stored).
    Cancelled { session_id: Uuid, reply_id: Uuid },
    /// The client or the therapist is typing, or stopped (not stored).
    Typing { session_id: Uuid, sender: Sender, active: bool },
    /// One instance has sockets of one side of a session open (`here`), or
    /// none any more (not stored). `name` is the therapist's, while here.
    /// `ask`: the instance just opened the session's first socket, and
    /// instances with sockets of it answer with their own presence.
    Presence {
        session_id: Uuid,
        sender: Sender,
        instance: Uuid,
        here: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        ask: bool,
    },
    /// An instance started (or restarted) listening: the others forget the
    /// presence it told them before, and tell it theirs (not stored).
    PresenceQuestion { instance: Uuid },
    /// One instance has a therapist's appointments list or chat sockets
    /// open (`here`), or none any more: the clients' "therapists online
    /// now" (not stored).
    Staff { instance: Uuid, therapist_id: Uuid, here: bool },
}

impl SessionEvent {
    /// A message committed here, with the message.
    pub fn message(session_id: Uuid, message: ChatMessage) -> Self {
        SessionEvent::Message {
            session_id,
            seq: message.seq,
            kind: message.kind,
            message: Some(Box::new(message)),
        }
    }

    /// The session the event is about, if one.
    pub fn session_id(&self) -> Option<Uuid> {
        Some(match self {
            SessionEvent::Message { session_id, .. }
            | SessionEvent::Flagged { session_id, .. }
            | SessionEvent::Acknowledged { session_id }
            | SessionEvent::Read { session_id }
            | SessionEvent::Created { session_id }
            | SessionEvent::Erased { session_id }
            | SessionEvent::Sharing { session_id, .. }
            | SessionEvent::Delta { session_id, .. }
            | SessionEvent::Cancelled { session_id, .. }
            | SessionEvent::Typing { session_id, .. }
            | SessionEvent::Presence { session_id, .. } => *session_id,
            SessionEvent::PresenceQuestion { .. } | SessionEvent::Staff { .. } => return None,
        })
    }
}

/// A write's outcome, and the [`SessionEvent`]s it committed.
#[derive(Debug, Clone)]
pub struct Committed<T> {
    pub outcome: T,
    pub events: Vec<SessionEvent>,
}

impl<T> Committed<T> {
    /// Every write that committed something comes through here, on the
    /// instance that wrote it: its metrics are counted here, once.
    pub(crate) fn new(outcome: T, events: Vec<SessionEvent>) -> Self {
        for event in &events {
            match event {
                SessionEvent::Message { kind, message: Some(message), .. } => {
                    metrics::counter!("haven_messages_stored_total", "sender" => message.sender.as_str())
                        .increment(1);
                    if *kind == MessageKind::Join {
                        metrics::counter!("haven_takeovers_total").increment(1);
                    }
                }
                SessionEvent::Flagged { level, .. } => {
                    metrics::counter!("haven_crisis_flags_total", "level" => level.as_str()).increment(1);
                }
                _ => {}
            }
        }
        Self { outcome, events }
    }

    /// An outcome that wrote nothing.
    pub(crate) fn nothing(outcome: T) -> Self {
        Self { outcome, events: Vec::new() }
    }
}

/// The result of [`Store::close_chat_session`].
#[derive(Debug, Clone)]
pub enum CloseOutcome {
    /// Closed now; the closing message is among the write's events.
    Closed,
    /// It was closed before; nothing was written.
    AlreadyClosed,
    /// The session is not assigned to this therapist; nothing was written.
    NotYours,
}

/// The result of [`Store::hand_back`].
#[derive(Debug, Clone)]
pub enum HandBackOutcome {
    /// The session switched to `BOT_ONLY` with the companion paused in this
    /// call; the note and the hand-back message are among its events.
    HandedBack,
    /// The session is not `THERAPIST_JOINED`; nothing was written.
    NotJoined,
    /// The chat is closed; nothing was written.
    Closed,
    /// The session is not assigned to this therapist; nothing was written.
    NotYours,
}

/// The result of [`Store::resume_companion`].
#[derive(Debug, Clone)]
pub enum ResumeOutcome {
    /// The companion may answer again; the `resume` message is among the
    /// write's events. `unanswered`: a client message came after the
    /// hand-back, and the companion should answer it now; `seq` is the
    /// `resume` message's, and `risk` the session's flag, for that answer.
    Resumed { unanswered: bool, seq: i64, risk: Option<CurrentRisk> },
    /// The companion was not waiting for the client's yes; nothing was
    /// written.
    NotPaused,
}

/// The result of [`Store::erase_chat`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EraseOutcome {
    /// Every row of the chat and its credential were deleted in this call;
    /// the [`SessionEvent::Erased`] is among the write's events.
    Erased { messages: i64 },
    /// A therapist has joined the chat (now or before): it is the clinic's
    /// record, and nothing was written.
    Joined,
}

/// When chats expire ([`Store::apply_retention`]): the last activity (the
/// newest message, or the creation) before which each tier goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionCutoffs {
    /// Chats no therapist ever joined, and never flagged.
    pub bot_only_before: OffsetDateTime,
    /// Chats a therapist joined, or the crisis detector flagged: the
    /// clinical record.
    pub clinical_before: OffsetDateTime,
}

/// What a retention run found (a dry run) or removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionReport {
    pub bot_only_chats: i64,
    pub bot_only_messages: i64,
    pub clinical_chats: i64,
    pub clinical_messages: i64,
    /// The chats were removed; otherwise only counted.
    pub applied: bool,
}

/// The result of [`Store::join_as_therapist`].
#[derive(Debug, Clone)]
pub enum JoinOutcome {
    /// The session switched to `THERAPIST_JOINED` in this call; the join
    /// message, committed in the same transaction, is among its events.
    Joined,
    /// This therapist had already joined; nothing was written.
    AlreadyJoined,
    /// Another therapist holds the session; nothing was written.
    ClaimedByOther,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Creates a therapist account, recorded in the audit trail as done by
    /// `by`. `Conflict` when the e-mail is taken.
    async fn create_therapist(&self, new: NewTherapist, by: Origin) -> Result<Therapist>;
    async fn therapists(&self) -> Result<Vec<Therapist>>;
    async fn count_therapists(&self) -> Result<i64>;
    /// Open (not closed) chat sessions, counted by mode.
    async fn sessions_by_mode(&self) -> Result<Vec<(ChatMode, i64)>>;
    /// Whether the database answers a trivial read now.
    async fn ping(&self) -> Result<()>;
    /// The account and its password hash, for a login attempt.
    async fn therapist_with_password(&self, email: &str) -> Result<Option<(Therapist, String)>>;

    /// Records a therapist login under the hash of its token, and in the
    /// audit trail, from `address`.
    async fn create_auth_session(
        &self,
        therapist_id: Uuid,
        token_hash: &[u8],
        expires_at: OffsetDateTime,
        address: Option<IpAddr>,
    ) -> Result<()>;
    /// The therapist whose login has this token hash, if the login is valid
    /// at `now`: not past its absolute expiry, used within `idle`, and of an
    /// account that is not disabled. With `touch`, a valid login is marked as
    /// used (a request or a message); a mere check (a heartbeat) leaves it.
    async fn therapist_by_token(
        &self,
        token_hash: &[u8],
        now: OffsetDateTime,
        idle: time::Duration,
        touch: bool,
    ) -> Result<Option<Therapist>>;

    /// Ends every login of a therapist.
    async fn revoke_therapist_sessions(&self, therapist_id: Uuid) -> Result<()>;

    /// Replaces an account's password hash and ends its logins, in one
    /// transaction with its audit record. `None` for an unknown e-mail.
    async fn set_password(&self, email: &str, password_hash: &str, by: Origin) -> Result<Option<Therapist>>;

    /// Disables an account and ends its logins, in one transaction with its
    /// audit record. `None` for an unknown e-mail.
    async fn disable_therapist(&self, email: &str, by: Origin) -> Result<Option<Therapist>>;
    /// Ends a login, recorded in the audit trail as its therapist's logout
    /// from `address`. Unknown hashes are not an error.
    async fn revoke_auth_session(&self, token_hash: &[u8], address: Option<IpAddr>) -> Result<()>;

    /// "Chat Now": a new open, unassigned `BOT_ONLY` session whose client
    /// credential has this token hash.
    async fn create_chat_session(&self, client_token_hash: &[u8]) -> Result<Committed<ChatSession>>;
    async fn chat_session(&self, session_id: Uuid) -> Result<Option<ChatSession>>;
    /// The session a client token is bound to.
    async fn session_for_client_token(&self, token_hash: &[u8]) -> Result<Option<Uuid>>;
    /// The open sessions assigned to this therapist, and the unassigned ones
    /// still waiting: flagged, or with activity (a message, or creation)
    /// since `waiting_since`. Oldest first.
    async fn appointments_for(
        &self,
        therapist_id: Uuid,
        waiting_since: OffsetDateTime,
    ) -> Result<Vec<ChatSession>>;

    /// What this therapist's list shows of each chat `appointments_for`
    /// lists, by session: how many messages from the client and the
    /// companion came after what they have read, and the newest message.
    async fn glances_for(
        &self,
        therapist_id: Uuid,
        waiting_since: OffsetDateTime,
    ) -> Result<std::collections::HashMap<Uuid, Glance>>;

    /// Records that this therapist was sent a session's messages up to
    /// `seq`. A lower `seq` than recorded changes nothing.
    async fn mark_read(&self, therapist_id: Uuid, session_id: Uuid, seq: i64) -> Result<()>;

    /// This therapist's closed chats, the most recently closed first: at
    /// most `limit`, closed before `before` (a `(closed_at, id)` of the
    /// previous page) when given.
    async fn closed_for(
        &self,
        therapist_id: Uuid,
        before: Option<(OffsetDateTime, Uuid)>,
        limit: u32,
    ) -> Result<Vec<ChatSession>>;

    /// Sets this therapist's private name for a session's client, or
    /// forgets it (`None`). Nobody else sees it.
    async fn set_client_label(&self, therapist_id: Uuid, session_id: Uuid, label: Option<&str>)
    -> Result<()>;

    /// This therapist's private names for clients, by session.
    async fn client_labels(&self, therapist_id: Uuid) -> Result<std::collections::HashMap<Uuid, String>>;

    /// The takeover, in one transaction: claims the session for the therapist
    /// if it is unassigned, switches it to `THERAPIST_JOINED` and appends
    /// `join_message` as a `system` message. `NotFound` for no such session.
    async fn join_as_therapist(
        &self,
        session_id: Uuid,
        therapist_id: Uuid,
        join_message: &str,
        address: Option<IpAddr>,
    ) -> Result<Committed<JoinOutcome>>;

    /// Closes a session assigned to this therapist, in one transaction:
    /// marks it closed (its client credential stays, for reading the
    /// transcript) and appends `closing_message` as a `system` message,
    /// which it returns.
    async fn close_chat_session(
        &self,
        session_id: Uuid,
        therapist_id: Uuid,
        closing_message: &str,
        address: Option<IpAddr>,
    ) -> Result<Committed<CloseOutcome>>;

    /// The hand-back, in one transaction: a session `THERAPIST_JOINED` by
    /// this therapist goes back to `BOT_ONLY` with the companion paused;
    /// `note`, if any, is appended as the therapist's message and then
    /// `hand_back_message` as a `system` message of kind `handback`. The
    /// session stays assigned: the same therapist may join again, as a new
    /// join. `by`: the therapist, or the client when the therapist was
    /// away. `NotFound` for no such session.
    async fn hand_back(
        &self,
        session_id: Uuid,
        therapist_id: Uuid,
        note: Option<&str>,
        hand_back_message: &str,
        by: Origin,
    ) -> Result<Committed<HandBackOutcome>>;

    /// The client's yes after a hand-back, in one transaction: unpauses the
    /// companion and appends `resume_message` as a `system` message of kind
    /// `resume`. `NotFound` for no such session.
    async fn resume_companion(
        &self,
        session_id: Uuid,
        resume_message: &str,
    ) -> Result<Committed<ResumeOutcome>>;

    /// Appends a message from a connection with the next seq, unless its
    /// `client_id` was already stored for this sender or the session is
    /// closed. `NotFound` for no such session.
    async fn append_message(&self, session_id: Uuid, new: NewMessage) -> Result<Committed<Appended>>;

    /// Appends a message from the companion's side — an `ai` reply, or a
    /// `system` notice such as "the companion is unavailable" — only if the
    /// session is still `BOT_ONLY` and its companion not paused, checked in
    /// the same transaction as the insert. `None` means a therapist joined
    /// (or handed back) first and nothing was written.
    async fn append_if_bot_only(
        &self,
        session_id: Uuid,
        message: BotMessage,
    ) -> Result<Committed<Option<ChatMessage>>>;

    /// The newest `limit` messages, in seq order.
    async fn recent_messages(&self, session_id: Uuid, limit: i64) -> Result<Vec<ChatMessage>>;

    /// Counts the rate events of `kind` for `key` at or after `since_ms`
    /// (Unix milliseconds), and returns the count and the oldest one's time.
    /// Events before `since_ms` are forgotten on the way.
    async fn count_rate_events(&self, kind: &str, key: &str, since_ms: i64) -> Result<(i64, Option<i64>)>;

    /// Records a rate event at `at_ms` (Unix milliseconds).
    async fn record_rate_event(&self, kind: &str, key: &str, at_ms: i64) -> Result<()>;

    /// Forgets every rate event of `kind` for `key`.
    async fn clear_rate_events(&self, kind: &str, key: &str) -> Result<()>;

    /// Tells the other instances sharing this store about something that is
    /// not stored ([`SessionEvent::Delta`], [`SessionEvent::Cancelled`]).
    /// Nothing to do for a store that only one instance uses.
    async fn announce(&self, _event: SessionEvent) -> Result<()> {
        Ok(())
    }

    /// Notifications from the other instances sharing this store, or `None`
    /// when no other instance can share it (SQLite).
    async fn listen(&self) -> Result<Option<Box<dyn Listener>>> {
        Ok(None)
    }

    /// Flags the stored message `seq` after the fact (the model's second
    /// opinion), as [`Store::append_message`] does in line. A flag only ever
    /// raises the session's level. `NotFound` for no such session.
    async fn flag_risk(&self, session_id: Uuid, seq: i64, flag: RiskFlag) -> Result<Committed<Flagged>>;

    /// Records that a therapist saw a session's flag, with an optional note,
    /// in the audit trail. The level stays: flags are never cleared.
    async fn acknowledge_risk(
        &self,
        session_id: Uuid,
        therapist_id: Uuid,
        note: Option<&str>,
        address: Option<IpAddr>,
    ) -> Result<Committed<AcknowledgeOutcome>>;

    /// A session's safety audit trail, oldest first.
    async fn safety_audit(&self, session_id: Uuid) -> Result<Vec<AuditRecord>>;

    /// Counts of flags and referrals at or after `since`.
    async fn safety_report(&self, since: OffsetDateTime) -> Result<SafetyReport>;

    /// Up to `limit` messages with `seq > after`, in seq order.
    async fn messages_after(&self, session_id: Uuid, after: i64, limit: i64) -> Result<Vec<ChatMessage>>;

    /// [`Store::messages_after`] for a reader whom the audit trail records:
    /// `read` (its actor, action and address; the session and the seqs
    /// sent are filled in) is appended in the same transaction as the read,
    /// when it returns any message.
    async fn read_messages(
        &self,
        session_id: Uuid,
        after: i64,
        limit: i64,
        read: TrailEntry,
    ) -> Result<Vec<ChatMessage>>;

    /// Records the client's choice for the companion part, while no
    /// therapist has joined, with its audit record. `NotFound` for no such
    /// session.
    async fn set_companion_shared(&self, session_id: Uuid, shared: bool)
    -> Result<Committed<SharingOutcome>>;

    /// The client's erasure, in one transaction: while no therapist has
    /// joined, deletes every message, flag record, therapist's read mark and
    /// label of the chat, its client credential and the chat itself, and
    /// records the erasure (without content) in the audit trail. `NotFound`
    /// for no such session.
    async fn erase_chat(&self, session_id: Uuid) -> Result<Committed<EraseOutcome>>;

    /// A retention run, in one transaction: counts the chats whose last
    /// activity is before their tier's cutoff and, with `apply`, deletes
    /// them as [`Store::erase_chat`] does. Either way the run is recorded in
    /// the audit trail as done by `by`, unless it was Haven's own daily run
    /// ([`Actor::System`]) and found nothing.
    async fn apply_retention(
        &self,
        cutoffs: RetentionCutoffs,
        apply: bool,
        by: Origin,
    ) -> Result<Committed<RetentionReport>>;

    /// Appends a record of something that wrote nothing else (a failed
    /// login) to the audit trail.
    async fn append_trail(&self, entry: TrailEntry) -> Result<()>;

    /// Audit records, oldest first: those `filter` selects.
    async fn trail(&self, filter: &TrailFilter) -> Result<Vec<TrailRecord>>;
}

/// What another instance did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notification {
    /// An event another instance committed (or announced).
    Event(SessionEvent),
    /// The connection to the notification source was lost: until
    /// [`Notification::Reconnected`], other instances are not heard.
    Lost,
    /// The connection to the notification source was lost and is back:
    /// notifications in between may be lost, so read what was missed.
    Reconnected,
}

/// A subscription to other instances' notifications.
#[async_trait]
pub trait Listener: Send {
    /// The next notification from another instance (never this one's own).
    async fn next(&mut self) -> Notification;
}

/// Now, in UTC, as stored: to the microsecond, PostgreSQL's precision, so
/// that a message reads back exactly as its writer saw it.
pub fn now() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_microsecond(now.microsecond()).unwrap_or(now)
}
