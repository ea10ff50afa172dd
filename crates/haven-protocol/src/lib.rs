//! Haven's wire protocol: the JSON frames exchanged on the chat WebSocket and
//! the bodies of the HTTP API. Server, tests and future clients share these
//! types so the contract in `docs/protocol.md` has one definition in code.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

pub mod api;
mod frame;

pub use frame::{
    ClientFrame, ClientInput, ErrorCode, FrameError, NewMessage, ServerFrame, parse_client_frame,
};

/// A typing indicator goes out after this many seconds without a new
/// `typing` signal.
pub const TYPING_EXPIRES_SECONDS: u64 = 5;

/// Longest message content accepted, in Unicode scalar values (characters).
pub const MAX_CONTENT_CHARS: usize = 4_000;

/// Longest `client_id` accepted, in bytes. A UUID needs 36.
pub const MAX_CLIENT_ID_LEN: usize = 64;

/// The system message appended when a therapist takes over a session, for
/// a therapist of no name; [`join_message`] names them. (The migration
/// that added `messages.kind` recognises this text.)
pub const JOIN_MESSAGE: &str = "🧑\u{200d}⚕️ Therapist has joined. You can talk directly now.";

/// The system message appended when a therapist takes over a session:
/// "🧑‍⚕️ Therapist has joined: NAME. You can talk directly now.", with the
/// account's name on one line (whitespace collapsed, at most 80
/// characters), or [`JOIN_MESSAGE`] when it has none.
pub fn join_message(therapist_name: &str) -> String {
    let name = one_line_name(therapist_name);
    if name.is_empty() {
        return JOIN_MESSAGE.to_owned();
    }
    format!("🧑\u{200d}⚕️ Therapist has joined: {name}. You can talk directly now.")
}

/// An account's name on one line: whitespace collapsed, at most 80
/// characters.
fn one_line_name(name: &str) -> String {
    name.split_whitespace().collect::<Vec<_>>().join(" ").chars().take(80).collect()
}

/// The system message appended when a therapist hands the chat back to the
/// companion (`NAME` as in [`join_message`]). The companion stays silent
/// until the client answers yes (`resume_companion`).
pub fn hand_back_message(therapist_name: &str) -> String {
    let name = one_line_name(therapist_name);
    let who = if name.is_empty() { "The therapist".to_owned() } else { name };
    format!(
        "{who} has ended their part of this chat and handed it back to the companion. \
         Would you like to continue with the companion? It stays silent until you say yes."
    )
}

/// The system message (kind `handback`) appended when the client chose the
/// companion after the joined therapist had been away for the away time.
/// [`RESUME_MESSAGE`] follows it at once.
pub const AWAY_HAND_BACK_MESSAGE: &str = "The therapist has been away from this chat for a while, so it went back \
     to the companion. They can join again.";

/// The system message appended when the client chooses to continue with
/// the companion after a hand-back.
pub const RESUME_MESSAGE: &str = "You chose to continue with the companion. Write whenever you are ready.";

/// The system message appended when a therapist closes a chat.
pub const CLOSE_MESSAGE: &str = "This chat has been closed by the therapist. Thank you for talking with us.";

/// WebSocket close codes Haven uses.
pub mod close_code {
    /// The therapist's part ended: the chat was handed back to the
    /// companion (therapist sockets only). Joining again is a new join.
    pub const NORMAL: u16 = 1000;
    /// The server is shutting down; reconnect later and resume with `since`.
    pub const GOING_AWAY: u16 = 1001;
    /// The connection is not allowed: missing or invalid credential, wrong
    /// session, role mismatch, foreign origin, session claimed by another.
    pub const POLICY_VIOLATION: u16 = 1008;
    /// The frame broke the WebSocket protocol.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A text frame was not valid UTF-8.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// A message or frame was larger than 64 KiB.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// The server failed; reconnect and resume with `since`.
    pub const INTERNAL_ERROR: u16 = 1011;
}

/// Who a connection is. Decided by the credential, never by the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Therapist,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Therapist => "therapist",
        }
    }
}

/// Who wrote a stored message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Sender {
    User,
    Therapist,
    Ai,
    System,
}

impl Sender {
    pub fn as_str(self) -> &'static str {
        match self {
            Sender::User => "user",
            Sender::Therapist => "therapist",
            Sender::Ai => "ai",
            Sender::System => "system",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "user" => Some(Sender::User),
            "therapist" => Some(Sender::Therapist),
            "ai" => Some(Sender::Ai),
            "system" => Some(Sender::System),
            _ => None,
        }
    }
}

impl From<Role> for Sender {
    fn from(role: Role) -> Self {
        match role {
            Role::User => Sender::User,
            Role::Therapist => Sender::Therapist,
        }
    }
}

/// What a stored message is to its session. Clients tell the join, the
/// close and the crisis resources apart by this, never by the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum MessageKind {
    /// A message of the conversation: the client's, the therapist's or the
    /// companion's.
    #[default]
    Chat,
    /// The therapist joined: the session is `THERAPIST_JOINED` from here.
    Join,
    /// The therapist closed the chat: nothing follows it.
    Close,
    /// The therapist handed the chat back to the companion: the session is
    /// `BOT_ONLY` from here, and the companion waits for the client's yes.
    Handback,
    /// The client chose to continue with the companion after a hand-back.
    Resume,
    /// Crisis resources, sent when the session's risk level rose.
    Crisis,
    /// Any other `system` notice, such as "the companion is unavailable".
    Notice,
}

impl MessageKind {
    pub const ALL: [MessageKind; 7] = [
        MessageKind::Chat,
        MessageKind::Join,
        MessageKind::Close,
        MessageKind::Handback,
        MessageKind::Resume,
        MessageKind::Crisis,
        MessageKind::Notice,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MessageKind::Chat => "chat",
            MessageKind::Join => "join",
            MessageKind::Close => "close",
            MessageKind::Handback => "handback",
            MessageKind::Resume => "resume",
            MessageKind::Crisis => "crisis",
            MessageKind::Notice => "notice",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        MessageKind::ALL.into_iter().find(|kind| kind.as_str() == value)
    }
}

/// Who may speak in a session: the companion until a therapist joins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum ChatMode {
    BotOnly,
    TherapistJoined,
}

impl ChatMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ChatMode::BotOnly => "BOT_ONLY",
            ChatMode::TherapistJoined => "THERAPIST_JOINED",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "BOT_ONLY" => Some(ChatMode::BotOnly),
            "THERAPIST_JOINED" => Some(ChatMode::TherapistJoined),
            _ => None,
        }
    }
}

/// How much risk the safety detector sees in a client message, lowest first.
/// A session's level is the highest of its messages' levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum RiskLevel {
    /// Nothing that suggests anyone is at risk.
    #[default]
    None,
    /// Hopelessness, a passive wish to be dead.
    Concern,
    /// Suicidal intent, self-harm, abuse or danger from someone else, risk
    /// to a third party.
    High,
    /// A plan, means at hand, a time, a farewell, or an act in progress.
    Imminent,
}

impl RiskLevel {
    pub const ALL: [RiskLevel; 4] =
        [RiskLevel::None, RiskLevel::Concern, RiskLevel::High, RiskLevel::Imminent];

    pub fn as_str(self) -> &'static str {
        match self {
            RiskLevel::None => "none",
            RiskLevel::Concern => "concern",
            RiskLevel::High => "high",
            RiskLevel::Imminent => "imminent",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        RiskLevel::ALL.into_iter().find(|level| level.as_str() == value)
    }
}

/// A committed message, as sent in `message` frames and the history API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ChatMessage {
    /// Position in the session: 1, 2, 3, … with no gap.
    pub seq: i64,
    pub id: Uuid,
    pub sender: Sender,
    /// What the message is to the session (`chat` for every message of a
    /// client, a therapist or the companion).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required = true))]
    pub kind: MessageKind,
    pub content: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// The sender's idempotency key; `null` for `ai` and `system` messages.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(required = true))]
    pub client_id: Option<String>,
    /// For `ai` messages: the `reply_id` of the `ai_delta` frames this
    /// message replaces (it equals `id`). Absent for other senders.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_id: Option<Uuid>,
    /// Sent to therapists only, for a message of the conversation with the
    /// companion that the client keeps private: its `content` is empty.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub private: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_join_message_names_the_therapist_on_one_line() {
        assert_eq!(
            join_message("  Dr Tess\n  Example "),
            "🧑\u{200d}⚕️ Therapist has joined: Dr Tess Example. You can talk directly now."
        );
        assert_eq!(join_message(" \n"), JOIN_MESSAGE);
        assert_eq!(join_message(&"x".repeat(200)).matches('x').count(), 80);
    }
}
