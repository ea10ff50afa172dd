//! The therapist's appointments list.

use axum::Router;
use std::cmp::Reverse;
use std::convert::Infallible;

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::routing::get;
use futures_util::Stream;
use haven_protocol::RiskLevel;
use haven_protocol::api::Appointment;
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;

use super::{ApiError, Json};
use crate::auth::{self, AuthTherapist};
use crate::chat::{Revocation, RiskAlert};
use crate::limits::Slot;
use crate::startup::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/appointments", get(list_appointments))
        .route("/api/appointments/events", get(appointment_events))
}

/// `GET /api/appointments`: open sessions and the caller's own. Flagged
/// sessions that need attention come first, highest level first; then the
/// other flagged ones; then the rest, oldest first.
async fn list_appointments(
    State(state): State<AppState>,
    caller: AuthTherapist,
) -> Result<Json<Vec<Appointment>>, ApiError> {
    let sessions = state.store.appointments_for(caller.therapist.id).await?;
    let mut appointments: Vec<Appointment> = sessions
        .into_iter()
        .map(|session| Appointment {
            appointment_id: session.appointment_id,
            session_id: session.id,
            status: session.status,
            chat_mode: session.chat_mode,
            therapist_id: session.therapist_id,
            created_at: session.created_at,
            last_message_at: session.last_message_at,
            risk_level: session.risk.as_ref().map_or(RiskLevel::None, |risk| risk.level),
            risk_first_flagged_at: session.risk.as_ref().map(|risk| risk.first_flagged_at),
            risk_last_flagged_at: session.risk.as_ref().map(|risk| risk.last_flagged_at),
            risk_needs_attention: session.risk.as_ref().is_some_and(|risk| risk.needs_attention()),
        })
        .collect();
    // A stable sort keeps the store's oldest-first order within each group.
    appointments.sort_by_key(|appointment| {
        (Reverse(appointment.risk_needs_attention), Reverse(appointment.risk_level))
    });
    Ok(Json(appointments))
}

/// `GET /api/appointments/events`: server-sent `changed` events whenever the
/// list may have changed (the dashboard then re-reads `/api/appointments`),
/// and a `risk` event `{"session_id", "level"}` the moment a session the
/// caller can see is flagged. A login holds at most
/// `--max-event-streams-per-login` streams (429 beyond). A stream ends at
/// shutdown, at once when its login is revoked on this instance, and
/// otherwise within one heartbeat interval of its login ending in any way
/// (logout or revocation elsewhere, `haven therapist disable` or `passwd`,
/// idle expiry): like a socket's heartbeat, it re-checks its credential.
async fn appointment_events(
    State(state): State<AppState>,
    caller: AuthTherapist,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    /// What the stream waits on.
    struct Feed {
        changes: broadcast::Receiver<()>,
        risks: broadcast::Receiver<RiskAlert>,
        revocations: broadcast::Receiver<Revocation>,
        recheck: tokio::time::Interval,
        state: AppState,
        login: [u8; 32],
        therapist_id: uuid::Uuid,
        _slot: Slot<[u8; 32]>,
    }
    let login = auth::token_hash(&caller.token);
    let slot = state.limits.open_event_stream(login).ok_or(ApiError::TooManyRequests {
        retry_after: std::time::Duration::from_secs(state.limits.settings.heartbeat_seconds.max(1)),
    })?;
    let period = std::time::Duration::from_secs(state.limits.settings.heartbeat_seconds.max(1));
    let feed = Feed {
        changes: state.hub.watch_appointments(),
        risks: state.hub.watch_risks(),
        revocations: state.hub.watch_revocations(),
        recheck: tokio::time::interval_at(tokio::time::Instant::now() + period, period),
        state: state.clone(),
        login,
        therapist_id: caller.therapist.id,
        _slot: slot,
    };
    let events = futures_util::stream::unfold(feed, |mut feed| async move {
        loop {
            tokio::select! {
                () = feed.state.shutdown.cancelled() => return None,
                _ = feed.recheck.tick() => {
                    let settings = &feed.state.settings;
                    // Reading does not count as activity: an open dashboard
                    // does not keep an idle login alive.
                    match feed.state.store.therapist_by_token(&feed.login, haven_store::now(), settings.therapist_idle, false).await {
                        Ok(Some(_)) => continue,
                        Ok(None) => {
                            tracing::info!("event stream: login ended, closing");
                            return None;
                        }
                        // A database outage is not the therapist's fault.
                        Err(error) => {
                            tracing::warn!(error = %error, "event stream: credential re-check failed");
                            continue;
                        }
                    }
                }
                revoked = feed.revocations.recv() => match revoked {
                    Ok(Revocation::Login(hash)) if hash == feed.login => return None,
                    Ok(Revocation::Therapist(id)) if id == feed.therapist_id => return None,
                    Err(RecvError::Closed) => return None,
                    _ => continue,
                },
                alert = feed.risks.recv() => match alert {
                    Ok(alert) if alert.visible_to(feed.therapist_id) => {
                        let data = serde_json::json!({"session_id": alert.session_id, "level": alert.level});
                        return Some((Ok(SseEvent::default().event("risk").data(data.to_string())), feed));
                    }
                    // Missed alerts still show in the list the next `changed` brings.
                    Ok(_) | Err(RecvError::Lagged(_)) => continue,
                    Err(RecvError::Closed) => return None,
                },
                next = feed.changes.recv() => match next {
                    // A lagged receiver missed some ticks; one refresh covers them all.
                    Ok(()) | Err(RecvError::Lagged(_)) => {
                        return Some((Ok(SseEvent::default().event("changed").data("{}")), feed));
                    }
                    Err(RecvError::Closed) => return None,
                },
            }
        }
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}
