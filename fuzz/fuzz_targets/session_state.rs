//! The companion's state machine in one session, driven by any sequence of
//! events: client messages starting replies, deltas, commits, failures, the
//! takeover, deltas relayed from other instances, closing the chat. Whatever
//! the order, there is one reply at a time, and no companion output follows
//! the join (or closing) message.
#![no_main]

use haven::chat::{Finished, Hub};
use haven_protocol::{ChatMessage, Sender};
use libfuzzer_sys::fuzz_target;
use uuid::Uuid;

fn message(seq: i64, sender: Sender) -> ChatMessage {
    ChatMessage {
        seq,
        id: Uuid::now_v7(),
        sender,
        content: String::new(),
        created_at: time::OffsetDateTime::UNIX_EPOCH,
        client_id: None,
        reply_id: None,
    }
}

fuzz_target!(|steps: &[u8]| {
    let hub = Hub::default();
    let room = hub.room(Uuid::now_v7());
    let mut events = room.subscribe();
    let mut current: Option<Uuid> = None;
    let mut seq = 0;
    // After the join (or the closing) the database refuses companion commits.
    let mut ended = false;
    for step in steps.iter().take(256) {
        match step % 7 {
            0 => {
                let started = room.start_generation();
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
                        Finished::Committed(message(seq, Sender::Ai))
                    } else {
                        Finished::Abandoned
                    };
                    current = room.finish_generation(reply, finished);
                }
            }
            4 => {
                seq += 1;
                ended = true;
                room.takeover(message(seq, Sender::System));
            }
            5 => room.relay_delta(Uuid::now_v7(), "remote".into()),
            _ => {
                seq += 1;
                ended = true;
                room.close_chat(message(seq, Sender::System));
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
