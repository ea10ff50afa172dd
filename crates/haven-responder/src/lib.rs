//! Companion responders: who answers a client while no therapist has joined.
//!
//! A [`Responder`] turns the recent conversation into a reply streamed as
//! text chunks, so providers that generate token by token (issue: real LLM
//! providers) fit the same trait as the built-in [`Companion`]. The server
//! commits the reply only if the session is still `BOT_ONLY` at commit time;
//! a responder never needs to know about the takeover.
//!
//! Responders also take part in crisis detection, which the server runs:
//! a reply can be asked to check in on the client's safety
//! ([`ReplyRequest::check_in_on_safety`]), and a model can give a second
//! opinion on a message's risk ([`Responder::assess_risk`]).

use futures_util::future::BoxFuture;
use futures_util::stream::BoxStream;
use haven_protocol::{MessageKind, RiskLevel, Sender};

mod companion;
mod llm;
pub mod prompt;

pub use companion::Companion;
pub use llm::{LlmResponder, LlmSettings, Provider};

/// One turn of the conversation, oldest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Turn {
    pub sender: Sender,
    /// What the message is to the session: a `handback` system message
    /// ends the therapist's part.
    pub kind: MessageKind,
    pub content: String,
}

/// What a responder is asked to answer: the recent turns of one session, the
/// last of which is the client's newest message.
#[derive(Debug, Clone, Default)]
pub struct ReplyRequest {
    pub history: Vec<Turn>,
    /// Ask whether the client is safe right now before anything else: set by
    /// the server when the session's risk level is `concern`. A model is told
    /// to do so in its system prompt; the built-in companion opens its reply
    /// with [`Companion::SAFETY_CHECK_IN`].
    pub check_in_on_safety: bool,
}

impl ReplyRequest {
    /// The client's newest message, if the history has one.
    pub fn last_user_message(&self) -> Option<&str> {
        self.history.iter().rev().find(|turn| turn.sender == Sender::User).map(|turn| turn.content.as_str())
    }
}

/// Why a reply could not be produced. The texts name the failure only:
/// they never contain what was written or the provider's response body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponderError {
    #[error("the model did not answer in time")]
    Timeout,
    #[error("the provider is rate limiting (HTTP 429)")]
    RateLimited,
    #[error("the provider failed (HTTP {0})")]
    ServerError(u16),
    #[error("the provider refused the API key")]
    Unauthorized,
    #[error("the provider rejected the request (HTTP {0})")]
    Rejected(u16),
    #[error("the provider could not be reached")]
    Unreachable,
    #[error("the provider sent a malformed stream")]
    Malformed,
    #[error("the provider's stream was cut off")]
    Truncated,
    #[error("the model returned no text")]
    Empty,
    #[error("{0}")]
    Misconfigured(&'static str),
}

impl ResponderError {
    /// What kind of failure this is, as a metric label.
    pub fn kind(&self) -> &'static str {
        match self {
            ResponderError::Timeout => "timeout",
            ResponderError::RateLimited => "rate_limited",
            ResponderError::ServerError(_) => "server_error",
            ResponderError::Unauthorized => "unauthorized",
            ResponderError::Rejected(_) => "rejected",
            ResponderError::Unreachable => "unreachable",
            ResponderError::Malformed => "malformed",
            ResponderError::Truncated => "truncated",
            ResponderError::Empty => "empty",
            ResponderError::Misconfigured(_) => "misconfigured",
        }
    }

    /// Worth another attempt, if no text has been shown yet.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::RateLimited | Self::ServerError(_) | Self::Unreachable)
    }
}

/// Produces companion replies.
pub trait Responder: Send + Sync + 'static {
    /// A short name for logs (`companion`, `gemini`, …).
    fn name(&self) -> &'static str;

    /// The reply as a stream of text chunks; their concatenation is the reply.
    /// Dropping the stream cancels the generation.
    fn reply(&self, request: ReplyRequest) -> BoxStream<'static, Result<String, ResponderError>>;

    /// A second opinion on the risk in one client message, from the model.
    /// `None` when this responder gives none (the built-in companion) or the
    /// model failed; the caller only ever uses it to raise a level.
    fn assess_risk(&self, text: &str) -> BoxFuture<'static, Option<RiskLevel>> {
        let _ = text;
        Box::pin(std::future::ready(None))
    }
}
