//! Row types and conversions shared by the SQLite and PostgreSQL stores.
//! The SQL differs between the two; what a row means does not.

use haven_protocol::{ChatMessage, ChatMode, MessageKind, RiskLevel, Sender, api::AppointmentStatus};
use sqlx::FromRow;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::{
    AuditKind, AuditRecord, ChatSession, CurrentRisk, Result, RiskState, SafetyReport, StoreError, Therapist,
};

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
    pub(crate) risk_level: Option<String>,
    pub(crate) risk_first_at: Option<OffsetDateTime>,
    pub(crate) risk_last_at: Option<OffsetDateTime>,
    pub(crate) risk_acknowledged_at: Option<OffsetDateTime>,
    pub(crate) risk_acknowledged_by: Option<Uuid>,
    pub(crate) companion_paused: bool,
    pub(crate) companion_shared: Option<bool>,
    pub(crate) first_join_seq: Option<i64>,
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
            closed_at: row.closed_at,
            companion_paused: row.companion_paused,
            companion_shared: row.companion_shared,
            first_join_seq: row.first_join_seq,
            risk: match (row.risk_level, row.risk_first_at, row.risk_last_at) {
                (Some(level), Some(first_flagged_at), Some(last_flagged_at)) => Some(RiskState {
                    level: parse_level(&level)?,
                    first_flagged_at,
                    last_flagged_at,
                    acknowledged_at: row.risk_acknowledged_at,
                    acknowledged_by: row.risk_acknowledged_by,
                }),
                _ => None,
            },
        })
    }
}

#[derive(FromRow)]
pub(crate) struct MessageRow {
    pub(crate) seq: i64,
    pub(crate) id: Uuid,
    pub(crate) sender: String,
    pub(crate) kind: String,
    pub(crate) content: String,
    pub(crate) created_at: OffsetDateTime,
    pub(crate) client_id: Option<String>,
}

/// The columns of [`MessageRow`], for a query on `messages`.
pub(crate) const MESSAGE_COLUMNS: &str = "seq, id, sender, kind, content, created_at, client_id";

impl TryFrom<MessageRow> for ChatMessage {
    type Error = StoreError;

    fn try_from(row: MessageRow) -> Result<Self> {
        let sender = Sender::parse(&row.sender)
            .ok_or_else(|| StoreError::Corrupt(format!("sender {:?}", row.sender)))?;
        let kind = MessageKind::parse(&row.kind)
            .ok_or_else(|| StoreError::Corrupt(format!("message kind {:?}", row.kind)))?;
        Ok(ChatMessage {
            seq: row.seq,
            id: row.id,
            sender,
            kind,
            content: row.content,
            created_at: row.created_at,
            client_id: row.client_id,
            reply_id: (sender == Sender::Ai).then_some(row.id),
            private: false,
        })
    }
}

pub(crate) fn parse_mode(value: &str) -> Result<ChatMode> {
    ChatMode::parse(value).ok_or_else(|| StoreError::Corrupt(format!("chat_mode {value:?}")))
}

pub(crate) const SESSION_COLUMNS: &str = "id, appointment_id, therapist_id, status, chat_mode, last_seq, \
     created_at, last_message_at, closed_at, risk_level, risk_first_at, risk_last_at, risk_acknowledged_at, \
     risk_acknowledged_by, companion_paused, companion_shared, first_join_seq";

pub(crate) fn parse_level(value: &str) -> Result<RiskLevel> {
    RiskLevel::parse(value).ok_or_else(|| StoreError::Corrupt(format!("risk level {value:?}")))
}

/// A session's stored level; `none` when it was never flagged.
pub(crate) fn stored_level(value: Option<String>) -> Result<RiskLevel> {
    value.map_or(Ok(RiskLevel::None), |value| parse_level(&value))
}

/// A session's flag from its `risk_level` and `risk_last_at` columns;
/// `None` when it was never flagged.
pub(crate) fn current_risk(level: Option<String>, at: Option<OffsetDateTime>) -> Result<Option<CurrentRisk>> {
    match (level, at) {
        (Some(level), Some(last_flagged_at)) => {
            Ok(Some(CurrentRisk { level: parse_level(&level)?, last_flagged_at }))
        }
        _ => Ok(None),
    }
}

/// A [`SafetyReport`] from its queries' rows: `(level, count)` pairs of
/// referrals and flags, and the session counts.
pub(crate) fn report_from_rows(
    referrals: Vec<(String, i64)>,
    flags: Vec<(String, i64)>,
    flagged_sessions: i64,
    unacknowledged_sessions: i64,
) -> Result<SafetyReport> {
    let levels = |rows: Vec<(String, i64)>| {
        rows.into_iter().map(|(level, count)| Ok((parse_level(&level)?, count))).collect::<Result<Vec<_>>>()
    };
    Ok(SafetyReport {
        referrals: levels(referrals)?,
        flags: levels(flags)?,
        flagged_sessions,
        unacknowledged_sessions,
    })
}

/// Rule ids are stored space-separated (an id never contains a space).
pub(crate) fn join_rules(rules: &[String]) -> String {
    rules.join(" ")
}

#[derive(FromRow)]
pub(crate) struct AuditRow {
    pub(crate) kind: String,
    pub(crate) level: String,
    pub(crate) message_seq: Option<i64>,
    pub(crate) rules: Option<String>,
    pub(crate) detector_version: Option<String>,
    pub(crate) referred: bool,
    pub(crate) therapist_id: Option<Uuid>,
    pub(crate) note: Option<String>,
    pub(crate) created_at: OffsetDateTime,
}

pub(crate) const AUDIT_COLUMNS: &str =
    "kind, level, message_seq, rules, detector_version, referred, therapist_id, note, created_at";

impl TryFrom<AuditRow> for AuditRecord {
    type Error = StoreError;

    fn try_from(row: AuditRow) -> Result<Self> {
        let corrupt = || StoreError::Corrupt(format!("audit record of kind {:?}", row.kind));
        let kind = match row.kind.as_str() {
            "flagged" => AuditKind::Flagged {
                seq: row.message_seq.ok_or_else(corrupt)?,
                rules: row
                    .rules
                    .as_deref()
                    .unwrap_or_default()
                    .split_whitespace()
                    .map(str::to_owned)
                    .collect(),
                detector_version: row.detector_version.clone().unwrap_or_default(),
                referred: row.referred,
            },
            "acknowledged" => AuditKind::Acknowledged {
                therapist_id: row.therapist_id.ok_or_else(corrupt)?,
                note: row.note.clone(),
            },
            _ => return Err(corrupt()),
        };
        Ok(AuditRecord { at: row.created_at, kind, level: parse_level(&row.level)? })
    }
}

/// A message about to be stored; `reply_id` is set for companion replies.
pub(crate) fn new_message(
    id: Uuid,
    seq: i64,
    sender: Sender,
    kind: MessageKind,
    content: &str,
    client_id: Option<&str>,
    created_at: OffsetDateTime,
) -> ChatMessage {
    ChatMessage {
        seq,
        id,
        sender,
        kind,
        content: content.to_owned(),
        created_at,
        client_id: client_id.map(str::to_owned),
        reply_id: (sender == Sender::Ai).then_some(id),
        private: false,
    }
}

pub(crate) fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.is_unique_violation())
}
