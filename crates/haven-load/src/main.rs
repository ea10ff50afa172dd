//! `haven-load`: Haven's load generator.
//!
//! One binary, one subcommand per scenario, each printing one JSON result
//! line on standard output and a readable summary on standard error:
//!
//! - [`idle`]: many idle sockets held open; the server's memory per socket.
//! - [`direct`]: clients talking to joined therapists; throughput, latency,
//!   and loss, duplication and reordering checked against seqs.
//! - [`bot`]: clients talking to the companion; replies/s and latency.
//! - [`takeover`]: therapists joining while replies stream; no companion
//!   frame may follow the join message.
//!
//! And the helpers the benchmark needs: [`relay`], a bare WebSocket relay
//! (no auth, no storage) that `direct --bare` measures as the baseline;
//! [`mock_llm`], an OpenAI-compatible streaming provider with a set latency;
//! [`summarize`], medians of several runs.
//!
//! Targets are loopback addresses only. Client sockets and HTTP requests
//! come from many loopback source addresses (127.N.x.y), as real clients
//! come from many machines, so the server's default per-address limits stay
//! on and are respected. Message content is never logged.

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// The server's allocator, so the bare relay runs on the same stack.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

mod api;
mod bot;
mod direct;
mod idle;
mod mock_llm;
mod net;
mod relay;
mod report;
mod summarize;
mod takeover;

#[derive(Debug, Parser)]
#[command(name = "haven-load", version, about = "Haven's load generator (loopback targets only)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Hold many idle client sockets; report how many stayed up and the
    /// server's memory per socket.
    Idle(idle::Args),
    /// Clients send to joined therapists; report delivered messages/s,
    /// latency, and lost, duplicated and out-of-order messages.
    Direct(direct::Args),
    /// Clients talk to the companion; report replies/s and latency.
    Bot(bot::Args),
    /// Therapists join while companion replies stream; count companion
    /// frames after the join message (must be 0).
    Takeover(takeover::Args),
    /// A bare WebSocket relay with no auth and no storage: the baseline.
    Relay(relay::Args),
    /// An OpenAI-compatible streaming chat-completions provider with a set latency.
    MockLlm(mock_llm::Args),
    /// Medians of several runs, from the JSON result lines.
    Summarize(summarize::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: starting the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Idle(args) => idle::run(args).await,
            Command::Direct(args) => direct::run(args).await,
            Command::Bot(args) => bot::run(args).await,
            Command::Takeover(args) => takeover::run(args).await,
            Command::Relay(args) => relay::run(args).await,
            Command::MockLlm(args) => mock_llm::run(args).await,
            Command::Summarize(args) => summarize::run(args),
        }
    });
    // Sockets still open are dropped here, without waiting for their tasks.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}
