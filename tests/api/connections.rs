//! Connections that send nothing, or not enough: every one is closed within
//! its deadline, one address cannot hold more than its share, and the
//! dashboard's event streams are limited per login and end with it.

use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::helpers::{EVENT_TIMEOUT, Options, TestApp, with_args};

/// The head and request deadlines these tests give the server, in seconds.
const DEADLINE: u64 = 2;
/// Open connections one address may hold in these tests.
const CAP: usize = 40;

/// A TCP connection to `server` from the loopback address `source`.
async fn connect_from(source: &str, server: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    socket.connect(server.parse().unwrap()).await.unwrap()
}

/// Reads until the server closes `stream` (an end of file or a reset);
/// returns what was read and when the close came, measured from `since`.
async fn until_closed(mut stream: TcpStream, since: Instant) -> (String, Duration) {
    let mut read = Vec::new();
    let mut buffer = [0u8; 4096];
    let wait = async {
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(n) => read.extend_from_slice(&buffer[..n]),
            }
        }
    };
    tokio::time::timeout(EVENT_TIMEOUT, wait).await.expect("the server kept the connection open");
    (String::from_utf8_lossy(&read).into_owned(), since.elapsed())
}

/// The HTTP/2 connection preface, an empty SETTINGS frame, and a HEADERS
/// frame on stream 1 without END_HEADERS (its one byte is `:method: GET`).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const H2_SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];
const H2_HEADERS_UNFINISHED: &[u8] = &[0, 0, 1, 1, 0, 0, 0, 0, 1, 0x82];

#[tokio::test]
async fn silent_and_stalled_connections_are_closed_while_others_chat() {
    let deadline = DEADLINE.to_string();
    let cap = CAP.to_string();
    let app = TestApp::spawn_with(with_args(&[
        "--max-connections-per-ip",
        &cap,
        "--handshake-timeout-seconds",
        &deadline,
        "--request-timeout-seconds",
        &deadline,
        "--message-rate",
        "100",
        "--message-burst",
        "100",
    ]))
    .await;
    let server = app.address.trim_start_matches("http://").to_owned();
    let deadline = Duration::from_secs(DEADLINE);

    // 127.0.0.2 opens connections that send nothing: up to its cap, and ten more.
    let mut silent = Vec::new();
    for _ in 0..CAP + 10 {
        // Watched from its own task from the start, so every close is timed
        // as it happens, whatever the test does meanwhile.
        let stream = connect_from("127.0.0.2", &server).await;
        silent.push(tokio::spawn(until_closed(stream, Instant::now())));
    }
    // 127.0.0.3 stalls in every other way.
    let mut stalled = Vec::new();
    let kinds: [(&str, Vec<u8>); 6] = [
        ("HTTP/2 preface", H2_PREFACE.to_vec()),
        ("HTTP/2 preface and SETTINGS", [H2_PREFACE, H2_SETTINGS].concat()),
        ("HTTP/2 HEADERS without END_HEADERS", [H2_PREFACE, H2_SETTINGS, H2_HEADERS_UNFINISHED].concat()),
        ("half a request head", b"GET /healthz HTTP/1.1\r\nHost: haven\r\n".to_vec()),
        (
            "a declared body never sent",
            b"POST /api/auth/login HTTP/1.1\r\nHost: haven\r\nContent-Type: application/json\r\n\
              Content-Length: 10000\r\n\r\n"
                .to_vec(),
        ),
        ("one request, then silence", b"GET /healthz HTTP/1.1\r\nHost: haven\r\n\r\n".to_vec()),
    ];
    for (kind, bytes) in kinds {
        let mut stream = connect_from("127.0.0.3", &server).await;
        stream.write_all(&bytes).await.unwrap();
        stalled.push((kind, tokio::spawn(until_closed(stream, Instant::now()))));
    }

    // Meanwhile 127.0.0.1 creates sessions and chats.
    let session = app.create_session().await;
    app.create_session().await;
    let mut client = app.connect(session.session_id, &session.client_token).await;
    client.mode().await;
    let mut latencies = Vec::new();
    for n in 0..50 {
        let sent = Instant::now();
        let id = client.send_message(&format!("note {n}: the bus was late and I made soup")).await;
        client.ack(&id).await;
        latencies.push(sent.elapsed());
    }
    // Held connections must not make the chat wait for their deadline: a
    // starved ack would take about `DEADLINE`. (Latency itself is measured
    // in scripts/bench.sh; a loaded test machine makes milliseconds noise.)
    latencies.sort();
    let slowest = latencies[latencies.len() - 1];
    eprintln!("ack latency beside {} held connections: slowest {slowest:?}", CAP + 16);
    assert!(slowest < deadline / 2, "an ack waited {slowest:?}, as long as a held connection's deadline");

    // The ten beyond the cap were closed before anything was read; the
    // others within their deadline.
    let mut closes = Vec::new();
    for task in silent {
        closes.push(task.await.unwrap().1);
    }
    let early = closes.iter().filter(|after| **after < deadline / 2).count();
    assert_eq!(early, 10, "connections beyond the cap are closed at once: {closes:?}");
    let late = closes.iter().filter(|after| **after > deadline + Duration::from_secs(2)).count();
    assert_eq!(late, 0, "silent connections outlived their deadline: {closes:?}");
    for (kind, task) in stalled {
        let (read, after) = task.await.unwrap();
        assert!(after <= deadline + Duration::from_secs(2), "{kind}: closed after {after:?}");
        if kind == "a declared body never sent" {
            assert!(read.starts_with("HTTP/1.1 408"), "{kind}: {read}");
            assert!(read.contains("\"request_timeout\""), "{kind}: {read}");
        }
        if kind == "one request, then silence" {
            assert!(read.starts_with("HTTP/1.1 200"), "{kind}: {read}");
        }
    }
}

#[tokio::test]
async fn a_login_holds_a_bounded_number_of_event_streams_and_they_end_with_it() {
    let app =
        TestApp::spawn_with(with_args(&["--max-event-streams-per-login", "2", "--heartbeat-seconds", "1"]))
            .await;
    let tess = app.therapist("Tess").await;
    let open = || app.http.get(app.url("/api/appointments/events")).bearer_auth(&tess.token).send();
    let first = open().await.unwrap();
    let mut second = open().await.unwrap();
    assert_eq!((first.status().as_u16(), second.status().as_u16()), (200, 200));
    let third = open().await.unwrap();
    assert_eq!(third.status(), 429);
    assert_eq!(third.json::<Value>().await.unwrap()["error"], "rate_limited");
    // A stream that ends gives its place back.
    drop(first);
    let again = async {
        loop {
            let response = open().await.unwrap();
            if response.status() == 200 {
                return response;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let _again = tokio::time::timeout(EVENT_TIMEOUT, again).await.expect("the slot was not given back");

    // Another process disables the account: the stream ends at the next re-check.
    let disabled = app.cli(&["therapist", "disable", "--email", "tess@clinic.test"], "").await;
    assert!(disabled.status.success());
    let ended = async { while second.chunk().await.unwrap().is_some() {} };
    tokio::time::timeout(EVENT_TIMEOUT, ended).await.expect("the event stream outlived its login");
}

#[tokio::test]
async fn serve_raises_its_open_file_limit_and_says_so() {
    let app = TestApp::spawn().await;
    let events = app.logs.wait_for(1, |event| event["message"] == "open file limit").await;
    let (soft, hard) = (events[0]["soft"].as_u64().unwrap(), events[0]["hard"].as_u64().unwrap());
    assert!(events[0]["soft_before"].as_u64().unwrap() <= soft);
    assert_eq!(soft, hard, "the soft limit is raised to the hard one: {}", events[0]);
}

#[tokio::test]
async fn when_descriptors_run_out_the_accept_loop_pauses_and_serves_again() {
    let options = Options { open_files: Some(64), ..Options::default() };
    let app = TestApp::spawn_with(options).await;
    let server = app.address.trim_start_matches("http://").to_owned();
    // More connections than the process may hold descriptors for.
    let mut held = Vec::new();
    for _ in 0..80 {
        held.push(connect_from("127.0.0.2", &server).await);
    }
    // The loop pauses between failed accepts, doubling each pause: it
    // does not spin.
    let failed = |event: &Value| event["message"] == "accept failed; pausing";
    let events = app.logs.wait_for(5, failed).await;
    let pauses: Vec<u64> = events[..5].iter().map(|event| event["pause_ms"].as_u64().unwrap()).collect();
    assert_eq!(pauses, [10, 20, 40, 80, 160]);
    let at = |event: &Value| {
        let text = event["timestamp"].as_str().unwrap();
        time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339).unwrap()
    };
    for (pair, pause) in events[..5].windows(2).zip(&pauses) {
        let gap = at(&pair[1]) - at(&pair[0]);
        assert!(gap >= time::Duration::milliseconds(*pause as i64), "{gap} after a pause of {pause} ms");
    }
    // Descriptors come back, and others are served again.
    drop(held);
    let health = async {
        loop {
            let client = reqwest::Client::builder().local_address("127.0.0.3".parse().ok()).build().unwrap();
            let client = app.client(client);
            if let Ok(response) = client.get(app.url("/healthz")).send().await {
                return response.status();
            }
        }
    };
    let status = tokio::time::timeout(EVENT_TIMEOUT, health).await.expect("the server no longer serves");
    assert_eq!(status, 200);
}
