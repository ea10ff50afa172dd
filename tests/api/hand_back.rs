//! The hand-back: a therapist ends their part without closing the chat,
//! and the companion answers again only after the client's yes.

use haven_protocol::{ChatMode, ErrorCode, MessageKind, Sender, ServerFrame};
use serde_json::json;
use uuid::Uuid;

use haven_protocol::api::{AppointmentStatus, LoginResponse};

use crate::helpers::{Options, PASSWORD, TestApp, Ws, error_body, from_companion, messages};

/// Posts a hand-back for `session` as the therapist with `token`.
pub async fn hand_back(
    app: &TestApp,
    session: Uuid,
    token: &str,
    body: serde_json::Value,
) -> reqwest::Response {
    app.http
        .post(app.url(&format!("/api/sessions/{session}/hand-back")))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// Frames until the `mode` frame that follows a message of `kind`, which
/// must come first; returns the frames before that message and the mode.
pub async fn until_mode_after(ws: &mut Ws, kind: MessageKind) -> (Vec<ServerFrame>, ServerFrame) {
    let mut frames = Vec::new();
    loop {
        let frame = ws.frame().await;
        let found = matches!(&frame, ServerFrame::Message(message) if message.kind == kind);
        frames.push(frame);
        if found {
            let mode = ws.frame().await;
            assert!(matches!(mode, ServerFrame::Mode { .. }), "a mode frame follows the {kind:?} message");
            return (frames, mode);
        }
    }
}

/// The caller's appointment row of `session`: its status, mode and pause.
async fn appointment(app: &TestApp, token: &str, session: Uuid) -> (AppointmentStatus, ChatMode, bool) {
    let list = app.appointments(token).await;
    let row = list.into_iter().find(|row| row.session_id == session).expect("listed");
    (row.status, row.chat_mode, row.companion_paused)
}

/// The next error frame's code, passing over messages (such as the join
/// message a new therapist socket gets first).
async fn error_code(ws: &mut Ws) -> ErrorCode {
    loop {
        match ws.frame().await {
            ServerFrame::Error { code, .. } => return code,
            ServerFrame::Message(_) | ServerFrame::Mode { .. } => {}
            other => panic!("expected an error frame, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_hand_back_returns_the_chat_to_the_companion_only_after_the_clients_yes() {
    let app = TestApp::spawn().await;
    app.add_therapist("tess@clinic.test", "Dr Tess Example").await;
    let tess: LoginResponse = app.login("tess@clinic.test", PASSWORD).await.json().await.unwrap();
    let session = app.create_session().await;
    let mut client = app.connect(session.session_id, &session.client_token).await;
    assert_eq!(client.mode().await, ChatMode::BotOnly);
    let hello = client.send_message("hello").await;
    client.ack(&hello).await;
    assert_eq!(client.message().await.sender, Sender::User);
    assert_eq!(client.message().await.sender, Sender::Ai);

    // Nobody joined yet: the chat is nobody's to hand back.
    let early = hand_back(&app, session.session_id, &tess.token, json!({})).await;
    assert_eq!(error_body(early, 403).await["error"], "forbidden");

    let mut therapist = app.connect(session.session_id, &tess.token).await;
    assert_eq!(therapist.mode().await, ChatMode::TherapistJoined);
    let (_, mode) = until_mode_after(&mut client, MessageKind::Join).await;
    assert_eq!(mode, ServerFrame::Mode { chat_mode: ChatMode::TherapistJoined, companion_paused: false });

    let too_long = hand_back(&app, session.session_id, &tess.token, json!({"note": "x".repeat(4001)})).await;
    assert_eq!(error_body(too_long, 400).await["error"], "note_too_long");
    let note = "I'm handing you back to the companion for tonight. Take care.";
    let handed =
        hand_back(&app, session.session_id, &tess.token, json!({"note": format!("  {note}\n")})).await;
    assert_eq!(handed.status(), 204);

    // Every side: the note, the hand-back message, then the paused mode.
    let (frames, mode) = until_mode_after(&mut client, MessageKind::Handback).await;
    let written: Vec<_> = messages(&frames).iter().map(|m| (m.sender, m.kind, m.content.clone())).collect();
    let [(Sender::Therapist, MessageKind::Chat, said), (Sender::System, MessageKind::Handback, handback)] =
        written.as_slice()
    else {
        panic!("expected the note and the hand-back message, got {written:?}")
    };
    assert_eq!(said, note);
    assert!(handback.starts_with("Dr Tess Example has ended their part"), "{handback}");
    assert_eq!(mode, ServerFrame::Mode { chat_mode: ChatMode::BotOnly, companion_paused: true });
    // The therapist's socket hears it too, and then leaves the chat.
    until_mode_after(&mut therapist, MessageKind::Handback).await;
    assert_eq!(therapist.closed().await, (1000, "handed back".to_owned()));
    let twice = hand_back(&app, session.session_id, &tess.token, json!({})).await;
    assert_eq!(error_body(twice, 409).await["error"], "conflict");
    // It stays on the therapist's list, as theirs, handed back.
    let row = appointment(&app, &tess.token, session.session_id).await;
    assert_eq!(row, (AppointmentStatus::Assigned, ChatMode::BotOnly, true));

    // Paused: the client's message is stored; the companion says nothing
    // until the yes, and then answers it.
    let waiting = client.send_message("are you still there?").await;
    let (waiting_seq, before) = client.ack(&waiting).await;
    assert!(!from_companion(&before));
    client.send_json(json!({"type": "resume_companion"})).await;
    let (frames, mode) = until_mode_after(&mut client, MessageKind::Resume).await;
    assert!(!from_companion(&frames), "nothing from the companion before the yes: {frames:?}");
    assert_eq!(messages(&frames).first().map(|m| m.seq), Some(waiting_seq));
    assert_eq!(mode, ServerFrame::Mode { chat_mode: ChatMode::BotOnly, companion_paused: false });
    let answer = client.message().await;
    assert_eq!((answer.sender, answer.seq), (Sender::Ai, waiting_seq + 2));
    client.send_json(json!({"type": "resume_companion"})).await;
    assert_eq!(error_code(&mut client).await, ErrorCode::NotPaused);
    let row = appointment(&app, &tess.token, session.session_id).await;
    assert_eq!(row, (AppointmentStatus::Assigned, ChatMode::BotOnly, false));

    // Joining again is a new takeover with its own message; a therapist
    // cannot answer for the client.
    let mut again = app.connect(session.session_id, &tess.token).await;
    assert_eq!(again.mode().await, ChatMode::TherapistJoined);
    let (_, mode) = until_mode_after(&mut client, MessageKind::Join).await;
    assert_eq!(mode, ServerFrame::Mode { chat_mode: ChatMode::TherapistJoined, companion_paused: false });
    again.send_json(json!({"type": "resume_companion"})).await;
    assert_eq!(error_code(&mut again).await, ErrorCode::NotAllowed);

    // The history tells the whole story, by kind.
    let kinds: Vec<_> = app.history(session.session_id, &tess.token).await.iter().map(|m| m.kind).collect();
    use MessageKind::{Chat, Handback, Join, Resume};
    assert_eq!(kinds, [Chat, Chat, Join, Chat, Handback, Chat, Resume, Chat, Join]);
}

#[tokio::test]
async fn a_client_who_reconnects_while_paused_is_told_so_and_a_therapist_replay_does_not_leave() {
    let app = TestApp::spawn().await;
    let tess = app.therapist("Tess").await;
    let session = app.create_session().await;
    let mut therapist = app.connect(session.session_id, &tess.token).await;
    therapist.mode().await;
    let handed = hand_back(&app, session.session_id, &tess.token, json!({})).await;
    assert_eq!(handed.status(), 204);
    assert_eq!(therapist.closed_eventually().await, (1000, "handed back".to_owned()));

    // A new tab learns the pause from its first frame.
    let mut tab = app.connect(session.session_id, &session.client_token).await;
    assert_eq!(tab.frame().await, ServerFrame::Mode { chat_mode: ChatMode::BotOnly, companion_paused: true });

    // The therapist comes back with `since` 0: the replay passes the old
    // hand-back, and the socket stays, joined.
    let path = format!("/api/chat/ws/{}?since=0", session.session_id);
    let mut back = app.connect_with(&path, &[("authorization", format!("Bearer {}", tess.token))]).await;
    assert_eq!(back.mode().await, ChatMode::TherapistJoined);
    let replayed = back.until_seq(3).await;
    let kinds: Vec<_> = messages(&replayed).iter().map(|m| m.kind).collect();
    assert_eq!(kinds, [MessageKind::Join, MessageKind::Handback, MessageKind::Join]);
    let said = back.send_message("I'm back").await;
    back.ack(&said).await;
    let (_, mode) = until_mode_after(&mut tab, MessageKind::Join).await;
    assert_eq!(mode, ServerFrame::Mode { chat_mode: ChatMode::TherapistJoined, companion_paused: false });
    assert_eq!(tab.message().await.content, "I'm back");
}

/// A client, a therapist who joined and left, on a server with this away time.
async fn therapist_joined_and_left(away_seconds: &str) -> (TestApp, Ws, LoginResponse, Uuid) {
    let options =
        Options { args: vec!["--therapist-away-seconds".into(), away_seconds.into()], ..Options::default() };
    let app = TestApp::spawn_with(options).await;
    let tess = app.therapist("Tess").await;
    let session = app.create_session().await;
    let mut client = app.connect(session.session_id, &session.client_token).await;
    // The client's socket is open and told nobody is here before the
    // therapist connects (else it may open after the join, and see neither).
    assert_eq!(client.mode().await, ChatMode::BotOnly);
    assert!(!client.presence().await.1, "no therapist at first");
    let mut therapist = app.connect(session.session_id, &tess.token).await;
    until_mode_after(&mut client, MessageKind::Join).await;
    assert!(client.presence().await.1, "then the therapist");
    // While the therapist is here, the client cannot take the chat back.
    client.send_json(json!({"type": "resume_companion"})).await;
    assert_eq!(error_code(&mut client).await, ErrorCode::TherapistHere);
    therapist.frame().await;
    therapist.close().await;
    assert_eq!(client.presence().await, (Sender::Therapist, false, None));
    (app, client, tess, session.session_id)
}

#[tokio::test]
async fn a_client_whose_therapist_stays_away_may_continue_with_the_companion() {
    // Away for less than the away time (2 min by default): refused.
    let (_app, mut client, _, _) = therapist_joined_and_left("120").await;
    client.send_json(json!({"type": "resume_companion"})).await;
    assert_eq!(error_code(&mut client).await, ErrorCode::TherapistHere);

    // Away for the away time (here none): handed back on the therapist's
    // behalf, and resumed; the companion answers again.
    let (app, mut client, tess, session_id) = therapist_joined_and_left("0").await;
    client.send_json(json!({"type": "resume_companion"})).await;
    let (frames, paused) = until_mode_after(&mut client, MessageKind::Handback).await;
    let handback = messages(&frames).last().map(|m| m.content.clone()).unwrap();
    assert_eq!(handback, haven_protocol::AWAY_HAND_BACK_MESSAGE);
    assert_eq!(paused, ServerFrame::Mode { chat_mode: ChatMode::BotOnly, companion_paused: true });
    let (_, mode) = until_mode_after(&mut client, MessageKind::Resume).await;
    assert_eq!(mode, ServerFrame::Mode { chat_mode: ChatMode::BotOnly, companion_paused: false });
    let hello = client.send_message("hello again").await;
    client.ack(&hello).await;
    assert_eq!(client.message().await.sender, Sender::User);
    assert_eq!(client.message().await.sender, Sender::Ai, "the companion answers again");
    // The chat stays the therapist's, who can join again.
    let row = appointment(&app, &tess.token, session_id).await;
    assert_eq!(row, (AppointmentStatus::Assigned, ChatMode::BotOnly, false));
}
