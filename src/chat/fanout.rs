//! Events from other Haven instances sharing the database, delivered to
//! this instance's sockets through the same [`Hub::apply`](super::Hub::apply)
//! as this instance's own writes.
//!
//! A message committed elsewhere arrives as its session, seq and kind; it
//! is read from the database and applied like a local one: published to
//! the local room, where connections order it by seq like any other, and
//! at a join or a close the room's takeover or close runs too.
//! Notifications can be lost; after the listener reconnects, every local
//! room re-reads its session from the database.

use std::sync::atomic::Ordering;

use haven_store::{Listener, Notification, SessionEvent};

use crate::startup::AppState;

/// Runs until shutdown.
pub async fn run(state: AppState, mut listener: Box<dyn Listener>) {
    // The other instances tell who of their clients and therapists is here.
    announce(&state, state.hub.ask_presence_again()).await;
    loop {
        let notification = tokio::select! {
            () = state.shutdown.cancelled() => return,
            notification = listener.next() => notification,
        };
        match notification {
            Notification::Event(SessionEvent::Message { session_id, seq, kind, .. }) => {
                // Only a session with sockets here needs the message itself.
                let message = match state.hub.existing_room(session_id) {
                    Some(_) => read(&state, session_id, seq).await,
                    None => None,
                };
                if kind == haven_protocol::MessageKind::Join && message.is_some() {
                    tracing::info!(session_id = %session_id, "therapist joined on another instance");
                }
                state.hub.apply([SessionEvent::Message { session_id, seq, kind, message }]);
            }
            Notification::Event(event) => {
                let answers = match event {
                    // Another instance opened its first socket of a session
                    // this one has sockets of: it learns who is here.
                    SessionEvent::Presence { session_id, ask: true, .. } => {
                        state.hub.presence_here(session_id)
                    }
                    // Another instance started listening: it learns every
                    // presence here (after forgetting what it said before).
                    SessionEvent::PresenceQuestion { .. } => state.hub.presence_everywhere(),
                    _ => Vec::new(),
                };
                state.hub.apply([event]);
                announce(&state, answers).await;
            }
            Notification::Lost => state.listening.store(false, Ordering::Relaxed),
            Notification::Reconnected => {
                metrics::counter!("haven_notification_reconnects_total").increment(1);
                state.listening.store(true, Ordering::Relaxed);
                tracing::info!("notification listener reconnected: re-reading open sessions");
                state.hub.appointments_changed();
                for room in state.hub.rooms() {
                    room.resync();
                }
                announce(&state, state.hub.ask_presence_again()).await;
            }
        }
    }
}

/// Tells the other instances about presence (not stored; a lost one is
/// told again when their listener reconnects).
async fn announce(state: &AppState, events: Vec<SessionEvent>) {
    for event in events {
        if let Err(error) = state.store.announce(event).await {
            tracing::debug!(error = %error, "could not announce presence");
        }
    }
}

/// The message another instance committed as `seq`; `None` when it cannot
/// be read now (connections then read the gap themselves).
async fn read(
    state: &AppState,
    session_id: uuid::Uuid,
    seq: i64,
) -> Option<Box<haven_protocol::ChatMessage>> {
    match state.store.messages_after(session_id, seq - 1, 1).await {
        Ok(mut found) if found.first().is_some_and(|message| message.seq == seq) => {
            Some(Box::new(found.remove(0)))
        }
        Ok(_) => None,
        Err(error) => {
            tracing::warn!(error = %error, "could not read a message announced by another instance");
            None
        }
    }
}
