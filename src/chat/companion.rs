//! Companion replies: generated off the connection's task, committed only if
//! the session is still `BOT_ONLY`, and abandoned as soon as a therapist
//! takes over.

use std::sync::Arc;

use futures_util::StreamExt;
use haven_responder::{ReplyRequest, Turn};
use tracing::Instrument;

use super::hub::{Event, Room};
use crate::startup::AppState;

/// How many of the latest messages the companion sees.
const HISTORY_TURNS: i64 = 20;

/// Starts a reply to the client message with seq `trigger_seq`. The task is
/// owned by the app's task tracker, so shutdown waits for it.
pub fn spawn(state: &AppState, room: Arc<Room>, trigger_seq: i64) {
    let state_for_task = state.clone();
    state
        .tasks
        .spawn(reply(state_for_task, room, trigger_seq).in_current_span());
}

async fn reply(state: AppState, room: Arc<Room>, trigger_seq: i64) {
    let first = (trigger_seq - HISTORY_TURNS).max(0);
    let history = match state
        .store
        .messages_after(room.session_id, first, trigger_seq - first)
        .await
    {
        Ok(messages) => messages,
        Err(error) => {
            tracing::error!(error = %error, "companion could not read the history");
            return;
        }
    };
    let request = ReplyRequest {
        history: history
            .into_iter()
            .map(|message| Turn {
                sender: message.sender,
                content: message.content,
            })
            .collect(),
    };

    let mut chunks = state.responder.reply(request);
    let mut text = String::new();
    loop {
        tokio::select! {
            biased;
            () = room.takeover.cancelled() => {
                tracing::info!("companion reply cancelled: therapist joined");
                return;
            }
            chunk = chunks.next() => match chunk {
                Some(Ok(chunk)) => text.push_str(&chunk),
                Some(Err(error)) => {
                    tracing::warn!(responder = state.responder.name(), error = %error, "companion failed");
                    return;
                }
                None => break,
            },
        }
    }
    if text.trim().is_empty() {
        tracing::warn!(
            responder = state.responder.name(),
            "companion returned an empty reply"
        );
        return;
    }

    // The check that the session is still BOT_ONLY is part of the insert's
    // transaction: a therapist who joined while we were generating wins.
    match state
        .store
        .append_companion_reply(room.session_id, &text)
        .await
    {
        Ok(Some(message)) => {
            tracing::info!(seq = message.seq, "companion reply stored");
            room.publish(Event::new(message, None));
        }
        Ok(None) => tracing::info!("companion reply discarded: therapist joined"),
        Err(error) => tracing::error!(error = %error, "companion reply not stored"),
    }
}
