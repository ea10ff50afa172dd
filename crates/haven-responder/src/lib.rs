//! Companion responders: who answers a client while no therapist has joined.
//!
//! A [`Responder`] turns the recent conversation into a reply streamed as
//! text chunks, so providers that generate token by token (issue: real LLM
//! providers) fit the same trait as the built-in [`Companion`]. The server
//! commits the reply only if the session is still `BOT_ONLY` at commit time;
//! a responder never needs to know about the takeover.

use futures_util::stream::BoxStream;
use haven_protocol::Sender;

mod companion;

pub use companion::Companion;

/// One turn of the conversation, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    pub sender: Sender,
    pub content: String,
}

/// What a responder is asked to answer: the recent turns of one session, the
/// last of which is the client's newest message.
#[derive(Debug, Clone, Default)]
pub struct ReplyRequest {
    pub history: Vec<Turn>,
}

impl ReplyRequest {
    /// The client's newest message, if the history has one.
    pub fn last_user_message(&self) -> Option<&str> {
        self.history
            .iter()
            .rev()
            .find(|turn| turn.sender == Sender::User)
            .map(|turn| turn.content.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ResponderError {
    #[error("responder unavailable: {0}")]
    Unavailable(String),
}

/// Produces companion replies.
pub trait Responder: Send + Sync + 'static {
    /// A short name for logs (`companion`, `gemini`, …).
    fn name(&self) -> &'static str;

    /// The reply as a stream of text chunks; their concatenation is the reply.
    /// Dropping the stream cancels the generation.
    fn reply(&self, request: ReplyRequest) -> BoxStream<'static, Result<String, ResponderError>>;
}
