//! `idle`: N client sockets over N/tabs sessions (two tabs by default), held open
//! without sending. Reports how many stayed up through the hold (heartbeats
//! included: the server pings every 20 s and drops a socket silent for two
//! periods) and the server's resident memory per socket, read from
//! /proc/PID/status before and after the sockets opened.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use clap::Args as ClapArgs;
use futures_util::{StreamExt, stream};
use serde_json::json;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use crate::api;
use crate::net::{self, Result, SESSIONS_PER_ADDRESS, SOCKETS_PER_ADDRESS, Sources, Target, Ws};
use crate::report::{self, progress, round};

#[derive(Debug, ClapArgs)]
pub struct Args {
    #[command(flatten)]
    pub target: Target,

    /// Client sockets to open (over half as many sessions).
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,

    /// Sockets per session (a client's tabs; the server allows 20).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=20))]
    pub tabs: u16,

    /// Seconds to hold them once all are open. Over 40 s covers two heartbeats.
    #[arg(long, default_value_t = 45.0)]
    pub hold: f64,

    /// Sockets being opened at once.
    #[arg(long, default_value_t = 200)]
    pub connect_concurrency: usize,
}

/// How one socket's hold ended.
#[derive(Debug)]
struct Held {
    /// Still open when the hold ended.
    up: bool,
    closed: Option<String>,
    pings: u64,
}

pub async fn run(args: Args) -> Result<()> {
    if args.connections == 0 {
        return Err("--connections must be positive".into());
    }
    net::check_open_files(args.connections)?;
    report::origin();
    let target = args.target.target;
    let sources = Sources::new(args.target.source_net);
    let tabs = usize::from(args.tabs);
    // Under both per-address limits: sockets, and new sessions per minute.
    let per_address = (SOCKETS_PER_ADDRESS / tabs).min(SESSIONS_PER_ADDRESS);
    let session_count = args.connections.div_ceil(tabs);
    let sessions = api::create_sessions(target, sources, session_count, per_address).await?;

    // Let the server settle after the session writes before the baseline.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pid = args.target.server_pid;
    let rss_before = pid.and_then(report::rss_kib);
    let own_before = report::rss_kib(std::process::id());

    let (release, released) = watch::channel(false);
    // A bound on the whole scenario, whatever happens.
    let connect_budget = Duration::from_secs(60) + Duration::from_millis(20 * args.connections as u64);
    let hard_end =
        Instant::now() + connect_budget + Duration::from_secs_f64(args.hold) + Duration::from_secs(30);
    let connect_started = Instant::now();
    let opened: Vec<Result<tokio::task::JoinHandle<Held>>> = stream::iter(0..args.connections)
        .map(|socket| {
            let session = &sessions[socket / tabs];
            let source = sources.client((socket / tabs) / per_address);
            let released = released.clone();
            async move {
                let path = format!("/api/chat/ws/{}", session.session_id);
                let mut ws = net::connect(target, source, &path, Some(&session.client_token)).await?;
                net::first_mode(&mut ws).await?;
                Ok(tokio::spawn(hold(ws, released, hard_end)))
            }
        })
        .buffer_unordered(args.connect_concurrency.max(1))
        .collect()
        .await;
    let connect_s = connect_started.elapsed().as_secs_f64();
    let mut holders = Vec::with_capacity(opened.len());
    let mut failures = BTreeMap::<String, u64>::new();
    for result in opened {
        match result {
            Ok(holder) => holders.push(holder),
            Err(error) => *failures.entry(error.to_string()).or_default() += 1,
        }
    }
    progress(format!("{} sockets open in {connect_s:.1} s; holding for {:.0} s", holders.len(), args.hold));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_connected = pid.and_then(report::rss_kib);

    tokio::time::sleep(Duration::from_secs_f64(args.hold)).await;
    // Measured while every socket is still held.
    let rss_held = pid.and_then(report::rss_kib);
    let own_held = report::rss_kib(std::process::id());
    let _ = release.send(true);

    let mut up = 0;
    let mut pings = 0;
    let mut closed = BTreeMap::<String, u64>::new();
    for holder in holders {
        match holder.await {
            Ok(held) => {
                up += u64::from(held.up);
                pings += held.pings;
                if let Some(reason) = held.closed {
                    *closed.entry(reason).or_default() += 1;
                }
            }
            Err(_) => *closed.entry("task failed".to_owned()).or_default() += 1,
        }
    }
    let opened_count = args.connections as u64 - failures.values().sum::<u64>();
    let per_socket = |before: Option<u64>, after: Option<u64>| {
        let (before, after) = (before?, after?);
        (opened_count > 0).then(|| round(after.saturating_sub(before) as f64 * 1024.0 / opened_count as f64))
    };
    let result = json!({
        "scenario": "idle",
        "label": args.target.label,
        "connections": args.connections,
        "sessions": session_count,
        "tabs": tabs,
        "opened": opened_count,
        "stayed_up": up,
        "connect_failures": failures,
        "closed_early": closed,
        "pings_received": pings,
        "hold_s": args.hold,
        "connect_s": round(connect_s),
        "connects_per_s": round(opened_count as f64 / connect_s.max(1e-9)),
        "server_rss_before_kib": rss_before,
        "server_rss_connected_kib": rss_connected,
        "server_rss_held_kib": rss_held,
        "server_bytes_per_connection": per_socket(rss_before, rss_held),
        "loadgen_bytes_per_connection": per_socket(own_before, own_held),
    });
    let summary = format!(
        "idle: {} of {} sockets stayed up for {:.0} s ({} pings answered); opened in {:.1} s\n  server RSS {} → {} KiB: {} bytes per connection; load generator {} bytes per connection{}",
        up,
        args.connections,
        args.hold,
        pings,
        connect_s,
        result["server_rss_before_kib"],
        result["server_rss_held_kib"],
        result["server_bytes_per_connection"],
        result["loadgen_bytes_per_connection"],
        if failures.is_empty() && closed.is_empty() {
            String::new()
        } else {
            format!("\n  failures: {} closed: {}", result["connect_failures"], result["closed_early"])
        }
    );
    report::emit(result, &summary);
    Ok(())
}

/// Reads a socket (answering pings) until released or closed.
async fn hold(mut ws: Ws, mut released: watch::Receiver<bool>, hard_end: Instant) -> Held {
    let mut held = Held { up: true, closed: None, pings: 0 };
    loop {
        tokio::select! {
            message = ws.next() => match message {
                Some(Ok(Message::Ping(_))) => held.pings += 1,
                Some(Ok(Message::Close(frame))) => {
                    let close = frame.map(|frame| (u16::from(frame.code), frame.reason.to_string()));
                    held.closed = Some(net::describe_close(&close));
                    held.up = false;
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => {
                    held.closed = Some(net::describe_close(&None));
                    held.up = false;
                    break;
                }
            },
            _ = released.wait_for(|released| *released) => break,
            () = tokio::time::sleep_until(hard_end.into()) => break,
        }
    }
    if held.up {
        net::close(ws).await;
    }
    held
}
