//! `bot`: S sessions with only a client, talking to the companion. Each
//! client sends, waits for the companion's committed reply (the `message`
//! frame with sender `ai`), and repeats, never faster than
//! `--client-max-rate`. Reports replies/s and the latency from send to
//! reply (and to its first `ai_delta`).
//!
//! Which companion answers is the server's choice (`--ai-provider`); the
//! bench script runs this against the built-in companion and against
//! `haven-load mock-llm --delay-ms 0`, and says which in `--responder`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use clap::Args as ClapArgs;
use futures_util::{SinkExt, StreamExt, stream};
use haven_protocol::{ChatMode, Sender, ServerFrame};
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::sleep_until;

use crate::api;
use crate::net::{self, Error, Incoming, Result, SESSIONS_PER_ADDRESS, Sources, Target, Ws, next_frame};
use crate::report::{self, CpuSplit, Percentiles, Usage, micros, progress, round};

#[derive(Debug, ClapArgs)]
pub struct Args {
    #[command(flatten)]
    pub target: Target,

    /// Sessions, each with one client socket.
    #[arg(long, default_value_t = 50)]
    pub sessions: usize,

    /// What answers, for the report (e.g. `companion`, `mock-0ms`); the
    /// server's `--ai-provider` decides.
    #[arg(long, default_value = "companion")]
    pub responder: String,

    /// Highest rate of one client, in messages/s (the server allows 10).
    #[arg(long, default_value_t = 9.5)]
    pub client_max_rate: f64,

    /// Message content size in bytes.
    #[arg(long, default_value_t = 100)]
    pub size: usize,

    /// Seconds measured.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,

    /// Seconds of load before the measurement starts.
    #[arg(long, default_value_t = 2.0)]
    pub warmup: f64,

    /// Seconds to wait for one reply before counting it as missing.
    #[arg(long, default_value_t = 10.0)]
    pub reply_timeout: f64,

    /// Sockets being opened at once during setup.
    #[arg(long, default_value_t = 100)]
    pub connect_concurrency: usize,
}

#[derive(Debug, Default)]
struct Outcome {
    sent: u64,
    replies: u64,
    replies_in_window: u64,
    /// Send to committed `ai` message, for sends within the window (µs).
    latencies: Vec<u32>,
    /// Send to the reply's first `ai_delta` (µs).
    first_delta: Vec<u32>,
    timeouts: u64,
    /// `system` messages instead of a reply: the companion failed.
    notices: u64,
    errors: BTreeMap<String, u64>,
    closed: Option<String>,
}

pub async fn run(args: Args) -> Result<()> {
    if args.sessions == 0 || args.duration <= 0.0 || args.client_max_rate <= 0.0 {
        return Err("--sessions, --duration and --client-max-rate must be positive".into());
    }
    net::check_open_files(args.sessions)?;
    report::origin();
    let target = args.target.target;
    let sources = Sources::new(args.target.source_net);
    let setup_started = Instant::now();
    let sessions = api::create_sessions(target, sources, args.sessions, SESSIONS_PER_ADDRESS).await?;
    let gap = Duration::from_secs_f64(1.0 / args.client_max_rate);
    let reply_timeout = Duration::from_secs_f64(args.reply_timeout);
    let content: std::sync::Arc<str> = net::filler(args.size).into();
    let (start_sender, start) = watch::channel(None);
    let requested = args.sessions;
    // Each client's task starts at once, reading (and so answering the
    // server's pings) while the other sessions are set up.
    let opened: Vec<Result<JoinHandle<Outcome>>> = stream::iter(sessions.iter().enumerate())
        .map(|(index, session)| {
            let (start, content) = (start.clone(), content.clone());
            async move {
                let path = format!("/api/chat/ws/{}", session.session_id);
                let source = sources.client(index / SESSIONS_PER_ADDRESS);
                let mut ws = net::connect(target, source, &path, Some(&session.client_token)).await?;
                if net::first_mode(&mut ws).await? != ChatMode::BotOnly {
                    return Err(Error::from("session already joined"));
                }
                let phase = gap.mul_f64(index as f64 / requested as f64);
                Ok(tokio::spawn(converse(ws, start, phase, content)))
            }
        })
        .buffer_unordered(args.connect_concurrency.max(1))
        .collect()
        .await;
    let mut tasks = Vec::new();
    let mut connect_failures = 0;
    for result in opened {
        match result {
            Ok(task) => tasks.push(task),
            Err(error) => {
                connect_failures += 1;
                progress(format!("a session failed to connect: {error}"));
            }
        }
    }
    let setup_s = setup_started.elapsed().as_secs_f64();
    if tasks.is_empty() {
        return Err("no session could be set up".into());
    }
    let count = tasks.len();
    progress(format!("{count} sessions ready in {setup_s:.1} s"));

    let start = Instant::now() + Duration::from_millis(500);
    let window_start = start + Duration::from_secs_f64(args.warmup);
    let stop = window_start + Duration::from_secs_f64(args.duration);
    let _ = start_sender.send(Some(Clock { start, window_start, stop, gap, reply_timeout }));
    let server_pid = args.target.server_pid;
    let sampler = tokio::spawn(async move {
        sleep_until(window_start.into()).await;
        let before = Usage::now(server_pid);
        sleep_until(stop.into()).await;
        before.split(&Usage::now(server_pid))
    });
    let mut outcomes = Vec::with_capacity(count);
    for task in tasks {
        outcomes.push(task.await.unwrap_or_default());
    }
    let cpu = sampler.await.unwrap_or_default();

    let mut errors = BTreeMap::<String, u64>::new();
    let mut closed = BTreeMap::<String, u64>::new();
    for outcome in &outcomes {
        for (code, n) in &outcome.errors {
            *errors.entry(code.clone()).or_default() += n;
        }
        if let Some(reason) = &outcome.closed {
            *closed.entry(reason.clone()).or_default() += 1;
        }
    }
    let sum = |field: fn(&Outcome) -> u64| outcomes.iter().map(field).sum::<u64>();
    let latency = Percentiles::of_micros(outcomes.iter().map(|outcome| outcome.latencies.as_slice()));
    let first_delta = Percentiles::of_micros(outcomes.iter().map(|outcome| outcome.first_delta.as_slice()));
    let result = json!({
        "scenario": "bot",
        "label": args.target.label,
        "responder": args.responder,
        "sessions": count,
        "size_bytes": args.size,
        "duration_s": args.duration,
        "replies_per_s": round(sum(|o| o.replies_in_window) as f64 / args.duration),
        "latency_ms": latency,
        "first_delta_ms": first_delta,
        "sent": sum(|o| o.sent),
        "replies": sum(|o| o.replies),
        "timeouts": sum(|o| o.timeouts),
        "notices": sum(|o| o.notices),
        "errors": errors,
        "closed_early": closed,
        "connect_failures": connect_failures,
        "setup_s": round(setup_s),
        "cpu": cpu,
        "server_rss_kib": server_pid.and_then(report::rss_kib),
    });
    let summary = format!(
        "bot ({}): {} sessions\n  {} replies/s; reply latency {}\n  first delta {}\n  sent {}, replies {}, timeouts {}, companion-unavailable notices {}\n  {}",
        args.responder,
        count,
        result["replies_per_s"],
        latency.line(),
        first_delta.line(),
        result["sent"],
        result["replies"],
        result["timeouts"],
        result["notices"],
        serde_json::from_value::<CpuSplit>(result["cpu"].clone()).unwrap_or_default().line(),
    );
    report::emit(result, &summary);
    Ok(())
}

#[derive(Debug, Clone, Copy)]
struct Clock {
    start: Instant,
    window_start: Instant,
    stop: Instant,
    gap: Duration,
    reply_timeout: Duration,
}

/// Send, wait for the reply, repeat, until the stop.
async fn converse(
    mut ws: Ws,
    mut start: watch::Receiver<Option<Clock>>,
    phase: Duration,
    content: std::sync::Arc<str>,
) -> Outcome {
    let mut outcome = Outcome::default();
    let clock = match net::wait_ready(&mut ws, &mut start).await {
        Ok(clock) => clock,
        Err(reason) => {
            outcome.closed = Some(reason);
            return outcome;
        }
    };
    let mut next = clock.start + phase;
    'conversation: while next < clock.stop {
        sleep_until(next.into()).await;
        let sent_at = Instant::now();
        let client_id = format!("b{}", outcome.sent);
        if ws.send(net::message_frame(&content, client_id)).await.is_err() {
            outcome.closed = Some(net::describe_close(&None));
            break;
        }
        outcome.sent += 1;
        // A reply answers this message if its seq is above this message's.
        let mut own_seq = i64::MAX;
        let mut first_delta = None;
        let deadline = sent_at + clock.reply_timeout;
        loop {
            let incoming = tokio::select! {
                incoming = next_frame(&mut ws) => incoming,
                () = sleep_until(deadline.into()) => {
                    outcome.timeouts += 1;
                    break;
                }
            };
            match incoming {
                Incoming::Frame(ServerFrame::Ack { seq, .. }) => own_seq = seq,
                Incoming::Frame(ServerFrame::AiDelta { .. }) => {
                    first_delta.get_or_insert_with(Instant::now);
                }
                Incoming::Frame(ServerFrame::Message(message))
                    if message.sender == Sender::Ai && message.seq > own_seq =>
                {
                    let now = Instant::now();
                    outcome.replies += 1;
                    if sent_at >= clock.window_start && sent_at < clock.stop {
                        outcome.latencies.push(micros(now - sent_at));
                        if let Some(delta) = first_delta {
                            outcome.first_delta.push(micros(delta - sent_at));
                        }
                    }
                    if now >= clock.window_start && now < clock.stop {
                        outcome.replies_in_window += 1;
                    }
                    break;
                }
                Incoming::Frame(ServerFrame::Message(message))
                    if message.sender == Sender::System && message.seq > own_seq =>
                {
                    outcome.notices += 1;
                    break;
                }
                Incoming::Frame(ServerFrame::Error { code, .. }) => {
                    let code =
                        serde_json::to_value(code).ok().and_then(|code| code.as_str().map(str::to_owned));
                    *outcome.errors.entry(code.unwrap_or_default()).or_default() += 1;
                    break;
                }
                Incoming::Frame(_) | Incoming::Unparsed => {}
                Incoming::Closed(close) => {
                    outcome.closed = Some(net::describe_close(&close));
                    break 'conversation;
                }
            }
        }
        next = (sent_at + clock.gap).max(Instant::now());
    }
    if outcome.closed.is_none() {
        net::close(ws).await;
    }
    outcome
}
