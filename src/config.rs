//! Command line and environment. Every flag has an environment variable;
//! the README's configuration table lists them all.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(name = "haven", version, about = "Real-time chat for therapy support")]
pub struct Cli {
    /// Database URL. `sqlite://FILE` (created if missing).
    #[arg(long, global = true, env = "HAVEN_DATABASE_URL", default_value = "sqlite://haven.db")]
    pub database: String,

    /// A configuration file (TOML) whose keys are the flags' long names;
    /// flags and environment variables override it (`haven config example`).
    #[arg(long, global = true, env = "HAVEN_CONFIG")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
// Parsed once per process; boxing the large variant would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Run the chat service.
    Serve(ServeArgs),
    /// Manage therapist accounts.
    Therapist {
        #[command(subcommand)]
        command: TherapistCommand,
    },
    /// The crisis detector: what it finds, and what it has flagged.
    Safety {
        #[command(subcommand)]
        command: SafetyCommand,
    },
    /// Copy a SQLite database to FILE while Haven serves it, and check the
    /// copy (PostgreSQL: use pg_dump).
    Backup {
        /// Where to write the copy; it must not exist.
        #[arg(long)]
        to: PathBuf,
    },
    /// Replace a stopped deployment's SQLite database with a backup, after
    /// checking it; the database replaced is kept beside it.
    Restore {
        /// The backup to restore.
        #[arg(long)]
        from: PathBuf,
    },
    /// Chats past their retention period (docs/privacy.md).
    Retention {
        #[command(subcommand)]
        command: RetentionCommand,
    },
    /// The audit trail: who read or changed which chat, and when.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// The configuration file of `serve --config`.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the configuration `serve` would run with (flags aside), secrets
    /// masked, each value with where it came from; exit non-zero on an
    /// unknown key or an invalid value, naming each one.
    Check,
    /// Print a configuration file with every key, commented out at its
    /// default.
    Example,
}

#[derive(Debug, Subcommand)]
pub enum RetentionCommand {
    /// Count the chats past their retention period, and with `--apply`
    /// delete them. `serve` does this by itself every day.
    Run {
        #[command(flatten)]
        policy: RetentionArgs,
        /// Delete them; without it, only count them (a dry run).
        #[arg(long)]
        apply: bool,
    },
}

/// How long chats are kept, counted from their last activity (their newest
/// message, or their creation).
#[derive(Debug, Clone, Copy, Args)]
pub struct RetentionArgs {
    /// Days a chat that no therapist joined, and that was never flagged, is
    /// kept.
    #[arg(long, env = "HAVEN_RETENTION_BOT_ONLY_DAYS", default_value_t = 30,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub retention_bot_only_days: u32,
    /// Days a chat that a therapist joined, or that the crisis detector
    /// flagged, is kept: the clinical record. The default is 7 years; set
    /// your jurisdiction's rule.
    #[arg(long, env = "HAVEN_RETENTION_CLINICAL_DAYS", default_value_t = 2557,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub retention_clinical_days: u32,
}

impl RetentionArgs {
    /// The last activity before which each tier has expired, at `now`.
    pub fn cutoffs(&self, now: time::OffsetDateTime) -> haven_store::RetentionCutoffs {
        haven_store::RetentionCutoffs {
            bot_only_before: now - time::Duration::days(self.retention_bot_only_days.into()),
            clinical_before: now - time::Duration::days(self.retention_clinical_days.into()),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the whole hash chain; name the first record that was edited,
    /// deleted or moved, and exit non-zero if one was.
    Verify,
    /// Print records, oldest first, one per line (tab-separated: seq, time,
    /// actor, therapist e-mail, action, session, address, outcome, detail).
    List {
        /// Only this chat session's records.
        #[arg(long)]
        session: Option<uuid::Uuid>,
        /// Only this therapist's records (by e-mail).
        #[arg(long)]
        therapist: Option<String>,
        /// Only records at or after this time: RFC 3339 (`2026-12-01T09:00:00Z`)
        /// or a date (`2026-12-01`, midnight UTC).
        #[arg(long, value_parser = parse_since)]
        since: Option<time::OffsetDateTime>,
    },
}

/// `--since`: an RFC 3339 time, or a date at midnight UTC.
fn parse_since(value: &str) -> Result<time::OffsetDateTime, String> {
    use time::format_description::well_known::Rfc3339;
    if let Ok(at) = time::OffsetDateTime::parse(value, &Rfc3339) {
        return Ok(at);
    }
    let date_format = time::macros::format_description!("[year]-[month]-[day]");
    time::Date::parse(value, &date_format)
        .map(|date| date.midnight().assume_utc())
        .map_err(|_| "expected an RFC 3339 time or a date such as 2026-12-01".to_owned())
}

#[derive(Debug, Subcommand)]
pub enum SafetyCommand {
    /// Classify TEXT with the rules and the model and print
    /// `{"level", "rules", "version", "model"}` as JSON (no database needed).
    Check {
        /// The message to classify.
        text: String,
        /// A model file to use instead of the built-in one.
        #[arg(long, env = "HAVEN_SAFETY_MODEL")]
        safety_model: Option<PathBuf>,
    },
    /// Print the counts of flags and crisis referrals as JSON.
    Report {
        /// Count the last DAYS days.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
}

#[derive(Debug, Subcommand)]
pub enum TherapistCommand {
    /// Create a therapist account; the password is read from standard input.
    Add(AddTherapistArgs),
    /// List therapist accounts.
    List,
    /// Set a new password (read from standard input) and end every login.
    Passwd(AccountArgs),
    /// Disable an account: it can no longer log in, and every login ends.
    Disable(AccountArgs),
}

#[derive(Debug, Args)]
pub struct AccountArgs {
    /// The account's e-mail address.
    #[arg(long, env = "HAVEN_THERAPIST_EMAIL")]
    pub email: String,
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
    #[arg(long = "allowed-origin", env = "HAVEN_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// Mark auth cookies `Secure` (set this when Haven is served over HTTPS).
    #[arg(long, env = "HAVEN_COOKIE_SECURE")]
    pub cookie_secure: bool,

    /// Hours a therapist login stays valid.
    #[arg(long, env = "HAVEN_THERAPIST_SESSION_HOURS", default_value_t = 12)]
    pub therapist_session_hours: u32,

    /// Address to serve Prometheus metrics on (`GET /metrics`), e.g.
    /// `127.0.0.1:9100`; off when unset. Never served on `--bind`.
    #[arg(long, env = "HAVEN_METRICS_BIND")]
    pub metrics_bind: Option<SocketAddr>,

    /// Log format on standard error.
    #[arg(long, env = "HAVEN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(flatten)]
    pub ai: AiArgs,

    #[command(flatten)]
    pub limits: LimitArgs,

    #[command(flatten)]
    pub safety: SafetyArgs,

    #[command(flatten)]
    pub retention: RetentionArgs,
}

/// The crisis resources shown to clients whose messages are flagged
/// (docs/safety.md). Set them for the deployment's country; the defaults
/// name no country's numbers.
#[derive(Debug, Clone, Args)]
pub struct SafetyArgs {
    /// The crisis line to call, as clients should read it, e.g.
    /// `988 (Suicide & Crisis Lifeline)` or `116 123 (Samaritans)`.
    #[arg(long, env = "HAVEN_CRISIS_LINE")]
    pub crisis_line: Option<String>,

    /// A crisis text or chat line, e.g. `text HOME to 741741`.
    #[arg(long, env = "HAVEN_CRISIS_TEXT_LINE")]
    pub crisis_text_line: Option<String>,

    /// The emergency number, e.g. `112`, `911` or `999`.
    #[arg(long, env = "HAVEN_EMERGENCY_NUMBER")]
    pub emergency_number: Option<String>,

    /// A directory of crisis lines, shown with every crisis message.
    #[arg(long, env = "HAVEN_CRISIS_RESOURCES_URL", default_value = "https://findahelpline.com")]
    pub crisis_resources_url: String,

    /// Ask the language model (when one is configured) for a second opinion
    /// on every client message; it can only raise the detector's level.
    #[arg(long, env = "HAVEN_SAFETY_SECOND_OPINION", default_value_t = true, action = clap::ArgAction::Set)]
    pub safety_second_opinion: bool,

    /// A crisis model file (`scripts/safety-model/train.sh`) to use instead
    /// of the built-in one. A file that cannot be used stops `serve`.
    #[arg(long, env = "HAVEN_SAFETY_MODEL")]
    pub safety_model: Option<PathBuf>,
}

/// Limits against abuse and failure; the defaults suit a clinic behind one
/// NAT address.
#[derive(Debug, Clone, Args)]
pub struct LimitArgs {
    /// Messages per second one connection may send (sustained).
    #[arg(long, env = "HAVEN_MESSAGE_RATE", default_value_t = 10)]
    pub message_rate: u32,

    /// Messages one connection may send in a burst.
    #[arg(long, env = "HAVEN_MESSAGE_BURST", default_value_t = 20)]
    pub message_burst: u32,

    /// Refused (rate-limited) messages within 10 s after which the socket is
    /// closed with 1008.
    #[arg(long = "rate-limit-refusals", env = "HAVEN_RATE_LIMIT_REFUSALS", default_value_t = 50)]
    pub refusals_before_close: usize,

    /// New chat sessions one IP address may create per minute.
    #[arg(long, env = "HAVEN_SESSIONS_PER_IP_PER_MINUTE", default_value_t = 120)]
    pub sessions_per_ip_per_minute: u32,

    /// Open TCP connections per IP address (an IPv6 /64), counted when a
    /// connection is accepted: one more is closed before anything is read.
    #[arg(long, env = "HAVEN_MAX_CONNECTIONS_PER_IP", default_value_t = 256)]
    pub max_connections_per_ip: usize,

    /// Open WebSockets per IP address (an IPv6 /64).
    #[arg(long, env = "HAVEN_MAX_SOCKETS_PER_IP", default_value_t = 200)]
    pub max_sockets_per_ip: usize,

    /// Open WebSockets per credential (a client's tabs, a therapist's windows).
    #[arg(long, env = "HAVEN_MAX_SOCKETS_PER_CREDENTIAL", default_value_t = 20)]
    pub max_sockets_per_credential: usize,

    /// Open appointment event streams (`GET /api/appointments/events`) per
    /// therapist login.
    #[arg(long, env = "HAVEN_MAX_EVENT_STREAMS_PER_LOGIN", default_value_t = 8)]
    pub max_event_streams_per_login: usize,

    /// Failed logins, per account and address and per address, after which
    /// logins from there are refused (HTTP 429) until the window has passed.
    /// An account's failures from anywhere only slow its logins down.
    #[arg(long, env = "HAVEN_LOGIN_FAILURES", default_value_t = 10)]
    pub login_failures: usize,

    /// The window for counting failed logins, in minutes.
    #[arg(long, env = "HAVEN_LOGIN_LOCK_MINUTES", default_value_t = 15)]
    pub login_lock_minutes: u64,

    /// Password hashes computed at once; more logins wait their turn.
    #[arg(long, env = "HAVEN_PASSWORD_HASH_WORKERS", default_value_t = 2)]
    pub password_hash_workers: usize,

    /// Seconds between pings on each WebSocket. A socket silent for two
    /// intervals is dropped, and each ping re-checks its credential.
    #[arg(long, env = "HAVEN_HEARTBEAT_SECONDS", default_value_t = 20)]
    pub heartbeat_seconds: u64,

    /// Seconds the joined therapist may have no tab open before the client
    /// is offered the crisis resources and to continue with the companion.
    #[arg(long, env = "HAVEN_THERAPIST_AWAY_SECONDS", default_value_t = 120)]
    pub therapist_away_seconds: u64,

    /// Frames queued for one socket; a client that stops reading is
    /// disconnected when its queue is full.
    #[arg(long, env = "HAVEN_OUTBOUND_QUEUE", default_value_t = 256)]
    pub outbound_queue: usize,

    /// Seconds a connection may take, from accept, to send a complete
    /// request head (the WebSocket handshake included), and may then stay
    /// idle between requests, before it is closed.
    #[arg(long, env = "HAVEN_HANDSHAKE_TIMEOUT_SECONDS", default_value_t = 10)]
    pub handshake_timeout_seconds: u64,

    /// Seconds from a request's complete head to its response, the body's
    /// upload included: a slower request gets 408 and its connection closes.
    #[arg(long, env = "HAVEN_REQUEST_TIMEOUT_SECONDS", default_value_t = 15)]
    pub request_timeout_seconds: u64,

    /// Hours an unclaimed, unflagged chat may go untouched (no message)
    /// before it leaves the therapists' waiting list. It stays open: its
    /// client can still write, which brings it back.
    #[arg(long, env = "HAVEN_WAITING_HOURS", default_value_t = 24)]
    pub waiting_hours: u64,

    /// Minutes a therapist login may go unused before it ends.
    #[arg(long, env = "HAVEN_THERAPIST_IDLE_MINUTES", default_value_t = 30)]
    pub therapist_idle_minutes: u64,
}

/// Who answers clients while no therapist has joined.
#[derive(Debug, Clone, Args)]
pub struct AiArgs {
    /// The companion: the built-in offline one, or a language model.
    #[arg(long, env = "HAVEN_AI_PROVIDER", value_enum, default_value_t = AiProvider::Companion)]
    pub ai_provider: AiProvider,

    /// The provider's API root including its version path. Defaults:
    /// `https://generativelanguage.googleapis.com/v1beta` (gemini),
    /// `https://api.openai.com/v1` (openai).
    #[arg(long, env = "HAVEN_AI_BASE_URL")]
    pub ai_base_url: Option<String>,

    /// The model. Defaults: `gemini-2.5-flash` (gemini), `gpt-4o-mini` (openai).
    #[arg(long, env = "HAVEN_AI_MODEL")]
    pub ai_model: Option<String>,

    /// The provider's API key. When unset, gemini reads `GEMINI_API_KEY` and
    /// openai reads `OPENAI_API_KEY`. Never logged or shown.
    #[arg(long, env = "HAVEN_AI_API_KEY", hide_env_values = true)]
    pub ai_api_key: Option<ApiKey>,

    /// Seconds a whole companion reply may take before it is given up.
    #[arg(long, env = "HAVEN_AI_TIMEOUT", default_value_t = 60)]
    pub ai_timeout: u64,

    /// A file with the system prompt, replacing the shipped one.
    #[arg(long, env = "HAVEN_AI_SYSTEM_PROMPT")]
    pub ai_system_prompt: Option<std::path::PathBuf>,

    /// How many characters of recent conversation the model sees.
    #[arg(long, env = "HAVEN_AI_HISTORY_CHARS", default_value_t = 8_000)]
    pub ai_history_chars: usize,

    /// Extra attempts after HTTP 429, 5xx or an unreachable provider, before
    /// the first word of a reply (with back-off: 250 ms, 500 ms, …).
    #[arg(long, env = "HAVEN_AI_RETRIES", default_value_t = 2)]
    pub ai_retries: u32,

    /// Milliseconds the built-in companion waits before replying (0 = at once).
    #[arg(long, env = "HAVEN_COMPANION_DELAY_MS", default_value_t = 0)]
    pub companion_delay_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AiProvider {
    /// The built-in offline companion.
    Companion,
    /// Google Gemini (Generative Language API).
    Gemini,
    /// Any OpenAI-compatible Chat Completions server (OpenAI, Ollama, vLLM).
    Openai,
}

/// An API key: parsed from the command line or environment, never printed.
#[derive(Clone)]
pub struct ApiKey(pub String);

impl std::str::FromStr for ApiKey {
    type Err = std::convert::Infallible;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        Ok(ApiKey(value.to_owned()))
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}
