//! Language-model companions against local mock providers: streaming,
//! the request each provider receives, the takeover race, and failures.

use std::time::Duration;

use haven_protocol::api::CreatedSession;
use haven_protocol::{ChatMode, Sender, ServerFrame};
use uuid::Uuid;

use crate::helpers::{Options, TestApp, Ws, message_of};
use crate::mock_llm::{MockLlm, Script};

const NOTICE: &str = "The companion is unavailable right now";

/// A server whose companion is the mock, spoken to as `provider`. The
/// model's second opinion on risk (tests/api/safety.rs) is off, so every
/// request the mock sees is a companion reply.
async fn app_with(mock: &MockLlm, provider: &str, extra: &[&str], env: &[(&str, &str)]) -> TestApp {
    let base_url = if provider == "gemini" { mock.gemini_url() } else { mock.openai_url() };
    let mut args: Vec<String> = [
        "--ai-provider",
        provider,
        "--ai-base-url",
        &base_url,
        "--ai-model",
        "test-model",
        "--safety-second-opinion",
        "false",
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|arg| arg.to_string()));
    let env = env.iter().map(|(name, value)| (name.to_string(), value.to_string())).collect();
    TestApp::spawn_with(Options { args, env, ..Options::default() }).await
}

/// Frames up to and including the first stored message from `sender`.
async fn until_sender(socket: &mut Ws, sender: Sender) -> Vec<ServerFrame> {
    let mut frames = Vec::new();
    loop {
        let frame = socket.frame().await;
        let done = matches!(&frame, ServerFrame::Message(message) if message.sender == sender);
        frames.push(frame);
        if done {
            return frames;
        }
    }
}

/// Reads until `words` deltas of the companion arrived, or its whole reply.
async fn until_words(socket: &mut Ws, words: usize) {
    let mut seen = 0;
    while seen < words {
        match socket.frame().await {
            ServerFrame::AiDelta { .. } => seen += 1,
            ServerFrame::Message(message) if message.sender == Sender::Ai => return,
            _ => {}
        }
    }
}

async fn chat(app: &TestApp) -> (CreatedSession, Ws) {
    let session = app.create_session().await;
    let mut client = app.connect(session.session_id, &session.client_token).await;
    assert_eq!(client.mode().await, ChatMode::BotOnly);
    (session, client)
}

/// The deltas of one reply, then its committed message.
/// A reply's id and text.
type Reply = (Uuid, String);

fn streamed(frames: &[ServerFrame]) -> (Vec<Reply>, Option<Reply>) {
    let deltas = frames
        .iter()
        .filter_map(|frame| match frame {
            ServerFrame::AiDelta { reply_id, delta } => Some((*reply_id, delta.clone())),
            _ => None,
        })
        .collect();
    let committed = frames.iter().find_map(|frame| match frame {
        ServerFrame::Message(message) if message.sender == Sender::Ai => {
            Some((message.reply_id.expect("an ai message carries its reply_id"), message.content.clone()))
        }
        _ => None,
    });
    (deltas, committed)
}

#[tokio::test]
async fn openai_replies_stream_as_deltas_then_one_committed_message() {
    let mock = MockLlm::start().await;
    let app = app_with(&mock, "openai", &[], &[("OPENAI_API_KEY", "sk-test-123")]).await;
    let (session, mut client) = chat(&app).await;
    client.send_message("hello").await;
    let frames = until_sender(&mut client, Sender::Ai).await;
    let (deltas, committed) = streamed(&frames);
    let (reply_id, text) = committed.unwrap();
    assert_eq!(deltas.len(), 3, "{frames:?}");
    assert!(deltas.iter().all(|(id, _)| *id == reply_id), "every delta names the reply");
    assert_eq!(deltas.iter().map(|(_, delta)| delta.as_str()).collect::<String>(), text);
    assert_eq!(text, "I hear you. What is on your mind?");

    let requests = mock.requests();
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    assert_eq!(request.path, "/v1/chat/completions");
    assert_eq!(request.headers["authorization"], "Bearer sk-test-123");
    assert_eq!(request.body["model"], "test-model");
    assert_eq!(request.body["stream"], true);
    let messages = request.body["messages"].as_array().unwrap();
    assert_eq!(messages[0]["role"], "system");
    assert!(messages[0]["content"].as_str().unwrap().contains("automated companion"));
    assert_eq!(messages.last().unwrap()["role"], "user");
    assert_eq!(messages.last().unwrap()["content"], "hello");

    let history = app.history(session.session_id, &session.client_token).await;
    assert_eq!(history.iter().map(|m| m.sender).collect::<Vec<_>>(), vec![Sender::User, Sender::Ai]);
    assert_eq!(history[1].id, reply_id, "the committed message is the streamed reply");
    assert!(!app.logs.text().contains("sk-test-123"), "the key is never logged");
}

#[tokio::test]
async fn gemini_replies_stream_with_the_key_in_its_header_and_the_prompt_in_its_body() {
    let mock = MockLlm::start().await;
    let app = app_with(&mock, "gemini", &[], &[("GEMINI_API_KEY", "g-key-456")]).await;
    let (session, mut client) = chat(&app).await;
    let hello = client.send_message("hello").await;
    client.ack(&hello).await;
    let frames = until_sender(&mut client, Sender::Ai).await;
    let (deltas, committed) = streamed(&frames);
    let (_, text) = committed.unwrap();
    assert_eq!(deltas.iter().map(|(_, delta)| delta.as_str()).collect::<String>(), text);

    // A second turn: the model sees the conversation so far.
    let again = client.send_message("I feel tired").await;
    client.ack(&again).await;
    until_sender(&mut client, Sender::Ai).await;

    let requests = mock.requests();
    assert_eq!(requests.len(), 2);
    let request = &requests[1];
    assert_eq!(request.path, "/v1beta/models/test-model:streamGenerateContent");
    assert_eq!(request.query.as_deref(), Some("alt=sse"));
    assert_eq!(request.headers["x-goog-api-key"], "g-key-456");
    let system = request.body["systemInstruction"]["parts"][0]["text"].as_str().unwrap();
    assert!(system.contains("automated companion") && system.contains("not a clinician"));
    let contents = request.body["contents"].as_array().unwrap();
    let turns: Vec<(&str, &str)> = contents
        .iter()
        .map(|content| (content["role"].as_str().unwrap(), content["parts"][0]["text"].as_str().unwrap()))
        .collect();
    assert_eq!(turns, vec![("user", "hello"), ("model", text.as_str()), ("user", "I feel tired")]);
    let history = app.history(session.session_id, &session.client_token).await;
    assert_eq!(history.len(), 4);
    assert!(!app.logs.text().contains("g-key-456"));
}

#[tokio::test]
async fn streams_split_at_any_byte_are_reassembled() {
    let mock = MockLlm::start().await;
    let chunks = vec!["Grüße, ".to_owned(), "🌍 naïve ".to_owned(), "café — ok".to_owned()];
    mock.script("", Script { chunks: chunks.clone(), byte_by_byte: true, ..Script::default() });
    for provider in ["openai", "gemini"] {
        let app = app_with(&mock, provider, &[], &[("HAVEN_AI_API_KEY", "k")]).await;
        let (_, mut client) = chat(&app).await;
        client.send_message("hello").await;
        let frames = until_sender(&mut client, Sender::Ai).await;
        let (deltas, committed) = streamed(&frames);
        assert_eq!(committed.unwrap().1, chunks.concat(), "{provider}");
        assert_eq!(deltas.iter().map(|(_, delta)| delta.as_str()).collect::<String>(), chunks.concat());
    }
}

#[tokio::test]
async fn messages_sent_while_a_reply_streams_are_answered_by_one_more_reply() {
    let mock = MockLlm::start().await;
    let slow = Script { chunk_delay: Duration::from_millis(150), ..Script::default() };
    mock.script("", slow);
    // At `debug`, where the companion says it is busy.
    let app = app_with(&mock, "openai", &[], &[("RUST_LOG", "info,haven=debug")]).await;
    let (session, mut client) = chat(&app).await;
    let first = client.send_message("first").await;
    client.ack(&first).await;
    mock.until("the first request", |mock| mock.requests().len() == 1).await;
    for text in ["second", "third"] {
        let id = client.send_message(text).await;
        client.ack(&id).await;
    }
    until_sender(&mut client, Sender::Ai).await;
    until_sender(&mut client, Sender::Ai).await;
    mock.until("both streams to end", |mock| mock.streams_open() == 0).await;

    let requests = mock.requests();
    assert_eq!(requests.len(), 2, "one reply, then one more for what came meanwhile");
    let newest = requests[1].body["messages"].as_array().unwrap().last().unwrap()["content"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(newest.contains("second") && newest.contains("third"), "{newest}");
    let history = app.history(session.session_id, &session.client_token).await;
    let senders: Vec<_> = history.iter().map(|m| m.sender).collect();
    assert_eq!(senders, vec![Sender::User, Sender::User, Sender::User, Sender::Ai, Sender::Ai]);
    assert!(!app.logs.matching(|event| message_of(event).starts_with("companion busy")).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_therapist_joining_mid_stream_silences_the_companion_in_200_sessions() {
    // 200 sessions in waves of 50, so the joins are not queued behind a
    // thousand other writes. Each reply streams 60 words over about 1.5 s.
    // Joins land at every stage of it, however fast the machine is: a third
    // at a moment in the first 2 s, a third after the client has seen a
    // given number of words, and a third as soon as the reply's message
    // reached the client (its commit a moment old).
    const SESSIONS: usize = 200;
    const WAVE: usize = 50;
    let mock = MockLlm::start().await;
    let words: Vec<String> = (0..60).map(|n| format!("word{n} ")).collect();
    mock.script("", Script { chunks: words, chunk_delay: Duration::from_millis(25), ..Script::default() });
    // One test machine is one IP address and one therapist: the limits are raised.
    let app = std::sync::Arc::new(
        app_with(
            &mock,
            "openai",
            &[
                "--sessions-per-ip-per-minute",
                "1000",
                "--max-sockets-per-ip",
                "1000",
                "--max-sockets-per-credential",
                "1000",
            ],
            &[],
        )
        .await,
    );
    let therapist = app.therapist("Tess").await;

    let mut answered = 0;
    for wave in 0..SESSIONS / WAVE {
        let mut sessions = tokio::task::JoinSet::new();
        for index in wave * WAVE..(wave + 1) * WAVE {
            let app = app.clone();
            let token = therapist.token.clone();
            sessions.spawn(async move {
                let (session, mut client) = chat(&app).await;
                let hello = client.send_message("hello").await;
                client.ack(&hello).await;
                match index % 3 {
                    0 => tokio::time::sleep(Duration::from_millis((index as u64 * 7919) % 2_000)).await,
                    1 => until_words(&mut client, index * 7 % 60).await,
                    _ => drop(until_sender(&mut client, Sender::Ai).await),
                }
                let mut desk = app.connect(session.session_id, &token).await;
                assert_eq!(desk.mode().await, ChatMode::TherapistJoined);
                let here = desk.send_message("I'm here now.").await;
                let (last, desk_frames) = desk.ack(&here).await;
                let mut client_frames = client.until_seq(last).await;
                client_frames.retain(|frame| !matches!(frame, ServerFrame::Ack { .. }));
                for (who, frames) in [("client", &client_frames), ("therapist", &desk_frames)] {
                    let join = frames.iter().position(
                        |frame| matches!(frame, ServerFrame::Message(m) if m.sender == Sender::System),
                    );
                    if let Some(join) = join {
                        let late = frames[join..].iter().find(|frame| {
                            matches!(frame, ServerFrame::AiDelta { .. })
                                || matches!(frame, ServerFrame::Message(m) if m.sender == Sender::Ai)
                        });
                        assert!(
                            late.is_none(),
                            "{who} got {late:?} after the join in session {}",
                            session.session_id
                        );
                    }
                }
                assert!(
                    client_frames
                        .iter()
                        .any(|frame| matches!(frame, ServerFrame::Message(m) if m.sender == Sender::System)),
                    "the client saw the join message"
                );
                let history = app.history(session.session_id, &session.client_token).await;
                let join_seq = history.iter().find(|m| m.sender == Sender::System).unwrap().seq;
                assert!(history.iter().all(|m| m.sender != Sender::Ai || m.seq < join_seq), "{history:?}");
                history.iter().any(|m| m.sender == Sender::Ai)
            });
        }
        while let Some(result) = sessions.join_next().await {
            answered += usize::from(result.expect("session task"));
        }
    }
    // Every provider request is over: finished, or closed by Haven at the join.
    mock.until("every provider stream to close", |mock| mock.streams_open() == 0).await;
    let (cut, requests) = (mock.streams_cut_by_client(), mock.requests().len());
    let counts = format!("{cut} streams cut, {answered} replies committed, {requests} requests");
    assert!(cut > 0, "no join landed mid-stream; the race was not exercised: {counts}");
    assert!(answered > 0, "no reply finished before its join; the race was not exercised: {counts}");
    assert!(requests <= SESSIONS, "at most one request per session, none after a join: {counts}");
}

#[tokio::test]
async fn provider_failures_tell_the_client_and_spare_other_sessions() {
    let mock = MockLlm::start().await;
    let fail = |failures: Vec<u16>| Script { failures, ..Script::default() };
    mock.script("#overloaded", fail(vec![500, 502, 503]));
    mock.script("#busy", fail(vec![429]));
    mock.script("#badkey", fail(vec![401, 401, 401]));
    mock.script("#garbled", Script { malformed: true, ..Script::default() });
    mock.script("#cut", Script { cut_after: Some(2), ..Script::default() });
    mock.script("#slow", Script { delay_before: Duration::from_secs(5), ..Script::default() });
    let app = app_with(&mock, "openai", &["--ai-timeout", "2"], &[("HAVEN_AI_API_KEY", "k")]).await;

    // The slow provider hangs one session while others go on.
    let (slow_session, mut slow) = chat(&app).await;
    slow.send_message("hello #slow").await;
    let (_, mut healthy) = chat(&app).await;
    healthy.send_message("hello").await;
    let frames = until_sender(&mut healthy, Sender::Ai).await;
    assert!(streamed(&frames).1.is_some(), "another session is answered meanwhile");
    let frames = until_sender(&mut slow, Sender::System).await;
    assert!(frames.iter().all(|frame| !matches!(frame, ServerFrame::Message(m) if m.sender == Sender::Ai)));
    let notice = slow_session_notice(&app, &slow_session).await;
    assert!(notice.starts_with(NOTICE), "{notice}");

    for (trigger, requests) in [("#overloaded", 3), ("#badkey", 1), ("#garbled", 1), ("#cut", 1)] {
        let before = mock.requests().len();
        let (session, mut client) = chat(&app).await;
        let text = format!("hello {trigger}");
        let id = client.send_message(&text).await;
        client.ack(&id).await;
        let frames = until_sender(&mut client, Sender::System).await;
        let (deltas, committed) = streamed(&frames);
        assert!(committed.is_none(), "{trigger}: no ai message");
        if let Some((reply_id, _)) = deltas.first() {
            assert!(
                frames.contains(&ServerFrame::AiCancelled { reply_id: *reply_id }),
                "{trigger}: partial text withdrawn"
            );
        }
        let history = app.history(session.session_id, &session.client_token).await;
        assert_eq!(history[0].content, text, "{trigger}: the user's message stays stored");
        assert!(history[1].content.starts_with(NOTICE), "{trigger}: {:?}", history[1]);
        assert_eq!(mock.requests().len() - before, requests, "{trigger}: attempts");
    }

    // A 429 is retried after a pause, and the reply then arrives.
    let (_, mut client) = chat(&app).await;
    client.send_message("hello #busy").await;
    let frames = until_sender(&mut client, Sender::Ai).await;
    assert!(streamed(&frames).1.is_some());

    let failures = app.logs.matching(|event| message_of(event) == "companion failed");
    assert!(failures.len() >= 5, "each failure is logged");
    assert!(failures.iter().all(|event| !event.to_string().contains("hello")), "without message content");
}

async fn slow_session_notice(app: &TestApp, session: &CreatedSession) -> String {
    let history = app.history(session.session_id, &session.client_token).await;
    history.iter().find(|m| m.sender == Sender::System).map(|m| m.content.clone()).unwrap_or_default()
}

#[tokio::test]
async fn the_api_key_never_shows_in_help() {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_haven"));
    let output =
        command.args(["serve", "--help"]).env("HAVEN_AI_API_KEY", "sekrit-key-789").output().await.unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(help.contains("--ai-api-key"), "{help}");
    assert!(!help.contains("sekrit-key-789"), "{help}");
}

#[tokio::test]
async fn a_provider_that_cannot_be_reached_is_retried_then_the_client_is_told() {
    // A port nothing listens on: every connection is refused.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base_url = format!("http://{}/v1", closed.local_addr().unwrap());
    drop(closed);
    let args = [
        "--ai-provider",
        "openai",
        "--ai-base-url",
        &base_url,
        "--ai-model",
        "test-model",
        "--ai-api-key",
        "k",
        "--ai-retries",
        "2",
        "--safety-second-opinion",
        "false",
    ];
    let app =
        TestApp::spawn_with(Options { args: args.map(String::from).to_vec(), ..Options::default() }).await;
    let (_, mut client) = chat(&app).await;
    client.send_message("hello").await;
    let frames = until_sender(&mut client, Sender::System).await;
    assert!(message_of_sender(&frames, Sender::System).starts_with(NOTICE), "{frames:?}");
    let retries = app.logs.matching(|line| line["message"] == "retrying the model");
    assert_eq!(retries.len(), 2, "{retries:?}");
    assert!(retries.iter().all(|line| line["error"] == "the provider could not be reached"), "{retries:?}");
}

fn message_of_sender(frames: &[ServerFrame], sender: Sender) -> String {
    frames
        .iter()
        .find_map(|frame| match frame {
            ServerFrame::Message(message) if message.sender == sender => Some(message.content.clone()),
            _ => None,
        })
        .unwrap_or_default()
}
