//! The test harness: each test starts the real `haven` binary on port 0 with
//! a fresh SQLite file, talks to it over HTTP and real WebSockets, and reads
//! its JSON logs from standard error.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use haven_protocol::api::{CreatedSession, LoginResponse, MessagePage};
use haven_protocol::{ChatMessage, ChatMode, ServerFrame};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use uuid::Uuid;

use crate::contract::{Http, contract};

/// How long any single expected event may take before the test fails.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(15);

pub const PASSWORD: &str = "correct horse battery";

/// Server options a test can set.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub companion_delay_ms: u64,
    pub allowed_origins: Vec<String>,
    /// More `serve` arguments, e.g. `--ai-provider openai`.
    pub args: Vec<String>,
    /// Environment variables for the server process.
    pub env: Vec<(String, String)>,
    /// Share this database (another instance's) instead of a fresh one.
    pub database_url: Option<String>,
    /// Run the server with this hard and soft limit on open files
    /// (through util-linux's `prlimit`).
    pub open_files: Option<u64>,
}

/// A running `haven serve` and the database it owns.
pub struct TestApp {
    /// `http://127.0.0.1:PORT`
    pub address: String,
    /// The setup URL printed at start, if the server printed one.
    pub setup_url: Option<String>,
    pub logs: Logs,
    /// Every response it receives is checked against `/api/openapi.json`
    /// (crate::contract).
    pub http: Http,
    pub dir: TempDir,
    /// `sqlite://…` in `dir`, or a fresh PostgreSQL database (see [`backend`]).
    pub database_url: String,
    options: Options,
    child: Child,
}

/// The database the suite runs on: SQLite unless `HAVEN_TEST_DATABASE` is
/// `postgres`.
pub fn on_postgres() -> bool {
    std::env::var("HAVEN_TEST_DATABASE").is_ok_and(|backend| backend == "postgres")
}

/// The PostgreSQL server for tests: `HAVEN_TEST_POSTGRES_URL`, by default
/// the local one with trust authentication.
pub fn postgres_server() -> String {
    std::env::var("HAVEN_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned())
}

/// A new, empty PostgreSQL database; returns its URL.
pub async fn fresh_postgres_database() -> String {
    use sqlx::Connection;
    let server = postgres_server();
    let name = format!("haven_test_{}", Uuid::now_v7().simple());
    let mut admin =
        sqlx::PgConnection::connect(&format!("{server}/postgres")).await.unwrap_or_else(|error| {
            panic!("PostgreSQL is required at {server} (HAVEN_TEST_POSTGRES_URL): {error}")
        });
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut admin).await.unwrap();
    format!("{server}/{name}")
}

/// Options that pass these flags to `serve`.
pub fn with_args(args: &[&str]) -> Options {
    Options { args: args.iter().map(|arg| arg.to_string()).collect(), ..Options::default() }
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(Options::default()).await
    }

    pub async fn spawn_with(options: Options) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let database_url = match &options.database_url {
            Some(shared) => shared.clone(),
            None if on_postgres() => fresh_postgres_database().await,
            None => format!("sqlite://{}", dir.path().join("haven.db").display()),
        };
        let (child, address, setup_url, logs) = start(&database_url, "127.0.0.1:0", &options).await;
        let http = Http::new(reqwest::Client::new(), &address);
        TestApp { address, setup_url, logs, http, dir, database_url, options, child }
    }

    /// Kills the server with SIGKILL (no graceful shutdown) and starts a new
    /// one on the same database file and the same port, so open pages and
    /// clients can reconnect to it.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.start_again().await;
    }

    /// Kills the server with SIGKILL.
    pub async fn stop(&mut self) {
        self.child.kill().await.expect("kill server");
    }

    /// Sends SIGTERM and waits (bounded) for the process to exit.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().expect("server running").to_string();
        let sent = std::process::Command::new("kill").args(["-TERM", &pid]).status().expect("kill");
        assert!(sent.success());
        tokio::time::timeout(EVENT_TIMEOUT, self.child.wait())
            .await
            .expect("the server did not exit in time after SIGTERM")
            .expect("wait for server")
    }

    /// [`TestApp::start_again`] with these arguments added to `serve`'s.
    pub async fn start_again_with(&mut self, args: &[&str]) {
        self.options.args.extend(args.iter().map(|arg| arg.to_string()));
        self.start_again().await;
    }

    /// Starts the server again after [`TestApp::stop`], on the same file and port.
    pub async fn start_again(&mut self) {
        let bind = self.address.trim_start_matches("http://").to_owned();
        let (child, address, setup_url, logs) = start(&self.database_url, &bind, &self.options).await;
        self.child = child;
        self.http.set_origin(&address);
        self.address = address;
        self.setup_url = setup_url;
        self.logs = logs;
    }

    /// Everything the database holds, as bytes: the SQLite file and its WAL,
    /// or, on PostgreSQL, every row of these tables as text.
    pub async fn stored_bytes(&self, tables: &[&str]) -> Vec<u8> {
        let mut stored = Vec::new();
        if on_postgres() {
            use sqlx::Connection;
            let mut connection = sqlx::PgConnection::connect(&self.database_url).await.unwrap();
            for table in tables {
                let rows: Vec<String> =
                    sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT t::text FROM {table} t")))
                        .fetch_all(&mut connection)
                        .await
                        .unwrap();
                stored.extend(rows.concat().into_bytes());
            }
        } else {
            for suffix in ["", "-wal"] {
                let path = format!("{}{suffix}", self.database_path().display());
                stored.extend(std::fs::read(path).unwrap_or_default());
            }
        }
        stored
    }

    /// The SQLite file, when the suite runs on SQLite.
    pub fn database_path(&self) -> PathBuf {
        self.dir.path().join("haven.db")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    /// A client built by the test (another source address, no redirects),
    /// whose responses are checked as [`TestApp::http`]'s are.
    pub fn client(&self, client: reqwest::Client) -> Http {
        Http::new(client, &self.address)
    }

    /// Runs `haven --database … ARGS` with `stdin` piped in.
    pub async fn cli(&self, args: &[&str], stdin: &str) -> std::process::Output {
        let mut child = Command::new(env!("CARGO_BIN_EXE_haven"))
            .arg("--database")
            .arg(&self.database_url)
            .args(args)
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run haven");
        let mut input = child.stdin.take().expect("stdin");
        input.write_all(stdin.as_bytes()).await.expect("write stdin");
        drop(input);
        child.wait_with_output().await.expect("haven output")
    }

    /// Creates a therapist account with `haven therapist add`.
    pub async fn add_therapist(&self, email: &str, name: &str) {
        let output =
            self.cli(&["therapist", "add", "--email", email, "--name", name], &format!("{PASSWORD}\n")).await;
        assert!(output.status.success(), "therapist add failed: {}", String::from_utf8_lossy(&output.stderr));
    }

    pub async fn login(&self, email: &str, password: &str) -> reqwest::Response {
        self.http
            .post(self.url("/api/auth/login"))
            .json(&json!({ "email": email, "password": password }))
            .send()
            .await
            .expect("login request")
    }

    /// A new therapist account, logged in.
    pub async fn therapist(&self, name: &str) -> LoginResponse {
        let email = format!("{}@clinic.test", name.to_lowercase());
        self.add_therapist(&email, name).await;
        let response = self.login(&email, PASSWORD).await;
        assert_eq!(response.status(), 200);
        response.json().await.expect("login body")
    }

    /// The appointments list as the therapist with `token` sees it.
    pub async fn appointments(&self, token: &str) -> Vec<haven_protocol::api::Appointment> {
        let response = self.http.get(self.url("/api/appointments")).bearer_auth(token).send().await.unwrap();
        assert_eq!(response.status(), 200);
        response.json().await.expect("appointments body")
    }

    /// "Chat Now".
    pub async fn create_session(&self) -> CreatedSession {
        let response = self.http.post(self.url("/api/sessions")).send().await.expect("create session");
        assert_eq!(response.status(), 201);
        response.json().await.expect("session body")
    }

    /// The client's choice for the conversation with the companion, sent
    /// with `token` as bearer (none: no credential); the answer's status.
    pub async fn share_companion_part(&self, session_id: Uuid, token: Option<&str>, shared: bool) -> u16 {
        let request = self
            .http
            .put(self.url(&format!("/api/sessions/{session_id}/companion-sharing")))
            .json(&json!({ "shared": shared }));
        let request = match token {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        request.send().await.expect("sharing request").status().as_u16()
    }

    /// The whole history through the API, with `token` as bearer.
    pub async fn history(&self, session_id: Uuid, token: &str) -> Vec<ChatMessage> {
        let response = self
            .http
            .get(self.url(&format!("/api/sessions/{session_id}/messages?limit=500")))
            .bearer_auth(token)
            .send()
            .await
            .expect("history request");
        assert_eq!(response.status(), 200, "history refused");
        response.json::<MessagePage>().await.expect("history body").messages
    }

    /// A socket for the session, authenticated with a bearer token.
    pub async fn connect(&self, session_id: Uuid, token: &str) -> Ws {
        self.connect_with(
            &format!("/api/chat/ws/{session_id}"),
            &[("authorization", format!("Bearer {token}"))],
        )
        .await
    }

    /// A socket to `path_and_query` with exactly these extra headers.
    pub async fn connect_with(&self, path_and_query: &str, headers: &[(&str, String)]) -> Ws {
        let url = format!("{}{path_and_query}", self.address.replace("http://", "ws://"));
        let mut request = url.into_client_request().expect("ws request");
        for (name, value) in headers {
            let name = HeaderName::from_bytes(name.as_bytes()).expect("header name");
            request.headers_mut().insert(name, HeaderValue::from_str(value).expect("header value"));
        }
        let (stream, _) = tokio_tungstenite::connect_async(request).await.expect("websocket handshake");
        Ws { stream, aside: Default::default(), pending: VecDeque::new() }
    }
}

async fn start(database: &str, bind: &str, options: &Options) -> (Child, String, Option<String>, Logs) {
    let mut command = match options.open_files {
        Some(limit) => {
            let mut command = Command::new("prlimit");
            command.arg(format!("--nofile={limit}:{limit}")).arg("--").arg(env!("CARGO_BIN_EXE_haven"));
            command
        }
        None => Command::new(env!("CARGO_BIN_EXE_haven")),
    };
    command
        .args(["--database", database, "serve", "--bind", bind, "--log-format", "json"])
        .arg("--companion-delay-ms")
        .arg(options.companion_delay_ms.to_string())
        .env_clear()
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for origin in &options.allowed_origins {
        command.arg("--allowed-origin").arg(origin);
    }
    command.args(&options.args).envs(options.env.iter().map(|(name, value)| (name, value)));
    let mut child = command.spawn().expect("start haven");

    let logs = Logs::default();
    let stderr = child.stderr.take().expect("stderr");
    let sink = logs.clone();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            sink.push(line);
        }
    });

    // The server prints the setup notice (if any) and then, last, the
    // address it listens on.
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let read_start = async {
        let mut setup_url = None;
        while let Some(line) = stdout.next_line().await.expect("read stdout") {
            if let Some(address) = line.strip_prefix("Haven is listening on ") {
                return (address.trim().to_owned(), setup_url, stdout);
            }
            if line.contains("/setup/") {
                setup_url = Some(line.trim().to_owned());
            }
        }
        panic!("server exited before listening");
    };
    let (address, setup_url, mut stdout) =
        tokio::time::timeout(EVENT_TIMEOUT, read_start).await.expect("server did not start");
    tokio::spawn(async move { while let Ok(Some(_)) = stdout.next_line().await {} });
    (child, address, setup_url, logs)
}

/// The server's log lines, parsed as JSON.
#[derive(Clone, Default)]
pub struct Logs {
    lines: Arc<Mutex<Vec<String>>>,
    changed: Arc<watch::Sender<usize>>,
}

impl Logs {
    fn push(&self, line: String) {
        let mut lines = self.lines.lock().unwrap();
        lines.push(line);
        let count = lines.len();
        drop(lines);
        self.changed.send_replace(count);
    }

    /// Every line so far, raw.
    pub fn text(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    /// Log events (JSON objects) matching `predicate`.
    pub fn matching(&self, predicate: impl Fn(&Value) -> bool) -> Vec<Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|event| predicate(event))
            .collect()
    }

    /// Waits until at least `count` events match `predicate`.
    pub async fn wait_for(&self, count: usize, predicate: impl Fn(&Value) -> bool) -> Vec<Value> {
        let mut changes = self.changed.subscribe();
        let wait = async {
            loop {
                let found = self.matching(&predicate);
                if found.len() >= count {
                    return found;
                }
                changes.changed().await.expect("log reader ended");
            }
        };
        tokio::time::timeout(EVENT_TIMEOUT, wait)
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {count} log events; logs:\n{}", self.text()))
    }
}

/// Checks an API error: this status, a JSON body with `error` and `message`.
pub async fn error_body(response: reqwest::Response, status: u16) -> Value {
    assert_eq!(response.status(), status);
    let content_type = response.headers().get("content-type").map(|value| value.to_str().unwrap().to_owned());
    assert!(
        content_type.as_deref().is_some_and(|value| value.starts_with("application/json")),
        "{content_type:?}"
    );
    let body: Value = response.json().await.expect("JSON error body");
    assert!(body["error"].is_string() && body["message"].is_string(), "{body}");
    body
}

/// A log event's message.
pub fn message_of(event: &Value) -> &str {
    event["message"].as_str().unwrap_or_default()
}

/// A log event's session, from its own fields or its span's.
pub fn session_of(event: &Value) -> Option<String> {
    event
        .get("session_id")
        .or_else(|| event.get("span").and_then(|span| span.get("session_id")))
        .and_then(Value::as_str)
        .map(str::to_owned)
}

/// A client-side WebSocket speaking Haven's protocol.
pub struct Ws {
    stream: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// `presence`, `queue` and `sharing` frames, set aside by kind
    /// ([`Aside`]): they come at connect and at changes, in between any
    /// others; [`Ws::presence`], [`Ws::queue`] and [`Ws::sharing`] read them.
    aside: [VecDeque<ServerFrame>; 3],
    /// What was received while one of those waited: read next.
    pending: VecDeque<Received>,
}

/// The kinds of frames [`Ws::receive`] sets aside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Aside {
    Presence,
    Queue,
    Sharing,
}

impl Aside {
    fn of(frame: &ServerFrame) -> Option<Self> {
        match frame {
            ServerFrame::Presence { .. } => Some(Aside::Presence),
            ServerFrame::Queue { .. } => Some(Aside::Queue),
            ServerFrame::Sharing { .. } => Some(Aside::Sharing),
            _ => None,
        }
    }
}

/// What a socket received next.
#[derive(Debug)]
pub enum Received {
    Frame(ServerFrame),
    Closed(Option<CloseFrame>),
}

impl Ws {
    /// Sends a chat message with a fresh `client_id`, which it returns.
    pub async fn send_message(&mut self, content: &str) -> String {
        let client_id = Uuid::now_v7().to_string();
        self.send_json(json!({ "type": "message", "content": content, "client_id": client_id })).await;
        client_id
    }

    pub async fn send_json(&mut self, value: Value) {
        self.send_raw(Message::Text(value.to_string().into())).await;
    }

    /// Sends a raw WebSocket frame (fragments, invalid payloads).
    pub async fn send_frame(&mut self, frame: tokio_tungstenite::tungstenite::protocol::frame::Frame) {
        self.stream.send(Message::Frame(frame)).await.expect("send frame");
    }

    pub async fn send_raw(&mut self, message: Message) {
        self.stream.send(message).await.expect("send frame");
    }

    /// The next frame or close but `presence`, `queue` and `sharing`
    /// frames, failing the test after [`EVENT_TIMEOUT`].
    pub async fn receive(&mut self) -> Received {
        if let Some(received) = self.pending.pop_front() {
            return received;
        }
        loop {
            match self.read().await {
                Received::Frame(frame) => match Aside::of(&frame) {
                    Some(kind) => self.aside[kind as usize].push_back(frame),
                    None => return Received::Frame(frame),
                },
                closed => return closed,
            }
        }
    }

    /// The next frame or close, failing the test after [`EVENT_TIMEOUT`].
    async fn read(&mut self) -> Received {
        loop {
            let next = tokio::time::timeout(EVENT_TIMEOUT, self.stream.next())
                .await
                .expect("timed out waiting for a frame");
            match next {
                Some(Ok(Message::Text(text))) => {
                    contract()
                        .check_server_frame(&text)
                        .unwrap_or_else(|breach| panic!("the server broke its contract: {breach}"));
                    let frame = serde_json::from_str(&text)
                        .unwrap_or_else(|error| panic!("bad frame {text}: {error}"));
                    return Received::Frame(frame);
                }
                Some(Ok(Message::Close(frame))) => return Received::Closed(frame),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(other)) => panic!("unexpected websocket message {other:?}"),
                Some(Err(error)) => panic!("websocket error: {error}"),
                None => return Received::Closed(None),
            }
        }
    }

    /// The next `presence` frame: whether the other side is here, and the
    /// name given. Other frames read meanwhile are kept for
    /// [`Ws::receive`]; it fails the test after [`EVENT_TIMEOUT`].
    pub async fn presence(&mut self) -> (haven_protocol::Sender, bool, Option<String>) {
        match self.set_aside(Aside::Presence).await {
            ServerFrame::Presence { sender, here, name } => (sender, here, name),
            _ => unreachable!(),
        }
    }

    /// The next `queue` frame: therapists online, chats ahead. Other frames
    /// read meanwhile are kept for [`Ws::receive`].
    pub async fn queue(&mut self) -> (u32, u32) {
        match self.set_aside(Aside::Queue).await {
            ServerFrame::Queue { therapists_online, ahead } => (therapists_online, ahead),
            _ => unreachable!(),
        }
    }

    /// How many `queue` frames were set aside and not read.
    pub fn queued(&self) -> usize {
        self.aside[Aside::Queue as usize].len()
    }

    /// The next `sharing` frame: the client's choice for the companion
    /// part. Other frames read meanwhile are kept for [`Ws::receive`].
    pub async fn sharing(&mut self) -> Option<bool> {
        match self.set_aside(Aside::Sharing).await {
            ServerFrame::Sharing { shared } => shared,
            _ => unreachable!(),
        }
    }

    /// The next frame of a `kind` that [`Ws::receive`] sets aside.
    async fn set_aside(&mut self, kind: Aside) -> ServerFrame {
        loop {
            if let Some(frame) = self.aside[kind as usize].pop_front() {
                return frame;
            }
            match self.read().await {
                Received::Frame(frame) => match Aside::of(&frame) {
                    Some(other) if other == kind => return frame,
                    Some(other) => self.aside[other as usize].push_back(frame),
                    None => self.pending.push_back(Received::Frame(frame)),
                },
                Received::Closed(close) => panic!("socket closed waiting for a frame set aside: {close:?}"),
            }
        }
    }

    pub async fn frame(&mut self) -> ServerFrame {
        match self.receive().await {
            Received::Frame(frame) => frame,
            Received::Closed(close) => panic!("socket closed unexpectedly: {close:?}"),
        }
    }

    /// The next `message` frame, passing over the companion's streaming
    /// frames (`ai_delta`, `ai_cancelled`) that may precede it.
    pub async fn message(&mut self) -> ChatMessage {
        loop {
            match self.frame().await {
                ServerFrame::Message(message) => return message,
                ServerFrame::AiDelta { .. } | ServerFrame::AiCancelled { .. } => {}
                other => panic!("expected a message frame, got {other:?}"),
            }
        }
    }

    pub async fn mode(&mut self) -> ChatMode {
        match self.frame().await {
            ServerFrame::Mode { chat_mode, .. } => chat_mode,
            other => panic!("expected a mode frame, got {other:?}"),
        }
    }

    /// Waits for the ack of `client_id`, returning its seq; other frames
    /// before it are returned too, in order.
    pub async fn ack(&mut self, client_id: &str) -> (i64, Vec<ServerFrame>) {
        let mut before = Vec::new();
        loop {
            match self.frame().await {
                ServerFrame::Ack { client_id: acked, seq } if acked == client_id => return (seq, before),
                other => before.push(other),
            }
        }
    }

    /// Frames up to and including the message with seq `seq`.
    pub async fn until_seq(&mut self, seq: i64) -> Vec<ServerFrame> {
        let mut frames = Vec::new();
        loop {
            let frame = self.frame().await;
            let done = matches!(&frame, ServerFrame::Message(message) if message.seq >= seq);
            frames.push(frame);
            if done {
                return frames;
            }
        }
    }

    /// Expects the server to close the socket; returns the close code and reason.
    pub async fn closed(&mut self) -> (u16, String) {
        match self.receive().await {
            Received::Closed(Some(frame)) => (frame.code.into(), frame.reason.to_string()),
            Received::Closed(None) => panic!("closed without a close frame"),
            Received::Frame(frame) => panic!("expected a close, got {frame:?}"),
        }
    }

    /// Expects the server to close the socket at some point, passing over
    /// the frames before; returns the close code and reason.
    pub async fn closed_eventually(&mut self) -> (u16, String) {
        loop {
            match self.receive().await {
                Received::Closed(Some(frame)) => return (frame.code.into(), frame.reason.to_string()),
                Received::Closed(None) => panic!("closed without a close frame"),
                Received::Frame(_) => {}
            }
        }
    }

    /// The underlying WebSocket, for tests that drive it by hand.
    pub fn into_inner(self) -> WebSocketStream<MaybeTlsStream<TcpStream>> {
        self.stream
    }

    pub async fn close(mut self) {
        let _ = self.stream.close(None).await;
    }
}

/// Only the message frames of `frames`.
/// Whether any of the frames is the companion's: a delta, a withdrawal or
/// a message.
pub fn from_companion(frames: &[ServerFrame]) -> bool {
    frames.iter().any(|frame| match frame {
        ServerFrame::AiDelta { .. } | ServerFrame::AiCancelled { .. } => true,
        ServerFrame::Message(message) => message.sender == haven_protocol::Sender::Ai,
        _ => false,
    })
}

pub fn messages(frames: &[ServerFrame]) -> Vec<&ChatMessage> {
    frames
        .iter()
        .filter_map(|frame| match frame {
            ServerFrame::Message(message) => Some(message),
            _ => None,
        })
        .collect()
}
