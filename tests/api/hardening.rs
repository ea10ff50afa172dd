//! Tests that try to break Haven: floods, hostile frames, revoked
//! credentials, slow readers, SIGTERM and SIGKILL.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use haven_protocol::{ChatMode, ErrorCode, Sender, ServerFrame};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

use crate::helpers::{EVENT_TIMEOUT, PASSWORD, Received, TestApp, message_of, with_args};

/// A WebSocket upgrade request written by hand, for a raw TCP client.
fn upgrade_request(address: &str, session: &haven_protocol::api::CreatedSession) -> String {
    format!(
        "GET /api/chat/ws/{} HTTP/1.1\r\nHost: {address}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Authorization: Bearer {}\r\n\r\n",
        session.session_id, session.client_token
    )
}

async fn status_and_body(response: reqwest::Response) -> (u16, Option<String>, Value) {
    let status = response.status().as_u16();
    let retry_after = response.headers().get("retry-after").map(|value| value.to_str().unwrap().to_owned());
    (status, retry_after, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn messages_over_the_rate_are_refused_unstored_and_a_flood_closes_the_socket() {
    let app = TestApp::spawn_with(with_args(&[
        "--message-rate",
        "1",
        "--message-burst",
        "3",
        "--rate-limit-refusals",
        "5",
    ]))
    .await;
    let session = app.create_session().await;
    let mut client = app.connect(session.session_id, &session.client_token).await;
    client.mode().await;
    for index in 0..3 {
        let id = client.send_message(&format!("burst {index}")).await;
        client.ack(&id).await;
    }
    client.send_json(json!({"type": "message", "content": "one too many", "client_id": "late-1"})).await;
    let refused = loop {
        match client.frame().await {
            ServerFrame::Error { code, client_id, .. } => break (code, client_id),
            _ => continue,
        }
    };
    assert_eq!(refused, (ErrorCode::RateLimited, Some("late-1".to_owned())));
    let history = app.history(session.session_id, &session.client_token).await;
    assert!(
        history.iter().all(|m| m.client_id.as_deref() != Some("late-1")),
        "a refused message is not stored"
    );

    // Another session is not affected.
    let other = app.create_session().await;
    let mut neighbour = app.connect(other.session_id, &other.client_token).await;
    neighbour.mode().await;
    let id = neighbour.send_message("hello").await;
    neighbour.ack(&id).await;

    // A flood of refusals closes the socket. Each frame waits for its
    // answer (an ack if a token came back meanwhile, or a refusal), so
    // nothing is sent after the close, which would reset the connection.
    let closed = 'flood: {
        for index in 0..30 {
            client
                .send_json(json!({"type": "message", "content": "flood", "client_id": format!("f{index}")}))
                .await;
            loop {
                match client.receive().await {
                    Received::Closed(Some(frame)) => {
                        break 'flood (u16::from(frame.code), frame.reason.to_string());
                    }
                    Received::Closed(None) => panic!("closed without a close frame"),
                    Received::Frame(ServerFrame::Ack { .. } | ServerFrame::Error { .. }) => break,
                    Received::Frame(_) => {}
                }
            }
        }
        panic!("30 messages over the rate did not close the socket")
    };
    assert_eq!(closed, (1008, "rate limit exceeded".to_owned()));
}

#[tokio::test]
async fn too_many_new_sessions_from_one_address_get_429_with_retry_after() {
    let app = TestApp::spawn_with(with_args(&["--sessions-per-ip-per-minute", "3"])).await;
    for _ in 0..3 {
        app.create_session().await;
    }
    let (status, retry_after, body) =
        status_and_body(app.http.post(app.url("/api/sessions")).send().await.unwrap()).await;
    assert_eq!(status, 429);
    assert_eq!(body["error"], "rate_limited");
    let seconds: u64 = retry_after.expect("Retry-After").parse().unwrap();
    assert!((1..=60).contains(&seconds), "{seconds}");
}

#[tokio::test]
async fn sockets_per_credential_are_limited_and_freed_on_close() {
    let app = TestApp::spawn_with(with_args(&["--max-sockets-per-credential", "2"])).await;
    let session = app.create_session().await;
    let mut first = app.connect(session.session_id, &session.client_token).await;
    first.mode().await;
    let mut second = app.connect(session.session_id, &session.client_token).await;
    second.mode().await;
    let mut third = app.connect(session.session_id, &session.client_token).await;
    assert_eq!(third.closed().await, (1008, "too many connections".to_owned()));

    first.close().await;
    // The slot comes back once the server has seen the close; until then a
    // new socket is refused, as a client retrying would find.
    for attempt in 0.. {
        assert!(attempt < 1_000, "a closed socket never gave its slot back");
        let mut again = app.connect(session.session_id, &session.client_token).await;
        match again.receive().await {
            Received::Frame(ServerFrame::Mode { chat_mode, .. }) => {
                assert_eq!(chat_mode, ChatMode::BotOnly);
                break;
            }
            Received::Closed(frame) => {
                let reason = frame.map(|frame| (u16::from(frame.code), frame.reason.to_string()));
                assert_eq!(reason, Some((1008, "too many connections".to_owned())));
            }
            Received::Frame(other) => panic!("expected the mode, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn failures_lock_an_address_but_only_slow_an_account_down_and_never_a_known_browser() {
    let app = TestApp::spawn_with(with_args(&["--login-failures", "3"])).await;
    app.add_therapist("tess@clinic.test", "Tess").await;
    app.add_therapist("omar@clinic.test", "Omar").await;
    let from = |address: &str| {
        app.client(reqwest::Client::builder().local_address(address.parse().ok()).build().unwrap())
    };
    let login = |client: &crate::contract::Http, email: &str, password: &str, device: Option<&str>| {
        let mut request =
            client.post(app.url("/api/auth/login")).json(&json!({"email": email, "password": password}));
        if let Some(device) = device {
            request = request.header("cookie", format!("haven_device={device}"));
        }
        request.send()
    };
    // Tess's own browser logs in from 127.0.0.2 and is given a device cookie.
    let (desk, home) = (from("127.0.0.2"), from("127.0.0.5"));
    let first = login(&desk, "tess@clinic.test", PASSWORD, None).await.unwrap();
    assert_eq!(first.status(), 200);
    let device = first
        .headers()
        .get_all("set-cookie")
        .iter()
        .filter_map(|value| value.to_str().ok()?.strip_prefix("haven_device="))
        .map(|rest| rest.split(';').next().unwrap().to_owned())
        .next()
        .expect("a device cookie");

    // Three failures from 127.0.0.1 lock that pair and that address…
    let attacker = from("127.0.0.1");
    for _ in 0..3 {
        assert_eq!(login(&attacker, "tess@clinic.test", "wrong password", None).await.unwrap().status(), 401);
    }
    let (status, retry_after, body) =
        status_and_body(login(&attacker, "tess@clinic.test", PASSWORD, None).await.unwrap()).await;
    assert_eq!((status, body["error"].as_str()), (429, Some("rate_limited")));
    let seconds: u64 = retry_after.expect("Retry-After").parse().unwrap();
    assert!(seconds > 800 && seconds <= 900, "the 15-minute window: {seconds}");
    assert_eq!(login(&attacker, "omar@clinic.test", PASSWORD, None).await.unwrap().status(), 429);
    // …and three more from 127.0.0.3 bring the account to six failures.
    let other = from("127.0.0.3");
    for _ in 0..3 {
        assert_eq!(login(&other, "tess@clinic.test", "wrong password", None).await.unwrap().status(), 401);
    }
    assert_eq!(login(&other, "tess@clinic.test", PASSWORD, None).await.unwrap().status(), 429);

    // The known browser, now at another address, is neither locked nor slowed.
    let slowed =
        |app: &TestApp| app.logs.matching(|event| message_of(event).starts_with("login slowed")).len();
    let before = slowed(&app);
    assert!(before > 0, "the sixth failure was slowed down");
    assert_eq!(login(&home, "tess@clinic.test", PASSWORD, Some(&device)).await.unwrap().status(), 200);
    assert_eq!(slowed(&app), before, "a known browser waits for no one's failures");
    // That login cleared the account's failures. Five more, from five
    // addresses (none of them locked), slow down a new browser elsewhere,
    // and a forged device cookie is no better than none.
    for n in 6..=10 {
        let status = login(&from(&format!("127.0.0.{n}")), "tess@clinic.test", "still wrong", None)
            .await
            .unwrap()
            .status();
        assert_eq!(status, 401);
    }
    let before = slowed(&app);
    let forged = format!("{}.0.{}", uuid::Uuid::now_v7(), "0".repeat(64));
    let newcomer = from("127.0.0.11");
    assert_eq!(login(&newcomer, "tess@clinic.test", PASSWORD, Some(&forged)).await.unwrap().status(), 200);
    assert_eq!(slowed(&app), before + 1, "the account's failures slow a new browser down");
    let event = app.logs.matching(|event| message_of(event).starts_with("login slowed")).pop().unwrap();
    assert_eq!(event["delay_ms"], 250, "five failures: the first step of the delay");
}

#[tokio::test]
async fn logout_closes_that_therapists_sockets_with_1008() {
    let app = TestApp::spawn().await;
    let therapist = app.therapist("Tess").await;
    let other = app.therapist("Omar").await;
    let mine = app.create_session().await;
    let theirs = app.create_session().await;
    let mut desk = app.connect(mine.session_id, &therapist.token).await;
    desk.mode().await;
    let mut colleague = app.connect(theirs.session_id, &other.token).await;
    colleague.mode().await;

    let logout =
        app.http.post(app.url("/api/auth/logout")).bearer_auth(&therapist.token).send().await.unwrap();
    assert_eq!(logout.status(), 204);
    assert_eq!(desk.closed_eventually().await, (1008, "credential revoked".to_owned()));
    // The colleague's socket stays open.
    let id = colleague.send_message("still here").await;
    colleague.ack(&id).await;
}

#[tokio::test]
async fn password_changes_and_disabled_accounts_end_logins_and_sockets() {
    let app = TestApp::spawn_with(with_args(&["--heartbeat-seconds", "1"])).await;
    let therapist = app.therapist("Tess").await;
    let session = app.create_session().await;
    let mut desk = app.connect(session.session_id, &therapist.token).await;
    desk.mode().await;

    let changed =
        app.cli(&["therapist", "passwd", "--email", "tess@clinic.test"], "a brand new password\n").await;
    assert!(changed.status.success(), "{}", String::from_utf8_lossy(&changed.stderr));
    // Another process changed it: this server notices at its next heartbeat.
    assert_eq!(desk.closed_eventually().await, (1008, "credential expired or revoked".to_owned()));
    assert_eq!(app.login("tess@clinic.test", PASSWORD).await.status(), 401);
    let relogin = app.login("tess@clinic.test", "a brand new password").await;
    assert_eq!(relogin.status(), 200);
    let token = relogin.json::<Value>().await.unwrap()["token"].as_str().unwrap().to_owned();
    let mut desk = app.connect(session.session_id, &token).await;
    desk.mode().await;

    let disabled = app.cli(&["therapist", "disable", "--email", "tess@clinic.test"], "").await;
    assert!(disabled.status.success());
    assert_eq!(desk.closed_eventually().await, (1008, "credential expired or revoked".to_owned()));
    assert_eq!(app.login("tess@clinic.test", "a brand new password").await.status(), 401);
    let listing = String::from_utf8(app.cli(&["therapist", "list"], "").await.stdout).unwrap();
    assert!(listing.contains("disabled"), "{listing}");
}

#[tokio::test]
async fn hostile_frames_get_the_right_close_codes_and_the_server_stays_up() {
    let app = TestApp::spawn().await;
    let session = app.create_session().await;
    let connect = || app.connect(session.session_id, &session.client_token);

    // Exactly 64 KiB is a message (refused for its content length, socket open).
    let mut socket = connect().await;
    socket.mode().await;
    let mut exact = json!({"type": "message", "client_id": "x", "content": ""}).to_string();
    let padding = 64 * 1024 - exact.len();
    exact = json!({"type": "message", "client_id": "x", "content": "a".repeat(padding)}).to_string();
    assert_eq!(exact.len(), 64 * 1024);
    socket.send_raw(Message::Text(exact.into())).await;
    assert!(matches!(socket.frame().await, ServerFrame::Error { code: ErrorCode::ContentTooLong, .. }));

    // One byte more closes with 1009.
    let over = json!({"type": "message", "client_id": "x", "content": "a".repeat(padding + 1)}).to_string();
    socket.send_raw(Message::Text(over.into())).await;
    assert_eq!(socket.closed().await.0, 1009);

    // Fragments that only together exceed the limit close with 1009 too.
    let mut socket = connect().await;
    socket.mode().await;
    let piece = vec![b'a'; 40 * 1024];
    socket.send_frame(Frame::message(piece.clone(), OpCode::Data(Data::Text), false)).await;
    socket.send_frame(Frame::message(piece, OpCode::Data(Data::Continue), true)).await;
    assert_eq!(socket.closed().await.0, 1009);

    // Text that is not UTF-8 closes with 1007.
    let mut socket = connect().await;
    socket.mode().await;
    socket.send_frame(Frame::message(vec![0x7b, 0xff, 0xfe, 0x7d], OpCode::Data(Data::Text), true)).await;
    assert_eq!(socket.closed().await.0, 1007);

    // A frame header claiming an enormous payload is refused without waiting
    // for (or allocating) it.
    let address = app.address.trim_start_matches("http://").to_owned();
    let mut raw = tokio::net::TcpStream::connect(&address).await.unwrap();
    raw.write_all(upgrade_request(&address, &session).as_bytes()).await.unwrap();
    let mut header = [0u8; 14];
    header[0] = 0x81; // FIN + text
    header[1] = 0x80 | 127; // masked, 64-bit length
    header[2..10].copy_from_slice(&(1u64 << 40).to_be_bytes());
    raw.write_all(&header).await.unwrap();
    let mut rest = Vec::new();
    // The server ends the connection (a close frame, or a reset) instead of
    // waiting for a terabyte.
    let _ = tokio::time::timeout(EVENT_TIMEOUT, raw.read_to_end(&mut rest))
        .await
        .expect("the server kept the connection open");

    // Through all of this, the session still works.
    let mut socket = connect().await;
    socket.mode().await;
    let id = socket.send_message("still fine").await;
    assert_eq!(socket.ack(&id).await.0, 1);
}

#[tokio::test]
async fn oversized_and_malformed_http_requests_get_json_errors() {
    let app = TestApp::spawn().await;
    app.add_therapist("tess@clinic.test", "Tess").await;
    let huge = json!({"email": "tess@clinic.test", "password": "x".repeat(20_000)});
    let (status, _, body) =
        status_and_body(app.http.post(app.url("/api/auth/login")).json(&huge).send().await.unwrap()).await;
    assert_eq!((status, body["error"].as_str()), (413, Some("payload_too_large")));
    let wrong_types = json!({"email": 5, "password": ["x"]});
    let (status, _, body) =
        status_and_body(app.http.post(app.url("/api/auth/login")).json(&wrong_types).send().await.unwrap())
            .await;
    assert_eq!((status, body["error"].as_str()), (400, Some("invalid_json")));
    let session = app.create_session().await;
    let bad_uuid = app.http.get(app.url("/api/sessions/%00%ff/messages")).bearer_auth(&session.client_token);
    let (status, _, body) = status_and_body(bad_uuid.send().await.unwrap()).await;
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")));
}

#[tokio::test]
async fn a_client_that_stops_reading_is_dropped_without_slowing_the_others() {
    let app = TestApp::spawn_with(with_args(&[
        "--outbound-queue",
        "16",
        "--message-rate",
        "100000",
        "--message-burst",
        "100000",
    ]))
    .await;
    let session = app.create_session().await;
    let therapist = app.therapist("Tess").await;
    let mut desk = app.connect(session.session_id, &therapist.token).await;
    desk.mode().await;
    let mut reader = app.connect(session.session_id, &session.client_token).await;
    reader.mode().await;
    // The reading client's baseline: the same traffic with nobody stalled.
    // Four bytes a character: big frames, so the buffers fill in fewer messages.
    let text = "😀".repeat(3_900);
    let mut baseline = Duration::ZERO;
    for _ in 0..20 {
        let started = Instant::now();
        let id = desk.send_message(&text).await;
        let (seq, _) = desk.ack(&id).await;
        reader.until_seq(seq).await;
        baseline = baseline.max(started.elapsed());
    }
    // A client that never reads: a raw socket with a tiny receive buffer.
    let address = app.address.trim_start_matches("http://").to_owned();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket.connect(address.parse().unwrap()).await.unwrap();
    stalled.write_all(upgrade_request(&address, &session).as_bytes()).await.unwrap();

    // The therapist writes long messages until the server gives up on the
    // stalled client; the reading client gets every one, promptly.
    let mut worst = Duration::ZERO;
    let mut sent = 0;
    while app.logs.matching(|event| message_of(event) == "client is not reading: disconnected").is_empty() {
        assert!(sent < 5_000, "the stalled client was never dropped");
        let started = Instant::now();
        let id = desk.send_message(&text).await;
        let (seq, _) = desk.ack(&id).await;
        let delivered = reader.until_seq(seq).await;
        worst = worst.max(started.elapsed());
        assert!(matches!(delivered.last(), Some(ServerFrame::Message(m)) if m.seq == seq));
        sent += 1;
    }
    eprintln!(
        "slow reader: dropped after {sent} messages; the reading client's worst wait {worst:?}, baseline {baseline:?}"
    );
    let bound = (baseline * 10).max(Duration::from_millis(500));
    assert!(worst < bound, "the reading client waited {worst:?} for a message (baseline {baseline:?})");
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_closes_every_socket_with_1001_and_loses_nothing_acknowledged() {
    let mut app =
        TestApp::spawn_with(with_args(&["--message-rate", "1000", "--message-burst", "1000"])).await;
    // Ten clients send as fast as they are acknowledged until the server closes them.
    let mut clients = tokio::task::JoinSet::new();
    let acks = Arc::new(watch::Sender::new(0_usize));
    for _ in 0..10 {
        let acks = acks.clone();
        let session = app.create_session().await;
        let mut client = app.connect(session.session_id, &session.client_token).await;
        client.mode().await;
        clients.spawn(async move {
            use futures_util::{SinkExt, StreamExt};
            let mut acked: Vec<(String, i64)> = Vec::new();
            let mut socket = client.into_inner();
            let mut next = 0;
            loop {
                next += 1;
                let id = format!("load-{next}");
                let frame = json!({"type": "message", "content": "under load", "client_id": id});
                if socket.send(Message::Text(frame.to_string().into())).await.is_err() {
                    return (session, acked, None);
                }
                loop {
                    match socket.next().await {
                        Some(Ok(Message::Text(text))) => {
                            if let Ok(ServerFrame::Ack { client_id, seq }) = serde_json::from_str(&text) {
                                acked.push((client_id, seq));
                                acks.send_modify(|count| *count += 1);
                                break;
                            }
                        }
                        Some(Ok(Message::Close(frame))) => {
                            return (session, acked, frame.map(|f| u16::from(f.code)));
                        }
                        Some(Ok(_)) => {}
                        _ => return (session, acked, None),
                    }
                }
            }
        });
    }
    let mut acked = acks.subscribe();
    tokio::time::timeout(EVENT_TIMEOUT, acked.wait_for(|count| *count >= 50))
        .await
        .expect("50 acks")
        .unwrap();
    let started = Instant::now();
    let status = app.terminate().await;
    eprintln!("SIGTERM under load: exited {:?} after the signal", started.elapsed());
    assert!(status.success(), "clean exit: {status:?}");
    assert!(started.elapsed() < Duration::from_secs(12), "bounded shutdown");

    let mut results = Vec::new();
    while let Some(result) = clients.join_next().await {
        results.push(result.unwrap());
    }
    app.start_again().await;
    let mut acknowledged = 0;
    for (session, acked, close) in results {
        assert_eq!(close, Some(1001), "every socket gets 1001");
        let history = app.history(session.session_id, &session.client_token).await;
        for (client_id, seq) in acked {
            let stored = history.iter().find(|m| m.client_id.as_deref() == Some(client_id.as_str()));
            assert_eq!(stored.map(|m| m.seq), Some(seq), "acknowledged {client_id} lost");
            acknowledged += 1;
        }
    }
    assert!(acknowledged >= 50, "only {acknowledged} messages were acknowledged");
}

/// A client of the durability test: sends numbered messages, remembers every
/// ack, re-sends what was not acked after a reconnect.
struct Writer {
    session: haven_protocol::api::CreatedSession,
    acked: BTreeMap<String, i64>,
    unacked: Vec<(String, String)>,
    next: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_any_moment_loses_no_acknowledged_message() {
    const SESSIONS: usize = 8;
    const KILLS: usize = 4;
    let mut app =
        TestApp::spawn_with(with_args(&["--message-rate", "1000", "--message-burst", "1000"])).await;
    let mut writers = Vec::new();
    for _ in 0..SESSIONS {
        writers.push(Writer {
            session: app.create_session().await,
            acked: BTreeMap::new(),
            unacked: Vec::new(),
            next: 0,
        });
    }
    for round in 0..KILLS {
        // Every writer sends as fast as it is acked, re-sending first what
        // the last crash left unacknowledged, until the server dies.
        let mut tasks = tokio::task::JoinSet::new();
        let acks = Arc::new(watch::Sender::new(0_usize));
        for mut writer in std::mem::take(&mut writers) {
            let acks = acks.clone();
            let app_address = app.address.clone();
            let token = writer.session.client_token.clone();
            let session_id = writer.session.session_id;
            tasks.spawn(async move {
                let url = format!("{}/api/chat/ws/{session_id}", app_address.replace("http://", "ws://"));
                let mut request =
                    tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)
                        .unwrap();
                request.headers_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
                let Ok((mut socket, _)) = tokio_tungstenite::connect_async(request).await else {
                    return writer;
                };
                use futures_util::{SinkExt, StreamExt};
                loop {
                    let (client_id, content) = match writer.unacked.first() {
                        Some(pending) => pending.clone(),
                        None => {
                            writer.next += 1;
                            let pending = (
                                format!("w-{session_id}-{}", writer.next),
                                format!("message {}", writer.next),
                            );
                            writer.unacked.push(pending.clone());
                            pending
                        }
                    };
                    let frame = json!({"type": "message", "content": content, "client_id": client_id});
                    if socket.send(Message::Text(frame.to_string().into())).await.is_err() {
                        return writer;
                    }
                    // Read until this message's ack, or until the server is gone.
                    loop {
                        match socket.next().await {
                            Some(Ok(Message::Text(text))) => {
                                if let Ok(ServerFrame::Ack { client_id: acked, seq }) =
                                    serde_json::from_str(&text)
                                {
                                    if let Some(previous) = writer.acked.insert(acked.clone(), seq) {
                                        assert_eq!(previous, seq, "a re-sent message got a different seq");
                                    }
                                    writer.unacked.retain(|(id, _)| *id != acked);
                                    acks.send_modify(|count| *count += 1);
                                    break;
                                }
                            }
                            Some(Ok(_)) => {}
                            _ => return writer,
                        }
                    }
                }
            });
        }
        // Kill after a different amount of traffic each round.
        let mut acked = acks.subscribe();
        let enough = acked.wait_for(|count| *count >= 40 + round * 13);
        tokio::time::timeout(EVENT_TIMEOUT, enough).await.expect("acks before the kill").unwrap();
        app.stop().await;
        while let Some(writer) = tasks.join_next().await {
            writers.push(writer.expect("writer task"));
        }
        app.start_again().await;
    }

    // Every acknowledged message is stored once, with the seq its ack named;
    // seqs have no gaps.
    let mut acknowledged = 0;
    for writer in &writers {
        let history = app.history(writer.session.session_id, &writer.session.client_token).await;
        let seqs: Vec<i64> = history.iter().map(|m| m.seq).collect();
        assert_eq!(seqs, (1..=history.len() as i64).collect::<Vec<_>>(), "gap-free seqs");
        let mut stored: HashMap<&str, i64> = HashMap::new();
        for message in history.iter().filter(|m| m.sender == Sender::User) {
            let id = message.client_id.as_deref().unwrap();
            assert!(stored.insert(id, message.seq).is_none(), "{id} stored twice");
        }
        for (client_id, seq) in &writer.acked {
            assert_eq!(stored.get(client_id.as_str()), Some(seq), "acknowledged {client_id} lost or moved");
            acknowledged += 1;
        }
    }
    eprintln!(
        "SIGKILL: {KILLS} kills, {SESSIONS} sessions, {acknowledged} acknowledged messages, 0 lost, 0 duplicated"
    );
    assert!(acknowledged > 100, "the test acknowledged only {acknowledged} messages");

    // PostgreSQL checks its own pages; SQLite is asked to.
    if !crate::helpers::on_postgres() {
        let url = format!("sqlite://{}", app.database_path().display());
        let mut connection = <sqlx::SqliteConnection as sqlx::Connection>::connect(&url).await.unwrap();
        let check: String =
            sqlx::query_scalar("PRAGMA integrity_check").fetch_one(&mut connection).await.unwrap();
        assert_eq!(check, "ok");
    }
}

#[tokio::test]
async fn sockets_per_address_are_limited_and_other_addresses_are_not() {
    let app = TestApp::spawn_with(with_args(&["--max-sockets-per-ip", "3"])).await;
    let mut open = Vec::new();
    for _ in 0..3 {
        let session = app.create_session().await;
        let mut socket = app.connect(session.session_id, &session.client_token).await;
        socket.mode().await;
        open.push(socket);
    }
    let session = app.create_session().await;
    let mut refused = app.connect(session.session_id, &session.client_token).await;
    assert_eq!(refused.closed().await, (1008, "too many connections".to_owned()));

    // The same credential from another address (127.0.0.2) is let in.
    let address: std::net::SocketAddr = app.address.trim_start_matches("http://").parse().unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let stream = socket.connect(address).await.unwrap();
    let url = format!("ws://{address}/api/chat/ws/{}", session.session_id);
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url).unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {}", session.client_token).parse().unwrap());
    let (mut elsewhere, _) = tokio_tungstenite::client_async(request, stream).await.unwrap();
    use futures_util::StreamExt;
    let first = tokio::time::timeout(EVENT_TIMEOUT, elsewhere.next()).await.unwrap().unwrap().unwrap();
    let frame: ServerFrame = serde_json::from_str(first.to_text().unwrap()).unwrap();
    assert_eq!(frame, ServerFrame::Mode { chat_mode: ChatMode::BotOnly, companion_paused: false });
}

#[tokio::test]
async fn a_login_flood_does_not_slow_the_chat() {
    let app = TestApp::spawn_with(with_args(&["--login-failures", "10000"])).await;
    app.add_therapist("tess@clinic.test", "Tess").await;
    let session = app.create_session().await;
    let mut client = app.connect(session.session_id, &session.client_token).await;
    client.mode().await;
    let roundtrip = async |client: &mut crate::helpers::Ws| {
        let started = Instant::now();
        let id = client.send_message("ping").await;
        client.ack(&id).await;
        started.elapsed()
    };
    let mut baseline = Duration::ZERO;
    for _ in 0..5 {
        baseline = baseline.max(roundtrip(&mut client).await);
    }
    // 40 logins at once, each a full password hash.
    let mut flood = tokio::task::JoinSet::new();
    for _ in 0..40 {
        let request = app
            .http
            .post(app.url("/api/auth/login"))
            .json(&json!({"email": "tess@clinic.test", "password": "not the password"}));
        flood.spawn(async move { request.send().await.unwrap().status().as_u16() });
    }
    let mut worst = Duration::ZERO;
    for _ in 0..5 {
        worst = worst.max(roundtrip(&mut client).await);
    }
    let mut statuses = Vec::new();
    while let Some(status) = flood.join_next().await {
        statuses.push(status.unwrap());
    }
    assert!(statuses.iter().all(|status| [401, 503].contains(status)), "{statuses:?}");
    eprintln!("login flood: chat roundtrip worst {worst:?} during, {baseline:?} before");
    let bound = (baseline * 10).max(Duration::from_millis(500));
    assert!(worst < bound, "the chat waited {worst:?} during the flood (baseline {baseline:?})");
}

#[tokio::test]
async fn logout_ends_the_dashboard_event_stream() {
    let app = TestApp::spawn().await;
    let therapist = app.therapist("Tess").await;
    let mut events =
        app.http.get(app.url("/api/appointments/events")).bearer_auth(&therapist.token).send().await.unwrap();
    assert_eq!(events.status(), 200);
    app.create_session().await;
    let tick = tokio::time::timeout(EVENT_TIMEOUT, events.chunk()).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&tick.unwrap()).contains("changed"));
    let logout =
        app.http.post(app.url("/api/auth/logout")).bearer_auth(&therapist.token).send().await.unwrap();
    assert_eq!(logout.status(), 204);
    // The stream ends (keep-alive comments aside).
    let ended = async {
        while let Some(chunk) = events.chunk().await.unwrap() {
            assert!(!String::from_utf8_lossy(&chunk).contains("event: changed"), "events after logout");
        }
    };
    tokio::time::timeout(EVENT_TIMEOUT, ended).await.expect("the event stream did not end at logout");
}

#[tokio::test]
async fn closing_a_chat_ends_its_sockets_and_leaves_the_client_only_its_transcript() {
    let app = TestApp::spawn().await;
    let tess = app.therapist("Tess").await;
    let omar = app.therapist("Omar").await;
    let session = app.create_session().await;
    let mut client = app.connect(session.session_id, &session.client_token).await;
    client.mode().await;
    let mut desk = app.connect(session.session_id, &tess.token).await;
    desk.mode().await;
    let close = |token: &str| {
        app.http
            .post(app.url(&format!("/api/sessions/{}/close", session.session_id)))
            .bearer_auth(token)
            .send()
    };
    assert_eq!(close(&omar.token).await.unwrap().status(), 403, "only its therapist closes a chat");
    assert_eq!(close(&tess.token).await.unwrap().status(), 204);

    let mut seen = Vec::new();
    let (code, reason) = loop {
        match client.receive().await {
            Received::Frame(frame) => seen.push(frame),
            Received::Closed(Some(frame)) => break (u16::from(frame.code), frame.reason.to_string()),
            Received::Closed(None) => panic!("closed without a close frame"),
        }
    };
    assert_eq!((code, reason.as_str()), (1008, "chat closed"));
    assert!(
        matches!(seen.last(), Some(ServerFrame::Message(m)) if m.content == haven_protocol::CLOSE_MESSAGE),
        "the closing message comes first: {seen:?}"
    );
    assert_eq!(desk.closed_eventually().await, (1008, "chat closed".to_owned()));
    let history = app.history(session.session_id, &tess.token).await;
    assert_eq!(history.last().unwrap().content, haven_protocol::CLOSE_MESSAGE, "the history is kept");
    let as_client = app
        .http
        .get(app.url(&format!("/api/sessions/{}/messages", session.session_id)))
        .bearer_auth(&session.client_token)
        .send()
        .await
        .unwrap();
    assert_eq!(as_client.status(), 200, "the client still reads the transcript");
    let page: Value = as_client.json().await.unwrap();
    assert_eq!(page["messages"].as_array().unwrap().last().unwrap()["kind"], "close");
    let mut socket = app.connect(session.session_id, &session.client_token).await;
    assert_eq!(socket.closed().await, (1008, "chat closed".to_owned()), "but opens no socket");
    let list: Vec<Value> = app
        .http
        .get(app.url("/api/appointments"))
        .bearer_auth(&tess.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(list.iter().all(|row| row["session_id"] != session.session_id.to_string()));
    assert_eq!(close(&tess.token).await.unwrap().status(), 204, "closing twice is fine");
}

#[tokio::test]
async fn a_handshake_that_never_finishes_is_dropped() {
    let app = TestApp::spawn_with(with_args(&["--handshake-timeout-seconds", "1"])).await;
    let address = app.address.trim_start_matches("http://").to_owned();
    let mut slow = tokio::net::TcpStream::connect(&address).await.unwrap();
    slow.write_all(b"GET /api/chat/ws/x HTTP/1.1\r\nHost: haven\r\n").await.unwrap();
    // Meanwhile the service answers others.
    assert_eq!(app.http.get(app.url("/healthz")).send().await.unwrap().status(), 200);
    let mut rest = Vec::new();
    let read = tokio::time::timeout(EVENT_TIMEOUT, slow.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the server kept a half-sent handshake open");
}
