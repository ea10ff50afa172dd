//! `direct`: S sessions, each with a client and a joined therapist. Clients
//! send; therapists receive. Reports delivered messages/s, the latency from
//! client send to therapist receive, and messages lost, duplicated or out of
//! order, checked against the seqs acked to the client.
//!
//! Two ways to send:
//! - **open loop** (`--rate R`): each client sends on a fixed schedule,
//!   whatever the server does, so R messages/s are offered in total. The
//!   latency runs from the *scheduled* send time, so a load generator (or
//!   server) that falls behind cannot hide it.
//! - **saturation** (`--rate 0`): each client sends its next message as soon
//!   as the previous one is acked, but never faster than
//!   `--client-max-rate`, under the server's 10 messages/s per connection.
//!
//! `--bare` points the same load at `haven-load relay`: no HTTP setup, no
//! credentials, no storage.
//!
//! `--crisis-every K`: one client in every K sends, once, partway through
//! the measured window, a message the crisis detector flags, and reports
//! how long the crisis message that answers it took to arrive.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args as ClapArgs;
use futures_util::{SinkExt, StreamExt, stream};
use haven_protocol::{ChatMode, MessageKind, Sender, ServerFrame};
use serde_json::json;
use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio::time::sleep_until;
use uuid::Uuid;

use crate::api::{self, Therapists};
use crate::net::{
    self, Error, Incoming, LOGINS_PER_ADDRESS, Result, SESSIONS_PER_ADDRESS, SOCKETS_PER_LOGIN, Sources,
    Target, Ws, next_frame,
};
use crate::report::{self, CpuSplit, Percentiles, Usage, micros_since_origin, progress, round};

#[derive(Debug, ClapArgs)]
pub struct Args {
    #[command(flatten)]
    pub target: Target,

    #[command(flatten)]
    pub therapists: Therapists,

    /// Sessions, each with one client and one therapist socket.
    #[arg(long, default_value_t = 100)]
    pub sessions: usize,

    /// Total offered rate in messages/s, open loop. 0: saturation (each
    /// client sends when its previous message is acked).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,

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

    /// Seconds to wait, after the last send, for messages still in flight.
    #[arg(long, default_value_t = 10.0)]
    pub drain: f64,

    /// Target a `haven-load relay`: no HTTP setup and no credentials.
    #[arg(long)]
    pub bare: bool,

    /// Sockets being opened at once during setup.
    #[arg(long, default_value_t = 100)]
    pub connect_concurrency: usize,

    /// One client in every K sends one message that the crisis detector
    /// flags, within the measured window, and times the crisis message
    /// that answers it. 0: none.
    #[arg(long, default_value_t = 0)]
    pub crisis_every: usize,
}

/// What a crisis client sends: the detector flags it `imminent` (the
/// server's API tests rely on this text too).
const CRISIS_TEXT: &str = "i have the pills in front of me and im going to take them all tonight";

/// When things happen, shared by every task.
#[derive(Debug, Clone, Copy)]
struct Times {
    start: Instant,
    /// Messages sent (scheduled) from here until `stop` are measured.
    window_start: Instant,
    /// No message is sent from here on.
    stop: Instant,
    /// Everything ends here, delivered or not.
    hard_end: Instant,
}

/// How one client sends.
#[derive(Debug, Clone, Copy)]
enum Plan {
    /// Every `interval`, starting `phase` after the start.
    Open { interval: Duration, phase: Duration },
    /// When the previous message is acked, at least `gap` after it.
    Closed { gap: Duration, phase: Duration },
}

/// What a client and its therapist share.
#[derive(Debug, Default)]
struct Shared {
    /// Acks the client has received.
    acked: AtomicU64,
    /// The client sent everything and has every answer (or gave up).
    client_done: AtomicBool,
    /// Wakes the therapist to re-check whether it has everything.
    wake: Notify,
}

/// Sockets stay open until every session's traffic is settled: thousands
/// closing at once keep the server busy, and would delay the last measured
/// messages of the sessions still sending. Counts the tasks not yet settled.
#[derive(Debug)]
struct Finish(watch::Sender<usize>);

impl Finish {
    fn new() -> Arc<Self> {
        Arc::new(Finish(watch::Sender::new(0)))
    }

    /// A task that will settle; its [`Arrival`] says so, or dropping it.
    fn join(self: &Arc<Self>) -> Arrival {
        self.0.send_modify(|tasks| *tasks += 1);
        Arrival(self.clone())
    }
}

/// One task of [`Finish`], not yet settled.
#[derive(Debug)]
struct Arrival(Arc<Finish>);

impl Arrival {
    /// This task is settled: waits until every task is, or `until`.
    async fn wait_for_all(self, until: Instant) {
        let mut unsettled = self.0.0.subscribe();
        drop(self);
        tokio::select! {
            _ = unsettled.wait_for(|tasks| *tasks == 0) => {}
            () = sleep_until(until.into()) => {}
        }
    }
}

impl Drop for Arrival {
    fn drop(&mut self) {
        self.0.0.send_modify(|tasks| *tasks = tasks.saturating_sub(1));
    }
}

#[derive(Debug, Default)]
struct ClientOutcome {
    sent: u64,
    acked_seqs: Vec<i64>,
    errors: BTreeMap<String, u64>,
    closed: Option<String>,
    unparsed: u64,
    /// How late each send within the window was against its schedule
    /// (open loop only), in µs.
    send_lags: Vec<u32>,
    /// A crisis message was sent (`--crisis-every`).
    crisis_sent: bool,
    /// From sending it to the crisis message that answered it, in µs.
    crisis_latency: Option<u32>,
}

#[derive(Debug, Default)]
struct TherapistOutcome {
    /// Seqs of client messages, in arrival order.
    seqs: Vec<i64>,
    /// Latencies (µs) of messages scheduled within the window.
    latencies: Vec<u32>,
    /// Client messages received within the window.
    received_in_window: u64,
    /// Companion frames (there must be none once a therapist has joined).
    companion_frames: u64,
    closed: Option<String>,
}

/// How clients pace themselves, fixed before the sockets open.
#[derive(Debug, Clone, Copy)]
struct Pacing {
    /// Total offered rate; 0 for saturation.
    rate: f64,
    client_max_rate: f64,
    /// Sessions asked for: client `i` starts `i / requested` into its interval.
    requested: usize,
    crisis_every: usize,
}

impl Pacing {
    fn plan(&self, index: usize, sessions: usize) -> Plan {
        let fraction = index as f64 / self.requested.max(1) as f64;
        if self.rate > 0.0 {
            let interval = Duration::from_secs_f64(sessions as f64 / self.rate);
            Plan::Open { interval, phase: interval.mul_f64(fraction) }
        } else {
            let gap = Duration::from_secs_f64(1.0 / self.client_max_rate);
            Plan::Closed { gap, phase: gap.mul_f64(fraction) }
        }
    }

    /// When client `index` sends its crisis message, if it sends one:
    /// spread over the middle of the window.
    fn crisis_at(&self, index: usize, times: &Times) -> Option<Instant> {
        if self.crisis_every == 0 || !index.is_multiple_of(self.crisis_every) {
            return None;
        }
        let fraction = 0.1 + 0.8 * index as f64 / self.requested.max(1) as f64;
        Some(times.window_start + (times.stop - times.window_start).mul_f64(fraction))
    }
}

/// Sent to every task once all sockets are open.
#[derive(Debug, Clone, Copy)]
struct Start {
    times: Times,
    /// Sessions that opened.
    sessions: usize,
}

type Tasks = (JoinHandle<ClientOutcome>, JoinHandle<TherapistOutcome>);

pub async fn run(args: Args) -> Result<()> {
    if args.sessions == 0 || args.duration <= 0.0 || args.client_max_rate <= 0.0 {
        return Err("--sessions, --duration and --client-max-rate must be positive".into());
    }
    let per_client = args.rate / args.sessions as f64;
    if per_client > args.client_max_rate {
        return Err(format!(
            "{} messages/s over {} sessions is {per_client:.1}/s per client, over --client-max-rate {}: use more sessions",
            args.rate, args.sessions, args.client_max_rate
        )
        .into());
    }
    net::check_open_files(2 * args.sessions)?;
    report::origin();
    let content: Arc<str> = net::filler(args.size).into();
    let (start_sender, start) = watch::channel(None);
    let setup_started = Instant::now();
    // Each session's tasks start at once, reading (and so answering the
    // server's pings) while the other sessions are set up.
    let finish = Finish::new();
    let (tasks, connect_failures) = setup(&args, start, content, &finish).await?;
    let setup_s = setup_started.elapsed().as_secs_f64();
    if tasks.is_empty() {
        return Err("no session could be set up".into());
    }
    let sessions = tasks.len();

    let start = Instant::now() + Duration::from_millis(500);
    let window_start = start + Duration::from_secs_f64(args.warmup);
    let stop = window_start + Duration::from_secs_f64(args.duration);
    let times = Times { start, window_start, stop, hard_end: stop + Duration::from_secs_f64(args.drain) };
    progress(format!(
        "{sessions} sessions ready in {setup_s:.1} s; sending for {:.0} s ({})",
        args.warmup + args.duration,
        if args.rate > 0.0 { format!("{} messages/s offered", args.rate) } else { "saturation".to_owned() }
    ));
    let _ = start_sender.send(Some(Start { times, sessions }));

    let server_pid = args.target.server_pid;
    let sampler = tokio::spawn(async move {
        sleep_until(window_start.into()).await;
        let before = Usage::now(server_pid);
        sleep_until(stop.into()).await;
        let after = Usage::now(server_pid);
        (before.split(&after), server_pid.and_then(report::rss_kib))
    });

    let mut outcomes = Vec::with_capacity(tasks.len());
    for (client, therapist) in tasks {
        // Each task ends by `hard_end`; a panic counts as an empty outcome.
        let client = client.await.unwrap_or_default();
        let therapist = therapist.await.unwrap_or_default();
        outcomes.push((client, therapist));
    }
    let (cpu, server_rss_kib) = sampler.await.unwrap_or_default();
    let result = analyse(&args, &outcomes, cpu, server_rss_kib, setup_s, connect_failures);
    let summary = summarise(&result);
    report::emit(result, &summary);
    Ok(())
}

/// Logs in, then opens each session's therapist socket (the join) and its
/// client socket, and starts their tasks. Returns the tasks and how many
/// sessions failed.
async fn setup(
    args: &Args,
    start: watch::Receiver<Option<Start>>,
    content: Arc<str>,
    finish: &Arc<Finish>,
) -> Result<(Vec<Tasks>, usize)> {
    let target = args.target.target;
    let sources = Sources::new(args.target.source_net);
    let pacing = Pacing {
        rate: args.rate,
        client_max_rate: args.client_max_rate,
        requested: args.sessions,
        crisis_every: args.crisis_every,
    };
    let sessions: Vec<(Uuid, Option<String>)> = if args.bare {
        (0..args.sessions).map(|_| (Uuid::now_v7(), None)).collect()
    } else {
        api::create_sessions(target, sources, args.sessions, SESSIONS_PER_ADDRESS)
            .await?
            .into_iter()
            .map(|session| (session.session_id, Some(session.client_token)))
            .collect()
    };
    let logins = if args.bare {
        Vec::new()
    } else {
        args.therapists.login(target, sources, args.sessions.div_ceil(SOCKETS_PER_LOGIN)).await?
    };
    let opened: Vec<Result<Tasks>> = stream::iter(sessions.into_iter().enumerate())
        .map(|(index, (session_id, client_token))| {
            let login = index / SOCKETS_PER_LOGIN;
            let therapist_token = logins.get(login).cloned();
            let start = start.clone();
            let content = content.clone();
            let finish = finish.clone();
            async move {
                let path = format!("/api/chat/ws/{session_id}");
                // The relay learns the role from the query; Haven from the token.
                let therapist_path = if args.bare { format!("{path}?role=therapist") } else { path.clone() };
                let therapist_source = sources.therapist(login / LOGINS_PER_ADDRESS);
                let mut therapist =
                    net::connect(target, therapist_source, &therapist_path, therapist_token.as_deref())
                        .await?;
                let mode = net::first_mode(&mut therapist).await?;
                let client_source = sources.client(index / SESSIONS_PER_ADDRESS);
                let mut client = net::connect(target, client_source, &path, client_token.as_deref()).await?;
                let client_mode = net::first_mode(&mut client).await?;
                if mode != ChatMode::TherapistJoined || client_mode != ChatMode::TherapistJoined {
                    return Err(Error::from("the session is not in THERAPIST_JOINED mode"));
                }
                let shared = Arc::new(Shared::default());
                let (client_settled, therapist_settled) = (finish.join(), finish.join());
                let client = tokio::spawn(run_client(
                    client,
                    index,
                    pacing,
                    (shared.clone(), client_settled),
                    content,
                    start.clone(),
                ));
                let therapist = tokio::spawn(run_therapist(therapist, (shared, therapist_settled), start));
                Ok((client, therapist))
            }
        })
        .buffer_unordered(args.connect_concurrency.max(1))
        .collect()
        .await;
    let mut tasks = Vec::with_capacity(opened.len());
    let mut failures = BTreeMap::<String, usize>::new();
    for result in opened {
        match result {
            Ok(pair) => tasks.push(pair),
            Err(error) => *failures.entry(error.to_string()).or_default() += 1,
        }
    }
    for (error, count) in &failures {
        progress(format!("{count} sessions failed to connect: {error}"));
    }
    Ok((tasks, failures.values().sum()))
}

async fn run_client(
    mut ws: Ws,
    index: usize,
    pacing: Pacing,
    (shared, settled_here): (Arc<Shared>, Arrival),
    content: Arc<str>,
    mut start: watch::Receiver<Option<Start>>,
) -> ClientOutcome {
    let Start { times, sessions } = match net::wait_ready(&mut ws, &mut start).await {
        Ok(start) => start,
        Err(reason) => {
            shared.client_done.store(true, Ordering::SeqCst);
            shared.wake.notify_one();
            return ClientOutcome { closed: Some(reason), ..ClientOutcome::default() };
        }
    };
    let plan = pacing.plan(index, sessions);
    let crisis_at = pacing.crisis_at(index, &times);
    // When the crisis message was sent, in µs since the origin (0: not yet).
    let crisis_sent_at = AtomicU64::new(0);
    let (mut sink, mut stream) = ws.split();
    let sent = AtomicU64::new(0);
    // Acks and refusals received: every sent message gets exactly one.
    let settled = AtomicU64::new(0);
    let writer_done = AtomicBool::new(false);
    let writer_finished = Notify::new();
    let answer_arrived = Notify::new();
    let mut send_lags: Vec<u32> = Vec::new();

    let writer = async {
        let mut index: u64 = 0;
        let (phase, step) = match plan {
            Plan::Open { interval, phase } => (phase, interval),
            Plan::Closed { gap, phase } => (phase, gap),
        };
        let mut next = times.start + phase;
        while next < times.stop {
            sleep_until(next.into()).await;
            let now = Instant::now();
            // Stamped with the moment of sending. In open loop, how late that
            // is against the schedule is measured too: tokio's timers fire
            // up to a millisecond late, and a saturated socket blocks sends.
            if matches!(plan, Plan::Open { .. }) && next >= times.window_start {
                send_lags.push(report::micros(now.saturating_duration_since(next)));
            }
            let stamp = now;
            let client_id = format!("{index}.{}", micros_since_origin(stamp));
            let crisis = crisis_at.is_some_and(|at| next >= at) && crisis_sent_at.load(Ordering::SeqCst) == 0;
            let text = if crisis { CRISIS_TEXT } else { &content };
            if sink.send(net::message_frame(text, client_id)).await.is_err() {
                break;
            }
            if crisis {
                crisis_sent_at.store(micros_since_origin(stamp).max(1), Ordering::SeqCst);
            }
            index += 1;
            sent.store(index, Ordering::SeqCst);
            match plan {
                Plan::Open { .. } => next = times.start + phase + step * index as u32,
                Plan::Closed { .. } => {
                    next = now + step;
                    // Wait for the answer to this message, until the stop.
                    while settled.load(Ordering::SeqCst) < index && Instant::now() < times.stop {
                        tokio::select! {
                            () = answer_arrived.notified() => {}
                            () = sleep_until(times.stop.into()) => {}
                        }
                    }
                }
            }
        }
        writer_done.store(true, Ordering::SeqCst);
        writer_finished.notify_one();
        sink
    };

    let reader = async {
        let mut outcome = ClientOutcome::default();
        loop {
            let crisis_pending =
                crisis_sent_at.load(Ordering::SeqCst) != 0 && outcome.crisis_latency.is_none();
            if writer_done.load(Ordering::SeqCst)
                && settled.load(Ordering::SeqCst) >= sent.load(Ordering::SeqCst)
                && !crisis_pending
            {
                break;
            }
            let incoming = tokio::select! {
                incoming = next_frame(&mut stream) => incoming,
                () = writer_finished.notified() => continue,
                () = sleep_until(times.hard_end.into()) => break,
            };
            match incoming {
                Incoming::Frame(ServerFrame::Ack { seq, .. }) => {
                    outcome.acked_seqs.push(seq);
                    shared.acked.fetch_add(1, Ordering::SeqCst);
                    settled.fetch_add(1, Ordering::SeqCst);
                    answer_arrived.notify_one();
                }
                Incoming::Frame(ServerFrame::Error { code, .. }) => {
                    let code =
                        serde_json::to_value(code).ok().and_then(|code| code.as_str().map(str::to_owned));
                    *outcome.errors.entry(code.unwrap_or_default()).or_default() += 1;
                    settled.fetch_add(1, Ordering::SeqCst);
                    answer_arrived.notify_one();
                }
                Incoming::Frame(ServerFrame::Message(message)) if message.kind == MessageKind::Crisis => {
                    let sent_at = crisis_sent_at.load(Ordering::SeqCst);
                    if sent_at != 0 && outcome.crisis_latency.is_none() {
                        let latency = micros_since_origin(Instant::now()).saturating_sub(sent_at);
                        outcome.crisis_latency = Some(latency.min(u64::from(u32::MAX)) as u32);
                    }
                }
                Incoming::Frame(_) => {}
                Incoming::Unparsed => outcome.unparsed += 1,
                Incoming::Closed(close) => {
                    outcome.closed = Some(net::describe_close(&close));
                    break;
                }
            }
        }
        shared.client_done.store(true, Ordering::SeqCst);
        shared.wake.notify_one();
        outcome
    };

    let (mut sink, mut outcome) = tokio::join!(writer, reader);
    outcome.sent = sent.load(Ordering::SeqCst);
    outcome.send_lags = send_lags;
    outcome.crisis_sent = crisis_sent_at.load(Ordering::SeqCst) != 0;
    settled_here.wait_for_all(times.hard_end).await;
    net::close_sink(&mut sink).await;
    outcome
}

async fn run_therapist(
    mut ws: Ws,
    (shared, settled_here): (Arc<Shared>, Arrival),
    mut start: watch::Receiver<Option<Start>>,
) -> TherapistOutcome {
    let mut outcome = TherapistOutcome::default();
    let times = match net::wait_ready(&mut ws, &mut start).await {
        Ok(start) => start.times,
        Err(reason) => {
            outcome.closed = Some(reason);
            return outcome;
        }
    };
    // Which seqs arrived, indexed by seq.
    let mut seen: Vec<bool> = Vec::new();
    let mut unique: u64 = 0;
    let window = micros_since_origin(times.window_start)..micros_since_origin(times.stop);
    loop {
        if shared.client_done.load(Ordering::SeqCst) && unique >= shared.acked.load(Ordering::SeqCst) {
            break;
        }
        let incoming = tokio::select! {
            incoming = next_frame(&mut ws) => incoming,
            () = shared.wake.notified() => continue,
            () = sleep_until(times.hard_end.into()) => break,
        };
        match incoming {
            Incoming::Frame(ServerFrame::Message(message)) if message.sender == Sender::User => {
                let now = Instant::now();
                let seq = message.seq;
                outcome.seqs.push(seq);
                if let Ok(slot) = usize::try_from(seq) {
                    if seen.len() <= slot {
                        seen.resize(slot + 1, false);
                    }
                    if !seen[slot] {
                        seen[slot] = true;
                        unique += 1;
                    }
                }
                let sent_at = message
                    .client_id
                    .as_deref()
                    .and_then(|id| id.split_once('.'))
                    .and_then(|(_, micros)| micros.parse::<u64>().ok());
                if let Some(sent_at) = sent_at
                    && window.contains(&sent_at)
                {
                    let latency = micros_since_origin(now).saturating_sub(sent_at);
                    outcome.latencies.push(latency.min(u64::from(u32::MAX)) as u32);
                }
                if now >= times.window_start && now < times.stop {
                    outcome.received_in_window += 1;
                }
            }
            Incoming::Frame(ServerFrame::Message(message)) if message.sender == Sender::Ai => {
                outcome.companion_frames += 1;
            }
            Incoming::Frame(ServerFrame::AiDelta { .. }) => outcome.companion_frames += 1,
            Incoming::Frame(_) | Incoming::Unparsed => {}
            Incoming::Closed(close) => {
                outcome.closed = Some(net::describe_close(&close));
                break;
            }
        }
    }
    settled_here.wait_for_all(times.hard_end).await;
    net::close(ws).await;
    outcome
}

/// Lost: acked but never received by the therapist. Duplicated: received
/// more than once. Out of order: received after a higher seq.
#[derive(Debug, Default)]
struct Integrity {
    lost: u64,
    duplicated: u64,
    out_of_order: u64,
}

fn integrity(acked: &[i64], received: &[i64]) -> Integrity {
    let mut result = Integrity::default();
    let mut seen = std::collections::HashSet::with_capacity(received.len());
    let mut highest = i64::MIN;
    for &seq in received {
        if !seen.insert(seq) {
            result.duplicated += 1;
        } else if seq < highest {
            result.out_of_order += 1;
        }
        highest = highest.max(seq);
    }
    result.lost = acked.iter().filter(|seq| !seen.contains(seq)).count() as u64;
    result
}

fn analyse(
    args: &Args,
    outcomes: &[(ClientOutcome, TherapistOutcome)],
    cpu: CpuSplit,
    server_rss_kib: Option<u64>,
    setup_s: f64,
    connect_failures: usize,
) -> serde_json::Value {
    let mut totals = Integrity::default();
    let mut errors = BTreeMap::<String, u64>::new();
    let mut closed = BTreeMap::<String, u64>::new();
    let (mut sent, mut acked, mut received, mut in_window, mut companion, mut unparsed) = (0, 0, 0, 0, 0, 0);
    for (client, therapist) in outcomes {
        let check = integrity(&client.acked_seqs, &therapist.seqs);
        totals.lost += check.lost;
        totals.duplicated += check.duplicated;
        totals.out_of_order += check.out_of_order;
        sent += client.sent;
        acked += client.acked_seqs.len() as u64;
        received += therapist.seqs.len() as u64;
        in_window += therapist.received_in_window;
        companion += therapist.companion_frames;
        unparsed += client.unparsed;
        for (code, count) in &client.errors {
            *errors.entry(code.clone()).or_default() += count;
        }
        for reason in [&client.closed, &therapist.closed].into_iter().flatten() {
            *closed.entry(reason.clone()).or_default() += 1;
        }
    }
    let refused: u64 = errors.values().sum();
    let latency =
        Percentiles::of_micros(outcomes.iter().map(|(_, therapist)| therapist.latencies.as_slice()));
    let sessions = outcomes.len();
    let crisis_latencies: Vec<u32> =
        outcomes.iter().filter_map(|(client, _)| client.crisis_latency).collect();
    json!({
        "scenario": "direct",
        "label": args.target.label,
        "bare": args.bare,
        "mode": if args.rate > 0.0 { "open" } else { "saturation" },
        "sessions": sessions,
        "sockets": 2 * sessions,
        "offered_per_s": if args.rate > 0.0 { args.rate } else { round(sessions as f64 * args.client_max_rate) },
        "size_bytes": args.size,
        "duration_s": args.duration,
        "delivered_per_s": round(in_window as f64 / args.duration),
        "latency_ms": latency,
        "sent": sent,
        "acked": acked,
        "received": received,
        "refused": refused,
        "unanswered": sent.saturating_sub(acked + refused),
        "lost": totals.lost,
        "duplicated": totals.duplicated,
        "out_of_order": totals.out_of_order,
        "companion_frames": companion,
        "unparsed_frames": unparsed,
        "errors": errors,
        "closed_early": closed,
        "connect_failures": connect_failures,
        "crisis_sent": outcomes.iter().filter(|(client, _)| client.crisis_sent).count(),
        "crisis_answered": crisis_latencies.len(),
        "crisis_ms": Percentiles::of_micros([crisis_latencies.as_slice()]),
        "send_lag_ms": Percentiles::of_micros(outcomes.iter().map(|(client, _)| client.send_lags.as_slice())),
        "setup_s": round(setup_s),
        "cpu": cpu,
        "server_rss_kib": server_rss_kib,
        "loadgen_rss_kib": report::rss_kib(std::process::id()),
    })
}

fn summarise(result: &serde_json::Value) -> String {
    let latency: Percentiles = serde_json::from_value(result["latency_ms"].clone()).unwrap_or_default();
    let cpu: CpuSplit = serde_json::from_value(result["cpu"].clone()).unwrap_or_default();
    format!(
        "direct{} ({}): {} sessions, {} offered/s, {} bytes\n  delivered {}/s; latency {}{}{}\n  sent {}, acked {}, received {}, refused {}, unanswered {}; lost {}, duplicated {}, out of order {}\n  {}{}",
        if result["bare"].as_bool() == Some(true) { " --bare" } else { "" },
        result["mode"].as_str().unwrap_or(""),
        result["sessions"],
        result["offered_per_s"],
        result["size_bytes"],
        result["delivered_per_s"],
        latency.line(),
        match result["crisis_sent"].as_u64() {
            Some(sent) if sent > 0 => format!(
                "\n  crisis messages: {sent} sent, {} answered; from send to the crisis message: {}",
                result["crisis_answered"],
                serde_json::from_value::<Percentiles>(result["crisis_ms"].clone()).unwrap_or_default().line()
            ),
            _ => String::new(),
        },
        match result["send_lag_ms"]["count"].as_u64() {
            Some(count) if count > 0 => format!(
                "\n  sends behind schedule: p99 {} ms, max {} ms",
                result["send_lag_ms"]["p99"], result["send_lag_ms"]["max"]
            ),
            _ => String::new(),
        },
        result["sent"],
        result["acked"],
        result["received"],
        result["refused"],
        result["unanswered"],
        result["lost"],
        result["duplicated"],
        result["out_of_order"],
        cpu.line(),
        match result["closed_early"].as_object() {
            Some(closed) if !closed.is_empty() => format!("\n  closed early: {}", result["closed_early"]),
            _ => String::new(),
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integrity_counts_lost_duplicated_and_reordered_seqs() {
        let check = integrity(&[2, 3, 4, 5, 6], &[2, 4, 3, 4, 6]);
        assert_eq!((check.lost, check.duplicated, check.out_of_order), (1, 1, 1));
    }
}
