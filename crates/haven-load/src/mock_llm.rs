//! `mock-llm`: a language-model provider with a set latency, speaking the
//! OpenAI-compatible Chat Completions format that Haven's `--ai-provider
//! openai` uses: `POST /v1/chat/completions` with `"stream": true` (a
//! companion reply) is answered with server-sent events, `data:
//! {"choices":[{"delta":{"content":"…"}}]}` per piece, then `data: [DONE]`;
//! without it (a risk assessment, the model's second opinion) with one
//! `chat.completion` object whose answer is the level `none`, after the
//! same delay.
//!
//! Start Haven with `--ai-provider openai --ai-base-url http://ADDR/v1
//! --ai-model mock --ai-api-key x`. The prompts it receives are read only
//! to be discarded: nothing of them is printed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use clap::Args as ClapArgs;
use serde_json::json;

use crate::net::{Result, loopback};

/// The reply's words; `--chunks` of them are sent.
const WORDS: [&str; 8] =
    ["I hear ", "you. ", "That sounds ", "hard. ", "Tell me ", "more ", "about it. ", "I'm here. "];

#[derive(Debug, ClapArgs)]
pub struct Args {
    /// Address to listen on (loopback only). Port 0 picks a free port; the
    /// base URL is printed on stdout.
    #[arg(long, default_value = "127.0.0.1:0", value_parser = loopback)]
    pub bind: SocketAddr,

    /// Milliseconds one whole reply takes: the pieces are spread evenly over
    /// it, the first after `delay / chunks`. 0: everything at once.
    #[arg(long, default_value_t = 0)]
    pub delay_ms: u64,

    /// Pieces (`delta` events) per reply.
    #[arg(long, default_value_t = 3)]
    pub chunks: usize,

    /// Stop after this many seconds, whatever happens.
    #[arg(long, default_value_t = 3600)]
    pub max_seconds: u64,
}

struct Mock {
    pause: Duration,
    chunks: usize,
    requests: AtomicU64,
}

pub async fn run(args: Args) -> Result<()> {
    let chunks = args.chunks.max(1);
    let mock = Arc::new(Mock {
        pause: Duration::from_millis(args.delay_ms) / chunks as u32,
        chunks,
        requests: AtomicU64::new(0),
    });
    let listener = tokio::net::TcpListener::bind(args.bind).await?;
    let address = listener.local_addr()?;
    let router = Router::new().route("/v1/chat/completions", post(completions)).with_state(mock.clone());
    println!("mock-llm listening on http://{address}/v1");
    let deadline = tokio::time::sleep(Duration::from_secs(args.max_seconds));
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                () = deadline => {}
            }
        })
        .await?;
    eprintln!("mock-llm answered {} requests", mock.requests.load(Ordering::Relaxed));
    Ok(())
}

fn event(delta: serde_json::Value, finish: Option<&str>) -> Bytes {
    let chunk = json!({
        "id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 0, "model": "mock",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    });
    Bytes::from(format!("data: {chunk}\n\n"))
}

/// Streams the reply, or answers a request that does not ask for a stream
/// at once. Of the request body only `stream` is read.
async fn completions(State(mock): State<Arc<Mock>>, body: Bytes) -> Response {
    mock.requests.fetch_add(1, Ordering::Relaxed);
    let request: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    if request["stream"] != json!(true) {
        tokio::time::sleep(mock.pause * mock.chunks as u32).await;
        return axum::Json(json!({
            "id": "chatcmpl-mock", "object": "chat.completion", "created": 0, "model": "mock",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": "none"},
                "finish_reason": "stop",
            }],
        }))
        .into_response();
    }
    // Each piece: a pause, then bytes. The role goes at once, each word
    // after a pause, and the end right after the last word.
    let mut pieces: Vec<(Duration, Bytes)> =
        vec![(Duration::ZERO, event(json!({"role": "assistant", "content": ""}), None))];
    pieces.extend(
        WORDS
            .iter()
            .cycle()
            .take(mock.chunks)
            .map(|word| (mock.pause, event(json!({"content": word}), None))),
    );
    let end = [event(json!({}), Some("stop")), Bytes::from_static(b"data: [DONE]\n\n")].concat();
    pieces.push((Duration::ZERO, Bytes::from(end)));
    if mock.pause.is_zero() {
        let body: Vec<u8> = pieces.into_iter().flat_map(|(_, bytes)| bytes).collect();
        return sse(Body::from(body));
    }
    let body = futures_util::stream::unfold(pieces.into_iter(), |mut pieces| async move {
        let (pause, bytes) = pieces.next()?;
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
        Some((Ok::<_, std::io::Error>(bytes), pieces))
    });
    sse(Body::from_stream(body))
}

fn sse(body: Body) -> Response {
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}
