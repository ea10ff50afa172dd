//! Input at the edges: characters no store can hold, ids in odd forms,
//! redirect targets, caching, query errors and the database file's mode.

use std::os::unix::fs::PermissionsExt;

use haven_protocol::{ErrorCode, ServerFrame};
use serde_json::{Value, json};

use crate::helpers::{Options, TestApp, error_body, message_of};

#[tokio::test]
async fn a_nul_character_is_refused_at_the_edge_and_fails_no_one_else() {
    let app = TestApp::spawn().await;
    // Twenty clients send at the same moment; one message holds U+0000.
    let mut clients = Vec::new();
    for _ in 0..20 {
        let session = app.create_session().await;
        let mut client = app.connect(session.session_id, &session.client_token).await;
        client.mode().await;
        clients.push(client);
    }
    for (n, client) in clients.iter_mut().enumerate() {
        let content = if n == 7 { "hello\u{0}world".to_owned() } else { format!("hello from {n}") };
        client.send_json(json!({"type": "message", "client_id": format!("m{n}"), "content": content})).await;
    }
    for (n, client) in clients.iter_mut().enumerate() {
        let id = format!("m{n}");
        if n == 7 {
            match client.frame().await {
                ServerFrame::Error { code, client_id, .. } => {
                    assert_eq!((code, client_id.as_deref()), (ErrorCode::InvalidContent, Some(id.as_str())));
                }
                other => panic!("expected invalid_content, got {other:?}"),
            }
        } else {
            client.ack(&id).await;
        }
    }
    // Over HTTP: 400 `invalid_json`, never "database unavailable".
    let login = app
        .http
        .post(app.url("/api/auth/login"))
        .json(&json!({"email": "tess\u{0}@clinic.test", "password": "x"}));
    let body = error_body(login.send().await.unwrap(), 400).await;
    assert_eq!(body["error"], "invalid_json");
    assert!(app.logs.matching(|event| message_of(event) == "database unavailable").is_empty());
}

#[tokio::test]
async fn api_responses_and_signed_in_pages_are_never_cached() {
    let app = TestApp::spawn().await;
    let tess = app.therapist("Tess").await;
    let session = app.create_session().await;
    let no_store = |response: &reqwest::Response| {
        response.headers().get("cache-control").map(|value| value.to_str().unwrap().to_owned())
    };
    let messages = app
        .http
        .get(app.url(&format!("/api/sessions/{}/messages", session.session_id)))
        .bearer_auth(&session.client_token)
        .send()
        .await
        .unwrap();
    assert_eq!(messages.status(), 200);
    assert_eq!(no_store(&messages).as_deref(), Some("no-store"));
    let list = app.http.get(app.url("/api/appointments")).bearer_auth(&tess.token).send().await.unwrap();
    assert_eq!(no_store(&list).as_deref(), Some("no-store"));
    let refused = app.http.get(app.url("/api/appointments")).send().await.unwrap();
    assert_eq!((refused.status().as_u16(), no_store(&refused).as_deref()), (401, Some("no-store")));
    let dashboard = app
        .http
        .get(app.url("/therapist"))
        .header("cookie", format!("haven_therapist={}", tess.token))
        .send()
        .await
        .unwrap();
    assert_eq!((dashboard.status().as_u16(), no_store(&dashboard).as_deref()), (200, Some("no-store")));
    // Static assets keep their own, revalidated caching.
    let script = app.http.get(app.url("/assets/chat.js")).send().await.unwrap();
    assert_eq!((script.status().as_u16(), no_store(&script).as_deref()), (200, Some("no-cache")));
}

#[tokio::test]
async fn a_login_redirects_only_to_haven_pages() {
    let app = TestApp::spawn().await;
    app.add_therapist("tess@clinic.test", "Tess").await;
    let session = app.create_session().await;
    let browser =
        app.client(reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap());
    let chat = format!("/chat/{}?therapist=true", session.session_id);
    for (next, expected) in [
        ("/\t/evil.example/x", "/therapist"),
        ("/\n", "/therapist"),
        ("/ /evil.example", "/therapist"),
        ("//evil.example", "/therapist"),
        (chat.as_str(), chat.as_str()),
    ] {
        let form = [("email", "tess@clinic.test"), ("password", crate::helpers::PASSWORD), ("next", next)];
        let response = browser.post(app.url("/therapist/login")).form(&form).send().await.unwrap();
        assert_eq!(response.status(), 303, "next={next:?}");
        assert_eq!(response.headers()["location"], expected, "next={next:?}");
    }
}

#[tokio::test]
async fn session_ids_are_accepted_only_in_their_canonical_form() {
    let app = TestApp::spawn().await;
    let session = app.create_session().await;
    let id = session.session_id.to_string();
    let get = |id: String| {
        app.http
            .get(app.url(&format!("/api/sessions/{id}/messages")))
            .bearer_auth(&session.client_token)
            .send()
    };
    assert_eq!(get(id.clone()).await.unwrap().status(), 200);
    for odd in [
        id.to_uppercase(),
        format!("{{{id}}}"),
        format!("urn:uuid:{id}"),
        session.session_id.simple().to_string(),
    ] {
        let body = error_body(get(odd.clone()).await.unwrap(), 404).await;
        assert_eq!(body["error"], "not_found", "{odd}");
    }
    let mut socket = app.connect_with(&format!("/api/chat/ws/{}", id.to_uppercase()), &[]).await;
    assert!(matches!(socket.receive().await, crate::helpers::Received::Closed(_)));
}

#[tokio::test]
async fn query_errors_are_json() {
    let app = TestApp::spawn().await;
    let tess = app.therapist("Tess").await;
    let report = app.http.get(app.url("/api/safety/report?days=many")).bearer_auth(&tess.token).send();
    let body = error_body(report.await.unwrap(), 400).await;
    assert_eq!(body["error"], "invalid_query");
}

#[tokio::test]
async fn the_database_file_is_readable_by_its_owner_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("private.db");
    let options =
        Options { database_url: Some(format!("sqlite://{}", path.display())), ..Options::default() };
    let app = TestApp::spawn_with(options).await;
    let session = app.create_session().await;
    let mut client = app.connect(session.session_id, &session.client_token).await;
    client.mode().await;
    let id = client.send_message("a line for the write-ahead log").await;
    client.ack(&id).await;
    for suffix in ["", "-wal", "-shm"] {
        let file = format!("{}{suffix}", path.display());
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{file} has mode {mode:o}");
    }
}

/// Follows `GET /api/appointments` pages by their `Link` headers.
async fn every_page(app: &TestApp, token: &str, limit: usize) -> Vec<Vec<Value>> {
    let mut pages = Vec::new();
    let mut url = Some(format!("/api/appointments?limit={limit}"));
    while let Some(path) = url {
        let response = app.http.get(app.url(&path)).bearer_auth(token).send().await.unwrap();
        assert_eq!(response.status(), 200);
        url = response.headers().get("link").map(|link| {
            let link = link.to_str().unwrap();
            assert!(link.ends_with("; rel=\"next\""), "{link}");
            link.trim_start_matches('<').split('>').next().unwrap().to_owned()
        });
        pages.push(response.json::<Vec<Value>>().await.unwrap());
    }
    pages
}

#[tokio::test]
async fn the_appointments_list_comes_in_pages_the_longest_waiting_first() {
    let app = TestApp::spawn().await;
    let tess = app.therapist("Tess").await;
    let mut created = Vec::new();
    for _ in 0..5 {
        created.push(app.create_session().await.session_id.to_string());
    }
    // The newest chat gets a message: it still waits the shortest.
    let newest = app.create_session().await;
    let mut client = app.connect(newest.session_id, &newest.client_token).await;
    client.mode().await;
    let id = client.send_message("back again").await;
    client.ack(&id).await;
    created.push(newest.session_id.to_string());

    let pages = every_page(&app, &tess.token, 2).await;
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [2, 2, 2]);
    let order: Vec<String> =
        pages.iter().flatten().map(|row| row["session_id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(order, created, "the longest waiting first, each once");
    for bad in ["limit=0", "limit=201", "cursor=nonsense"] {
        let response =
            app.http.get(app.url(&format!("/api/appointments?{bad}"))).bearer_auth(&tess.token).send();
        assert_eq!(error_body(response.await.unwrap(), 400).await["error"], "invalid_query", "{bad}");
    }
}

/// Moves these sessions' creation two days back and clears their last
/// message time, in the database itself: a day cannot be waited for.
async fn age(app: &TestApp, sessions: &[uuid::Uuid]) {
    use sqlx::Connection;
    let two_days_ago = time::OffsetDateTime::now_utc() - time::Duration::days(2);
    for id in sessions {
        if crate::helpers::on_postgres() {
            let mut db = sqlx::PgConnection::connect(&app.database_url).await.unwrap();
            sqlx::query("UPDATE chat_sessions SET created_at = $1, last_message_at = NULL WHERE id = $2")
                .bind(two_days_ago)
                .bind(id)
                .execute(&mut db)
                .await
                .unwrap();
        } else {
            let mut db = sqlx::SqliteConnection::connect(&app.database_url).await.unwrap();
            sqlx::query("UPDATE chat_sessions SET created_at = ?, last_message_at = NULL WHERE id = ?")
                .bind(two_days_ago)
                .bind(id)
                .execute(&mut db)
                .await
                .unwrap();
        }
    }
}

#[tokio::test]
async fn chats_untouched_for_a_day_leave_the_waiting_list_unless_flagged() {
    let app = TestApp::spawn().await;
    let tess = app.therapist("Tess").await;
    let (stale, flagged, fresh) =
        (app.create_session().await, app.create_session().await, app.create_session().await);
    let mut alarm = app.connect(flagged.session_id, &flagged.client_token).await;
    alarm.mode().await;
    let id =
        alarm.send_message("i have the pills in front of me and im going to take them all tonight").await;
    alarm.ack(&id).await;
    age(&app, &[stale.session_id, flagged.session_id]).await;
    let listed = |pages: Vec<Vec<Value>>| -> Vec<String> {
        pages.into_iter().flatten().map(|row| row["session_id"].as_str().unwrap().to_owned()).collect()
    };
    let now = listed(every_page(&app, &tess.token, 200).await);
    assert!(now.contains(&fresh.session_id.to_string()), "{now:?}");
    assert!(now.contains(&flagged.session_id.to_string()), "a flagged chat never leaves the list: {now:?}");
    assert!(!now.contains(&stale.session_id.to_string()), "an untouched chat leaves the list: {now:?}");
    // It stays open: its client writes again, and it is back.
    let mut client = app.connect(stale.session_id, &stale.client_token).await;
    client.mode().await;
    let id = client.send_message("sorry, I was away").await;
    client.ack(&id).await;
    let again = listed(every_page(&app, &tess.token, 200).await);
    assert!(again.contains(&stale.session_id.to_string()), "{again:?}");
}
