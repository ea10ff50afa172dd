//! The crisis detector and its flags, for therapists (docs/safety.md).

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, State};
use haven_protocol::api::{AcknowledgeRequest, AuditEntry, ClassifyRequest, SafetyReport, SessionRisk};
use haven_protocol::{MAX_CONTENT_CHARS, RiskLevel};
use haven_safety::Assessment;
use haven_store::{AcknowledgeOutcome, AuditKind, ChatSession};
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::openapi::ErrorBody;
use super::{ApiError, Json, Path, Query, SessionPath, visible_session};
use crate::auth::AuthTherapist;
use crate::startup::AppState;

/// Longest acknowledgement note, in characters.
const MAX_NOTE_CHARS: usize = 2_000;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(classify))
        .routes(routes!(report))
        .routes(routes!(session_risk))
        .routes(routes!(acknowledge))
}

/// What the detector finds in a text, and why.
///
/// `POST /api/safety/classify {"text"}`: what the detector finds in a text,
/// and why. Nothing is stored or logged.
#[utoipa::path(
    post,
    path = "/api/safety/classify",
    tag = "safety",
    request_body = ClassifyRequest,
    security(("therapist_token" = []), ("therapist_cookie" = [])),
    responses(
        (status = 200, description = "The verdict.", body = Assessment),
        (status = 400, description = "`invalid_json`, or `content_too_long` (over 4,000 characters).", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 500, description = "`internal`", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    )
)]
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

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct ReportQuery {
    /// Count over this many days back (default 365, at most 36,500).
    days: Option<u32>,
}

/// Flags and crisis referrals counted over the last N days.
///
/// `GET /api/safety/report?days=N`: flags and crisis referrals counted over
/// the last N days (default 365).
#[utoipa::path(
    get,
    path = "/api/safety/report",
    tag = "safety",
    params(ReportQuery),
    security(("therapist_token" = []), ("therapist_cookie" = [])),
    responses(
        (status = 200, description = "The counts.", body = SafetyReport),
        (status = 400, description = "`invalid_query`", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 500, description = "`internal`", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    )
)]
async fn report(
    State(state): State<AppState>,
    _caller: AuthTherapist,
    Query(query): Query<ReportQuery>,
) -> Result<Json<SafetyReport>, ApiError> {
    let days = query.days.unwrap_or(365).min(36_500);
    let version = state.escalation.detector_version();
    Ok(Json(crate::safety::report(state.store.as_ref(), days, version).await?))
}

/// A session's flag and its audit trail.
///
/// `GET /api/sessions/{id}/risk`: a session's flag and audit trail, for a
/// therapist who can see the session.
#[utoipa::path(
    get,
    path = "/api/sessions/{session_id}/risk",
    tag = "safety",
    params(SessionPath),
    security(("therapist_token" = []), ("therapist_cookie" = [])),
    responses(
        (status = 200, description = "The flag (level `none` if never flagged) and the trail.", body = SessionRisk),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`: another therapist's chat.", body = ErrorBody),
        (status = 404, description = "`not_found`: no such session.", body = ErrorBody),
        (status = 500, description = "`internal`", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    )
)]
async fn session_risk(
    State(state): State<AppState>,
    Path(session_id): Path<String>,
    caller: AuthTherapist,
) -> Result<Json<SessionRisk>, ApiError> {
    let session = visible_session(&state, &session_id, &caller).await?;
    Ok(Json(risk_of(&state, &session).await?))
}

/// The therapist has seen the flag.
///
/// `POST /api/sessions/{id}/risk/acknowledge {"note"}`: the therapist has
/// seen the flag. It is recorded in the audit trail with the note; the
/// level stays, and a later flag needs attention again.
#[utoipa::path(
    post,
    path = "/api/sessions/{session_id}/risk/acknowledge",
    tag = "safety",
    params(SessionPath),
    request_body = AcknowledgeRequest,
    security(("therapist_token" = []), ("therapist_cookie" = [])),
    responses(
        (status = 200, description = "The flag, acknowledged.", body = SessionRisk),
        (status = 400, description = "`invalid_json`, or `note_too_long` (over 2,000 characters).", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`: another therapist's chat.", body = ErrorBody),
        (status = 404, description = "`not_found`: no such session.", body = ErrorBody),
        (status = 409, description = "`conflict`: the session has no flag to acknowledge.", body = ErrorBody),
        (status = 413, description = "`payload_too_large`", body = ErrorBody),
        (status = 500, description = "`internal`", body = ErrorBody),
        (status = 503, description = "`unavailable`", body = ErrorBody),
    )
)]
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
