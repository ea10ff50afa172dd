//! Several Haven instances on one PostgreSQL behave as one service. These
//! tests always run on PostgreSQL (`HAVEN_TEST_POSTGRES_URL`).

use std::time::Duration;

use haven_protocol::api::CreatedSession;
use haven_protocol::{ChatMode, ErrorCode, MessageKind, Sender, ServerFrame};
use serde_json::json;

use crate::hand_back::{hand_back, until_mode_after};
use crate::helpers::{
    EVENT_TIMEOUT, Options, PASSWORD, Received, TestApp, Ws, fresh_postgres_database, from_companion,
    messages,
};
use crate::mock_llm::{MockLlm, Script};

/// `count` instances sharing one fresh database.
async fn instances(count: usize, args: &[String]) -> Vec<TestApp> {
    let database_url = fresh_postgres_database().await;
    let mut apps = Vec::new();
    for _ in 0..count {
        let options =
            Options { database_url: Some(database_url.clone()), args: args.to_vec(), ..Options::default() };
        apps.push(TestApp::spawn_with(options).await);
    }
    apps
}

/// A therapist account (made through any instance) logged in on `app`.
async fn therapist_on(app: &TestApp, maker: &TestApp) -> String {
    maker.add_therapist("tess@clinic.test", "Tess").await;
    let response: serde_json::Value = app.login("tess@clinic.test", PASSWORD).await.json().await.unwrap();
    response["token"].as_str().unwrap().to_owned()
}

/// One client tab of `session` on each instance, past its first `mode` frame.
async fn tab_on_each(apps: &[TestApp], session: &CreatedSession) -> Vec<Ws> {
    let mut tabs = Vec::new();
    for app in apps {
        let mut tab = app.connect(session.session_id, &session.client_token).await;
        tab.mode().await;
        tabs.push(tab);
    }
    tabs
}

#[tokio::test]
async fn a_client_on_one_instance_and_a_therapist_on_another_talk_as_one_service() {
    let apps = instances(2, &[]).await;
    let (a, b) = (&apps[0], &apps[1]);
    let token = therapist_on(b, a).await;

    let session = a.create_session().await;
    let mut client = a.connect(session.session_id, &session.client_token).await;
    client.mode().await;
    let hello = client.send_message("hello").await;
    client.ack(&hello).await;
    assert_eq!(client.message().await.sender, Sender::User);
    assert_eq!(client.message().await.sender, Sender::Ai, "the companion answers on instance A");

    // The session shows on B's dashboard, and B's therapist takes it over.
    let list: Vec<serde_json::Value> = b
        .http
        .get(b.url("/api/appointments"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(list.iter().any(|row| row["session_id"] == session.session_id.to_string()));
    let mut desk = b.connect(session.session_id, &token).await;
    assert_eq!(desk.mode().await, ChatMode::TherapistJoined);
    assert_eq!(desk.message().await.sender, Sender::System);
    let joined = client.message().await;
    assert_eq!(joined.sender, Sender::System, "the join on B reaches the client on A");
    assert_eq!(client.mode().await, ChatMode::TherapistJoined);

    let question = client.send_message("are you there?").await;
    let (_, mut frames) = client.ack(&question).await;
    let received = desk.message().await;
    assert_eq!(received.content, "are you there?", "A's client reaches B's therapist");
    let answer = desk.send_message("Yes, I'm here to help").await;
    let (last, _) = desk.ack(&answer).await;
    frames.extend(client.until_seq(last).await);
    assert!(!from_companion(&frames), "the companion spoke after the join on B: {frames:?}");
    // Typing crosses instances too, by the same announcement as deltas.
    client.send_json(serde_json::json!({"type": "typing"})).await;
    let typing = loop {
        match desk.frame().await {
            ServerFrame::Message(_) => continue,
            other => break other,
        }
    };
    assert_eq!(typing, ServerFrame::Typing { sender: Sender::User, active: true }, "typing from A reaches B");
    let seen: Vec<_> = messages(&frames).iter().map(|m| (m.sender, m.content.clone())).collect();
    assert_eq!(
        seen,
        vec![
            (Sender::User, "are you there?".to_owned()),
            (Sender::Therapist, "Yes, I'm here to help".to_owned())
        ]
    );
}

/// Frames until the socket closes: the frames, and the close code and reason.
async fn frames_until_closed(ws: &mut Ws) -> (Vec<ServerFrame>, u16, String) {
    let mut frames = Vec::new();
    loop {
        match ws.receive().await {
            Received::Frame(frame) => frames.push(frame),
            Received::Closed(Some(close)) => return (frames, close.code.into(), close.reason.to_string()),
            Received::Closed(None) => panic!("closed without a close frame after {frames:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_closed_on_one_instance_closes_every_socket_on_another_and_takes_no_more_writes() {
    let apps = instances(2, &[]).await;
    let (a, b) = (&apps[0], &apps[1]);
    let token = therapist_on(b, a).await;
    let session = a.create_session().await;
    let mut tab = b.connect(session.session_id, &session.client_token).await;
    tab.mode().await;
    let mut desk = b.connect(session.session_id, &token).await;
    assert_eq!(desk.mode().await, ChatMode::TherapistJoined);
    let join = desk.message().await;
    assert_eq!(join.kind, MessageKind::Join);
    // A second socket of the therapist on B, which writes as the chat closes.
    let mut late = b.connect(session.session_id, &token).await;
    late.mode().await;

    let closed = a
        .http
        .post(a.url(&format!("/api/sessions/{}/close", session.session_id)))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(closed.status(), 204);
    let sent = late.send_message("one more thing").await;
    // The close reaches B's sockets through the notification, within 1 s.
    for ws in [&mut tab, &mut desk] {
        let (frames, code, reason) = tokio::time::timeout(Duration::from_secs(1), frames_until_closed(ws))
            .await
            .expect("the close did not reach B within 1 s");
        assert_eq!((code, reason.as_str()), (1008, "chat closed"));
        assert!(
            matches!(frames.last(), Some(ServerFrame::Message(m)) if m.kind == MessageKind::Close),
            "the closing message comes last: {frames:?}"
        );
    }
    // The write raced the close: either it reached the store after the
    // close and was refused there, or the close reached the socket first.
    let (frames, code, _) = frames_until_closed(&mut late).await;
    assert_eq!(code, 1008);
    let refused = frames.iter().any(|frame| {
        matches!(frame, ServerFrame::Error { code: ErrorCode::ChatClosed, client_id: Some(id), .. } if *id == sent)
    });
    let told =
        frames.iter().any(|frame| matches!(frame, ServerFrame::Message(m) if m.kind == MessageKind::Close));
    assert!(refused || told, "neither refused nor told of the close: {frames:?}");
    assert!(
        !frames.iter().any(|frame| matches!(frame, ServerFrame::Ack { .. })),
        "nothing is stored: {frames:?}"
    );
    let history = a.history(session.session_id, &token).await;
    assert_eq!(
        history.last().map(|m| m.kind),
        Some(MessageKind::Close),
        "nothing follows the closing message"
    );
}

#[tokio::test]
async fn three_tabs_on_three_instances_see_the_same_conversation() {
    let apps = instances(3, &[]).await;
    let token = therapist_on(&apps[0], &apps[0]).await;
    let session = apps[0].create_session().await;
    let mut tabs = tab_on_each(&apps, &session).await;
    let mut desk = apps[1].connect(session.session_id, &token).await;
    desk.mode().await;
    for round in 0..3 {
        for (index, tab) in tabs.iter_mut().enumerate() {
            tab.send_message(&format!("tab {index} round {round}")).await;
        }
        desk.send_message(&format!("therapist round {round}")).await;
    }
    let last = desk.send_message("that's all").await;
    let (total, _) = desk.ack(&last).await;
    let mut transcripts = Vec::new();
    for tab in &mut tabs {
        let frames = tab.until_seq(total).await;
        let seen: Vec<(i64, uuid::Uuid)> = messages(&frames).iter().map(|m| (m.seq, m.id)).collect();
        assert_eq!(seen.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(), (1..=total).collect::<Vec<_>>());
        transcripts.push(seen);
    }
    assert!(
        transcripts.windows(2).all(|pair| pair[0] == pair[1]),
        "every instance delivered the same stream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_on_another_instance_cancels_the_reply_being_generated() {
    const SESSIONS: usize = 24;
    let mock = MockLlm::start().await;
    let words: Vec<String> = (0..40).map(|n| format!("word{n} ")).collect();
    mock.script("", Script { chunks: words, chunk_delay: Duration::from_millis(25), ..Script::default() });
    let args: Vec<String> = [
        "--ai-provider",
        "openai",
        "--ai-base-url",
        &mock.openai_url(),
        "--max-sockets-per-credential",
        "100",
    ]
    .map(String::from)
    .to_vec();
    let apps = std::sync::Arc::new(instances(2, &args).await);
    let token = therapist_on(&apps[1], &apps[0]).await;

    let mut sessions = tokio::task::JoinSet::new();
    for index in 0..SESSIONS {
        let apps = apps.clone();
        let token = token.clone();
        let join_after = Duration::from_millis((index as u64 * 7919) % 1_300);
        sessions.spawn(async move {
            let (a, b) = (&apps[0], &apps[1]);
            let session = a.create_session().await;
            let mut client = a.connect(session.session_id, &session.client_token).await;
            client.mode().await;
            let hello = client.send_message("hello").await;
            client.ack(&hello).await;
            tokio::time::sleep(join_after).await;
            let mut desk = b.connect(session.session_id, &token).await;
            assert_eq!(desk.mode().await, ChatMode::TherapistJoined);
            let here = desk.send_message("I'm here now.").await;
            let (last, _) = desk.ack(&here).await;
            let frames = client.until_seq(last).await;
            let join = frames
                .iter()
                .position(|frame| matches!(frame, ServerFrame::Message(m) if m.sender == Sender::System))
                .expect("the client saw the join message");
            let late = frames[join..].iter().find(|frame| {
                matches!(frame, ServerFrame::AiDelta { .. })
                    || matches!(frame, ServerFrame::Message(m) if m.sender == Sender::Ai)
            });
            assert!(late.is_none(), "companion output after the join: {late:?}");
        });
    }
    while let Some(result) = sessions.join_next().await {
        result.expect("session task");
    }
    mock.until("every provider stream to close", |mock| mock.streams_open() == 0).await;
    assert!(mock.streams_cut_by_client() > 0, "no join on B cut a reply streaming on A");
}

#[tokio::test]
async fn when_an_instance_dies_its_clients_resume_on_another_without_a_gap() {
    let mut apps = instances(2, &[]).await;
    let token = therapist_on(&apps[1], &apps[0]).await;
    let session = apps[0].create_session().await;
    let mut client = apps[0].connect(session.session_id, &session.client_token).await;
    client.mode().await;
    let mut desk = apps[1].connect(session.session_id, &token).await;
    desk.mode().await;
    let first = desk.send_message("before the crash").await;
    let (seen, _) = desk.ack(&first).await;
    client.until_seq(seen).await;

    // Instance A dies; the therapist on B goes on writing.
    apps[0].stop().await;
    for text in ["while you were away 1", "while you were away 2"] {
        let id = desk.send_message(text).await;
        desk.ack(&id).await;
    }
    let mut resumed = apps[1]
        .connect_with(
            &format!("/api/chat/ws/{}?since={seen}", session.session_id),
            &[("authorization", format!("Bearer {}", session.client_token))],
        )
        .await;
    resumed.mode().await;
    let last = desk.send_message("welcome back").await;
    let (total, _) = desk.ack(&last).await;
    let frames = resumed.until_seq(total).await;
    let seqs: Vec<i64> = messages(&frames).iter().map(|m| m.seq).collect();
    assert_eq!(seqs, ((seen + 1)..=total).collect::<Vec<_>>(), "no gap, no duplicate");
}

/// A PostgreSQL server of the test's own (a private cluster on a free port),
/// so it can be stopped and started without disturbing other tests.
struct PrivatePostgres {
    bin: std::path::PathBuf,
    data: std::path::PathBuf,
    port: u16,
    _dir: tempfile::TempDir,
}

impl PrivatePostgres {
    fn start() -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL's server binaries (Debian package postgresql)")
            .filter_map(|entry| entry.ok().map(|entry| entry.path().join("bin")))
            .find(|bin| bin.join("initdb").exists())
            .expect("initdb");
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        // PostgreSQL refuses to run as root: the cluster belongs to `postgres`.
        run("chown", &["-R", "postgres:postgres", dir.path().to_str().unwrap()]);
        let initdb = bin.join("initdb");
        run(
            "runuser",
            &[
                "-u",
                "postgres",
                "--",
                initdb.to_str().unwrap(),
                "-D",
                data.to_str().unwrap(),
                "-A",
                "trust",
                "-U",
                "postgres",
            ],
        );
        let server = Self { bin, data, port, _dir: dir };
        server.pg_ctl("start");
        server
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}", self.port)
    }

    fn pg_ctl(&self, action: &str) {
        let pg_ctl = self.bin.join("pg_ctl");
        let options = format!("-p {} -k {} -c listen_addresses=127.0.0.1", self.port, self.data.display());
        let log = self.data.with_file_name("server.log");
        // The server inherits pg_ctl's output: it goes to a file, or reading
        // pg_ctl's output would wait for the server to exit.
        let status = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--", pg_ctl.to_str().unwrap(), "-D", self.data.to_str().unwrap()])
            .args(["-o", &options, "-l", log.to_str().unwrap(), "-m", "fast", "-w", action])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .expect("pg_ctl");
        assert!(status.success(), "pg_ctl {action} failed; see {}", log.display());
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let pg_ctl = self.bin.join("pg_ctl");
        let _ = std::process::Command::new("runuser")
            .args([
                "-u",
                "postgres",
                "--",
                pg_ctl.to_str().unwrap(),
                "-D",
                self.data.to_str().unwrap(),
                "-m",
                "immediate",
                "stop",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

fn run(program: &str, args: &[&str]) {
    let output = std::process::Command::new(program).args(args).output().expect(program);
    assert!(output.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&output.stderr));
}

/// `/readyz`'s body once it answers `status`, asked again until then (the
/// database's state reaches an instance through a failed read or its
/// listener).
async fn readiness_becomes(app: &TestApp, status: u16) -> serde_json::Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let response = app.http.get(app.url("/readyz")).send().await.unwrap();
        if response.status() == status {
            return response.json().await.unwrap();
        }
        assert!(std::time::Instant::now() < deadline, "/readyz never answered {status}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_postgres_restart_loses_nothing_acknowledged_and_instances_recover() {
    use sqlx::Connection;
    let postgres = PrivatePostgres::start();
    let mut admin = sqlx::PgConnection::connect(&format!("{}/postgres", postgres.url())).await.unwrap();
    sqlx::query("CREATE DATABASE haven").execute(&mut admin).await.unwrap();
    drop(admin);
    let database_url = format!("{}/haven", postgres.url());
    let options = || Options { database_url: Some(database_url.clone()), ..Options::default() };
    let metered = Options { args: vec!["--metrics-bind".into(), "127.0.0.1:0".into()], ..options() };
    let (a, b) = (TestApp::spawn_with(metered).await, TestApp::spawn_with(options()).await);
    let metrics = crate::metrics::address(&a).await;
    let token = therapist_on(&b, &a).await;
    let session = a.create_session().await;
    let mut client = a.connect(session.session_id, &session.client_token).await;
    client.mode().await;
    let mut desk = b.connect(session.session_id, &token).await;
    desk.mode().await;
    desk.message().await;
    let before = client.send_message("before the restart").await;
    let (first, _) = client.ack(&before).await;

    for app in [&a, &b] {
        assert_eq!(readiness_becomes(app, 200).await["status"], "ready");
    }

    // While the database is down, nothing is acknowledged, and neither
    // instance is ready.
    postgres.pg_ctl("stop");
    for app in [&a, &b] {
        assert_eq!(readiness_becomes(app, 503).await["error"], "not_ready");
    }
    client
        .send_json(json!({"type": "message", "content": "during the outage", "client_id": "outage-1"}))
        .await;
    let refused = loop {
        match client.frame().await {
            ServerFrame::Error { code, client_id, .. } => break (code, client_id),
            ServerFrame::Ack { .. } => panic!("acknowledged while the database was down"),
            _ => {}
        }
    };
    assert_eq!(refused, (haven_protocol::ErrorCode::Unavailable, Some("outage-1".to_owned())));

    // Back up: both are ready again (the database answers, the listeners are
    // back); the re-sent message is stored once, and reaches the other instance.
    postgres.pg_ctl("start");
    for app in [&a, &b] {
        assert_eq!(readiness_becomes(app, 200).await["status"], "ready");
    }
    let (samples, _) = crate::metrics::scrape(&metrics).await;
    assert_eq!(samples.get("haven_notification_reconnects_total"), Some(&1.0), "{samples:?}");
    client
        .send_json(json!({"type": "message", "content": "during the outage", "client_id": "outage-1"}))
        .await;
    let (seq, _) = client.ack("outage-1").await;
    assert_eq!(seq, first + 1, "no gap");
    let received = loop {
        let message = desk.message().await;
        if message.seq == seq {
            break message;
        }
    };
    assert_eq!(received.content, "during the outage", "instance B hears A again after the restart");
    let history = b.history(session.session_id, &token).await;
    assert_eq!(history.iter().filter(|m| m.client_id.as_deref() == Some("outage-1")).count(), 1);
    assert!(history.iter().any(|m| m.client_id.as_deref() == Some(before.as_str())));
}

#[tokio::test]
async fn login_and_session_limits_hold_across_instances() {
    let args: Vec<String> =
        ["--login-failures", "3", "--sessions-per-ip-per-minute", "2"].map(String::from).to_vec();
    let apps = instances(2, &args).await;
    let (a, b) = (&apps[0], &apps[1]);
    a.add_therapist("tess@clinic.test", "Tess").await;
    assert_eq!(a.login("tess@clinic.test", "wrong").await.status(), 401);
    assert_eq!(a.login("tess@clinic.test", "wrong").await.status(), 401);
    assert_eq!(b.login("tess@clinic.test", "wrong").await.status(), 401);
    // Three failures in all: both instances refuse, even the right password.
    assert_eq!(a.login("tess@clinic.test", PASSWORD).await.status(), 429);
    assert_eq!(b.login("tess@clinic.test", PASSWORD).await.status(), 429);

    a.create_session().await;
    b.create_session().await;
    for app in [a, b] {
        let third = app.http.post(app.url("/api/sessions")).send().await.unwrap();
        assert_eq!(third.status(), 429, "two sessions per minute from this address, across instances");
    }
}

#[tokio::test]
async fn a_flag_on_one_instance_alerts_a_therapist_on_another() {
    let apps = instances(2, &[]).await;
    let (a, b) = (&apps[0], &apps[1]);
    let token = therapist_on(b, a).await;
    // The therapist sits in their own chat on B.
    let own = a.create_session().await;
    let mut desk = b.connect(own.session_id, &token).await;
    desk.mode().await;

    let session = a.create_session().await;
    let mut client = a.connect(session.session_id, &session.client_token).await;
    client.mode().await;
    let risky = client.send_message("I want to kill myself").await;
    client.ack(&risky).await;
    loop {
        if let ServerFrame::Risk { session_id, level } = desk.frame().await {
            assert_eq!((session_id, level), (session.session_id, haven_protocol::RiskLevel::High));
            break;
        }
    }
    // B's API shows the flag, first in the list.
    let list: Vec<serde_json::Value> = b
        .http
        .get(b.url("/api/appointments"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list[0]["session_id"], session.session_id.to_string());
    assert_eq!(list[0]["risk_level"], "high");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_batches_on_two_instances_number_every_session_once_and_store_a_resend_once() {
    const SESSIONS: usize = 6;
    const EACH: usize = 8;
    let apps = instances(2, &[]).await;
    let mut sessions = Vec::new();
    for _ in 0..SESSIONS {
        let session = apps[0].create_session().await;
        let tabs = tab_on_each(&apps, &session).await;
        sessions.push((session, tabs));
    }
    // Every tab writes without waiting, so both instances' batches hold
    // writes to the same sessions at once. Tab 0 sends `shared-i`; tab 1
    // sends the same `shared-i` again (the client re-sending through the
    // other instance) and a message of its own.
    for i in 0..EACH {
        for (_, tabs) in &mut sessions {
            let shared = json!({"type": "message", "content": format!("shared {i}"), "client_id": format!("shared-{i}")});
            tabs[0].send_json(shared.clone()).await;
            tabs[1].send_json(shared).await;
            let own = format!("own-{i}");
            tabs[1].send_json(json!({"type": "message", "content": own, "client_id": own})).await;
        }
    }
    for (session, tabs) in &mut sessions {
        let mut acked = std::collections::HashMap::new();
        for i in 0..EACH {
            let shared = format!("shared-{i}");
            let (first, _) = tabs[0].ack(&shared).await;
            let (again, _) = tabs[1].ack(&shared).await;
            assert_eq!(first, again, "both instances acknowledge the one stored copy");
            acked.insert(shared, first);
            let own = format!("own-{i}");
            let (seq, _) = tabs[1].ack(&own).await;
            acked.insert(own, seq);
        }
        let history = apps[1].history(session.session_id, &session.client_token).await;
        let seqs: Vec<i64> = history.iter().map(|message| message.seq).collect();
        assert_eq!(seqs, (1..=history.len() as i64).collect::<Vec<_>>(), "gap-free, each seq once");
        let stored: std::collections::HashMap<String, i64> = history
            .iter()
            .filter(|message| message.sender == Sender::User)
            .map(|message| {
                (message.client_id.clone().expect("a client message keeps its client_id"), message.seq)
            })
            .collect();
        let users = history.iter().filter(|message| message.sender == Sender::User).count();
        assert_eq!(users, 2 * EACH, "every client_id stored exactly once");
        assert_eq!(stored, acked, "each ack names the stored seq");
    }
}

#[tokio::test]
async fn a_hand_back_on_one_instance_pauses_the_companion_everywhere_until_the_yes_on_another() {
    let apps = instances(2, &[]).await;
    let (a, b) = (&apps[0], &apps[1]);
    let token = therapist_on(b, a).await;
    let session = a.create_session().await;
    let mut tabs = tab_on_each(&apps, &session).await;
    let mut therapist = b.connect(session.session_id, &token).await;
    assert_eq!(therapist.mode().await, ChatMode::TherapistJoined);
    for tab in &mut tabs {
        until_mode_after(tab, MessageKind::Join).await;
    }

    let handed = hand_back(b, session.session_id, &token, json!({"note": "back to the companion"})).await;
    assert_eq!(handed.status(), 204);
    for tab in &mut tabs {
        let (frames, mode) = until_mode_after(tab, MessageKind::Handback).await;
        assert_eq!(messages(&frames)[0].content, "back to the companion");
        assert_eq!(mode, ServerFrame::Mode { chat_mode: ChatMode::BotOnly, companion_paused: true });
    }
    assert_eq!(therapist.closed_eventually().await, (1000, "handed back".to_owned()));

    // The client says yes on A; A's companion answers the next message,
    // and B's tab sees the same, in the same order.
    tabs[0].send_json(json!({"type": "resume_companion"})).await;
    for tab in &mut tabs {
        let (frames, mode) = until_mode_after(tab, MessageKind::Resume).await;
        assert!(!from_companion(&frames));
        assert_eq!(mode, ServerFrame::Mode { chat_mode: ChatMode::BotOnly, companion_paused: false });
    }
    let hello = tabs[0].send_message("hello again").await;
    let (seq, _) = tabs[0].ack(&hello).await;
    for tab in &mut tabs {
        let said = tab.message().await;
        assert_eq!((said.seq, said.sender), (seq, Sender::User));
        let answer = tab.message().await;
        assert_eq!((answer.seq, answer.sender), (seq + 1, Sender::Ai));
    }
}

#[tokio::test]
async fn presence_crosses_instances_and_a_first_tab_elsewhere_learns_who_is_here() {
    let apps = instances(2, &[]).await;
    let (a, b) = (&apps[0], &apps[1]);
    let token = therapist_on(a, a).await;
    let session = a.create_session().await;
    let mut desk = a.connect(session.session_id, &token).await;
    assert_eq!(desk.presence().await, (Sender::User, false, None));

    // B has no socket of this session yet: its first one asks, and A tells.
    let mut client = b.connect(session.session_id, &session.client_token).await;
    let here = (Sender::Therapist, true, Some("Tess".to_owned()));
    loop {
        let presence = client.presence().await;
        if presence == here {
            break;
        }
        assert_eq!(presence, (Sender::Therapist, false, None), "before A answers, B knows of nobody");
    }
    assert_eq!(desk.presence().await, (Sender::User, true, None), "A hears of the client on B");

    let online = async |app: &TestApp, token: &str| {
        let list = app.appointments(token).await;
        list.iter().any(|row| row.session_id == session.session_id && row.client_online)
    };
    assert!(online(a, &token).await, "A's dashboard shows B's client online");

    // An instance that starts later asks, and is told at once: its dashboard
    // shows the client online as soon as the answer comes (a `changed`
    // event), or already.
    let database_url = Some(a.database_url.clone());
    let c = TestApp::spawn_with(Options { database_url, ..Options::default() }).await;
    let token_c: serde_json::Value = c.login("tess@clinic.test", PASSWORD).await.json().await.unwrap();
    let token_c = token_c["token"].as_str().unwrap().to_owned();
    let mut events =
        c.http.get(c.url("/api/appointments/events")).bearer_auth(&token_c).send().await.unwrap();
    while !online(&c, &token_c).await {
        let tick = tokio::time::timeout(EVENT_TIMEOUT, events.chunk()).await;
        tick.expect("C never learned the client is online").unwrap().expect("the stream ended");
    }

    desk.close().await;
    assert_eq!(client.presence().await, (Sender::Therapist, false, None), "leaving on A reaches B");
    // The client leaves B: C's dashboard shows it offline once told.
    client.close().await;
    while online(&c, &token_c).await {
        let tick = tokio::time::timeout(EVENT_TIMEOUT, events.chunk()).await;
        tick.expect("C never learned the client left").unwrap().expect("the stream ended");
    }
}

#[tokio::test]
async fn waiting_clients_count_the_therapists_online_on_every_instance() {
    let apps = instances(2, &[]).await;
    let (a, b) = (&apps[0], &apps[1]);
    let token = therapist_on(a, a).await;
    let first = b.create_session().await;
    let mut client = b.connect(first.session_id, &first.client_token).await;
    assert_eq!(client.queue().await, (0, 0));

    // The therapist opens the appointments list on A: B's client is told.
    let list = a.http.get(a.url("/api/appointments/events")).bearer_auth(&token).send().await.unwrap();
    assert_eq!(list.status(), 200);
    assert_eq!(client.queue().await, (1, 0));

    // An instance that starts later asks, and learns of the therapist on A.
    let database_url = Some(a.database_url.clone());
    let c = TestApp::spawn_with(Options { database_url, ..Options::default() }).await;
    let second = c.create_session().await;
    let mut later = c.connect(second.session_id, &second.client_token).await;
    loop {
        match later.queue().await {
            (1, 1) => break,
            place => assert_eq!(place, (0, 1), "before A answers, C knows of nobody"),
        }
    }

    // The list closes on A: nobody is online, on B and on C.
    drop(list);
    assert_eq!(client.queue().await, (0, 0));
    assert_eq!(later.queue().await, (0, 1));
}

#[tokio::test]
async fn two_instances_appending_at_once_keep_one_audit_chain() {
    let apps = instances(2, &[]).await;
    let (a, b) = (&apps[0], &apps[1]);
    a.add_therapist("tess@clinic.test", "Dr Tess Example").await;
    // Logins on both instances at once: each appends to the trail.
    let attempts = 20;
    let logins = (0..attempts).map(|i| {
        let app = if i % 2 == 0 { a } else { b };
        let password = if i % 10 == 0 { "wrong password" } else { PASSWORD };
        app.login("tess@clinic.test", password)
    });
    let statuses: Vec<u16> = futures_util::future::join_all(logins)
        .await
        .iter()
        .map(|response| response.status().as_u16())
        .collect();
    assert_eq!(statuses.iter().filter(|status| **status == 401).count(), 2, "{statuses:?}");
    assert!(statuses.iter().all(|status| *status == 200 || *status == 401), "{statuses:?}");
    let output = a.cli(&["audit", "verify"], "").await;
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{text}{}", String::from_utf8_lossy(&output.stderr));
    // The account, then every attempt.
    assert!(text.contains(&format!("{} records", attempts + 1)), "{text}");
}

#[tokio::test]
async fn a_chat_erased_on_one_instance_closes_its_tabs_on_another() {
    let apps = instances(2, &[]).await;
    let (a, b) = (&apps[0], &apps[1]);
    let token = therapist_on(b, a).await;
    let session = a.create_session().await;
    let mut tabs = tab_on_each(&apps, &session).await;
    assert!(b.appointments(&token).await.iter().any(|row| row.session_id == session.session_id));
    let response = a
        .http
        .delete(a.url(&format!("/api/sessions/{}", session.session_id)))
        .bearer_auth(&session.client_token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    for tab in &mut tabs {
        let (code, reason) = tab.closed_eventually().await;
        assert_eq!((code, reason.as_str()), (1008, "chat erased"));
    }
    assert!(!b.appointments(&token).await.iter().any(|row| row.session_id == session.session_id));
}
