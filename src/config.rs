//! Command line and environment. Every flag has an environment variable;
//! the README's configuration table lists them all.

use std::net::SocketAddr;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(name = "haven", version, about = "Real-time chat for therapy support")]
pub struct Cli {
    /// Database URL. `sqlite://FILE` (created if missing).
    #[arg(
        long,
        global = true,
        env = "HAVEN_DATABASE_URL",
        default_value = "sqlite://haven.db"
    )]
    pub database: String,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the chat service.
    Serve(ServeArgs),
    /// Manage therapist accounts.
    Therapist {
        #[command(subcommand)]
        command: TherapistCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum TherapistCommand {
    /// Create a therapist account; the password is read from standard input.
    Add(AddTherapistArgs),
    /// List therapist accounts.
    List,
}

#[derive(Debug, Args)]
pub struct AddTherapistArgs {
    /// The login e-mail address (stored in lower case).
    #[arg(long, env = "HAVEN_THERAPIST_EMAIL")]
    pub email: String,
    /// The name clients and colleagues see.
    #[arg(long, env = "HAVEN_THERAPIST_NAME")]
    pub name: String,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on. Port 0 picks a free port (printed at start).
    #[arg(long, env = "HAVEN_BIND", default_value = "127.0.0.1:8000")]
    pub bind: SocketAddr,

    /// Extra origins allowed to open cookie-authenticated WebSockets, e.g.
    /// `https://chat.example.org` (repeatable; comma-separated in the env var).
    /// The server's own origin is always allowed.
    #[arg(
        long = "allowed-origin",
        env = "HAVEN_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    pub allowed_origins: Vec<String>,

    /// Mark auth cookies `Secure` (set this when Haven is served over HTTPS).
    #[arg(long, env = "HAVEN_COOKIE_SECURE")]
    pub cookie_secure: bool,

    /// Hours a therapist login stays valid.
    #[arg(long, env = "HAVEN_THERAPIST_SESSION_HOURS", default_value_t = 12)]
    pub therapist_session_hours: u32,

    /// Milliseconds the built-in companion waits before replying (0 = at once).
    #[arg(long, env = "HAVEN_COMPANION_DELAY_MS", default_value_t = 0)]
    pub companion_delay_ms: u64,

    /// Log format on standard error.
    #[arg(long, env = "HAVEN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}
