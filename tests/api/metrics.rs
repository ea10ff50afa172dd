//! Prometheus metrics on `--metrics-bind`: a scripted chat moves each
//! series by what it did, and no label names a person or a session.

use std::collections::BTreeMap;

use haven_protocol::{ChatMode, Sender, ServerFrame};
use serde_json::json;

use crate::helpers::{EVENT_TIMEOUT, Options, TestApp, Ws};
use crate::mock_llm::{MockLlm, Script};

/// One scrape: each sample (`name{labels}`) and its value.
pub type Samples = BTreeMap<String, f64>;

pub async fn scrape(address: &str) -> (Samples, String) {
    let response = reqwest::get(format!("http://{address}/metrics")).await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/plain; version=0.0.4"));
    let text = response.text().await.unwrap();
    let samples = text
        .lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let (name, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {line}"));
            (name.to_owned(), value.parse().unwrap_or_else(|_| panic!("not a value: {line}")))
        })
        .collect();
    (samples, text)
}

/// The address `app` serves metrics on (`--metrics-bind`).
pub async fn address(app: &TestApp) -> String {
    let listening = app.logs.wait_for(1, |line| line["message"] == "metrics listening").await;
    listening[0]["address"].as_str().unwrap().to_owned()
}

/// How much `sample` grew from `before` to `after` (absent counts as 0).
fn grew(before: &Samples, after: &Samples, sample: &str) -> f64 {
    after.get(sample).copied().unwrap_or(0.0) - before.get(sample).copied().unwrap_or(0.0)
}

/// Reads frames until a message from `sender`.
async fn until_sender(socket: &mut Ws, sender: Sender) {
    while !matches!(socket.frame().await, ServerFrame::Message(message) if message.sender == sender) {}
}

async fn say(socket: &mut Ws, text: &str) {
    let client_id = socket.send_message(text).await;
    socket.ack(&client_id).await;
}

#[tokio::test]
async fn a_scripted_chat_moves_each_series_by_what_it_did() {
    let mock = MockLlm::start().await;
    mock.script("#fail", Script { failures: vec![500], ..Script::default() });
    let args = [
        "--metrics-bind",
        "127.0.0.1:0",
        "--ai-provider",
        "openai",
        "--ai-base-url",
        &mock.openai_url(),
        "--ai-model",
        "mock",
        "--ai-api-key",
        "k",
        "--ai-retries",
        "0",
        "--safety-second-opinion",
        "false",
        "--sessions-per-ip-per-minute",
        "2",
    ];
    let app =
        TestApp::spawn_with(Options { args: args.map(String::from).to_vec(), ..Options::default() }).await;
    let address = address(&app).await;
    let (before, _) = scrape(&address).await;
    let build = format!("haven_build_info{{version=\"{}\"}}", env!("CARGO_PKG_VERSION"));
    assert_eq!(before.get(&build), Some(&1.0), "{before:?}");

    // A wrong password; two chats, and a third refused for the rate.
    assert_eq!(app.login("nobody@clinic.test", "not the password").await.status(), 401);
    let tess = app.therapist("Tess").await;
    let chat = app.create_session().await;
    app.create_session().await;
    let refused = app.http.post(app.url("/api/sessions")).send().await.unwrap();
    assert_eq!(refused.status(), 429);

    // A reply, a provider failure (told by a notice), a crisis message
    // answered by the safety script; then the join, a therapist message
    // and the flag's acknowledgement.
    let mut client = app.connect(chat.session_id, &chat.client_token).await;
    assert_eq!(client.mode().await, ChatMode::BotOnly);
    say(&mut client, "hello there").await;
    until_sender(&mut client, Sender::Ai).await;
    say(&mut client, "hello #fail").await;
    until_sender(&mut client, Sender::System).await;
    say(&mut client, "i have the pills in front of me and im going to take them all tonight").await;
    until_sender(&mut client, Sender::System).await;
    until_sender(&mut client, Sender::Ai).await;
    let mut desk = app.connect(chat.session_id, &tess.token).await;
    assert_eq!(desk.mode().await, ChatMode::TherapistJoined);
    say(&mut desk, "I'm here with you now.").await;
    let path = format!("/api/sessions/{}/risk/acknowledge", chat.session_id);
    let acknowledged =
        app.http.post(app.url(&path)).bearer_auth(&tess.token).json(&json!({})).send().await.unwrap();
    assert_eq!(acknowledged.status(), 200);

    let (after, text) = scrape(&address).await;
    let moved = |sample: &str| grew(&before, &after, sample);
    let expected = [
        ("haven_login_failures_total", 1.0),
        ("haven_rate_limited_total{limit=\"sessions_per_ip\"}", 1.0),
        ("haven_messages_stored_total{sender=\"user\"}", 3.0),
        ("haven_messages_stored_total{sender=\"ai\"}", 2.0),
        // The failure's notice, the crisis resources and the join.
        ("haven_messages_stored_total{sender=\"system\"}", 3.0),
        ("haven_messages_stored_total{sender=\"therapist\"}", 1.0),
        ("haven_ack_latency_seconds_count", 4.0),
        // Every client and therapist message, and the three companion
        // messages (two replies and the failure's notice), go through group
        // commit.
        ("haven_commit_batch_size_sum", 7.0),
        ("haven_companion_first_delta_seconds_count{provider=\"openai\"}", 1.0),
        ("haven_companion_first_delta_seconds_count{provider=\"safety_script\"}", 1.0),
        ("haven_companion_reply_seconds_count{provider=\"openai\"}", 1.0),
        ("haven_companion_reply_seconds_count{provider=\"safety_script\"}", 1.0),
        ("haven_provider_errors_total{provider=\"openai\",kind=\"server_error\"}", 1.0),
        ("haven_takeovers_total", 1.0),
        ("haven_crisis_acknowledgement_seconds_count", 1.0),
    ];
    for (sample, by) in expected {
        assert_eq!(moved(sample), by, "{sample} in:\n{text}");
    }
    let flags: f64 = ["concern", "high", "imminent"]
        .iter()
        .map(|level| moved(&format!("haven_crisis_flags_total{{level=\"{level}\"}}")))
        .sum();
    assert_eq!(flags, 1.0, "{text}");
    let batches = moved("haven_commit_batch_size_count");
    assert!((1.0..=7.0).contains(&batches), "{batches} batches for 7 writes");
    assert_eq!(moved("haven_commit_batch_duration_seconds_count"), batches);
    for (sample, value) in [
        ("haven_open_sockets{role=\"user\"}", 1.0),
        ("haven_open_sockets{role=\"therapist\"}", 1.0),
        ("haven_sessions{mode=\"BOT_ONLY\"}", 1.0),
        ("haven_sessions{mode=\"THERAPIST_JOINED\"}", 1.0),
    ] {
        assert_eq!(after.get(sample), Some(&value), "{sample} in:\n{text}");
    }
    // Bounded labels: nobody's address, e-mail or session is one.
    for private in [chat.session_id.to_string(), "tess".to_owned(), "nobody@clinic.test".to_owned()] {
        assert!(!text.to_lowercase().contains(&private), "{private} in:\n{text}");
    }

    // Closed sockets leave the gauge.
    client.close().await;
    desk.close().await;
    let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
    loop {
        let (now, _) = scrape(&address).await;
        let open: f64 =
            now.iter().filter(|(name, _)| name.starts_with("haven_open_sockets")).map(|(_, v)| v).sum();
        if open == 0.0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "sockets still counted: {now:?}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn metrics_are_off_by_default_and_never_on_the_public_address() {
    let app = TestApp::spawn().await;
    let response = app.http.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 404);
    assert!(app.logs.matching(|line| line["message"] == "metrics listening").is_empty());
}
