//! Structured logs with `tracing`.
//!
//! Events carry `session_id`, `role` and `chat_mode` fields. Message content,
//! tokens and passwords are never logged: no code path passes them to a
//! `tracing` macro, and HTTP spans record the route pattern, not the URI
//! (the setup URL carries a secret).
//!
//! Lines are written to standard error by a thread of their own: the task
//! that logs formats its line and queues it, and the thread writes what is
//! queued in as few `write` calls as it can, then flushes. Every line is
//! kept: when the queue is full, the task that logs waits.

use std::io::{BufWriter, IsTerminal};

use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::{Layered, SubscriberExt};
use tracing_subscriber::registry::Registry;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::LogFormat;

/// Lines that may wait for the log thread (a few megabytes) before
/// logging waits for it.
const QUEUED_LINES: usize = 16_384;

/// Crates that log what passes through them (WebSocket frames, in plain and
/// in hex; HTTP heads) at `debug` and `trace`: capped at `info` whatever
/// `RUST_LOG` says, so no level shows message content or credentials.
const TRANSPORTS: [&str; 6] = ["tungstenite", "tokio_tungstenite", "hyper", "hyper_util", "h2", "reqwest"];

/// Installs the global subscriber. `RUST_LOG` overrides the default level,
/// but never lifts the transport crates above `info`.
/// Lines queued when the returned guard is dropped are written before the
/// drop returns (it waits up to about a second for them), so it must live
/// as long as the server.
#[must_use = "logging stops when the guard is dropped"]
pub fn init(format: LogFormat) -> WorkerGuard {
    // genai's own logs can quote provider responses; they stay off unless asked for.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,genai=off"));
    // Colours only on a terminal, never in a log file.
    let ansi = std::io::stderr().is_terminal();
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(false)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("haven-log")
        .finish(BufWriter::with_capacity(64 * 1024, std::io::stderr()));
    let layer = tracing_subscriber::fmt::layer().with_writer(writer).with_ansi(ansi);
    let layer = match format {
        LogFormat::Text => layer.boxed(),
        LogFormat::Json => layer.json().flatten_event(true).with_current_span(true).boxed(),
    };
    let _ = filtered(filter).with(layer).try_init();
    guard
}

/// The registry with both filters: `RUST_LOG`'s, and the transports' cap.
/// Both apply to the whole subscriber, not as a filter of the one layer:
/// `EnvFilter` combined into a per-layer filter lost every event's span
/// (its `session_id`) under a filter such as `info,haven=debug` on
/// PostgreSQL (`privacy.rs` checks it).
///
/// The cap's default is the most `RUST_LOG` asks for, not `TRACE`: the
/// subscriber's most verbose level is the most of its filters', and `log`
/// records below it (tungstenite's, several per frame) are skipped at the
/// macro rather than turned into events and then dropped.
fn filtered(filter: EnvFilter) -> Layered<Targets, Layered<EnvFilter, Registry>> {
    let most = filter.max_level_hint().unwrap_or(LevelFilter::TRACE);
    let transports = TRANSPORTS.iter().fold(Targets::new().with_default(most), |cap, target| {
        cap.with_target(*target, LevelFilter::INFO.min(most))
    });
    tracing_subscriber::registry().with(filter).with(transports)
}

#[cfg(test)]
mod tests {
    use tracing::Subscriber;

    use super::*;

    #[test]
    fn the_most_verbose_level_is_the_most_rust_log_asks_for() {
        let most = |directives: &str| filtered(EnvFilter::new(directives)).max_level_hint();
        assert_eq!(most("info,genai=off"), Some(LevelFilter::INFO));
        assert_eq!(most("warn,haven=debug"), Some(LevelFilter::DEBUG));
        assert_eq!(most("off"), Some(LevelFilter::OFF));
    }
}
