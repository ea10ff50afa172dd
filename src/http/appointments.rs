//! The therapist's appointments list.

use axum::Router;
use std::convert::Infallible;

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::routing::get;
use futures_util::Stream;
use haven_protocol::api::Appointment;
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;

use super::{ApiError, Json};
use crate::auth::{self, AuthTherapist};
use crate::chat::Revocation;
use crate::startup::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/appointments", get(list_appointments))
        .route("/api/appointments/events", get(appointment_events))
}

/// `GET /api/appointments`: open sessions and the caller's own, oldest first.
async fn list_appointments(
    State(state): State<AppState>,
    caller: AuthTherapist,
) -> Result<Json<Vec<Appointment>>, ApiError> {
    let sessions = state.store.appointments_for(caller.therapist.id).await?;
    let appointments = sessions
        .into_iter()
        .map(|session| Appointment {
            appointment_id: session.appointment_id,
            session_id: session.id,
            status: session.status,
            chat_mode: session.chat_mode,
            therapist_id: session.therapist_id,
            created_at: session.created_at,
            last_message_at: session.last_message_at,
        })
        .collect();
    Ok(Json(appointments))
}

/// `GET /api/appointments/events`: server-sent `changed` events whenever the
/// list may have changed; the dashboard then re-reads `/api/appointments`.
async fn appointment_events(
    State(state): State<AppState>,
    caller: AuthTherapist,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    /// What the stream waits on; it ends at shutdown and when its login ends.
    struct Feed {
        changes: broadcast::Receiver<()>,
        revocations: broadcast::Receiver<Revocation>,
        shutdown: tokio_util::sync::CancellationToken,
        login: [u8; 32],
        therapist_id: uuid::Uuid,
    }
    let feed = Feed {
        changes: state.hub.watch_appointments(),
        revocations: state.hub.watch_revocations(),
        shutdown: state.shutdown.clone(),
        login: auth::token_hash(&caller.token),
        therapist_id: caller.therapist.id,
    };
    let events = futures_util::stream::unfold(feed, |mut feed| async move {
        loop {
            tokio::select! {
                () = feed.shutdown.cancelled() => return None,
                revoked = feed.revocations.recv() => match revoked {
                    Ok(Revocation::Login(hash)) if hash == feed.login => return None,
                    Ok(Revocation::Therapist(id)) if id == feed.therapist_id => return None,
                    Err(RecvError::Closed) => return None,
                    _ => continue,
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
    Sse::new(events).keep_alive(KeepAlive::default())
}
