//! What a client whose chat waits for a therapist is told (the `queue`
//! frame): how many therapists are online now, and how many waiting chats
//! come before theirs in the therapists' list. No estimated wait: nothing
//! here could honestly compute one.
//!
//! A therapist counts as online while they have the appointments list or a
//! chat socket open, on any instance ([`OnDuty`]). The order is the
//! appointments list's, read from the database after the list may have
//! changed, at most about twice a second, and only while some client is
//! waiting to hear it.

use std::time::Duration;

use tokio::sync::broadcast::error::RecvError;
use uuid::Uuid;

use super::announce;
use super::hub::Queue;
use crate::http::appointments::waiting_order;
use crate::startup::AppState;

/// How long the queue waits for more changes before it is read again.
const SETTLE: Duration = Duration::from_millis(500);

/// Runs until shutdown.
pub async fn run(state: AppState) {
    let mut changes = state.hub.watch_appointments();
    loop {
        if state.hub.queue_watched() {
            match read(&state).await {
                Ok(queue) => state.hub.set_queue(queue),
                Err(error) => tracing::warn!(error = %error, "could not read the waiting queue"),
            }
        }
        tokio::select! {
            () = state.shutdown.cancelled() => return,
            () = state.hub.staffing_changed() => {}
            change = changes.recv() => if let Err(RecvError::Closed) = change { return },
        }
        tokio::select! {
            () = state.shutdown.cancelled() => return,
            () = tokio::time::sleep(SETTLE) => {}
        }
        // The changes meanwhile are covered by the next read.
        changes = changes.resubscribe();
    }
}

async fn read(state: &AppState) -> haven_store::Result<Queue> {
    let waiting_since = haven_store::now() - state.settings.waiting_window;
    // No therapist has the nil id: this is the chats waiting for anyone.
    let sessions = state.store.appointments_for(Uuid::nil(), waiting_since).await?;
    let order = waiting_order(sessions.iter().filter(|session| session.therapist_id.is_none()));
    Ok(Queue {
        therapists_online: u32::try_from(state.hub.therapists_online()).unwrap_or(u32::MAX),
        ahead: order.into_iter().zip(0..).collect(),
    })
}

/// Counts a therapist as online while it lives: held by each of their
/// appointments lists and chat sockets.
pub struct OnDuty {
    state: AppState,
    therapist_id: Uuid,
}

impl OnDuty {
    pub fn start(state: &AppState, therapist_id: Uuid) -> Self {
        if let Some(event) = state.hub.on_duty(therapist_id) {
            announce(state, event);
        }
        Self { state: state.clone(), therapist_id }
    }
}

impl Drop for OnDuty {
    fn drop(&mut self) {
        if let Some(event) = self.state.hub.off_duty(self.therapist_id) {
            announce(&self.state, event);
        }
    }
}
