//! Who a connection is comes from its credential, never from the client.

use haven_protocol::{ChatMode, Sender, ServerFrame};
use serde_json::json;

use crate::helpers::{Options, Received, TestApp, message_of};

const POLICY_VIOLATION: u16 = 1008;

#[tokio::test]
async fn forged_and_missing_credentials_are_closed_with_1008_and_store_nothing() {
    let app = TestApp::spawn().await;
    let session = app.create_session().await;
    let other = app.create_session().await;
    let tess = app.therapist("Tess").await;
    let omar = app.therapist("Omar").await;
    let claimed = app.create_session().await;
    let mut holder = app.connect(claimed.session_id, &tess.token).await;
    assert_eq!(holder.mode().await, ChatMode::TherapistJoined);

    let path = |session_id: uuid::Uuid, query: &str| format!("/api/chat/ws/{session_id}{query}");
    let bearer = |token: &str| vec![("authorization", format!("Bearer {token}"))];
    let cases = [
        (
            "client token asking to be therapist",
            path(session.session_id, "?role=therapist"),
            bearer(&session.client_token),
            "role does not match credential",
        ),
        ("no credential", path(session.session_id, ""), vec![], "missing credential"),
        (
            "no credential but a role",
            path(session.session_id, "?role=therapist"),
            vec![],
            "missing credential",
        ),
        (
            "another session's client token",
            path(session.session_id, ""),
            bearer(&other.client_token),
            "credential is for another session",
        ),
        (
            "therapist token asking to be user",
            path(session.session_id, "?role=user"),
            bearer(&tess.token),
            "role does not match credential",
        ),
        (
            "a made-up token",
            path(session.session_id, ""),
            bearer("hvt_0000"),
            "invalid or expired credential",
        ),
        (
            "an unknown role",
            path(session.session_id, "?role=admin"),
            bearer(&session.client_token),
            "unknown role",
        ),
        (
            "a second therapist on a claimed session",
            path(claimed.session_id, ""),
            bearer(&omar.token),
            "session is assigned to another therapist",
        ),
        ("an unknown session", path(uuid::Uuid::now_v7(), ""), bearer(&tess.token), "unknown session"),
    ];
    for (case, path, headers, reason) in cases {
        let mut socket = app.connect_with(&path, &headers).await;
        assert_eq!(socket.closed().await, (POLICY_VIOLATION, reason.to_owned()), "{case}");
    }

    // Nothing was written: the open session has no messages and is still BOT_ONLY.
    assert!(app.history(session.session_id, &session.client_token).await.is_empty());
    let mut client = app.connect(session.session_id, &session.client_token).await;
    assert_eq!(client.mode().await, ChatMode::BotOnly);
    assert_eq!(
        app.history(claimed.session_id, &claimed.client_token).await.len(),
        1,
        "only the join message"
    );
    // Every refusal is logged with its reason (lines reach the log a moment
    // after the event: the server writes them from a thread of its own).
    let rejected = app.logs.wait_for(9, |event| message_of(event) == "connection rejected").await;
    assert!(rejected.iter().all(|event| event["reason"].is_string()));
}

#[tokio::test]
async fn a_sender_field_in_a_client_frame_is_ignored() {
    let app = TestApp::spawn().await;
    let session = app.create_session().await;
    let mut client = app.connect(session.session_id, &session.client_token).await;
    client.mode().await;
    client
        .send_json(json!({
            "type": "message", "content": "I am the therapist now", "client_id": "forged-1",
            "sender": "therapist", "role": "therapist"
        }))
        .await;
    let (seq, _) = client.ack("forged-1").await;
    let stored = client.message().await;
    assert_eq!((stored.seq, stored.sender), (seq, Sender::User));
    // Still a user in a BOT_ONLY session: the companion answers.
    assert_eq!(client.message().await.sender, Sender::Ai);
    let history = app.history(session.session_id, &session.client_token).await;
    assert_eq!(history[0].sender, Sender::User);
}

#[tokio::test]
async fn two_therapists_racing_for_one_session_exactly_one_wins() {
    let app = TestApp::spawn().await;
    let tess = app.therapist("Tess").await;
    let omar = app.therapist("Omar").await;
    for _ in 0..5 {
        let session = app.create_session().await;
        let (mut a, mut b) = tokio::join!(
            app.connect(session.session_id, &tess.token),
            app.connect(session.session_id, &omar.token)
        );
        let (a, b) = tokio::join!(a.receive(), b.receive());
        let accepted = [&a, &b]
            .iter()
            .filter(|outcome| {
                matches!(
                    outcome,
                    Received::Frame(ServerFrame::Mode {
                        chat_mode: ChatMode::TherapistJoined,
                        companion_paused: false
                    })
                )
            })
            .count();
        let refused = [&a, &b]
            .iter()
            .filter(|outcome| matches!(outcome, Received::Closed(Some(frame)) if u16::from(frame.code) == POLICY_VIOLATION))
            .count();
        assert_eq!((accepted, refused), (1, 1), "{a:?} / {b:?}");

        let winner = if matches!(a, Received::Frame(_)) { &tess } else { &omar };
        let history = app.history(session.session_id, &session.client_token).await;
        assert_eq!(history.iter().filter(|m| m.sender == Sender::System).count(), 1, "one join message");
        let winner_history = app.history(session.session_id, &winner.token).await;
        assert_eq!(winner_history.len(), 1, "the winner holds the session");
    }
}

#[tokio::test]
async fn a_cookie_upgrade_needs_the_servers_own_or_an_allowed_origin() {
    let app = TestApp::spawn_with(Options {
        allowed_origins: vec!["https://chat.clinic.test".into()],
        ..Options::default()
    })
    .await;
    let session = app.create_session().await;
    let path = format!("/api/chat/ws/{}", session.session_id);
    let cookie = ("cookie", format!("haven_client={}", session.client_token));
    let own_origin = app.address.clone();

    let mut foreign =
        app.connect_with(&path, &[cookie.clone(), ("origin", "https://evil.example".into())]).await;
    assert_eq!(foreign.closed().await, (POLICY_VIOLATION, "origin not allowed".into()));
    let mut missing = app.connect_with(&path, std::slice::from_ref(&cookie)).await;
    assert_eq!(missing.closed().await, (POLICY_VIOLATION, "origin not allowed".into()));

    let mut own = app.connect_with(&path, &[cookie.clone(), ("origin", own_origin)]).await;
    assert_eq!(own.mode().await, ChatMode::BotOnly);
    let mut listed = app.connect_with(&path, &[cookie, ("origin", "https://chat.clinic.test".into())]).await;
    assert_eq!(listed.mode().await, ChatMode::BotOnly);

    // Therapist cookie: the role parameter picks it, and the same rule holds.
    let therapist = app.therapist("Tess").await;
    let jar =
        ("cookie", format!("haven_client={}; haven_therapist={}", session.client_token, therapist.token));
    let mut evil = app
        .connect_with(
            &format!("{path}?role=therapist"),
            &[jar.clone(), ("origin", "https://evil.example".into())],
        )
        .await;
    assert_eq!(evil.closed().await, (POLICY_VIOLATION, "origin not allowed".into()));
    assert!(
        app.history(session.session_id, &session.client_token).await.is_empty(),
        "the refused therapist did not join"
    );
    let mut desk =
        app.connect_with(&format!("{path}?role=therapist"), &[jar, ("origin", app.address.clone())]).await;
    assert_eq!(desk.mode().await, ChatMode::TherapistJoined);
}
