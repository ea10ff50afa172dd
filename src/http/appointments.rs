//! The therapist's appointments list.

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use haven_protocol::api::Appointment;

use super::{ApiError, Json};
use crate::auth::AuthTherapist;
use crate::startup::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/api/appointments", get(list_appointments))
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
