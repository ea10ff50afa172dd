//! Who sees what: the client chooses, before a therapist joins, whether
//! that therapist sees the conversation with the companion. Private until
//! they say yes; then the therapist gets those messages without their
//! text in every view, and the crisis flag with its level all the same.

use haven_protocol::api::{CreatedSession, LoginResponse, Transcript};
use haven_protocol::{ChatMessage, ChatMode, MessageKind, RiskLevel, Sender, ServerFrame};
use uuid::Uuid;

use crate::helpers::{TestApp, Ws};

/// The client says `content` and waits for the companion's answer.
async fn talk(app: &TestApp, session: &CreatedSession, content: &str) {
    let mut ws = app.connect(session.session_id, &session.client_token).await;
    let sent = ws.send_message(content).await;
    ws.ack(&sent).await;
    loop {
        if let ServerFrame::Message(message) = ws.frame().await
            && message.sender == Sender::Ai
        {
            break;
        }
    }
    ws.close().await;
}

/// The therapist joins with the whole history, as the chat page does;
/// returns the messages up to and including the join message.
async fn join(app: &TestApp, session: Uuid, token: &str) -> (Ws, Vec<ChatMessage>) {
    let headers = [("authorization", format!("Bearer {token}"))];
    let mut ws = app.connect_with(&format!("/api/chat/ws/{session}?since=0"), &headers).await;
    let mut history = Vec::new();
    loop {
        if let ServerFrame::Message(message) = ws.frame().await {
            let join = message.kind == MessageKind::Join;
            history.push(message);
            if join {
                return (ws, history);
            }
        }
    }
}

async fn transcript(app: &TestApp, session: Uuid, token: &str, format: &str) -> reqwest::Response {
    let url = app.url(&format!("/api/sessions/{session}/transcript?format={format}"));
    let response = app.http.get(url).bearer_auth(token).send().await.unwrap();
    assert_eq!(response.status(), 200);
    response
}

#[tokio::test]
async fn the_companion_part_is_private_everywhere_unless_the_client_shares_it() {
    let app = TestApp::spawn().await;
    let tess: LoginResponse = app.therapist("Tess").await;

    // Private by default: the client never answered.
    let private = app.create_session().await;
    let canary = format!("canary-{}", Uuid::now_v7().simple());
    talk(&app, &private, &format!("{canary} my week was long")).await;
    talk(&app, &private, &format!("{canary} i am going to kill myself tonight")).await;
    let row =
        app.appointments(&tess.token).await.into_iter().find(|row| row.session_id == private.session_id);
    let row = row.expect("listed");
    let preview = row.last_message.expect("a last message");
    assert!(preview.private && preview.text.is_none(), "the preview hides it: {preview:?}");
    assert!(row.risk_level >= RiskLevel::High, "the flag and its level are always visible");

    let (mut desk, history) = join(&app, private.session_id, &tess.token).await;
    let (before, join_message) = history.split_at(history.len() - 1);
    assert!(before.len() >= 4, "the client's, the companion's and the crisis messages: {before:?}");
    assert!(before.iter().all(|message| message.private && message.content.is_empty()), "{before:?}");
    assert!(!join_message[0].private && !join_message[0].content.is_empty());
    // What follows the join is the conversation with the therapist.
    let mut client = app.connect(private.session_id, &private.client_token).await;
    assert_eq!(client.mode().await, ChatMode::TherapistJoined);
    let after = client.send_message("now i talk to you").await;
    client.ack(&after).await;
    loop {
        if let ServerFrame::Message(message) = desk.frame().await
            && message.sender == Sender::User
        {
            assert_eq!(message.content, "now i talk to you");
            assert!(!message.private);
            break;
        }
    }
    let api = app.history(private.session_id, &tess.token).await;
    assert!(api.iter().filter(|message| message.seq < join_message[0].seq).all(|message| message.private));
    assert_eq!(api.iter().filter(|message| message.private).count(), before.len());
    assert!(api.iter().any(|message| message.content == "now i talk to you"));
    let json: Transcript =
        transcript(&app, private.session_id, &tess.token, "json").await.json().await.unwrap();
    assert_eq!(json.messages.iter().filter(|message| message.private).count(), before.len());
    let markdown = transcript(&app, private.session_id, &tess.token, "markdown").await.text().await.unwrap();
    let placeholder = format!("{} earlier messages with the companion are private", before.len());
    assert!(markdown.contains(&placeholder) && !markdown.contains(&canary), "{markdown}");
    // The client always reads their own chat whole.
    let own = app.history(private.session_id, &private.client_token).await;
    assert!(own.iter().all(|message| !message.private) && own.iter().any(|m| m.content.contains(&canary)));
    // Once a therapist has joined the choice is fixed.
    assert_eq!(app.share_companion_part(private.session_id, Some(&private.client_token), true).await, 409);

    // Shared: the therapist reads it. Every open tab of the client learns
    // each answer as it is given, and a new tab the answer as it stands.
    let shared = app.create_session().await;
    let mut tab = app.connect(shared.session_id, &shared.client_token).await;
    assert_eq!(tab.sharing().await, None, "not answered yet");
    assert_eq!(app.share_companion_part(shared.session_id, None, true).await, 401);
    assert_eq!(app.share_companion_part(shared.session_id, Some(&tess.token), true).await, 403);
    assert_eq!(app.share_companion_part(shared.session_id, Some(&private.client_token), true).await, 403);
    assert_eq!(app.share_companion_part(shared.session_id, Some(&shared.client_token), false).await, 204);
    assert_eq!(tab.sharing().await, Some(false));
    assert_eq!(app.share_companion_part(shared.session_id, Some(&shared.client_token), true).await, 204);
    assert_eq!(tab.sharing().await, Some(true));
    let mut new_tab = app.connect(shared.session_id, &shared.client_token).await;
    assert_eq!(new_tab.sharing().await, Some(true));
    let output = app.cli(&["audit", "list", "--session", &shared.session_id.to_string()], "").await;
    let trail = String::from_utf8(output.stdout).unwrap();
    let answers: Vec<&str> = trail.lines().filter(|line| line.contains("\tsharing\t")).collect();
    assert_eq!(answers.len(), 2, "each answer is recorded, the refused ones are not: {trail}");
    assert!(answers[0].contains("\tclient\t") && answers[0].ends_with("\tprivate"), "{trail}");
    assert!(answers[1].ends_with("\tshared"), "{trail}");
    talk(&app, &shared, "you may read this").await;
    let row = app.appointments(&tess.token).await.into_iter().find(|row| row.session_id == shared.session_id);
    let preview = row.expect("listed").last_message.expect("a last message");
    assert!(!preview.private, "{preview:?}");
    let (_desk, history) = join(&app, shared.session_id, &tess.token).await;
    assert!(history.iter().all(|message| !message.private));
    assert!(history.iter().any(|message| message.content == "you may read this"));
}
