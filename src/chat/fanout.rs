//! Events from other Haven instances sharing the database, delivered to
//! this instance's sockets.
//!
//! A message committed elsewhere arrives as its session and seq; it is read
//! from the database and published to the local room, where connections
//! order it by seq like any other. The join message also runs the local
//! takeover, which cancels a companion reply this instance is generating.
//! Notifications can be lost; after the listener reconnects, every local
//! room re-reads its session from the database.

use haven_store::{Announcement, Listener, Notification};

use super::RiskAlert;
use crate::startup::AppState;

/// Runs until shutdown.
pub async fn run(state: AppState, mut listener: Box<dyn Listener>) {
    loop {
        let notification = tokio::select! {
            () = state.shutdown.cancelled() => return,
            notification = listener.next() => notification,
        };
        match notification {
            Notification::Message { session_id, seq, join } => {
                state.hub.appointments_changed();
                let Some(room) = state.hub.existing_room(session_id) else { continue };
                match state.store.messages_after(session_id, seq - 1, 1).await {
                    Ok(mut found) if !found.is_empty() => {
                        let message = found.remove(0);
                        if join {
                            tracing::info!(session_id = %session_id, "therapist joined on another instance");
                            room.takeover(message);
                        } else {
                            room.publish(message);
                        }
                    }
                    // Connections fill the gap when the next event arrives,
                    // or at the resync below.
                    Ok(_) => room.resync(),
                    Err(error) => {
                        tracing::warn!(error = %error, "could not read a message announced by another instance");
                        room.resync();
                    }
                }
            }
            Notification::AppointmentsChanged => state.hub.appointments_changed(),
            Notification::Risk { session_id, level, therapist_id } => {
                state.hub.risk_flagged(RiskAlert { session_id, level, therapist_id });
            }
            Notification::Announced(Announcement::Delta { session_id, reply_id, delta }) => {
                if let Some(room) = state.hub.existing_room(session_id) {
                    room.relay_delta(reply_id, delta);
                }
            }
            Notification::Announced(Announcement::Cancelled { session_id, reply_id }) => {
                if let Some(room) = state.hub.existing_room(session_id) {
                    room.relay_cancelled(reply_id);
                }
            }
            Notification::Reconnected => {
                tracing::info!("notification listener reconnected: re-reading open sessions");
                state.hub.appointments_changed();
                for room in state.hub.rooms() {
                    room.resync();
                }
            }
        }
    }
}
