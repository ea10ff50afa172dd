//! Live fan-out within one process: one room per chat session with a
//! broadcast channel of committed events.
//!
//! Events are published only after their transaction committed, and every
//! event carries the message's seq. A receiver that sees a seq beyond the
//! next one it expects (a concurrent writer published out of order, or the
//! channel lagged) reads the missing messages from the database, which has
//! them already; one that sees a seq it has delivered drops it. So the
//! channel may reorder or drop, and clients still see every message once, in
//! order.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};

use axum::extract::ws::Utf8Bytes;
use haven_protocol::{ChatMessage, ChatMode, ServerFrame};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Events buffered per room before a slow receiver lags (and then catches
/// up from the database).
const ROOM_CAPACITY: usize = 256;

type Rooms = Mutex<HashMap<Uuid, Weak<Room>>>;

/// All rooms of this process, and the therapists' dashboard feed.
pub struct Hub {
    /// Rooms are owned by their connections and companion tasks; the map
    /// holds weak references and a room removes itself when the last owner
    /// drops it.
    rooms: Arc<Rooms>,
    /// Ticks whenever the appointments list may have changed (a session was
    /// created, joined or written to). Carries no data: dashboards re-read
    /// the list through the API, which applies each therapist's rights.
    appointments: broadcast::Sender<()>,
}

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}

impl Hub {
    pub fn new() -> Self {
        Self {
            rooms: Arc::default(),
            appointments: broadcast::channel(16).0,
        }
    }

    /// Tells open dashboards to refresh.
    pub fn appointments_changed(&self) {
        let _ = self.appointments.send(());
    }

    pub fn watch_appointments(&self) -> broadcast::Receiver<()> {
        self.appointments.subscribe()
    }

    /// The room of a session, created on first use.
    pub fn room(&self, session_id: Uuid) -> Arc<Room> {
        let mut rooms = lock(&self.rooms);
        if let Some(room) = rooms.get(&session_id).and_then(Weak::upgrade) {
            return room;
        }
        let (events, _) = broadcast::channel(ROOM_CAPACITY);
        let room = Arc::new(Room {
            session_id,
            events,
            takeover: CancellationToken::new(),
            connections: AtomicUsize::new(0),
            rooms: Arc::downgrade(&self.rooms),
        });
        rooms.insert(session_id, Arc::downgrade(&room));
        room
    }
}

/// One committed message, ready to send, plus the mode it left the session in.
#[derive(Debug, Clone)]
pub struct Event {
    pub seq: i64,
    /// The `message` frame, serialised once for every receiver.
    pub frame: Utf8Bytes,
    /// Set when this message changed the session's mode (the join message).
    pub mode: Option<ChatMode>,
}

impl Event {
    pub fn new(message: ChatMessage, mode: Option<ChatMode>) -> Self {
        let seq = message.seq;
        Self {
            seq,
            frame: frame_text(&ServerFrame::Message(message)),
            mode,
        }
    }
}

/// A frame as WebSocket text.
pub fn frame_text(frame: &ServerFrame) -> Utf8Bytes {
    // Serialising these plain structs cannot fail.
    serde_json::to_string(frame).unwrap_or_default().into()
}

/// Live state of one chat session in this process.
pub struct Room {
    pub session_id: Uuid,
    events: broadcast::Sender<Event>,
    /// Cancelled when a therapist takes over, stopping companion replies in
    /// flight. The database check at commit is what guarantees silence; this
    /// only saves the work.
    pub takeover: CancellationToken,
    connections: AtomicUsize,
    rooms: Weak<Rooms>,
}

impl Room {
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// Sends a committed event to every connection of the session here.
    pub fn publish(&self, event: Event) {
        // No receivers is fine: nobody is connected right now.
        let _ = self.events.send(event);
    }

    /// Counts a connection until the returned guard drops; also returns the
    /// new count for the logs.
    pub fn connect(self: &Arc<Self>) -> (ConnectionGuard, usize) {
        let count = self.connections.fetch_add(1, Ordering::SeqCst) + 1;
        (ConnectionGuard { room: self.clone() }, count)
    }
}

impl Drop for Room {
    fn drop(&mut self) {
        if let Some(rooms) = self.rooms.upgrade() {
            let mut rooms = lock(&rooms);
            // A new room for the same session may already have replaced this one.
            if rooms
                .get(&self.session_id)
                .is_some_and(|room| room.strong_count() == 0)
            {
                rooms.remove(&self.session_id);
            }
        }
    }
}

/// Keeps a room's connection count while a socket is open.
pub struct ConnectionGuard {
    room: Arc<Room>,
}

impl ConnectionGuard {
    pub fn room(&self) -> &Arc<Room> {
        &self.room
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.room.connections.fetch_sub(1, Ordering::SeqCst);
    }
}

fn lock(rooms: &Rooms) -> std::sync::MutexGuard<'_, HashMap<Uuid, Weak<Room>>> {
    // The map stays consistent under every panic point (single insert/remove).
    rooms
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_room_is_shared_while_owned_and_removed_after() {
        let hub = Hub::default();
        let id = Uuid::now_v7();
        let room = hub.room(id);
        assert!(Arc::ptr_eq(&room, &hub.room(id)));
        drop(room);
        assert!(lock(&hub.rooms).is_empty());
    }
}
