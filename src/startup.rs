//! Assembles the service: storage, responder, chat hub, routes, and a
//! graceful shutdown that closes every socket and waits for in-flight work.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context;
use axum::extract::ConnectInfo;
use haven_responder::prompt::DEFAULT_SYSTEM_PROMPT;
use haven_responder::{Companion, LlmResponder, LlmSettings, Provider, Responder};
use haven_store::{PgStore, SqliteStore, Store};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;
use uuid::Uuid;

use crate::chat::Hub;
use crate::config::{AiArgs, AiProvider, ServeArgs};
use crate::http::setup::SetupToken;
use crate::limits::Limits;
use crate::safety::Escalation;

/// Shared state of every request and connection.
#[derive(Clone)]
pub struct AppState {
    /// Everything persisted.
    pub store: Arc<dyn Store>,
    /// The companion that answers while a session is `BOT_ONLY`.
    pub responder: Arc<dyn Responder>,
    /// Live connections and events, per chat session.
    pub hub: Arc<Hub>,
    /// The one-time first-therapist setup token, while no account exists.
    pub setup: Arc<SetupToken>,
    pub settings: Arc<Settings>,
    /// Rate and concurrency limits.
    pub limits: Arc<Limits>,
    /// What happens when the crisis detector flags a message.
    pub escalation: Arc<Escalation>,
    /// Background work (companion replies) that shutdown waits for.
    pub tasks: TaskTracker,
    /// Cancelled when the server shuts down; sockets close with 1001.
    pub shutdown: CancellationToken,
    /// Other instances' events are heard (always, with no other instances
    /// to hear: SQLite); `/readyz` reports it.
    pub listening: Arc<AtomicBool>,
}

/// Settings the handlers need, parsed once at start.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Origins, besides the server's own, allowed to open cookie sockets.
    pub allowed_origins: Vec<String>,
    pub cookie_secure: bool,
    /// A therapist login's absolute lifetime.
    pub therapist_session: time::Duration,
    /// How long a therapist login may go unused.
    pub therapist_idle: time::Duration,
    /// How long an unclaimed chat stays on the waiting list untouched.
    pub waiting_window: time::Duration,
    /// Ask the language model for a second opinion on client messages.
    pub safety_second_opinion: bool,
}

/// Opens the database named by `url`, creating it and running migrations.
pub async fn open_store(url: &str) -> anyhow::Result<Arc<dyn Store>> {
    if url.starts_with("sqlite:") {
        let store = SqliteStore::connect(url).await.with_context(|| "opening the SQLite database")?;
        Ok(Arc::new(store))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        // Each process is its own instance on the shared database.
        let store =
            PgStore::connect(url, Uuid::now_v7()).await.with_context(|| "opening the PostgreSQL database")?;
        Ok(Arc::new(store))
    } else {
        anyhow::bail!("unsupported database URL (expected sqlite://FILE or postgres://…)")
    }
}

/// The companion the configuration asks for.
fn build_responder(ai: &AiArgs) -> anyhow::Result<Arc<dyn Responder>> {
    let (provider, base_url, model, key_variable) = match ai.ai_provider {
        AiProvider::Companion => {
            return Ok(Arc::new(Companion::new(Duration::from_millis(ai.companion_delay_ms))));
        }
        AiProvider::Gemini => (
            Provider::Gemini,
            "https://generativelanguage.googleapis.com/v1beta",
            "gemini-2.5-flash",
            "GEMINI_API_KEY",
        ),
        AiProvider::Openai => {
            (Provider::OpenAi, "https://api.openai.com/v1", "gpt-4o-mini", "OPENAI_API_KEY")
        }
    };
    let api_key = ai
        .ai_api_key
        .as_ref()
        .map(|key| key.0.clone())
        .or_else(|| std::env::var(key_variable).ok())
        .filter(|key| !key.trim().is_empty());
    if provider == Provider::Gemini && api_key.is_none() {
        anyhow::bail!("the gemini companion needs an API key: set HAVEN_AI_API_KEY or {key_variable}");
    }
    let system_prompt = match &ai.ai_system_prompt {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("reading the system prompt {}", path.display()))?,
        None => DEFAULT_SYSTEM_PROMPT.to_owned(),
    };
    let settings = LlmSettings {
        provider,
        base_url: ai.ai_base_url.clone().unwrap_or_else(|| base_url.to_owned()),
        model: ai.ai_model.clone().unwrap_or_else(|| model.to_owned()),
        api_key,
        timeout: Duration::from_secs(ai.ai_timeout.max(1)),
        system_prompt,
        history_chars: ai.ai_history_chars.max(1),
        retries: ai.ai_retries,
    };
    tracing::info!(
        provider = provider.name(),
        model = settings.model,
        base_url = settings.base_url,
        "companion uses a language model"
    );
    Ok(Arc::new(LlmResponder::new(settings)?))
}

/// `haven serve`: runs until SIGINT or SIGTERM.
pub async fn serve(database: &str, args: ServeArgs) -> anyhow::Result<()> {
    raise_open_file_limit();
    // One server per SQLite file, and no restore under it.
    let _serving = haven_store::backup::ServingLock::acquire(database)?;
    let store = open_store(database).await?;
    // Compile the detector's rules and load its model now, not in the first
    // client's turn; a model file that cannot be used stops the server.
    let classifier = haven_safety::Classifier::load(args.safety.safety_model.as_deref())?;
    tracing::info!(version = classifier.version(), "crisis detector ready");
    if !Escalation::configured(&args.safety) {
        tracing::warn!(
            "no crisis line or emergency number configured: crisis messages name none (set --crisis-line and --emergency-number, the config keys crisis-line and emergency-number, or HAVEN_CRISIS_LINE and HAVEN_EMERGENCY_NUMBER)"
        );
    }
    let setup = Arc::new(SetupToken::default());
    let state = AppState {
        store: store.clone(),
        responder: build_responder(&args.ai)?,
        hub: Arc::new(Hub::new()),
        setup: setup.clone(),
        settings: Arc::new(Settings {
            allowed_origins: args
                .allowed_origins
                .iter()
                .map(|origin| origin.trim_end_matches('/').to_owned())
                .collect(),
            cookie_secure: args.cookie_secure,
            therapist_session: time::Duration::hours(args.therapist_session_hours.into()),
            therapist_idle: time::Duration::minutes(args.limits.therapist_idle_minutes.max(1) as i64),
            waiting_window: time::Duration::hours(args.limits.waiting_hours.max(1) as i64),
            // The built-in companion has no opinion to give.
            safety_second_opinion: args.safety.safety_second_opinion
                && args.ai.ai_provider != AiProvider::Companion,
        }),
        limits: Arc::new(Limits::new(args.limits.clone())),
        escalation: Arc::new(Escalation::new(&args.safety, classifier)),
        tasks: TaskTracker::new(),
        shutdown: CancellationToken::new(),
        listening: Arc::new(AtomicBool::new(true)),
    };

    let listener = TcpListener::bind(args.bind).await.with_context(|| format!("binding {}", args.bind))?;
    let address = listener.local_addr()?;
    let base = base_url(address);
    tracing::info!(address = %address, responder = state.responder.name(), "listening");
    // Printed on stdout, not logged: the setup URL is a secret for the
    // person at the console, and scripts read the address from the last line.
    if store.count_therapists().await? == 0 {
        let token = setup.issue();
        println!("No therapist account exists yet. Create the first one here (valid until used or restart):");
        println!("  {base}/setup/{token}");
    }
    if let Some(bind) = args.metrics_bind {
        let metrics = crate::prometheus::serve(bind, state.clone()).await?;
        println!("Haven metrics are on http://{metrics}/metrics");
    }
    println!("Haven is listening on {base}");

    // With a shared database, other instances' events reach this one's sockets.
    if let Some(listener) = store.listen().await? {
        let task = crate::chat::fanout::run(state.clone(), listener);
        state.tasks.spawn(task);
    }

    state.tasks.spawn(crate::chat::queue::run(state.clone()));
    state.tasks.spawn(crate::retention::daily(state.clone(), args.retention));

    let app = crate::http::router(state.clone())?;
    let shutdown = state.shutdown.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        shutdown.cancel();
    });
    serve_connections(listener, app, state.limits.clone(), state.shutdown.clone()).await;

    // Sockets have been told to close; let companion replies in flight finish.
    state.tasks.close();
    if tokio::time::timeout(Duration::from_secs(10), state.tasks.wait()).await.is_err() {
        tracing::warn!("background tasks still running at shutdown");
    }
    Ok(())
}

/// Accepts connections until `shutdown`, then waits (bounded) for requests
/// in flight. This is `axum::serve` with what it lacks:
/// - a cap on open connections per address, taken at accept, before a byte
///   is read: one more is closed at once;
/// - a deadline for each request head, from accept for the first one and
///   from the previous response for the next (hyper's header read timeout),
///   so a connection that sends nothing, or only part of a head, is closed;
/// - HTTP/1.1 only: the web app is served over HTTP/1.1 (a TLS proxy in
///   front may speak HTTP/2 to browsers), so an HTTP/2 preface is refused at
///   once instead of opening streams with deadlines of their own;
/// - an accept loop that backs off when accepting fails (out of file
///   descriptors), doubling its pause up to a second, and never spins.
///
/// Upgraded sockets are not waited for here: they close with 1001 on
/// `shutdown` and are tracked by the task tracker.
async fn serve_connections(
    listener: TcpListener,
    app: axum::Router,
    limits: Arc<Limits>,
    shutdown: CancellationToken,
) {
    const FIRST_PAUSE: Duration = Duration::from_millis(10);
    let header_timeout = Duration::from_secs(limits.settings.handshake_timeout_seconds.max(1));
    let connections = TaskTracker::new();
    let mut pause = FIRST_PAUSE;
    loop {
        let (stream, peer) = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(error = %error, pause_ms = pause.as_millis() as u64, "accept failed; pausing");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(pause) => {}
                    }
                    pause = (pause * 2).min(Duration::from_secs(1));
                    continue;
                }
            },
        };
        pause = FIRST_PAUSE;
        let Some(slot) = limits.open_connection(peer.ip()) else {
            tracing::debug!("connection refused: too many open from its address");
            continue;
        };
        let _ = stream.set_nodelay(true);
        // What `ConnectInfo<SocketAddr>` extracts in handlers.
        let service = app.clone().layer(axum::Extension(ConnectInfo(peer)));
        let service =
            hyper::service::service_fn(move |request: axum::http::Request<hyper::body::Incoming>| {
                service.clone().oneshot(request.map(axum::body::Body::new))
            });
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(header_timeout)
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            let _slot = slot;
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                () = shutdown.cancelled() => {
                    // Finish the request in flight, then close.
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
    connections.close();
    if tokio::time::timeout(Duration::from_secs(10), connections.wait()).await.is_err() {
        tracing::warn!("HTTP requests still in flight at shutdown");
    }
}

/// Raises the soft limit on open files to the hard limit: every connection
/// and socket is a descriptor, and the usual soft limit (1,024) is far
/// below what one instance serves.
fn raise_open_file_limit() {
    let before = rlimit::Resource::NOFILE.get();
    match (before, rlimit::increase_nofile_limit(u64::MAX)) {
        (Ok((soft, hard)), Ok(now)) => {
            tracing::info!(soft_before = soft, soft = now, hard, "open file limit")
        }
        (_, Err(error)) | (Err(error), _) => {
            tracing::warn!(error = %error, "could not raise the open file limit")
        }
    }
}

/// The URL people should open: an unspecified bind address becomes localhost.
fn base_url(address: SocketAddr) -> String {
    if address.ip().is_unspecified() {
        format!("http://localhost:{}", address.port())
    } else {
        format!("http://{address}")
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
