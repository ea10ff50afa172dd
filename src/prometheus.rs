//! Prometheus metrics: `GET /metrics` on `--metrics-bind`, a listener of
//! its own, so that it is never served to the public by accident.
//!
//! The code records through the `metrics` facade where things happen (the
//! store records its commits, the socket its acks); without
//! `--metrics-bind` no recorder is installed and each of those calls does
//! nothing. `metrics-exporter-prometheus` keeps the values and renders
//! the text format. Labels are bounded sets (roles, modes, senders,
//! providers, error kinds, levels, limits): never a session id or an
//! e-mail. [`describe`] is the list of every series.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::Context;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use haven_protocol::ChatMode;
use metrics::{Unit, describe_counter, describe_gauge, describe_histogram, gauge};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

use crate::startup::AppState;

/// Seconds: from half a millisecond to half a minute.
const LATENCY_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
/// Writes per group commit (the store commits at most 512 at once).
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];
/// Seconds from a crisis flag to its acknowledgement: a minute to a day.
const ACKNOWLEDGEMENT_BUCKETS: &[f64] =
    &[60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0, 86400.0];

/// The recorder, installed once per process.
static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the recorder (once), and serves `GET /metrics` on `bind` until
/// shutdown. Returns the address it listens on.
pub async fn serve(bind: SocketAddr, state: AppState) -> anyhow::Result<SocketAddr> {
    let handle = match HANDLE.get() {
        Some(handle) => handle.clone(),
        None => {
            let handle = PrometheusBuilder::new()
                .set_buckets(LATENCY_BUCKETS)?
                .set_buckets_for_metric(Matcher::Full("haven_commit_batch_size".into()), BATCH_BUCKETS)?
                .set_buckets_for_metric(
                    Matcher::Full("haven_crisis_acknowledgement_seconds".into()),
                    ACKNOWLEDGEMENT_BUCKETS,
                )?
                .install_recorder()
                .context("installing the metrics recorder")?;
            describe();
            HANDLE.get_or_init(|| handle).clone()
        }
    };
    gauge!("haven_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);

    // Histograms are drained into their buckets at upkeep, and at least
    // this often.
    let upkeep = handle.clone();
    let shutdown = state.shutdown.clone();
    state.tasks.spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                _ = every.tick() => upkeep.run_upkeep(),
            }
        }
    });

    let listener = TcpListener::bind(bind).await.with_context(|| format!("binding {bind} for metrics"))?;
    let address = listener.local_addr()?;
    let shutdown = state.shutdown.clone();
    let app = axum::Router::new().route("/metrics", axum::routing::get(scrape)).with_state((state, handle));
    tokio::spawn(async move {
        let served = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await;
        if let Err(error) = served {
            tracing::error!(error = %error, "the metrics listener failed");
        }
    });
    tracing::info!(address = %address, "metrics listening");
    Ok(address)
}

/// One open chat socket, counted in `haven_open_sockets` while it lives.
pub struct OpenSocket(&'static str);

impl OpenSocket {
    pub fn new(role: &'static str) -> Self {
        gauge!("haven_open_sockets", "role" => role).increment(1.0);
        Self(role)
    }
}

impl Drop for OpenSocket {
    fn drop(&mut self) {
        gauge!("haven_open_sockets", "role" => self.0).decrement(1.0);
    }
}

/// `GET /metrics`: the sessions by mode are counted now, in the database
/// (every instance of a shared database reports the same count); the rest
/// is what this process recorded.
async fn scrape(State((state, handle)): State<(AppState, PrometheusHandle)>) -> impl IntoResponse {
    match state.store.sessions_by_mode().await {
        Ok(counts) => {
            for mode in [ChatMode::BotOnly, ChatMode::TherapistJoined] {
                let count =
                    counts.iter().find(|(counted, _)| *counted == mode).map_or(0, |(_, count)| *count);
                gauge!("haven_sessions", "mode" => mode.as_str()).set(count as f64);
            }
        }
        Err(error) => tracing::warn!(error = %error, "metrics: could not count sessions"),
    }
    handle.run_upkeep();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], handle.render())
}

/// Every series, with its help text.
fn describe() {
    describe_gauge!("haven_build_info", "Always 1; the version is its label.");
    describe_gauge!("haven_open_sockets", "Open chat WebSockets on this instance, by role.");
    describe_gauge!("haven_sessions", "Open chat sessions in the database, by mode.");
    describe_counter!("haven_messages_stored_total", "Messages committed by this instance, by sender.");
    describe_histogram!(
        "haven_ack_latency_seconds",
        Unit::Seconds,
        "From a chat message's arrival on its socket to its ack (after the commit)."
    );
    describe_histogram!("haven_commit_batch_size", "Writes per group commit of messages.");
    describe_histogram!(
        "haven_commit_batch_duration_seconds",
        Unit::Seconds,
        "How long each group commit took."
    );
    describe_histogram!(
        "haven_companion_first_delta_seconds",
        Unit::Seconds,
        "From asking the companion for a reply to its first piece of text, by provider."
    );
    describe_histogram!(
        "haven_companion_reply_seconds",
        Unit::Seconds,
        "From asking the companion for a reply to its commit, by provider."
    );
    describe_counter!("haven_provider_errors_total", "Companion replies that failed, by provider and kind.");
    describe_counter!("haven_takeovers_total", "Therapist joins committed by this instance.");
    describe_counter!("haven_crisis_flags_total", "Client messages the crisis detector flagged, by level.");
    describe_histogram!(
        "haven_crisis_acknowledgement_seconds",
        Unit::Seconds,
        "From a session's latest crisis flag to a therapist's acknowledgement."
    );
    describe_counter!("haven_rate_limited_total", "Requests and messages refused by a limit, by limit.");
    describe_counter!(
        "haven_login_failures_total",
        "Therapist logins refused for a wrong e-mail or password."
    );
    describe_counter!(
        "haven_notification_reconnects_total",
        "Times the PostgreSQL notification listener reconnected."
    );
}
