//! JSON bodies of the HTTP API.

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::{ChatMessage, ChatMode, MessageKind, RiskLevel, Sender};

/// `201` body of `POST /api/sessions`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreatedSession {
    pub session_id: Uuid,
    pub appointment_id: Uuid,
    /// The client's credential for this one session. Shown once.
    pub client_token: String,
    pub chat_mode: ChatMode,
}

/// Body of `POST /api/auth/login`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LoginRequest {
    pub email: String,
    pub password: String,
}

/// A therapist account as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TherapistProfile {
    pub id: Uuid,
    pub name: String,
    pub email: String,
}

/// Body of a successful login.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LoginResponse {
    pub token: String,
    pub therapist: TherapistProfile,
}

/// Appointment status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum AppointmentStatus {
    /// Waiting for a therapist; any therapist may join.
    Open,
    /// Claimed by one therapist.
    Assigned,
}

/// One row of `GET /api/appointments`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Appointment {
    pub appointment_id: Uuid,
    pub session_id: Uuid,
    pub status: AppointmentStatus,
    pub chat_mode: ChatMode,
    /// Handed back by its therapist, and the client has not yet said yes
    /// to the companion.
    pub companion_paused: bool,
    /// The caller's private name for the client, if they gave one.
    #[cfg_attr(feature = "openapi", schema(required = true))]
    pub client_label: Option<String>,
    /// The client has the chat open now (a socket on any instance).
    pub client_online: bool,
    #[cfg_attr(feature = "openapi", schema(required = true))]
    pub therapist_id: Option<Uuid>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    #[cfg_attr(feature = "openapi", schema(required = true))]
    pub last_message_at: Option<OffsetDateTime>,
    /// The highest level the safety detector has seen in the session;
    /// `none` when it was never flagged. Flagged sessions come first.
    pub risk_level: RiskLevel,
    /// When the session was first and last flagged.
    #[serde(with = "time::serde::rfc3339::option")]
    #[cfg_attr(feature = "openapi", schema(required = true))]
    pub risk_first_flagged_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    #[cfg_attr(feature = "openapi", schema(required = true))]
    pub risk_last_flagged_at: Option<OffsetDateTime>,
    /// Flagged since the last acknowledgement: the dashboard alerts.
    pub risk_needs_attention: bool,
    /// Messages from the client and the companion the caller's chat page
    /// was not sent yet.
    pub unread: u32,
    /// The newest message, if any.
    #[cfg_attr(feature = "openapi", schema(required = true))]
    pub last_message: Option<MessagePreview>,
}

/// One line about a message, for a list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MessagePreview {
    pub sender: Sender,
    pub kind: MessageKind,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// The start of its first line, at most [`PREVIEW_CHARS`] characters
    /// with "…" when cut; `null` for the companion's messages, which
    /// therapists read in the chat itself, and for private ones.
    #[cfg_attr(feature = "openapi", schema(required = true))]
    pub text: Option<String>,
    /// Part of the conversation with the companion that the client keeps
    /// private: no text.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub private: bool,
}

/// Longest preview text, in characters, before its "…".
pub const PREVIEW_CHARS: usize = 100;

impl MessagePreview {
    pub fn of(message: &ChatMessage) -> Self {
        let text = (message.sender != Sender::Ai && !message.private).then(|| {
            let line = message.content.lines().find(|line| !line.trim().is_empty()).unwrap_or("").trim();
            match line.char_indices().nth(PREVIEW_CHARS) {
                Some((cut, _)) => format!("{}…", line[..cut].trim_end()),
                None => line.to_owned(),
            }
        });
        Self {
            sender: message.sender,
            kind: message.kind,
            created_at: message.created_at,
            text,
            private: message.private,
        }
    }
}

/// One row of `GET /api/appointments/closed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ClosedAppointment {
    pub appointment_id: Uuid,
    pub session_id: Uuid,
    /// The caller's private name for the client, if they gave one.
    #[cfg_attr(feature = "openapi", schema(required = true))]
    pub client_label: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub closed_at: OffsetDateTime,
    /// How many messages the transcript holds.
    pub messages: i64,
    /// The highest level the safety detector saw; `none` if never flagged.
    pub risk_level: RiskLevel,
}

/// Body of `POST /api/safety/classify`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ClassifyRequest {
    pub text: String,
}

/// Body of `POST /api/sessions/{id}/risk/acknowledge`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AcknowledgeRequest {
    /// The therapist's note for the audit trail (at most 2,000 characters).
    #[serde(default)]
    pub note: Option<String>,
}

/// Body of `POST /api/sessions/{id}/hand-back`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HandBackRequest {
    /// A note to the client, stored as the therapist's last message (at
    /// most 4,000 characters, as any message).
    #[serde(default)]
    pub note: Option<String>,
}

/// Body of `PUT /api/sessions/{id}/label`, and of its answer and of
/// `GET /api/sessions/{id}/label`: the caller's private name for the
/// session's client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ClientLabel {
    /// One line, at most [`MAX_CLIENT_LABEL_CHARS`] characters; `null` or
    /// blank forgets it.
    pub label: Option<String>,
}

/// Longest private client name, in characters.
pub const MAX_CLIENT_LABEL_CHARS: usize = 60;

/// Body of `GET /api/sessions/{id}/risk` and of an acknowledgement.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SessionRisk {
    pub session_id: Uuid,
    pub level: RiskLevel,
    #[serde(with = "time::serde::rfc3339::option")]
    #[cfg_attr(feature = "openapi", schema(required = true))]
    pub first_flagged_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    #[cfg_attr(feature = "openapi", schema(required = true))]
    pub last_flagged_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    #[cfg_attr(feature = "openapi", schema(required = true))]
    pub acknowledged_at: Option<OffsetDateTime>,
    #[cfg_attr(feature = "openapi", schema(required = true))]
    pub acknowledged_by: Option<Uuid>,
    pub needs_attention: bool,
    /// The audit trail, oldest first.
    pub audit: Vec<AuditEntry>,
}

/// One line of a session's safety audit trail.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum AuditEntry {
    /// A client message was flagged. `rules` are the ids of the rules that
    /// fired; `referred` says crisis resources were sent with this flag.
    Flagged {
        #[serde(with = "time::serde::rfc3339")]
        at: OffsetDateTime,
        level: RiskLevel,
        seq: i64,
        rules: Vec<String>,
        detector_version: String,
        referred: bool,
    },
    /// A therapist acknowledged the flag.
    Acknowledged {
        #[serde(with = "time::serde::rfc3339")]
        at: OffsetDateTime,
        level: RiskLevel,
        therapist_id: Uuid,
        #[cfg_attr(feature = "openapi", schema(required = true))]
        note: Option<String>,
    },
}

/// Body of `GET /api/safety/report?days=N`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SafetyReport {
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
    /// Crisis messages sent to clients (referrals to crisis resources).
    pub referrals: LevelCounts,
    /// Client messages flagged.
    pub flags: LevelCounts,
    pub flagged_sessions: i64,
    pub unacknowledged_sessions: i64,
    pub detector_version: String,
}

/// Counts per level, with their total.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LevelCounts {
    pub concern: i64,
    pub high: i64,
    pub imminent: i64,
    pub total: i64,
}

/// Body of `GET /api/sessions/{id}/transcript` (JSON): the whole chat, for
/// its therapist to keep.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Transcript {
    pub session_id: Uuid,
    #[serde(with = "time::serde::rfc3339")]
    pub started_at: OffsetDateTime,
    pub chat_mode: ChatMode,
    pub closed: bool,
    pub messages: Vec<ChatMessage>,
}

/// Body of `GET /api/sessions/{id}/messages`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MessagePage {
    pub messages: Vec<ChatMessage>,
}

/// Body of every API error.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ApiError {
    pub error: String,
    pub message: String,
}

/// `PUT /api/sessions/{id}/companion-sharing`: the client's choice, before
/// a therapist joins, whether that therapist will see the conversation
/// with the companion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CompanionSharing {
    pub shared: bool,
}

/// `GET /api/sessions/{id}/access-log`: the chat's records in the audit
/// trail, oldest first, for its therapist.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AccessLog {
    pub records: Vec<AccessRecord>,
}

/// Who did what to the chat, when, from where, and how it ended. Never a
/// message's text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AccessRecord {
    /// The record's place in the whole audit trail.
    pub seq: i64,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// `therapist`, `client`, `system` or `operator`.
    pub actor: String,
    /// The therapist's name, for a therapist's record.
    #[cfg_attr(feature = "openapi", schema(required = true))]
    pub therapist: Option<String>,
    /// `read`, `export`, `join`, `hand_back`, `close`, `flag`,
    /// `acknowledge`, …
    pub action: String,
    /// The therapist's or operator's address; clients' are never kept.
    #[cfg_attr(feature = "openapi", schema(required = true))]
    pub address: Option<String>,
    /// `ok`, or `refused`.
    pub outcome: String,
    /// A few words without content, e.g. `messages 1-12`.
    #[cfg_attr(feature = "openapi", schema(required = true))]
    pub detail: Option<String>,
}
