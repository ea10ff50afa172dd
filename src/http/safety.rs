//! The crisis detector and its flags, for therapists (docs/safety.md).

use std::net::SocketAddr;

use axum::Router;
use axum::extract::{ConnectInfo, State};
use axum::routing::{get, post};
use haven_protocol::api::{AcknowledgeRequest, AuditEntry, ClassifyRequest, SafetyReport, SessionRisk};
use haven_protocol::{MAX_CONTENT_CHARS, RiskLevel};
use haven_safety::Assessment;
use haven_store::{AcknowledgeOutcome, AuditKind, ChatSession};
use serde::Deserialize;

use super::{ApiError, Json, Path, Query, visible_session};
use crate::auth::AuthTherapist;
use crate::startup::AppState;

/// Longest acknowledgement note, in characters.
const MAX_NOTE_CHARS: usize = 2_000;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/safety/classify", post(classify))
        .route("/api/safety/report", get(report))
        .route("/api/sessions/{session_id}/risk", get(session_risk))
        .route("/api/sessions/{session_id}/risk/acknowledge", post(acknowledge))
}

/// `POST /api/safety/classify {"text"}`: what the detector finds in a text,
/// and why. Nothing is stored or logged.
async fn classify(
    State(state): State<AppState>,
    _caller: AuthTherapist,
    Json(request): Json<ClassifyRequest>,
) -> Result<Json<Assessment>, ApiError> {
    if request.text.chars().count() > MAX_CONTENT_CHARS {
        return Err(ApiError::BadRequest {
            code: "content_too_long",
            message: format!("text is longer than {MAX_CONTENT_CHARS} characters"),
        });
    }
    Ok(Json(state.escalation.classify(&request.text)))
}

#[derive(Debug, Deserialize)]
struct ReportQuery {
    days: Option<u32>,
}

/// `GET /api/safety/report?days=N`: flags and crisis referrals counted over
/// the last N days (default 365).
async fn report(
    State(state): State<AppState>,
    _caller: AuthTherapist,
    Query(query): Query<ReportQuery>,
) -> Result<Json<SafetyReport>, ApiError> {
    let days = query.days.unwrap_or(365).min(36_500);
    let version = state.escalation.detector_version();
    Ok(Json(crate::safety::report(state.store.as_ref(), days, version).await?))
}

/// `GET /api/sessions/{id}/risk`: a session's flag and audit trail, for a
/// therapist who can see the session.
async fn session_risk(
    State(state): State<AppState>,
    Path(session_id): Path<String>,
    caller: AuthTherapist,
) -> Result<Json<SessionRisk>, ApiError> {
    let session = visible_session(&state, &session_id, &caller).await?;
    Ok(Json(risk_of(&state, &session).await?))
}

/// `POST /api/sessions/{id}/risk/acknowledge {"note"}`: the therapist has
/// seen the flag. It is recorded in the audit trail with the note; the
/// level stays, and a later flag needs attention again.
async fn acknowledge(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(session_id): Path<String>,
    caller: AuthTherapist,
    Json(request): Json<AcknowledgeRequest>,
) -> Result<Json<SessionRisk>, ApiError> {
    let session = visible_session(&state, &session_id, &caller).await?;
    let note = request.note.as_deref().map(str::trim).filter(|note| !note.is_empty());
    if note.is_some_and(|note| note.chars().count() > MAX_NOTE_CHARS) {
        return Err(ApiError::BadRequest {
            code: "note_too_long",
            message: format!("the note is longer than {MAX_NOTE_CHARS} characters"),
        });
    }
    let acknowledged =
        state.store.acknowledge_risk(session.id, caller.therapist.id, note, Some(peer.ip())).await?;
    match acknowledged.outcome {
        AcknowledgeOutcome::Acknowledged(risk) => {
            tracing::info!(session_id = %session.id, "risk flag acknowledged");
            if let Some(at) = risk.acknowledged_at {
                let waited = (at - risk.last_flagged_at).as_seconds_f64().max(0.0);
                metrics::histogram!("haven_crisis_acknowledgement_seconds").record(waited);
            }
            state.hub.apply(acknowledged.events);
            let session = state.store.chat_session(session.id).await?.ok_or(ApiError::NotFound)?;
            Ok(Json(risk_of(&state, &session).await?))
        }
        AcknowledgeOutcome::NotFlagged => {
            Err(ApiError::Conflict("the session has no risk flag to acknowledge".into()))
        }
        AcknowledgeOutcome::NotYours => Err(ApiError::Forbidden),
    }
}

async fn risk_of(state: &AppState, session: &ChatSession) -> Result<SessionRisk, ApiError> {
    let audit = state.store.safety_audit(session.id).await?;
    let risk = session.risk.as_ref();
    Ok(SessionRisk {
        session_id: session.id,
        level: risk.map_or(RiskLevel::None, |risk| risk.level),
        first_flagged_at: risk.map(|risk| risk.first_flagged_at),
        last_flagged_at: risk.map(|risk| risk.last_flagged_at),
        acknowledged_at: risk.and_then(|risk| risk.acknowledged_at),
        acknowledged_by: risk.and_then(|risk| risk.acknowledged_by),
        needs_attention: risk.is_some_and(|risk| risk.needs_attention()),
        audit: audit
            .into_iter()
            .map(|record| match record.kind {
                AuditKind::Flagged { seq, rules, detector_version, referred } => AuditEntry::Flagged {
                    at: record.at,
                    level: record.level,
                    seq,
                    rules,
                    detector_version,
                    referred,
                },
                AuditKind::Acknowledged { therapist_id, note } => {
                    AuditEntry::Acknowledged { at: record.at, level: record.level, therapist_id, note }
                }
            })
            .collect(),
    })
}
