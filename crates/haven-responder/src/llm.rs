//! Language-model companions: Google Gemini and any OpenAI-compatible
//! Chat Completions server (OpenAI, Ollama, vLLM, llama.cpp).
//!
//! The HTTP and SSE work is done by the `genai` crate, which speaks both
//! providers' streaming formats and takes a custom base URL. This module
//! adds what Haven needs around it: the prompt, one deadline for the whole
//! reply, bounded retries before the first word, and errors that say what
//! failed without repeating what anyone wrote (genai's own error texts can
//! carry request and response bodies, so they are never displayed).
//!
//! The same model also gives a second opinion on the risk in a client's
//! message ([`Responder::assess_risk`]): one short, non-streaming request.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::{BoxFuture, FutureExt};
use futures_util::stream::{self, BoxStream, StreamExt};
use genai::adapter::AdapterKind;
use genai::chat::{ChatMessage, ChatOptions, ChatRequest, ChatStream, ChatStreamEvent};
use genai::resolver::{AuthData, Endpoint};
use genai::{Client, WebConfig};
use haven_protocol::RiskLevel;
use tokio::time::{Instant, timeout_at};

use crate::prompt::{self, Speaker};
use crate::{ReplyRequest, Responder, ResponderError};

/// The most a risk assessment may take, whatever the reply timeout: the
/// server waits for it before deciding how to treat the message.
const ASSESSMENT_TIMEOUT_CAP: Duration = Duration::from_secs(10);

/// Which wire format a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    /// Google's Generative Language API (`streamGenerateContent`, SSE).
    Gemini,
    /// OpenAI-compatible Chat Completions with `stream: true`.
    OpenAi,
}

impl Provider {
    pub fn name(self) -> &'static str {
        match self {
            Provider::Gemini => "gemini",
            Provider::OpenAi => "openai",
        }
    }
}

/// How to reach and use a model.
#[derive(Clone)]
pub struct LlmSettings {
    pub provider: Provider,
    /// The API root including its version path, e.g.
    /// `https://generativelanguage.googleapis.com/v1beta`.
    pub base_url: String,
    pub model: String,
    /// Sent in the provider's header; never logged or displayed.
    pub api_key: Option<String>,
    /// The whole reply, first byte to last, must arrive within this.
    pub timeout: Duration,
    pub system_prompt: String,
    /// How many characters of recent conversation the model sees.
    pub history_chars: usize,
    /// Extra attempts after a 429, a 5xx or an unreachable server, made only
    /// before the first word of a reply.
    pub retries: u32,
}

impl fmt::Debug for LlmSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LlmSettings")
            .field("provider", &self.provider)
            .field("base_url", &self.base_url)
            .field("model", &self.model)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("timeout", &self.timeout)
            .field("history_chars", &self.history_chars)
            .field("retries", &self.retries)
            .finish_non_exhaustive()
    }
}

/// A responder backed by a language model.
#[derive(Clone)]
pub struct LlmResponder {
    client: Client,
    settings: Arc<LlmSettings>,
}

impl LlmResponder {
    pub fn new(settings: LlmSettings) -> Result<Self, ResponderError> {
        let kind = match settings.provider {
            Provider::Gemini => AdapterKind::Gemini,
            Provider::OpenAi => AdapterKind::OpenAI,
        };
        let mut base_url = settings.base_url.trim().to_owned();
        if !base_url.ends_with('/') {
            base_url.push('/');
        }
        // Servers such as Ollama need no key, but the OpenAI adapter always
        // sends one; any placeholder does.
        let key = settings.api_key.clone().unwrap_or_else(|| "none".to_owned());
        let client = Client::builder()
            .with_adapter_kind(kind)
            .append_provider_config(kind, (Endpoint::from_owned(base_url), AuthData::from_single(key)))
            .with_web_config(
                WebConfig::default().with_connect_timeout(settings.timeout.min(Duration::from_secs(10))),
            )
            .build()
            .map_err(|_| ResponderError::Misconfigured("the model client could not be built"))?;
        Ok(Self { client, settings: Arc::new(settings) })
    }

    fn chat_request(&self, request: &ReplyRequest) -> ChatRequest {
        let lines = prompt::conversation(&request.history, self.settings.history_chars);
        let messages = lines.into_iter().map(|line| match line.speaker {
            Speaker::User => ChatMessage::user(line.text),
            Speaker::Assistant => ChatMessage::assistant(line.text),
        });
        let system = prompt::system_prompt(&self.settings.system_prompt, request.check_in_on_safety);
        ChatRequest::from_system(system).append_messages(messages)
    }
}

impl Responder for LlmResponder {
    fn name(&self) -> &'static str {
        self.settings.provider.name()
    }

    fn reply(&self, request: ReplyRequest) -> BoxStream<'static, Result<String, ResponderError>> {
        let chat = self.chat_request(&request);
        let responder = self.clone();
        let deadline = Instant::now() + self.settings.timeout;
        stream::once(async move { responder.open(chat, deadline).await })
            .flat_map(move |opened| match opened {
                Ok((first, events)) => stream::once(async move { Ok(first) })
                    .chain(stream::unfold(Some(events), move |events| rest(events, deadline)))
                    .boxed(),
                Err(error) => stream::once(async move { Err(error) }).boxed(),
            })
            .boxed()
    }

    fn assess_risk(&self, text: &str) -> BoxFuture<'static, Option<RiskLevel>> {
        let chat = ChatRequest::from_system(prompt::RISK_ASSESSMENT_PROMPT)
            .append_message(ChatMessage::user(text.to_owned()));
        let responder = self.clone();
        async move { responder.assess(chat).await }.boxed()
    }
}

impl LlmResponder {
    /// Starts the request and reads up to the first text, retrying failures
    /// that are worth retrying. Returns that text and the rest of the stream.
    async fn open(
        &self,
        chat: ChatRequest,
        deadline: Instant,
    ) -> Result<(String, ChatStream), ResponderError> {
        let options = ChatOptions::default();
        let (chat, options) = (&chat, &options);
        self.with_retries(deadline, move || async move {
            let response = self
                .client
                .exec_chat_stream(self.settings.model.as_str(), chat.clone(), Some(options))
                .await
                .map_err(|error| classify(&error))?;
            let mut events = response.stream;
            loop {
                match events.next().await {
                    Some(Ok(ChatStreamEvent::Chunk(chunk))) if !chunk.content.is_empty() => {
                        return Ok((chunk.content, events));
                    }
                    Some(Ok(ChatStreamEvent::End(end))) if end.captured_stop_reason.is_none() => {
                        return Err(ResponderError::Truncated);
                    }
                    Some(Ok(ChatStreamEvent::End(_))) => return Err(ResponderError::Empty),
                    Some(Ok(_)) => {}
                    Some(Err(error)) => return Err(classify(&error)),
                    None => return Err(ResponderError::Truncated),
                }
            }
        })
        .await
    }

    /// Asks the model for the risk level of one message, within
    /// [`ASSESSMENT_TIMEOUT_CAP`] and with the usual retries. Failures are
    /// logged by kind only: neither the message nor the answer is logged.
    async fn assess(&self, chat: ChatRequest) -> Option<RiskLevel> {
        let deadline = Instant::now() + self.settings.timeout.min(ASSESSMENT_TIMEOUT_CAP);
        // Models that think aloud (e.g. DeepSeek-R1 on Ollama) put it in
        // `<think>` tags; moving it out of the answer leaves the one word.
        let options = ChatOptions::default().with_normalize_reasoning_content(true);
        let (chat, options) = (&chat, &options);
        let answer = self
            .with_retries(deadline, move || async move {
                let response = self
                    .client
                    .exec_chat(self.settings.model.as_str(), chat.clone(), Some(options))
                    .await
                    .map_err(|error| classify(&error))?;
                response.into_first_text().ok_or(ResponderError::Empty)
            })
            .await;
        match answer.map(|answer| parse_risk_level(&answer)) {
            Ok(Some(level)) => Some(level),
            Ok(None) => {
                tracing::warn!(provider = self.name(), "risk assessment failed: the answer was not a level");
                None
            }
            Err(error) => {
                tracing::warn!(provider = self.name(), error = %error, "risk assessment failed");
                None
            }
        }
    }

    /// Runs `attempt` until it succeeds, fails in a way not worth retrying,
    /// or has been retried `settings.retries` times, pausing 250 ms, 500 ms,
    /// 1 s, … in between. Every attempt and pause ends by `deadline`.
    async fn with_retries<T, Attempt>(
        &self,
        deadline: Instant,
        mut attempt: impl FnMut() -> Attempt,
    ) -> Result<T, ResponderError>
    where
        Attempt: Future<Output = Result<T, ResponderError>>,
    {
        let mut retries = 0;
        loop {
            let outcome = timeout_at(deadline, attempt()).await.unwrap_or(Err(ResponderError::Timeout));
            match outcome {
                Err(error) if error.is_retryable() && retries < self.settings.retries => {
                    retries += 1;
                    let pause = Duration::from_millis(250 * 2u64.pow(retries - 1));
                    if Instant::now() + pause >= deadline {
                        return Err(error);
                    }
                    tracing::info!(provider = self.name(), attempt = retries, error = %error, "retrying the model");
                    tokio::time::sleep(pause).await;
                }
                other => return other,
            }
        }
    }
}

/// The level named by the first word of a model's answer, whatever its case
/// and the punctuation or markup around it (`"High."`, `"**imminent**"`);
/// `None` when that word is not a level.
fn parse_risk_level(answer: &str) -> Option<RiskLevel> {
    let first_word = answer.split(|c: char| !c.is_alphabetic()).find(|word| !word.is_empty())?;
    RiskLevel::parse(&first_word.to_lowercase())
}

/// The stream after its first text: more text until the provider's end
/// event. A stream that stops without one was cut off.
async fn rest(
    events: Option<ChatStream>,
    deadline: Instant,
) -> Option<(Result<String, ResponderError>, Option<ChatStream>)> {
    let mut events = events?;
    loop {
        match timeout_at(deadline, events.next()).await {
            Err(_) => return Some((Err(ResponderError::Timeout), None)),
            Ok(Some(Ok(ChatStreamEvent::Chunk(chunk)))) if !chunk.content.is_empty() => {
                return Some((Ok(chunk.content), Some(events)));
            }
            // A provider says why it stopped; a stream closed without saying
            // so was cut off (genai ends Gemini streams either way).
            Ok(Some(Ok(ChatStreamEvent::End(end)))) if end.captured_stop_reason.is_none() => {
                return Some((Err(ResponderError::Truncated), None));
            }
            Ok(Some(Ok(ChatStreamEvent::End(_)))) => return None,
            Ok(Some(Ok(_))) => {}
            Ok(Some(Err(error))) => return Some((Err(classify(&error)), None)),
            Ok(None) => return Some((Err(ResponderError::Truncated), None)),
        }
    }
}

/// What went wrong, from the HTTP status where there is one.
fn classify(error: &genai::Error) -> ResponderError {
    let status = error.status().or_else(|| match error {
        // A failed status on a streaming call arrives wrapped.
        genai::Error::WebStream { error, .. } => {
            error.downcast_ref::<genai::Error>().and_then(genai::Error::status)
        }
        _ => None,
    });
    match status.map(|status| status.as_u16()) {
        Some(401 | 403) => ResponderError::Unauthorized,
        Some(429) => ResponderError::RateLimited,
        Some(status @ 500..=599) => ResponderError::ServerError(status),
        Some(status) => ResponderError::Rejected(status),
        None => match error {
            genai::Error::StreamParse { .. }
            | genai::Error::ChatResponse { .. }
            | genai::Error::InvalidJsonResponseElement { .. }
            | genai::Error::ChatResponseGeneration { .. }
            | genai::Error::SerdeJson(_) => ResponderError::Malformed,
            // A stream whose connection was never made failed to reach
            // the provider; one that broke later was cut off.
            genai::Error::WebStream { error, .. } if never_connected(error.as_ref()) => {
                ResponderError::Unreachable
            }
            genai::Error::WebStream { .. } => ResponderError::Truncated,
            genai::Error::WebModelCall { .. } | genai::Error::WebAdapterCall { .. } => {
                ResponderError::Unreachable
            }
            _ => ResponderError::Misconfigured("the model request could not be made"),
        },
    }
}

/// Whether `error` comes from a connection that could not be made (refused,
/// or no route to the provider), anywhere down its chain of causes.
fn never_connected(error: &(dyn std::error::Error + 'static)) -> bool {
    use std::io::ErrorKind;
    let mut cause = Some(error);
    while let Some(error) = cause {
        if let Some(io) = error.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                ErrorKind::ConnectionRefused
                    | ErrorKind::HostUnreachable
                    | ErrorKind::NetworkUnreachable
                    | ErrorKind::AddrNotAvailable
            )
        {
            return true;
        }
        cause = error.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_first_word_of_an_answer_as_a_risk_level() {
        let answers = [
            ("none", RiskLevel::None),
            ("concern", RiskLevel::Concern),
            ("High", RiskLevel::High),
            ("IMMINENT", RiskLevel::Imminent),
            ("  high.\n", RiskLevel::High),
            ("**Imminent**", RiskLevel::Imminent),
            ("\"concern\"", RiskLevel::Concern),
            ("high - the message mentions self-harm", RiskLevel::High),
        ];
        for (answer, level) in answers {
            assert_eq!(parse_risk_level(answer), Some(level), "{answer:?}");
        }
    }

    #[test]
    fn an_answer_that_does_not_start_with_a_level_is_no_assessment() {
        for answer in ["", "  ...", "I think high", "medium", "highly concerning", "nonexistent", "4"] {
            assert_eq!(parse_risk_level(answer), None, "{answer:?}");
        }
    }
}
