//! `relay`: the baseline. A bare WebSocket relay on the same stack as Haven
//! (axum's ws over tokio-tungstenite) that speaks just enough of Haven's
//! protocol for `direct --bare`: no credentials, no storage, no limits.
//!
//! `GET /api/chat/ws/{room}`: the connection gets a `mode` frame
//! (`THERAPIST_JOINED`), then every client frame is numbered within its
//! room, acked to its sender and sent as a `message` to every connection of
//! the room, as Haven does, but from memory. `?role=therapist` sets the
//! sender. So the figures of `direct --bare` are what this machine can do
//! with the same sockets, frames and JSON, without Haven's work.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use axum::Router;
use axum::extract::ws::{Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::response::Response;
use axum::routing::get;
use clap::Args as ClapArgs;
use futures_util::{SinkExt, StreamExt};
use haven_protocol::{
    ChatMessage, ChatMode, ClientInput, MessageKind, Sender, ServerFrame, parse_client_frame,
};
use serde::Deserialize;
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::net::{Result, loopback};

/// Frames buffered per room, as in Haven.
const ROOM_CAPACITY: usize = 256;

#[derive(Debug, ClapArgs)]
pub struct Args {
    /// Address to listen on (loopback only). Port 0 picks a free port; the
    /// address is printed on stdout.
    #[arg(long, default_value = "127.0.0.1:0", value_parser = loopback)]
    pub bind: SocketAddr,

    /// Stop after this many seconds, whatever happens.
    #[arg(long, default_value_t = 3600)]
    pub max_seconds: u64,
}

#[derive(Default)]
struct Relay {
    rooms: Mutex<HashMap<String, Weak<Room>>>,
}

struct Room {
    /// Held while a message is numbered and published, so seqs go out in order.
    seq: Mutex<i64>,
    events: broadcast::Sender<Utf8Bytes>,
}

impl Relay {
    fn room(&self, name: &str) -> Arc<Room> {
        let mut rooms = self.rooms.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(room) = rooms.get(name).and_then(Weak::upgrade) {
            return room;
        }
        rooms.retain(|_, room| room.strong_count() > 0);
        let room = Arc::new(Room { seq: Mutex::new(0), events: broadcast::channel(ROOM_CAPACITY).0 });
        rooms.insert(name.to_owned(), Arc::downgrade(&room));
        room
    }
}

pub async fn run(args: Args) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(args.bind).await?;
    let address = listener.local_addr()?;
    let router =
        Router::new().route("/api/chat/ws/{room}", get(upgrade)).with_state(Arc::new(Relay::default()));
    println!("relay listening on http://{address}");
    let deadline = tokio::time::sleep(Duration::from_secs(args.max_seconds));
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                () = deadline => {}
            }
        })
        .await?;
    Ok(())
}

#[derive(Debug, Deserialize)]
struct RoleQuery {
    role: Option<String>,
}

async fn upgrade(
    State(relay): State<Arc<Relay>>,
    Path(room): Path<String>,
    Query(query): Query<RoleQuery>,
    upgrade: WebSocketUpgrade,
) -> Response {
    let sender = if query.role.as_deref() == Some("therapist") { Sender::Therapist } else { Sender::User };
    let room = relay.room(&room);
    // Haven's write buffer sizes. Haven reads with a 1 KiB buffer; the read
    // buffer's size did not change Haven's throughput (docs/benchmarks.md).
    upgrade
        .read_buffer_size(16 * 1024)
        .write_buffer_size(16 * 1024)
        .max_write_buffer_size(256 * 1024)
        .max_message_size(1024 * 1024)
        .on_upgrade(move |socket| connection(socket, room, sender))
}

fn text(frame: &ServerFrame) -> Utf8Bytes {
    serde_json::to_string(frame).unwrap_or_default().into()
}

async fn connection(socket: WebSocket, room: Arc<Room>, sender: Sender) {
    let mut events = room.events.subscribe();
    let (mut sink, mut incoming) = socket.split();
    if sink
        .send(Message::Text(text(&ServerFrame::Mode {
            chat_mode: ChatMode::TherapistJoined,
            companion_paused: false,
        })))
        .await
        .is_err()
    {
        return;
    }
    loop {
        tokio::select! {
            message = incoming.next() => match message {
                Some(Ok(Message::Text(frame))) => {
                    let reply = match parse_client_frame(&frame) {
                        Ok(ClientInput::Typing { .. } | ClientInput::ResumeCompanion) => continue,
                        Ok(ClientInput::Message(new)) => {
                            let mut seq = room.seq.lock().unwrap_or_else(PoisonError::into_inner);
                            *seq += 1;
                            let message = ChatMessage {
                                seq: *seq,
                                id: Uuid::now_v7(),
                                sender,
                                kind: MessageKind::Chat,
                                content: new.content,
                                created_at: time::OffsetDateTime::now_utc(),
                                client_id: Some(new.client_id.clone()),
                                reply_id: None,
                                private: false,
                            };
                            let _ = room.events.send(text(&ServerFrame::Message(message)));
                            ServerFrame::Ack { client_id: new.client_id, seq: *seq }
                        }
                        Err(error) => error.into_frame(),
                    };
                    if sink.send(Message::Text(text(&reply))).await.is_err() {
                        return;
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
            event = events.recv() => match event {
                Ok(frame) => {
                    if sink.send(Message::Text(frame)).await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}
