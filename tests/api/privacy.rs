//! Private by default: no content, token or password in logs or at rest.

use haven_protocol::ChatMode;

use crate::helpers::{Options, PASSWORD, TestApp, message_of};

#[tokio::test]
async fn logs_carry_every_product_step_but_no_content_tokens_or_passwords() {
    // `trace` and `debug` too: the transport crates log frames there. And
    // a filter by target, which once lost every event's span.
    for level in ["info", "info,haven=debug", "debug", "trace"] {
        logs_are_private_at(level).await;
    }
}

async fn logs_are_private_at(level: &str) {
    let options = Options { env: vec![("RUST_LOG".to_owned(), level.to_owned())], ..Options::default() };
    let app = TestApp::spawn_with(options).await;
    let setup_token = app.setup_url.clone().unwrap().rsplit('/').next().unwrap().to_owned();
    let session = app.create_session().await;
    let mut client = app.connect(session.session_id, &session.client_token).await;
    client.mode().await;
    let secret = "my-secret-diary-entry-7f3a";
    let id = client.send_message(secret).await;
    client.ack(&id).await;
    client.until_seq(2).await;

    let therapist = app.therapist("Tess").await;
    let mut desk = app.connect(session.session_id, &therapist.token).await;
    assert_eq!(desk.mode().await, ChatMode::TherapistJoined);
    let later = client.send_message("another-private-line-9c2e").await;
    client.ack(&later).await;
    // A therapist's read (audited), a client's choice and an erasure.
    app.history(session.session_id, &therapist.token).await;
    let erased = app.create_session().await;
    let mut gone = app.connect(erased.session_id, &erased.client_token).await;
    gone.mode().await;
    let erased_secret = "erase-me-secret-41d0";
    let sent = gone.send_message(erased_secret).await;
    gone.ack(&sent).await;
    assert_eq!(app.share_companion_part(erased.session_id, Some(&erased.client_token), true).await, 204);
    let url = app.url(&format!("/api/sessions/{}", erased.session_id));
    let response = app.http.delete(url).bearer_auth(&erased.client_token).send().await.unwrap();
    assert_eq!(response.status(), 204);
    let mut refused =
        app.connect_with(&format!("/api/chat/ws/{}?role=therapist", session.session_id), &[]).await;
    refused.closed().await;
    // Each message's own steps are logged at `debug`; `info` keeps what an
    // operator follows.
    let per_message =
        ["message received", "message stored", "generating companion reply", "companion will not respond"];
    if level != "info" {
        app.logs.wait_for(1, |event| message_of(event) == "companion will not respond").await;
    }
    app.logs.wait_for(1, |event| message_of(event) == "connection rejected").await;

    let logs = app.logs.text().to_lowercase();
    for needle in [
        secret,
        "another-private-line-9c2e",
        erased_secret,
        PASSWORD,
        &session.client_token,
        &erased.client_token,
        &therapist.token,
        &setup_token,
    ] {
        // As written, and as a transport's dump would show its bytes: in
        // hex, and as a byte slice's `Debug`.
        let hex: String = needle.bytes().map(|byte| format!("{byte:02x}")).collect();
        let decimal: Vec<String> = needle.bytes().map(|byte| byte.to_string()).collect();
        for form in [needle.to_lowercase(), hex, decimal.join(", ")] {
            assert!(!logs.contains(&form), "at {level}, the logs contain {needle:?} as {form:?}");
        }
    }
    for step in [
        "connected",
        "therapist connecting: mode set to THERAPIST_JOINED",
        "join message sent",
        "connection rejected",
        "companion part sharing chosen",
        "chat erased by its client",
    ] {
        assert!(
            !app.logs.matching(|event| message_of(event) == step).is_empty(),
            "at {level}, no {step:?} event"
        );
    }
    for step in per_message {
        let logged = app.logs.matching(|event| message_of(event) == step);
        assert_eq!(logged.is_empty(), level == "info", "at {level}, {step:?} events: {logged:?}");
    }
    let connected = app.logs.matching(|event| message_of(event) == "connected");
    assert!(connected.iter().all(|event| event["connections"].is_u64() && event["span"]["role"].is_string()));
}

#[tokio::test]
async fn tokens_and_passwords_are_stored_only_as_hashes() {
    let app = TestApp::spawn().await;
    let session = app.create_session().await;
    let therapist = app.therapist("Tess").await;
    let mut client = app.connect(session.session_id, &session.client_token).await;
    client.mode().await;

    let tables = ["therapists", "therapist_auth_sessions", "chat_sessions", "client_credentials", "messages"];
    let stored = app.stored_bytes(&tables).await;
    assert!(!stored.is_empty());
    let contains = |needle: &str| stored.windows(needle.len()).any(|window| window == needle.as_bytes());
    assert!(!contains(&session.client_token), "client token stored in clear");
    assert!(!contains(&therapist.token), "therapist token stored in clear");
    assert!(!contains(PASSWORD), "password stored in clear");
    assert!(contains("$argon2id$"), "the password hash is argon2id");
}
