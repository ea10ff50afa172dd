//! Erasure by the client, and retention: what is deleted is gone from the
//! database, not hidden, and each deletion is in the audit trail.

use haven_protocol::api::{CreatedSession, LoginResponse};
use haven_protocol::{ChatMode, ServerFrame};
use uuid::Uuid;

use crate::helpers::{TestApp, message_of, on_postgres};

/// Everything the database holds of chats, as bytes.
async fn stored_bytes(app: &TestApp) -> Vec<u8> {
    let tables = [
        "chat_sessions",
        "client_credentials",
        "messages",
        "safety_audit",
        "therapist_reads",
        "client_labels",
        "audit_trail",
    ];
    app.stored_bytes(&tables).await
}

fn holds(stored: &[u8], needle: &str) -> bool {
    stored.windows(needle.len()).any(|window| window == needle.as_bytes())
}

async fn erase(app: &TestApp, session: Uuid, token: Option<&str>) -> reqwest::Response {
    let request = app.http.delete(app.url(&format!("/api/sessions/{session}")));
    let request = match token {
        Some(token) => request.bearer_auth(token),
        None => request,
    };
    request.send().await.unwrap()
}

/// Sends `content` as the client and waits for its ack.
async fn say(app: &TestApp, session: &CreatedSession, content: &str) {
    let mut ws = app.connect(session.session_id, &session.client_token).await;
    let sent = ws.send_message(content).await;
    ws.ack(&sent).await;
    ws.close().await;
}

#[tokio::test]
async fn a_client_erases_their_chat_and_nothing_of_it_is_left() {
    let app = TestApp::spawn().await;
    let tess: LoginResponse = app.therapist("Tess").await;
    let session = app.create_session().await;
    let canary = format!("canary-{}", Uuid::now_v7().simple());
    say(&app, &session, &format!("{canary} is what i call it")).await;
    // A flagged message: its flag records go too.
    say(&app, &session, &format!("{canary} i am going to kill myself tonight")).await;
    let mut other_tab = app.connect(session.session_id, &session.client_token).await;
    assert_eq!(other_tab.mode().await, ChatMode::BotOnly);
    let listed = |list: Vec<haven_protocol::api::Appointment>| {
        list.iter().any(|appointment| appointment.session_id == session.session_id)
    };
    assert!(listed(app.appointments(&tess.token).await));
    assert!(holds(&stored_bytes(&app).await, &canary), "the canary is stored before the erasure");

    // Only the chat's own client may erase it.
    assert_eq!(erase(&app, session.session_id, None).await.status(), 401);
    assert_eq!(erase(&app, session.session_id, Some(&tess.token)).await.status(), 403);
    let someone_else = app.create_session().await;
    let response = erase(&app, session.session_id, Some(&someone_else.client_token)).await;
    assert_eq!(response.status(), 403);

    let response = erase(&app, session.session_id, Some(&session.client_token)).await;
    assert_eq!(response.status(), 204);
    let (code, reason) = other_tab.closed_eventually().await;
    assert_eq!((code, reason.as_str()), (1008, "chat erased"), "every open tab is closed");
    assert!(!listed(app.appointments(&tess.token).await), "gone from the dashboard");
    let url = app.url(&format!("/api/sessions/{}/messages", session.session_id));
    let read = app.http.get(url).bearer_auth(&session.client_token).send().await.unwrap();
    assert_eq!(read.status(), 401, "the credential is gone too");
    assert_eq!(erase(&app, session.session_id, Some(&session.client_token)).await.status(), 401);

    // Deleted, not hidden: not a byte of it is left in the files.
    let stored = stored_bytes(&app).await;
    assert!(!holds(&stored, &canary), "the erased text is still in the database");
    assert!(!holds(&stored, &session.session_id.simple().to_string()));

    // The trail keeps that it happened, without the words.
    let output = app.cli(&["audit", "list", "--session", &session.session_id.to_string()], "").await;
    let trail = String::from_utf8(output.stdout).unwrap();
    let erased: Vec<&str> = trail.lines().filter(|line| line.contains("\terase\t")).collect();
    assert_eq!(erased.len(), 1, "{trail}");
    assert!(erased[0].contains("\tclient\t") && erased[0].contains("\t-\tok\t"), "{trail}");
    assert!(!trail.contains(&canary));
    let logged = app.logs.matching(|event| message_of(event) == "chat erased by its client");
    assert_eq!(logged.len(), 1);
}

#[tokio::test]
async fn a_chat_a_therapist_joined_cannot_be_erased_and_says_whom_to_ask() {
    let app = TestApp::spawn().await;
    let tess: LoginResponse = app.therapist("Tess").await;
    let session = app.create_session().await;
    say(&app, &session, "hello").await;
    let mut therapist = app.connect(session.session_id, &tess.token).await;
    while !matches!(therapist.frame().await, ServerFrame::Mode { chat_mode: ChatMode::TherapistJoined, .. }) {
    }

    let before = app.history(session.session_id, &session.client_token).await;
    let response = erase(&app, session.session_id, Some(&session.client_token)).await;
    assert_eq!(response.status(), 409);
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(body["message"].as_str().unwrap().contains("ask the clinic"), "{body}");
    assert_eq!(app.history(session.session_id, &session.client_token).await, before, "nothing deleted");
}

/// Moves a chat's creation and last activity `days` back.
async fn age(app: &TestApp, session: Uuid, days: i64) {
    use sqlx::Connection;
    let then = time::OffsetDateTime::now_utc() - time::Duration::days(days);
    let sql = "UPDATE chat_sessions SET created_at = $1, last_message_at = $1 WHERE id = $2";
    if on_postgres() {
        let mut db = sqlx::PgConnection::connect(&app.database_url).await.unwrap();
        sqlx::query(sql).bind(then).bind(session).execute(&mut db).await.unwrap();
    } else {
        let mut db = sqlx::SqliteConnection::connect(&app.database_url).await.unwrap();
        sqlx::query(sql).bind(then).bind(session).execute(&mut db).await.unwrap();
    }
}

/// How many chats and messages the database holds.
async fn rows(app: &TestApp) -> (i64, i64) {
    use sqlx::Connection;
    let sql = "SELECT (SELECT COUNT(*) FROM chat_sessions), (SELECT COUNT(*) FROM messages)";
    if on_postgres() {
        let mut db = sqlx::PgConnection::connect(&app.database_url).await.unwrap();
        sqlx::query_as(sql).fetch_one(&mut db).await.unwrap()
    } else {
        let mut db = sqlx::SqliteConnection::connect(&app.database_url).await.unwrap();
        sqlx::query_as(sql).fetch_one(&mut db).await.unwrap()
    }
}

/// Whether the chat still exists, as its client sees it.
async fn exists(app: &TestApp, session: &CreatedSession) -> bool {
    let url = app.url(&format!("/api/sessions/{}/messages", session.session_id));
    let response = app.http.get(url).bearer_auth(&session.client_token).send().await.unwrap();
    match response.status().as_u16() {
        200 => true,
        401 => false,
        other => panic!("unexpected status {other}"),
    }
}

#[tokio::test]
async fn retention_counts_in_a_dry_run_and_removes_exactly_the_expired_chats() {
    let mut app = TestApp::spawn().await;
    let tess: LoginResponse = app.therapist("Tess").await;
    let join = async |session: &CreatedSession| {
        let mut ws = app.connect(session.session_id, &tess.token).await;
        while !matches!(ws.frame().await, ServerFrame::Mode { chat_mode: ChatMode::TherapistJoined, .. }) {}
        ws.close().await;
    };
    // Bot-only chats expire after 30 days; joined or flagged ones after
    // 2,557 (the defaults).
    let old_bot = app.create_session().await;
    say(&app, &old_bot, "an old chat with the companion").await;
    let fresh_bot = app.create_session().await;
    say(&app, &fresh_bot, "a new chat").await;
    let old_flagged = app.create_session().await;
    say(&app, &old_flagged, "i am going to kill myself tonight").await;
    let old_joined = app.create_session().await;
    say(&app, &old_joined, "hello").await;
    join(&old_joined).await;
    let ancient_joined = app.create_session().await;
    say(&app, &ancient_joined, "hello").await;
    join(&ancient_joined).await;
    for session in [&old_bot, &old_flagged, &old_joined] {
        age(&app, session.session_id, 31).await;
    }
    age(&app, ancient_joined.session_id, 2_600).await;
    let bot_messages = app.history(old_bot.session_id, &old_bot.client_token).await.len();
    let clinical_messages = app.history(ancient_joined.session_id, &ancient_joined.client_token).await.len();

    let before = rows(&app).await;
    let dry = app.cli(&["retention", "run"], "").await;
    assert!(dry.status.success(), "{}", String::from_utf8_lossy(&dry.stderr));
    let said = String::from_utf8(dry.stdout).unwrap();
    let counts = format!(
        "1 chats no therapist joined ({bot_messages} messages) and 1 clinical chats ({clinical_messages} messages)"
    );
    assert!(said.starts_with("Dry run: ") && said.contains(&counts), "{said}");
    assert_eq!(rows(&app).await, before, "a dry run changes nothing");

    let applied = app.cli(&["retention", "run", "--apply"], "").await;
    let said = String::from_utf8(applied.stdout).unwrap();
    assert!(said.starts_with("Removed ") && said.contains(&counts), "{said}");
    for (session, kept) in [
        (&old_bot, false),
        (&fresh_bot, true),
        (&old_flagged, true),
        (&old_joined, true),
        (&ancient_joined, false),
    ] {
        assert_eq!(exists(&app, session).await, kept, "{}", session.session_id);
    }
    let removed = before.1 - rows(&app).await.1;
    assert_eq!(removed, (bot_messages + clinical_messages) as i64, "exactly their messages");

    // `serve` applies its policy at start, by itself: a two-day-old chat
    // with the companion goes under a one-day policy, nothing else.
    age(&app, fresh_bot.session_id, 2).await;
    app.stop().await;
    app.start_again_with(&["--retention-bot-only-days", "1"]).await;
    app.logs.wait_for(1, |event| message_of(event) == "retention run: expired chats removed").await;
    assert!(!exists(&app, &fresh_bot).await);
    assert!(exists(&app, &old_flagged).await && exists(&app, &old_joined).await);
    let trail = String::from_utf8(app.cli(&["audit", "list"], "").await.stdout).unwrap();
    let runs: Vec<&str> = trail.lines().filter(|line| line.contains("\tretention\t")).collect();
    assert_eq!(runs.len(), 3, "{trail}");
    assert!(runs[0].contains("\toperator\t") && runs[0].contains("dry run: "), "{trail}");
    assert!(runs[1].contains("\toperator\t") && runs[1].contains("removed "), "{trail}");
    assert!(runs[2].contains("\tsystem\t") && runs[2].contains("removed 1 chats no therapist"), "{trail}");
}
