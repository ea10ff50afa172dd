//! Structured logs with `tracing`.
//!
//! Events carry `session_id`, `role` and `chat_mode` fields. Message content,
//! tokens and passwords are never logged: no code path passes them to a
//! `tracing` macro, and HTTP spans record the route pattern, not the URI
//! (the setup URL carries a secret).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber. `RUST_LOG` overrides the default level.
pub fn init(format: LogFormat) {
    // genai's own logs can quote provider responses; they stay off unless asked for.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,genai=off"));
    // Colours only on a terminal, never in a log file.
    let ansi = std::io::stderr().is_terminal();
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).try_init(),
    };
}
