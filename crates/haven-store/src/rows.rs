//! Row types and conversions shared by the SQLite and PostgreSQL stores.
//! The SQL differs between the two; what a row means does not.

use haven_protocol::{ChatMessage, ChatMode, Sender, api::AppointmentStatus};
use sqlx::FromRow;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::{ChatSession, Result, StoreError, Therapist};

#[derive(FromRow)]
pub(crate) struct TherapistRow {
    pub(crate) id: Uuid,
    pub(crate) email: String,
    pub(crate) name: String,
    pub(crate) created_at: OffsetDateTime,
    pub(crate) disabled_at: Option<OffsetDateTime>,
}

impl From<TherapistRow> for Therapist {
    fn from(row: TherapistRow) -> Self {
        Therapist {
            id: row.id,
            email: row.email,
            name: row.name,
            created_at: row.created_at,
            disabled: row.disabled_at.is_some(),
        }
    }
}

/// The columns of [`TherapistRow`], for a query on `therapists`.
pub(crate) const THERAPIST_COLUMNS: &str = "id, email, name, created_at, disabled_at";

/// A login is marked as used at most this often, to spare writes.
pub(crate) const TOUCH_INTERVAL: time::Duration = time::Duration::minutes(1);

#[derive(FromRow)]
pub(crate) struct SessionRow {
    pub(crate) id: Uuid,
    pub(crate) appointment_id: Uuid,
    pub(crate) therapist_id: Option<Uuid>,
    pub(crate) status: String,
    pub(crate) chat_mode: String,
    pub(crate) last_seq: i64,
    pub(crate) created_at: OffsetDateTime,
    pub(crate) last_message_at: Option<OffsetDateTime>,
    pub(crate) closed_at: Option<OffsetDateTime>,
}

impl TryFrom<SessionRow> for ChatSession {
    type Error = StoreError;

    fn try_from(row: SessionRow) -> Result<Self> {
        let status = match row.status.as_str() {
            "open" => AppointmentStatus::Open,
            "assigned" => AppointmentStatus::Assigned,
            other => return Err(StoreError::Corrupt(format!("status {other:?}"))),
        };
        Ok(ChatSession {
            id: row.id,
            appointment_id: row.appointment_id,
            therapist_id: row.therapist_id,
            status,
            chat_mode: parse_mode(&row.chat_mode)?,
            last_seq: row.last_seq,
            created_at: row.created_at,
            last_message_at: row.last_message_at,
            closed: row.closed_at.is_some(),
        })
    }
}

#[derive(FromRow)]
pub(crate) struct MessageRow {
    pub(crate) seq: i64,
    pub(crate) id: Uuid,
    pub(crate) sender: String,
    pub(crate) content: String,
    pub(crate) created_at: OffsetDateTime,
    pub(crate) client_id: Option<String>,
}

impl TryFrom<MessageRow> for ChatMessage {
    type Error = StoreError;

    fn try_from(row: MessageRow) -> Result<Self> {
        let sender = Sender::parse(&row.sender)
            .ok_or_else(|| StoreError::Corrupt(format!("sender {:?}", row.sender)))?;
        Ok(ChatMessage {
            seq: row.seq,
            id: row.id,
            sender,
            content: row.content,
            created_at: row.created_at,
            client_id: row.client_id,
            reply_id: (sender == Sender::Ai).then_some(row.id),
        })
    }
}

pub(crate) fn parse_mode(value: &str) -> Result<ChatMode> {
    ChatMode::parse(value).ok_or_else(|| StoreError::Corrupt(format!("chat_mode {value:?}")))
}

pub(crate) const SESSION_COLUMNS: &str =
    "id, appointment_id, therapist_id, status, chat_mode, last_seq, created_at, last_message_at, closed_at";

/// A message about to be stored; `reply_id` is set for companion replies.
pub(crate) fn new_message(
    id: Uuid,
    seq: i64,
    sender: Sender,
    content: &str,
    client_id: Option<&str>,
    created_at: OffsetDateTime,
) -> ChatMessage {
    ChatMessage {
        seq,
        id,
        sender,
        content: content.to_owned(),
        created_at,
        client_id: client_id.map(str::to_owned),
        reply_id: (sender == Sender::Ai).then_some(id),
    }
}

pub(crate) fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.is_unique_violation())
}
