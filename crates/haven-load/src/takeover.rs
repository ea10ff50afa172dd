//! `takeover`: clients keep talking to a slow companion (its replies stream
//! as `ai_delta` frames) while a therapist joins each session at a moment
//! of its own. After the join message, no `ai` message and no `ai_delta`
//! may reach the client or the therapist: this counts every one (the
//! result must be 0), and how many joins caught a reply mid-stream.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use clap::Args as ClapArgs;
use futures_util::{SinkExt, StreamExt, stream};
use haven_protocol::{ChatMode, MessageKind, Sender, ServerFrame};
use serde_json::json;
use tokio::time::sleep_until;

use crate::api::{self, Therapists};
use crate::net::{
    self, Error, Incoming, LOGINS_PER_ADDRESS, Result, SESSIONS_PER_ADDRESS, SOCKETS_PER_LOGIN, Sources,
    Target, Ws, next_frame,
};
use crate::report::{self, Percentiles, micros, progress};

#[derive(Debug, ClapArgs)]
pub struct Args {
    #[command(flatten)]
    pub target: Target,

    #[command(flatten)]
    pub therapists: Therapists,

    /// Sessions, each with a client, then a therapist.
    #[arg(long, default_value_t = 100)]
    pub sessions: usize,

    /// Messages/s each client sends (the server allows 10).
    #[arg(long, default_value_t = 4.0)]
    pub client_rate: f64,

    /// Earliest join, in seconds after the clients start.
    #[arg(long, default_value_t = 1.0)]
    pub join_after_min: f64,

    /// Latest join, in seconds after the clients start.
    #[arg(long, default_value_t = 4.0)]
    pub join_after_max: f64,

    /// Seconds clients keep sending (and both sides keep reading) after the join.
    #[arg(long, default_value_t = 3.0)]
    pub after_join: f64,

    /// Message content size in bytes.
    #[arg(long, default_value_t = 100)]
    pub size: usize,

    /// Sockets being opened at once during setup.
    #[arg(long, default_value_t = 100)]
    pub connect_concurrency: usize,
}

/// Companion frames one side saw.
#[derive(Debug, Default, Clone, Copy)]
struct Seen {
    /// The join message arrived.
    joined: bool,
    /// When it arrived.
    joined_at: Option<Instant>,
    ai_before_join: u64,
    deltas_before_join: u64,
    cancelled_before_join: u64,
    /// Each must stay 0.
    ai_after_join: u64,
    deltas_after_join: u64,
    /// Should be 0: `ai_cancelled` goes out before the join message.
    cancelled_after_join: u64,
    /// A reply was streaming when the therapist joined: its deltas had
    /// arrived, and then its `ai_cancelled` (sent just before the join
    /// message) or nothing.
    in_flight_at_join: bool,
    /// The last companion frame was the cancellation of a streaming reply.
    just_cancelled: bool,
    /// Client messages the therapist received after joining.
    user_messages_after_join: u64,
}

impl Seen {
    /// Counts one frame; `streaming` holds the replies with deltas but no end yet.
    fn frame(&mut self, frame: &ServerFrame, streaming: &mut HashSet<uuid::Uuid>) {
        match frame {
            ServerFrame::Message(message) if message.kind == MessageKind::Join && !self.joined => {
                self.joined = true;
                self.joined_at = Some(Instant::now());
                self.in_flight_at_join = !streaming.is_empty() || self.just_cancelled;
            }
            ServerFrame::Message(message) if message.sender == Sender::Ai => {
                self.just_cancelled = false;
                if let Some(reply_id) = message.reply_id {
                    streaming.remove(&reply_id);
                }
                if self.joined {
                    self.ai_after_join += 1;
                } else {
                    self.ai_before_join += 1;
                }
            }
            ServerFrame::Message(message) if message.sender == Sender::User && self.joined => {
                self.user_messages_after_join += 1;
            }
            ServerFrame::AiDelta { reply_id, .. } => {
                if self.joined {
                    self.deltas_after_join += 1;
                } else {
                    self.just_cancelled = false;
                    streaming.insert(*reply_id);
                    self.deltas_before_join += 1;
                }
            }
            ServerFrame::AiCancelled { reply_id } => {
                self.just_cancelled = streaming.remove(reply_id);
                if self.joined {
                    self.cancelled_after_join += 1;
                } else {
                    self.cancelled_before_join += 1;
                }
            }
            _ => {}
        }
    }
}

#[derive(Debug, Default)]
struct Outcome {
    client: Seen,
    therapist: Seen,
    /// The therapist's socket opened and the join message arrived.
    joined: bool,
    /// From opening the therapist socket to its join message (µs).
    join_latency: Option<u32>,
    /// From the therapist's join message to the client's (µs).
    join_to_client: Option<u32>,
    client_sent: u64,
    problems: Vec<String>,
}

pub async fn run(args: Args) -> Result<()> {
    if args.sessions == 0 || args.client_rate <= 0.0 || args.join_after_max < args.join_after_min {
        return Err("--sessions and --client-rate must be positive, and the join window not empty".into());
    }
    net::check_open_files(2 * args.sessions)?;
    report::origin();
    let target = args.target.target;
    let sources = Sources::new(args.target.source_net);
    let sessions = api::create_sessions(target, sources, args.sessions, SESSIONS_PER_ADDRESS).await?;
    let logins = args.therapists.login(target, sources, args.sessions.div_ceil(SOCKETS_PER_LOGIN)).await?;
    let opened: Vec<Result<(usize, Ws)>> = stream::iter(sessions.iter().enumerate())
        .map(|(index, session)| async move {
            let path = format!("/api/chat/ws/{}", session.session_id);
            let source = sources.client(index / SESSIONS_PER_ADDRESS);
            let mut ws = net::connect(target, source, &path, Some(&session.client_token)).await?;
            match net::first_mode(&mut ws).await? {
                ChatMode::BotOnly => Ok((index, ws)),
                ChatMode::TherapistJoined => Err(Error::from("session already joined")),
            }
        })
        .buffer_unordered(args.connect_concurrency.max(1))
        .collect()
        .await;

    let start = Instant::now() + Duration::from_millis(500);
    let content: std::sync::Arc<str> = net::filler(args.size).into();
    let gap = Duration::from_secs_f64(1.0 / args.client_rate);
    let mut tasks = Vec::new();
    let mut connect_failures = 0;
    for result in opened {
        let (index, ws) = match result {
            Ok(opened) => opened,
            Err(error) => {
                connect_failures += 1;
                progress(format!("a session failed to connect: {error}"));
                continue;
            }
        };
        let spread = args.join_after_max - args.join_after_min;
        let join_at = start + Duration::from_secs_f64(args.join_after_min + spread * unit(index as u64));
        let plan = Plan {
            first_send: start + gap.mul_f64(unit(index as u64 ^ 0x5eed)),
            gap,
            join_at,
            end: join_at + Duration::from_secs_f64(args.after_join),
        };
        let login = index / SOCKETS_PER_LOGIN;
        let therapist = Therapist {
            source: sources.therapist(login / LOGINS_PER_ADDRESS),
            path: format!("/api/chat/ws/{}", sessions[index].session_id),
            token: logins[login].clone(),
        };
        tasks.push(tokio::spawn(session(ws, therapist, target, plan, content.clone())));
    }
    progress(format!(
        "{} sessions talking; therapists join between {} and {} s",
        tasks.len(),
        args.join_after_min,
        args.join_after_max
    ));

    let mut outcomes = Vec::with_capacity(tasks.len());
    for task in tasks {
        outcomes.push(task.await.unwrap_or_default());
    }
    let total = |side: fn(&Outcome) -> u64| outcomes.iter().map(side).sum::<u64>();
    let mut problems = BTreeMap::<String, u64>::new();
    for problem in outcomes.iter().flat_map(|outcome| &outcome.problems) {
        *problems.entry(problem.clone()).or_default() += 1;
    }
    let violations = total(|o| {
        o.client.ai_after_join
            + o.client.deltas_after_join
            + o.therapist.ai_after_join
            + o.therapist.deltas_after_join
    });
    let joined = total(|o| u64::from(o.joined));
    let join_latency = Percentiles::of_micros(
        outcomes.iter().filter_map(|o| o.join_latency.as_ref().map(std::slice::from_ref)),
    );
    let join_to_client = Percentiles::of_micros(
        outcomes.iter().filter_map(|o| o.join_to_client.as_ref().map(std::slice::from_ref)),
    );
    let result = json!({
        "scenario": "takeover",
        "label": args.target.label,
        "sessions": outcomes.len(),
        "joined": joined,
        "clients_saw_join": total(|o| u64::from(o.client.joined)),
        "ai_after_join": {"client": total(|o| o.client.ai_after_join), "therapist": total(|o| o.therapist.ai_after_join)},
        "ai_delta_after_join": {"client": total(|o| o.client.deltas_after_join), "therapist": total(|o| o.therapist.deltas_after_join)},
        "ai_cancelled_after_join": {"client": total(|o| o.client.cancelled_after_join), "therapist": total(|o| o.therapist.cancelled_after_join)},
        "violations": violations,
        "replies_in_flight_at_join": total(|o| u64::from(o.client.in_flight_at_join)),
        "client_ai_before_join": total(|o| o.client.ai_before_join),
        "client_deltas_before_join": total(|o| o.client.deltas_before_join),
        "client_cancelled_before_join": total(|o| o.client.cancelled_before_join),
        "therapist_ai_before_join": total(|o| o.therapist.ai_before_join),
        "therapist_user_messages_after_join": total(|o| o.therapist.user_messages_after_join),
        "client_sent": total(|o| o.client_sent),
        "join_latency_ms": join_latency,
        "join_to_client_ms": join_to_client,
        "problems": problems,
        "connect_failures": connect_failures,
        "pass": violations == 0 && joined == outcomes.len() as u64 && connect_failures == 0,
    });
    let summary = format!(
        "takeover: {} sessions, {} joined ({} with a reply streaming at the join), {} clients saw the join\n  after the join message: ai {} / ai_delta {} (client), ai {} / ai_delta {} (therapist) → {}\n  join latency {}\n  join message at the client after the therapist's: {}{}",
        outcomes.len(),
        joined,
        result["replies_in_flight_at_join"],
        result["clients_saw_join"],
        result["ai_after_join"]["client"],
        result["ai_delta_after_join"]["client"],
        result["ai_after_join"]["therapist"],
        result["ai_delta_after_join"]["therapist"],
        if violations == 0 { "0 violations" } else { "VIOLATIONS" },
        join_latency.line(),
        join_to_client.line(),
        if problems.is_empty() { String::new() } else { format!("\n  problems: {}", result["problems"]) },
    );
    report::emit(result, &summary);
    Ok(())
}

/// A uniform number in [0, 1) from an integer (splitmix64): spreads join
/// moments without a random-number crate, the same on every run.
fn unit(seed: u64) -> f64 {
    let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

#[derive(Debug, Clone, Copy)]
struct Plan {
    first_send: Instant,
    gap: Duration,
    join_at: Instant,
    end: Instant,
}

struct Therapist {
    source: std::net::IpAddr,
    path: String,
    token: String,
}

/// One session: the client talks until the end while its therapist joins
/// at `join_at`.
async fn session(
    client: Ws,
    therapist: Therapist,
    target: std::net::SocketAddr,
    plan: Plan,
    content: std::sync::Arc<str>,
) -> Outcome {
    let (client_side, therapist_side) =
        tokio::join!(run_client(client, plan, content), run_therapist(therapist, target, plan));
    let (client, client_sent, mut problems) = client_side;
    let (seen, joined, join_latency, therapist_problems) = therapist_side;
    problems.extend(therapist_problems);
    let join_to_client = match (seen.joined_at, client.joined_at) {
        (Some(therapist), Some(client)) => Some(micros(client.saturating_duration_since(therapist))),
        _ => None,
    };
    Outcome { client, therapist: seen, joined, join_latency, join_to_client, client_sent, problems }
}

async fn run_client(ws: Ws, plan: Plan, content: std::sync::Arc<str>) -> (Seen, u64, Vec<String>) {
    let (mut sink, mut stream) = ws.split();
    let mut seen = Seen::default();
    let mut streaming = HashSet::new();
    let mut problems = Vec::new();
    let mut sent = 0u64;
    let mut next = plan.first_send;
    // Frames still arriving just after the end are read too.
    let read_until = plan.end + Duration::from_secs(1);
    loop {
        tokio::select! {
            incoming = next_frame(&mut stream) => match incoming {
                Incoming::Frame(frame) => seen.frame(&frame, &mut streaming),
                Incoming::Unparsed => {}
                Incoming::Closed(close) => {
                    problems.push(format!("client {}", net::describe_close(&close)));
                    break;
                }
            },
            () = sleep_until(next.into()), if next < plan.end => {
                if sink.send(net::message_frame(&content, format!("t{sent}"))).await.is_err() {
                    problems.push("client send failed".to_owned());
                    break;
                }
                sent += 1;
                next += plan.gap;
            }
            () = sleep_until(read_until.into()) => break,
        }
    }
    if !seen.joined {
        problems.push("client never saw the join message".to_owned());
    }
    net::close_sink(&mut sink).await;
    (seen, sent, problems)
}

async fn run_therapist(
    therapist: Therapist,
    target: std::net::SocketAddr,
    plan: Plan,
) -> (Seen, bool, Option<u32>, Vec<String>) {
    let mut seen = Seen::default();
    sleep_until(plan.join_at.into()).await;
    let opened = Instant::now();
    let mut ws = match net::connect(target, therapist.source, &therapist.path, Some(&therapist.token)).await {
        Ok(ws) => ws,
        Err(error) => return (seen, false, None, vec![format!("therapist could not connect: {error}")]),
    };
    let mut streaming = HashSet::new();
    let mut join_latency = None;
    let mut problems = Vec::new();
    let read_until = plan.end + Duration::from_secs(1);
    loop {
        let incoming = tokio::select! {
            incoming = next_frame(&mut ws) => incoming,
            () = sleep_until(read_until.into()) => break,
        };
        match incoming {
            Incoming::Frame(frame) => {
                seen.frame(&frame, &mut streaming);
                if seen.joined && join_latency.is_none() {
                    join_latency = Some(micros(opened.elapsed()));
                }
            }
            Incoming::Unparsed => {}
            Incoming::Closed(close) => {
                problems.push(format!("therapist {}", net::describe_close(&close)));
                break;
            }
        }
    }
    let joined = seen.joined;
    if !joined {
        problems.push("therapist never saw the join message".to_owned());
    }
    net::close(ws).await;
    (seen, joined, join_latency, problems)
}
