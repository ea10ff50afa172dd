//! A local stand-in for the language-model providers. It speaks their real
//! wire formats — OpenAI Chat Completions (`POST /v1/chat/completions`,
//! `stream: true`, `data:` events ending in `[DONE]`) and Gemini
//! (`POST /v1beta/models/{model}:streamGenerateContent?alt=sse`), and their
//! non-streaming forms (`stream` absent; `:generateContent`), which answer
//! with the script's chunks joined — records every request, and can be told
//! to be slow, fail, or cut a stream.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::helpers::EVENT_TIMEOUT;

/// How the mock answers one request.
#[derive(Debug, Clone)]
pub struct Script {
    /// The reply's text pieces, one event each.
    pub chunks: Vec<String>,
    /// Pause before each event.
    pub chunk_delay: Duration,
    /// Answer with this HTTP status instead, for this many requests.
    pub failures: Vec<u16>,
    /// Stop after this many events without finishing, breaking the connection.
    pub cut_after: Option<usize>,
    /// Send the body one byte at a time, splitting events and UTF-8 characters.
    pub byte_by_byte: bool,
    /// Send an event whose data is not JSON.
    pub malformed: bool,
    /// Wait this long before answering at all.
    pub delay_before: Duration,
    /// Hold the answer until this turns `true`: a stream after its first
    /// event, any other answer before it starts.
    pub hold: Option<watch::Receiver<bool>>,
}

impl Default for Script {
    fn default() -> Self {
        Self {
            chunks: vec!["I hear ".into(), "you. ".into(), "What is on your mind?".into()],
            chunk_delay: Duration::from_millis(5),
            failures: Vec::new(),
            cut_after: None,
            byte_by_byte: false,
            malformed: false,
            delay_before: Duration::ZERO,
            hold: None,
        }
    }
}

/// One request the mock received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Value,
}

#[derive(Default)]
struct MockState {
    /// Scripts chosen by a word in the newest user message; `""` is the default.
    scripts: Mutex<HashMap<String, Script>>,
    requests: Mutex<Vec<Recorded>>,
    streams_open: AtomicUsize,
    streams_cut_by_client: AtomicUsize,
    changed: watch::Sender<u64>,
}

impl MockState {
    fn touch(&self) {
        self.changed.send_modify(|count| *count += 1);
    }
}

pub struct MockLlm {
    address: String,
    state: Arc<MockState>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for MockLlm {
    fn drop(&mut self) {
        self.server.abort();
    }
}

#[derive(Clone, Copy)]
enum Format {
    OpenAi,
    Gemini,
}

impl MockLlm {
    pub async fn start() -> Self {
        let state = Arc::new(MockState::default());
        state.scripts.lock().unwrap().insert(String::new(), Script::default());
        let router = Router::new()
            .route("/v1/chat/completions", post(openai))
            .route("/v1beta/models/{model_action}", post(gemini))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        MockLlm { address, state, server }
    }

    pub fn openai_url(&self) -> String {
        format!("{}/v1", self.address)
    }

    pub fn gemini_url(&self) -> String {
        format!("{}/v1beta", self.address)
    }

    /// Answers requests whose newest user message contains `trigger` this way
    /// (`""` sets the default).
    pub fn script(&self, trigger: &str, script: Script) {
        self.state.scripts.lock().unwrap().insert(trigger.to_owned(), script);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().unwrap().clone()
    }

    pub fn streams_cut_by_client(&self) -> usize {
        self.state.streams_cut_by_client.load(Ordering::SeqCst)
    }

    /// Waits until `condition` holds, re-checking on every request and
    /// every stream that starts or ends.
    pub async fn until(&self, what: &str, condition: impl Fn(&MockLlm) -> bool) {
        let mut changes = self.state.changed.subscribe();
        let wait = async {
            while !condition(self) {
                changes.changed().await.unwrap();
            }
        };
        tokio::time::timeout(EVENT_TIMEOUT * 2, wait)
            .await
            .unwrap_or_else(|_| panic!("mock: timed out waiting for {what}"));
    }

    pub fn streams_open(&self) -> usize {
        self.state.streams_open.load(Ordering::SeqCst)
    }
}

async fn openai(State(state): State<Arc<MockState>>, headers: HeaderMap, body: Bytes) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let newest =
        body["messages"].as_array().and_then(|messages| messages.last()).map(|m| m["content"].to_string());
    let streaming = body["stream"].as_bool().unwrap_or(false);
    record(&state, "/v1/chat/completions".into(), None, headers, body);
    respond(state, Format::OpenAi, newest.unwrap_or_default(), streaming).await
}

async fn gemini(
    State(state): State<Arc<MockState>>,
    Path(model_action): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let newest = body["contents"].as_array().and_then(|contents| contents.last()).map(|c| c.to_string());
    let streaming = model_action.ends_with(":streamGenerateContent");
    record(&state, format!("/v1beta/models/{model_action}"), query, headers, body);
    respond(state, Format::Gemini, newest.unwrap_or_default(), streaming).await
}

fn record(state: &MockState, path: String, query: Option<String>, headers: HeaderMap, body: Value) {
    state.requests.lock().unwrap().push(Recorded { path, query, headers, body });
    state.touch();
}

async fn respond(state: Arc<MockState>, format: Format, newest: String, streaming: bool) -> Response {
    let script = {
        let mut scripts = state.scripts.lock().unwrap();
        let trigger =
            scripts.keys().filter(|key| !key.is_empty() && newest.contains(key.as_str())).max().cloned();
        let script = scripts.get_mut(&trigger.unwrap_or_default()).unwrap();
        let failure = (!script.failures.is_empty()).then(|| script.failures.remove(0));
        (script.clone(), failure)
    };
    let (script, failure) = script;
    tokio::time::sleep(script.delay_before).await;
    if let Some(status) = failure {
        let status = StatusCode::from_u16(status).unwrap();
        let body = json!({"error": {"code": status.as_u16(), "message": "mock failure", "status": "MOCK"}});
        return (status, axum::Json(body)).into_response();
    }
    if !streaming {
        if let Some(mut hold) = script.hold.clone() {
            let _ = hold.wait_for(|released| *released).await;
        }
        let text = script.chunks.concat();
        let body = match format {
            Format::OpenAi => {
                json!({"id": "chatcmpl-mock", "object": "chat.completion", "created": 0, "model": "mock",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]})
            }
            Format::Gemini => json!({"candidates": [{"content": {"parts": [{"text": text}], "role": "model"},
                "finishReason": "STOP", "index": 0}], "modelVersion": "mock"}),
        };
        return axum::Json(body).into_response();
    }

    let mut events: Vec<String> = Vec::new();
    if script.malformed {
        events.push("data: {this is not json\n\n".into());
    }
    for chunk in &script.chunks {
        events.push(match format {
            Format::OpenAi => format!(
                "data: {}\n\n",
                json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 0, "model": "mock",
                       "choices": [{"index": 0, "delta": {"content": chunk}, "finish_reason": null}]})
            ),
            Format::Gemini => format!(
                "data: {}\r\n\r\n",
                json!({"candidates": [{"content": {"parts": [{"text": chunk}], "role": "model"}, "index": 0}],
                       "modelVersion": "mock"})
            ),
        });
    }
    let cut = script.cut_after.is_some();
    if let Some(keep) = script.cut_after {
        events.truncate(keep);
    } else {
        events.push(match format {
            Format::OpenAi => format!(
                "data: {}\n\ndata: [DONE]\n\n",
                json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 0, "model": "mock",
                       "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
            ),
            Format::Gemini => format!(
                "data: {}\r\n\r\n",
                json!({"candidates": [{"content": {"parts": [{"text": ""}], "role": "model"}, "finishReason": "STOP", "index": 0}],
                       "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 3, "totalTokenCount": 6}})
            ),
        });
    }

    // Each item: a pause, then bytes to send.
    let mut pieces: Vec<(Duration, Vec<u8>)> = Vec::new();
    for event in events {
        if script.byte_by_byte {
            let mut delay = script.chunk_delay;
            for byte in event.into_bytes() {
                pieces.push((delay, vec![byte]));
                delay = Duration::from_millis(1);
            }
        } else {
            pieces.push((script.chunk_delay, event.into_bytes()));
        }
    }

    state.streams_open.fetch_add(1, Ordering::SeqCst);
    state.touch();
    let guard = StreamGuard { state: state.clone(), finished: false };
    let body = futures_util::stream::unfold(
        (pieces.into_iter(), guard, cut, script.hold, true),
        |(mut pieces, mut guard, cut, mut hold, first)| async move {
            match pieces.next() {
                Some((delay, bytes)) => {
                    if !first && let Some(mut held) = hold.take() {
                        let _ = held.wait_for(|released| *released).await;
                    }
                    tokio::time::sleep(delay).await;
                    Some((Ok::<_, std::io::Error>(Bytes::from(bytes)), (pieces, guard, cut, hold, false)))
                }
                None if cut => {
                    guard.finish();
                    Some((
                        Err(std::io::Error::other("mock: stream cut")),
                        (pieces, guard, false, hold, false),
                    ))
                }
                None => {
                    guard.finish();
                    None
                }
            }
        },
    );
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Notices when a response stream ends, and whether the client went away first.
struct StreamGuard {
    state: Arc<MockState>,
    finished: bool,
}

impl StreamGuard {
    /// The mock sent everything it meant to (or cut the stream itself).
    fn finish(&mut self) {
        self.finished = true;
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.state.streams_cut_by_client.fetch_add(1, Ordering::SeqCst);
        }
        self.state.streams_open.fetch_sub(1, Ordering::SeqCst);
        self.state.touch();
    }
}

/// The takeover test relies on the mock noticing a client that hangs up.
#[tokio::test]
async fn the_mock_notices_a_client_that_hangs_up_mid_stream() {
    let mock = MockLlm::start().await;
    let words: Vec<String> = (0..30).map(|n| format!("word{n} ")).collect();
    mock.script("", Script { chunks: words, chunk_delay: Duration::from_millis(10), ..Script::default() });
    let mut response = reqwest::Client::new()
        .post(format!("{}/chat/completions", mock.openai_url()))
        .json(&json!({"messages": [], "stream": true}))
        .send()
        .await
        .unwrap();
    assert!(response.chunk().await.unwrap().is_some());
    drop(response);
    mock.until("the stream to end", |mock| mock.streams_open() == 0).await;
    assert_eq!(mock.streams_cut_by_client(), 1);
}
