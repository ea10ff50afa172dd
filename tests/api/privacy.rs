//! Private by default: no content, token or password in logs or at rest.

use haven_protocol::ChatMode;

use crate::helpers::{Options, PASSWORD, TestApp, message_of};

#[tokio::test]
async fn logs_carry_every_product_step_but_no_content_tokens_or_passwords() {
    // `trace` and `debug` too: the transport crates log frames there.
    for level in ["info", "debug", "trace"] {
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
    let mut refused =
        app.connect_with(&format!("/api/chat/ws/{}?role=therapist", session.session_id), &[]).await;
    refused.closed().await;
    app.logs.wait_for(1, |event| message_of(event) == "companion will not respond").await;
    app.logs.wait_for(1, |event| message_of(event) == "connection rejected").await;

    let logs = app.logs.text().to_lowercase();
    for needle in
        [secret, "another-private-line-9c2e", PASSWORD, &session.client_token, &therapist.token, &setup_token]
    {
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
        "message received",
        "generating companion reply",
        "therapist connecting: mode set to THERAPIST_JOINED",
        "join message sent",
        "companion will not respond",
        "connection rejected",
    ] {
        assert!(!app.logs.matching(|event| message_of(event) == step).is_empty(), "no {step:?} event");
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

    // Everything the database holds, as bytes: the SQLite files, or every
    // row of every table on PostgreSQL.
    let mut stored = Vec::new();
    if crate::helpers::on_postgres() {
        use sqlx::Connection;
        let mut connection = sqlx::PgConnection::connect(&app.database_url).await.unwrap();
        for table in
            ["therapists", "therapist_auth_sessions", "chat_sessions", "client_credentials", "messages"]
        {
            let rows: Vec<String> =
                sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT t::text FROM {table} t")))
                    .fetch_all(&mut connection)
                    .await
                    .unwrap();
            stored.extend(rows.concat().into_bytes());
        }
    } else {
        for suffix in ["", "-wal"] {
            let path = format!("{}{suffix}", app.database_path().display());
            stored.extend(std::fs::read(path).unwrap_or_default());
        }
    }
    assert!(!stored.is_empty());
    let contains = |needle: &str| stored.windows(needle.len()).any(|window| window == needle.as_bytes());
    assert!(!contains(&session.client_token), "client token stored in clear");
    assert!(!contains(&therapist.token), "therapist token stored in clear");
    assert!(!contains(PASSWORD), "password stored in clear");
    assert!(contains("$argon2id$"), "the password hash is argon2id");
}
