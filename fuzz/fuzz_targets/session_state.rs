//! The companion's state machine in one session, driven by any sequence of
//! events: client messages starting replies, deltas, commits, failures, and
//! the committed events that reach the hub (`Hub::apply`): the takeover,
//! deltas relayed from other instances, closing the chat. Whatever the
//! order, there is one reply at a time, and no companion output follows the
//! join (or closing) message.
#![no_main]

use haven::chat::{Finished, Hub};
use haven_protocol::{ChatMessage, MessageKind, Sender};
use haven_store::SessionEvent;
use libfuzzer_sys::fuzz_target;
use uuid::Uuid;

fn message(seq: i64, sender: Sender, kind: MessageKind) -> ChatMessage {
    ChatMessage {
        seq,
        id: Uuid::now_v7(),
        sender,
        kind,
        content: String::new(),
        created_at: time::OffsetDateTime::UNIX_EPOCH,
        client_id: None,
        reply_id: None,
        private: false,
    }
}

fuzz_target!(|steps: &[u8]| {
    let hub = Hub::default();
    let session_id = Uuid::now_v7();
    let room = hub.room(session_id);
    let committed = |message| [SessionEvent::message(session_id, message)];
    let mut events = room.subscribe();
    let mut current: Option<Uuid> = None;
    let mut seq = 0;
    // After the join (or the closing) the database refuses companion commits.
    let mut ended = false;
    for step in steps.iter().take(256) {
        match step % 7 {
            0 => {
                let started = room.start_generation(seq, None);
                assert!(started.is_none() || current.is_none(), "two replies at once");
                current = current.or(started);
            }
            1 => {
                if let Some(reply) = current {
                    room.publish_delta(reply, "x".into());
                }
            }
            2 | 3 => {
                if let Some(reply) = current.take() {
                    // Only a stored reply takes a seq.
                    let finished = if step % 7 == 2 && !ended {
                        seq += 1;
                        hub.apply(committed(message(seq, Sender::Ai, MessageKind::Chat)));
                        Finished::Committed
                    } else {
                        Finished::Abandoned
                    };
                    current = room.finish_generation(reply, finished);
                }
            }
            4 => {
                seq += 1;
                ended = true;
                hub.apply(committed(message(seq, Sender::System, MessageKind::Join)));
            }
            5 => {
                let delta = SessionEvent::Delta { session_id, reply_id: Uuid::now_v7(), delta: "remote".into() };
                hub.apply([delta]);
            }
            _ => {
                seq += 1;
                ended = true;
                hub.apply(committed(message(seq, Sender::System, MessageKind::Close)));
            }
        }
    }
    let mut after_end = false;
    while let Ok(event) = events.try_recv() {
        if event.resync {
            continue;
        }
        let frame: serde_json::Value = serde_json::from_str(event.frame.as_str()).unwrap();
        let from_companion = frame["type"] == "ai_delta" || frame["sender"] == "ai";
        assert!(!(after_end && from_companion), "companion output after the join: {frame}");
        after_end |= frame["sender"] == "system";
    }
});
