//! The JSON API and bad input on the socket.

use haven_protocol::api::{Appointment, AppointmentStatus, ClosedAppointment, PREVIEW_CHARS};
use haven_protocol::{ChatMode, ErrorCode, MAX_CONTENT_CHARS, MessageKind, Sender, ServerFrame};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::{EVENT_TIMEOUT, PASSWORD, TestApp, error_body};

#[tokio::test]
async fn chat_now_creates_an_open_bot_only_session_and_sets_an_http_only_cookie() {
    let app = TestApp::spawn().await;
    let response = app.http.post(app.url("/api/sessions")).send().await.unwrap();
    assert_eq!(response.status(), 201);
    let cookie = response.headers()["set-cookie"].to_str().unwrap().to_owned();
    let body: Value = response.json().await.unwrap();
    let token = body["client_token"].as_str().unwrap();
    let secret = token.strip_prefix("hvc_").expect("a client token");
    assert!(secret.len() >= 32 && secret.chars().all(|c| c.is_ascii_hexdigit()), "at least 128 random bits");
    assert_eq!(body["chat_mode"], "BOT_ONLY");
    assert!(body["session_id"].is_string() && body["appointment_id"].is_string());
    let id = uuid::Uuid::parse_str(body["session_id"].as_str().unwrap()).unwrap().simple();
    assert!(cookie.starts_with(&format!("haven_client_{id}={token}")), "one cookie per chat: {cookie}");
    assert!(cookie.contains("HttpOnly") && cookie.contains("Path=/"), "{cookie}");
}

#[tokio::test]
async fn login_answers_unknown_email_and_wrong_password_alike() {
    let app = TestApp::spawn().await;
    app.add_therapist("tess@clinic.test", "Tess").await;
    let unknown = error_body(app.login("nobody@clinic.test", PASSWORD).await, 401).await;
    let wrong = error_body(app.login("tess@clinic.test", "not the password").await, 401).await;
    assert_eq!(unknown, wrong);
    assert_eq!(unknown["error"], "invalid_credentials");

    let response = app.login("  Tess@Clinic.test ", PASSWORD).await;
    assert_eq!(response.status(), 200);
    let cookies: Vec<String> = response
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|value| value.to_str().unwrap().to_owned())
        .collect();
    let cookie =
        cookies.iter().find(|cookie| cookie.starts_with("haven_therapist=")).expect("a login cookie");
    let device = cookies.iter().find(|cookie| cookie.starts_with("haven_device=")).expect("a device cookie");
    assert!(device.contains("HttpOnly") && device.contains("Max-Age=7776000"), "{device}");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["therapist"]["email"], "tess@clinic.test");
    assert_eq!(body["therapist"]["name"], "Tess");
    assert!(body["token"].as_str().unwrap().starts_with("hvt_"));
    assert!(cookie.starts_with("haven_therapist=") && cookie.contains("HttpOnly"), "{cookie}");

    let malformed =
        app.http.post(app.url("/api/auth/login")).body("{").header("content-type", "application/json");
    error_body(malformed.send().await.unwrap(), 400).await;
}

#[tokio::test]
async fn logout_revokes_the_token_for_the_api_and_the_socket() {
    let app = TestApp::spawn().await;
    let therapist = app.therapist("Tess").await;
    let list = || app.http.get(app.url("/api/appointments")).bearer_auth(&therapist.token).send();
    assert_eq!(list().await.unwrap().status(), 200);
    let logout =
        app.http.post(app.url("/api/auth/logout")).bearer_auth(&therapist.token).send().await.unwrap();
    assert_eq!(logout.status(), 204);
    error_body(list().await.unwrap(), 401).await;

    let session = app.create_session().await;
    let mut socket = app.connect(session.session_id, &therapist.token).await;
    assert_eq!(socket.closed().await, (1008, "invalid or expired credential".to_owned()));
}

#[tokio::test]
async fn appointments_show_open_sessions_and_the_callers_own_only() {
    let app = TestApp::spawn().await;
    let tess = app.therapist("Tess").await;
    let omar = app.therapist("Omar").await;
    let taken = app.create_session().await;
    let open = app.create_session().await;
    let mut desk = app.connect(taken.session_id, &tess.token).await;
    desk.mode().await;
    desk.message().await;

    let list = |token: String| {
        let request = app.http.get(app.url("/api/appointments")).bearer_auth(token);
        async move { request.send().await.unwrap().json::<Vec<Appointment>>().await.unwrap() }
    };
    let for_tess = list(tess.token.clone()).await;
    let for_omar = list(omar.token.clone()).await;
    let ids = |rows: &[Appointment]| rows.iter().map(|row| row.session_id).collect::<Vec<_>>();
    // Chats waiting for a therapist come before the caller's own.
    assert_eq!(ids(&for_tess), vec![open.session_id, taken.session_id]);
    assert_eq!(ids(&for_omar), vec![open.session_id]);

    let own = &for_tess[1];
    assert_eq!(own.appointment_id, taken.appointment_id);
    assert_eq!(
        (own.status, own.chat_mode, own.therapist_id),
        (AppointmentStatus::Assigned, ChatMode::TherapistJoined, Some(tess.therapist.id))
    );
    assert!(own.last_message_at.is_some());
    let waiting = &for_omar[0];
    assert_eq!(
        (waiting.status, waiting.chat_mode, waiting.therapist_id),
        (AppointmentStatus::Open, ChatMode::BotOnly, None)
    );
    assert!(waiting.last_message_at.is_none());

    // A client credential is not a therapist's.
    let as_client =
        app.http.get(app.url("/api/appointments")).bearer_auth(&open.client_token).send().await.unwrap();
    error_body(as_client, 401).await;
    error_body(app.http.get(app.url("/api/appointments")).send().await.unwrap(), 401).await;
}

/// The caller's row of `session_id` once `wanted` holds of it, re-read at
/// each event of the caller's open appointments stream.
async fn row_once(
    app: &TestApp,
    token: &str,
    events: &mut reqwest::Response,
    session_id: uuid::Uuid,
    wanted: impl Fn(&Appointment) -> bool,
) -> Appointment {
    loop {
        let rows = app.appointments(token).await;
        if let Some(row) = rows.into_iter().find(|row| row.session_id == session_id && wanted(row)) {
            return row;
        }
        let tick = tokio::time::timeout(EVENT_TIMEOUT, events.chunk()).await;
        tick.expect("the row never became as wanted").unwrap().expect("the stream ended");
    }
}

#[tokio::test]
async fn appointments_count_unread_messages_preview_the_last_and_list_closed_chats_apart() {
    let app = TestApp::spawn().await;
    let tess = app.therapist("Tess").await;
    let mut events =
        app.http.get(app.url("/api/appointments/events")).bearer_auth(&tess.token).send().await.unwrap();
    let session = app.create_session().await;
    let mut client = app.connect(session.session_id, &session.client_token).await;
    client.mode().await;
    let sent = client.send_message("is anyone there").await;
    client.ack(&sent).await;
    while client.message().await.sender != Sender::Ai {}
    let row = row_once(&app, &tess.token, &mut events, session.session_id, |row| row.unread == 2).await;
    let last = row.last_message.expect("a last message");
    assert_eq!(
        (last.sender, last.kind, last.text),
        (Sender::Ai, MessageKind::Chat, None),
        "no companion words"
    );

    // Tess opens the chat and leaves it: she has read everything so far.
    let mut desk = app.connect(session.session_id, &tess.token).await;
    desk.mode().await;
    desk.close().await;
    let row = row_once(&app, &tess.token, &mut events, session.session_id, |row| row.unread == 0).await;
    assert_eq!(row.last_message.expect("the join").sender, Sender::System);

    // The client writes on: one unread, previewed by its first line, cut.
    let long = format!("{}\nand a second line", "word ".repeat(40));
    let sent = client.send_message(&long).await;
    client.ack(&sent).await;
    let row = row_once(&app, &tess.token, &mut events, session.session_id, |row| row.unread == 1).await;
    let text = row.last_message.expect("the message").text.expect("a client's words are previewed");
    // The first PREVIEW_CHARS characters are 20 times "word ".
    assert_eq!(PREVIEW_CHARS, 100);
    assert_eq!(text, format!("{}…", "word ".repeat(20).trim_end()));

    // Closed chats leave the list for the "Closed" one, newest first, paged.
    let other = app.create_session().await;
    let mut desk = app.connect(other.session_id, &tess.token).await;
    desk.mode().await;
    for id in [session.session_id, other.session_id] {
        let closed = app.http.post(app.url(&format!("/api/sessions/{id}/close"))).bearer_auth(&tess.token);
        assert_eq!(closed.send().await.unwrap().status(), 204);
    }
    assert!(app.appointments(&tess.token).await.is_empty());
    let closed = |url: String| {
        let request = app.http.get(url).bearer_auth(&tess.token);
        async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), 200);
            let link = response.headers().get("link").map(|link| link.to_str().unwrap().to_owned());
            (response.json::<Vec<ClosedAppointment>>().await.unwrap(), link)
        }
    };
    let (first, link) = closed(app.url("/api/appointments/closed?limit=1")).await;
    assert_eq!(first.iter().map(|row| row.session_id).collect::<Vec<_>>(), vec![other.session_id]);
    let next = link.expect("a next page");
    let next = next.trim_start_matches('<').split('>').next().unwrap();
    let (second, link) = closed(app.url(next)).await;
    assert_eq!(second.len(), 1);
    let row = &second[0];
    assert_eq!((row.session_id, link), (session.session_id, None));
    let history = app.history(session.session_id, &tess.token).await;
    assert_eq!(row.messages, history.len() as i64);
    assert!(row.closed_at >= row.created_at);
    // Nobody else's, and a bad cursor is refused.
    let omar = app.therapist("Omar").await;
    let theirs =
        app.http.get(app.url("/api/appointments/closed")).bearer_auth(&omar.token).send().await.unwrap();
    assert!(theirs.json::<Vec<ClosedAppointment>>().await.unwrap().is_empty());
    let bad =
        app.http.get(app.url("/api/appointments/closed?cursor=x")).bearer_auth(&tess.token).send().await;
    error_body(bad.unwrap(), 400).await;
}

#[tokio::test]
async fn message_history_pages_by_seq_for_the_client_and_its_therapist_only() {
    let app = TestApp::spawn().await;
    let session = app.create_session().await;
    let other = app.create_session().await;
    let mut client = app.connect(session.session_id, &session.client_token).await;
    client.mode().await;
    for (round, text) in ["one", "two", "three"].into_iter().enumerate() {
        let id = client.send_message(text).await;
        client.ack(&id).await;
        client.until_seq(2 * (round as i64 + 1)).await;
    }

    let get = |query: &str, token: &str| {
        app.http
            .get(app.url(&format!("/api/sessions/{}/messages{query}", session.session_id)))
            .bearer_auth(token)
            .send()
    };
    let page: Value = get("?after=2&limit=3", &session.client_token).await.unwrap().json().await.unwrap();
    let seqs: Vec<i64> =
        page["messages"].as_array().unwrap().iter().map(|m| m["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, vec![3, 4, 5]);
    let (question, reply) = (&page["messages"][0], &page["messages"][1]);
    for field in ["seq", "id", "sender", "content", "created_at", "client_id"] {
        assert!(reply.get(field).is_some(), "{field} missing in {reply}");
    }
    assert_eq!((reply["sender"].as_str(), reply["client_id"].is_null()), (Some("ai"), true));
    assert_eq!((question["sender"].as_str(), question["content"].as_str()), (Some("user"), Some("two")));
    assert!(question["client_id"].is_string());
    let all: Value = get("", &session.client_token).await.unwrap().json().await.unwrap();
    assert_eq!(all["messages"].as_array().unwrap().len(), 6);

    error_body(get("", &other.client_token).await.unwrap(), 403).await;
    let stranger = app.therapist("Omar").await;
    error_body(get("", &stranger.token).await.unwrap(), 403).await;
    error_body(get("?limit=0", &session.client_token).await.unwrap(), 400).await;
    error_body(get("?after=abc", &session.client_token).await.unwrap(), 400).await;
    let anonymous = app.http.get(app.url(&format!("/api/sessions/{}/messages", session.session_id)));
    error_body(anonymous.send().await.unwrap(), 401).await;
    let unknown =
        app.http.get(app.url("/api/sessions/not-a-session/messages")).bearer_auth(&session.client_token);
    error_body(unknown.send().await.unwrap(), 404).await;
}

#[tokio::test]
async fn the_chats_therapist_downloads_its_whole_transcript_as_markdown_or_json() {
    let app = TestApp::spawn().await;
    let session = app.create_session().await;
    let mut client = app.connect(session.session_id, &session.client_token).await;
    client.mode().await;
    let id = client.send_message("first line\nsecond line").await;
    client.ack(&id).await;
    client.until_seq(2).await;
    assert_eq!(app.share_companion_part(session.session_id, Some(&session.client_token), true).await, 204);
    let tess = app.therapist("Tess").await;
    let mut desk = app.connect(session.session_id, &tess.token).await;
    desk.mode().await;
    let answer = desk.send_message("Hello, I'm Tess.").await;
    desk.ack(&answer).await;

    let get = |format: &str, token: &str| {
        app.http
            .get(app.url(&format!("/api/sessions/{}/transcript{format}", session.session_id)))
            .bearer_auth(token)
            .send()
    };
    let json = get("", &tess.token).await.unwrap();
    assert_eq!(json.status(), 200);
    let disposition = json.headers()["content-disposition"].to_str().unwrap().to_owned();
    let short = &session.session_id.simple().to_string()[..8];
    assert_eq!(disposition, format!("attachment; filename=\"haven-chat-{short}.json\""));
    let transcript: Value = json.json().await.unwrap();
    let senders: Vec<&str> =
        transcript["messages"].as_array().unwrap().iter().map(|m| m["sender"].as_str().unwrap()).collect();
    assert_eq!(senders, ["user", "ai", "system", "therapist"]);
    assert_eq!(
        (transcript["chat_mode"].as_str(), transcript["closed"].as_bool()),
        (Some("THERAPIST_JOINED"), Some(false))
    );
    assert_eq!(transcript["messages"][2]["kind"], "join");

    let markdown = get("?format=markdown", &tess.token).await.unwrap();
    assert_eq!(markdown.headers()["content-type"], "text/markdown; charset=utf-8");
    let text = markdown.text().await.unwrap();
    assert!(text.starts_with(&format!("# Haven chat {short}\n")), "{text}");
    assert!(text.contains("**Client** · ") && text.contains("> first line\n> second line\n"), "{text}");
    assert!(
        text.contains("**Companion**") && text.contains("**System**") && text.contains("> Hello, I'm Tess."),
        "{text}"
    );

    // Only the chat's own therapist: not another one, not the client.
    let omar = app.therapist("Omar").await;
    error_body(get("", &omar.token).await.unwrap(), 403).await;
    error_body(get("", &session.client_token).await.unwrap(), 401).await;
    let body = error_body(get("?format=xml", &tess.token).await.unwrap(), 400).await;
    assert_eq!(body["error"], "invalid_query");
}

#[tokio::test]
async fn bad_frames_get_error_codes_store_nothing_and_keep_the_socket_open() {
    let app = TestApp::spawn().await;
    let session = app.create_session().await;
    let mut client = app.connect(session.session_id, &session.client_token).await;
    client.mode().await;

    let too_long = "x".repeat(MAX_CONTENT_CHARS + 1);
    let cases = [
        (Message::Text("{not json".into()), ErrorCode::InvalidJson, None),
        (
            Message::Text(json!({"type": "shout", "client_id": "c1"}).to_string().into()),
            ErrorCode::UnknownType,
            Some("c1"),
        ),
        (
            Message::Text(json!({"type": "message", "content": "hi"}).to_string().into()),
            ErrorCode::MissingClientId,
            None,
        ),
        (
            Message::Text(
                json!({"type": "message", "content": "  \n", "client_id": "c2"}).to_string().into(),
            ),
            ErrorCode::EmptyContent,
            Some("c2"),
        ),
        (
            Message::Text(json!({"type": "message", "content": "", "client_id": "c3"}).to_string().into()),
            ErrorCode::EmptyContent,
            Some("c3"),
        ),
        (
            Message::Text(
                json!({"type": "message", "content": too_long, "client_id": "c4"}).to_string().into(),
            ),
            ErrorCode::ContentTooLong,
            Some("c4"),
        ),
        (Message::Binary(vec![1, 2, 3].into()), ErrorCode::UnsupportedFrame, None),
        // PostgreSQL cannot store U+0000: refused at the edge on every store.
        (
            Message::Text(
                json!({"type": "message", "content": "hello\u{0}world", "client_id": "c5"})
                    .to_string()
                    .into(),
            ),
            ErrorCode::InvalidContent,
            Some("c5"),
        ),
        (
            Message::Text(
                json!({"type": "message", "content": "hi", "client_id": "c\u{0}6"}).to_string().into(),
            ),
            ErrorCode::InvalidClientId,
            None,
        ),
    ];
    for (frame, expected, client_id) in cases {
        client.send_raw(frame).await;
        match client.frame().await {
            ServerFrame::Error { code, client_id: echoed, message } => {
                assert_eq!(code, expected, "{message}");
                assert_eq!(echoed.as_deref(), client_id);
                assert!(!message.is_empty());
            }
            other => panic!("expected an error frame, got {other:?}"),
        }
    }
    let exact = "y".repeat(MAX_CONTENT_CHARS);
    let id = client.send_message(&exact).await;
    let (seq, before) = client.ack(&id).await;
    assert_eq!(seq, 1, "nothing was stored before: {before:?}");

    // A frame beyond the 64 KiB limit closes the socket with 1009; nothing is stored.
    let huge = json!({"type": "message", "content": "z".repeat(70_000), "client_id": "huge"});
    client.send_raw(Message::Text(huge.to_string().into())).await;
    let (code, _) = loop {
        if let crate::helpers::Received::Closed(Some(frame)) = client.receive().await {
            break (u16::from(frame.code), frame.reason);
        }
    };
    assert_eq!(code, 1009);
    let history = app.history(session.session_id, &session.client_token).await;
    assert!(history.iter().all(|m| m.client_id.as_deref() != Some("huge")));
}

#[tokio::test]
async fn unknown_routes_get_a_json_404_and_health_answers() {
    let app = TestApp::spawn().await;
    error_body(app.http.get(app.url("/api/nothing-here")).send().await.unwrap(), 404).await;
    let health = app.http.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let ready = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
    assert_eq!(ready.json::<serde_json::Value>().await.unwrap(), serde_json::json!({"status": "ready"}));
    error_body(app.http.delete(app.url("/api/sessions")).send().await.unwrap(), 405).await;
    let session = app.create_session().await;
    let plain_get = app.http.get(app.url(&format!("/api/chat/ws/{}", session.session_id))).send();
    error_body(plain_get.await.unwrap(), 400).await;
}

/// The caller's private name for `session` in their appointments list.
async fn listed_label(app: &TestApp, token: &str, session: uuid::Uuid) -> Option<String> {
    let list = app.appointments(token).await;
    list.into_iter().find(|row| row.session_id == session).and_then(|row| row.client_label)
}

#[tokio::test]
async fn a_private_client_name_is_seen_by_its_therapist_only() {
    let app = TestApp::spawn().await;
    let tess = app.therapist("Tess").await;
    let omar = app.therapist("Omar").await;
    let session = app.create_session().await;
    let url = app.url(&format!("/api/sessions/{}/label", session.session_id));
    let put = |token: &str, body: Value| app.http.put(&url).bearer_auth(token).json(&body).send();
    let get = |token: &str| app.http.get(&url).bearer_auth(token).send();

    let named = put(&tess.token, json!({"label": "  Sam,\n Tuesday   group "})).await.unwrap();
    assert_eq!(named.status(), 200);
    assert_eq!(named.json::<Value>().await.unwrap(), json!({"label": "Sam, Tuesday group"}));
    assert_eq!(
        get(&tess.token).await.unwrap().json::<Value>().await.unwrap(),
        json!({"label": "Sam, Tuesday group"})
    );
    assert_eq!(
        listed_label(&app, &tess.token, session.session_id).await.as_deref(),
        Some("Sam, Tuesday group")
    );
    // Another therapist sees the open session, without Tess's name for it,
    // and may name it for themselves.
    assert_eq!(listed_label(&app, &omar.token, session.session_id).await, None);
    assert_eq!(put(&omar.token, json!({"label": "S."})).await.unwrap().status(), 200);
    assert_eq!(
        listed_label(&app, &tess.token, session.session_id).await.as_deref(),
        Some("Sam, Tuesday group")
    );

    let long = put(&tess.token, json!({"label": "x".repeat(61)})).await.unwrap();
    assert_eq!(error_body(long, 400).await["error"], "label_too_long");
    let client = app.http.get(&url).bearer_auth(&session.client_token).send().await.unwrap();
    assert_eq!(client.status(), 401, "a client never reads it");
    let unknown = app.url(&format!("/api/sessions/{}/label", uuid::Uuid::now_v7()));
    let unknown = app.http.get(unknown).bearer_auth(&tess.token).send().await.unwrap();
    assert_eq!(unknown.status(), 404);

    // Once Tess joins, the session is hers: Omar may no longer read or name it.
    let mut joined = app.connect(session.session_id, &tess.token).await;
    joined.mode().await;
    assert_eq!(error_body(get(&omar.token).await.unwrap(), 403).await["error"], "forbidden");
    let cleared = put(&tess.token, json!({"label": " "})).await.unwrap();
    assert_eq!(cleared.json::<Value>().await.unwrap(), json!({"label": null}));
    assert_eq!(listed_label(&app, &tess.token, session.session_id).await, None);
}
