//! The audit trail: every read and every action on a chat, an account or a
//! login is recorded with who, what, which chat, when, from where and the
//! outcome; the chain shows any edit, deletion or reordering.

use haven_protocol::ServerFrame;
use haven_protocol::api::{AccessLog, LoginResponse};
use serde_json::json;
use uuid::Uuid;

use crate::hand_back::hand_back;
use crate::helpers::{PASSWORD, TestApp, Ws, on_postgres};

/// One line of `haven audit list`, without its time and seq.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Line {
    actor: String,
    email: String,
    action: String,
    session: String,
    address: String,
    outcome: String,
}

impl Line {
    fn new(actor: &str, email: &str, action: &str, session: Option<Uuid>, outcome: &str) -> Self {
        let address = if actor == "therapist" { "127.0.0.1" } else { "-" };
        Line {
            actor: actor.into(),
            email: email.into(),
            action: action.into(),
            session: session.map_or("-".into(), |id| id.to_string()),
            address: address.into(),
            outcome: outcome.into(),
        }
    }

    fn tess(action: &str, session: Option<Uuid>) -> Self {
        Line::new("therapist", TESS, action, session, "ok")
    }
}

const TESS: &str = "tess@clinic.test";
const OMAR: &str = "omar@clinic.test";

/// `haven audit list ARGS`, parsed; the seqs must count up from 1 when
/// nothing is filtered.
async fn audit_list(app: &TestApp, args: &[&str]) -> Vec<Line> {
    let mut command = vec!["audit", "list"];
    command.extend_from_slice(args);
    let output = app.cli(&command, "").await;
    assert!(output.status.success(), "audit list failed: {}", String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8(output.stdout).unwrap();
    text.lines()
        .map(|line| {
            let columns: Vec<&str> = line.split('\t').collect();
            assert_eq!(columns.len(), 9, "nine columns: {line}");
            // The address is kept as the server saw it (a loopback client
            // here); nothing else is in it.
            let address = if columns[6] == "-" { "-" } else { "127.0.0.1" };
            assert!(columns[6] == "-" || columns[6] == "127.0.0.1", "address: {line}");
            Line {
                actor: columns[2].into(),
                email: columns[3].into(),
                action: columns[4].into(),
                session: columns[5].into(),
                address: address.into(),
                outcome: columns[7].into(),
            }
        })
        .collect()
}

/// `haven audit verify`: its success and what it printed.
async fn audit_verify(app: &TestApp) -> (bool, String) {
    let output = app.cli(&["audit", "verify"], "").await;
    let text =
        format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    (output.status.success(), text)
}

/// What the therapist does in one step of the random sequence.
#[derive(Debug, Clone, Copy)]
enum Step {
    ReadApi,
    Export,
    OpenSocket,
    HandBack,
    WrongPassword,
    Login,
    ClientWrites,
    OtherTherapistJoins,
}

const STEPS: [Step; 8] = [
    Step::ReadApi,
    Step::Export,
    Step::OpenSocket,
    Step::HandBack,
    Step::WrongPassword,
    Step::Login,
    Step::ClientWrites,
    Step::OtherTherapistJoins,
];

/// A therapist's socket that asks for the whole history, as the chat page
/// does.
async fn with_history(app: &TestApp, session: Uuid, token: &str) -> Ws {
    let headers = [("authorization", format!("Bearer {token}"))];
    app.connect_with(&format!("/api/chat/ws/{session}?since=0"), &headers).await
}

/// The first message frame of a socket: by then a therapist's join and
/// history read are committed.
async fn first_message(ws: &mut Ws) {
    while !matches!(ws.frame().await, ServerFrame::Message(_)) {}
}

#[tokio::test]
async fn every_read_and_action_in_a_random_sequence_is_in_the_trail_in_order() {
    let app = TestApp::spawn().await;
    app.add_therapist(TESS, "Dr Tess Example").await;
    app.add_therapist(OMAR, "Dr Omar Example").await;
    let tess: LoginResponse = app.login(TESS, PASSWORD).await.json().await.unwrap();
    let omar: LoginResponse = app.login(OMAR, PASSWORD).await.json().await.unwrap();
    // An account's creation names the account in its detail; its actor is
    // the operator at the command line.
    let mut expected = vec![
        Line::new("operator", "-", "account_add", None, "ok"),
        Line::new("operator", "-", "account_add", None, "ok"),
        Line::tess("login", None),
        Line::new("therapist", OMAR, "login", None, "ok"),
    ];

    let session = app.create_session().await;
    let id = Some(session.session_id);
    let mut client = app.connect(session.session_id, &session.client_token).await;
    let hello = client.send_message("hello").await;
    client.ack(&hello).await;
    // The first open is the join; the API's messages and transcript are
    // the therapist's once they joined.
    let mut tess_token = tess.token.clone();
    let mut socket = Some(with_history(&app, session.session_id, &tess_token).await);
    first_message(socket.as_mut().unwrap()).await;
    expected.push(Line::tess("join", id));
    expected.push(Line::tess("read", id));
    let mut joined = true;

    let steps: Vec<Step> = (0..24).map(|_| STEPS[rand::random_range(0..STEPS.len())]).collect();
    for step in &steps {
        match step {
            Step::ReadApi => {
                app.history(session.session_id, &tess_token).await;
                expected.push(Line::tess("read", id));
            }
            Step::Export => {
                let url = app.url(&format!("/api/sessions/{}/transcript", session.session_id));
                let response = app.http.get(url).bearer_auth(&tess_token).send().await.unwrap();
                assert_eq!(response.status(), 200);
                expected.push(Line::tess("export", id));
            }
            Step::OpenSocket => {
                if let Some(old) = socket.take() {
                    old.close().await;
                }
                let mut ws = with_history(&app, session.session_id, &tess_token).await;
                first_message(&mut ws).await;
                if !joined {
                    expected.push(Line::tess("join", id));
                    joined = true;
                }
                expected.push(Line::tess("read", id));
                socket = Some(ws);
            }
            Step::HandBack if joined => {
                let response = hand_back(&app, session.session_id, &tess_token, json!({})).await;
                assert_eq!(response.status(), 204);
                expected.push(Line::tess("hand_back", id));
                joined = false;
                socket = None;
            }
            Step::HandBack => {
                let response = hand_back(&app, session.session_id, &tess_token, json!({})).await;
                assert_eq!(response.status(), 409, "no hand-back while not joined");
            }
            Step::WrongPassword => {
                assert_eq!(app.login(TESS, "not the password").await.status(), 401);
                expected.push(Line::new("therapist", TESS, "login", None, "refused"));
            }
            Step::Login => {
                let again: LoginResponse = app.login(TESS, PASSWORD).await.json().await.unwrap();
                tess_token = again.token;
                expected.push(Line::tess("login", None));
            }
            Step::ClientWrites => {
                let sent = client.send_message("a client message").await;
                client.ack(&sent).await;
            }
            Step::OtherTherapistJoins => {
                let mut ws = app.connect(session.session_id, &omar.token).await;
                let (code, _) = ws.closed_eventually().await;
                assert_eq!(code, 1008, "someone else's chat is refused");
                expected.push(Line::new("therapist", OMAR, "join", id, "refused"));
            }
        }
    }
    // Reads of the client's own chat are the client's, and not recorded.
    app.history(session.session_id, &session.client_token).await;
    let response = app
        .http
        .post(app.url(&format!("/api/sessions/{}/close", session.session_id)))
        .bearer_auth(&tess_token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    expected.push(Line::tess("close", id));

    assert_eq!(audit_list(&app, &[]).await, expected, "steps: {steps:?}");
    let (intact, text) = audit_verify(&app).await;
    assert!(intact, "{text}");
    assert!(text.contains(&format!("{} records", expected.len())), "{text}");

    // The chat's own records, by CLI and on the therapist's access log.
    let of_session: Vec<Line> = expected.iter().filter(|line| line.session != "-").cloned().collect();
    let session_arg = session.session_id.to_string();
    assert_eq!(audit_list(&app, &["--session", &session_arg]).await, of_session);
    let log_url = app.url(&format!("/api/sessions/{}/access-log", session.session_id));
    let log: AccessLog =
        app.http.get(&log_url).bearer_auth(&tess_token).send().await.unwrap().json().await.unwrap();
    let actions: Vec<(&str, Option<&str>, &str)> = log
        .records
        .iter()
        .map(|record| (record.action.as_str(), record.therapist.as_deref(), record.outcome.as_str()))
        .collect();
    let names = |line: &Line| match line.email.as_str() {
        TESS => Some("Dr Tess Example"),
        OMAR => Some("Dr Omar Example"),
        _ => None,
    };
    let wanted: Vec<(&str, Option<&str>, &str)> =
        of_session.iter().map(|line| (line.action.as_str(), names(line), line.outcome.as_str())).collect();
    assert_eq!(actions, wanted);
    assert!(log.records.iter().all(|record| record.detail.as_deref().is_none_or(|d| !d.contains("hello"))));
    let theirs = app.http.get(&log_url).bearer_auth(&omar.token).send().await.unwrap();
    assert_eq!(theirs.status(), 403, "only the chat's therapist sees its access log");
    let by_omar = audit_list(&app, &["--therapist", OMAR]).await;
    assert!(!by_omar.is_empty() && by_omar.iter().all(|line| line.email == OMAR));
    // Nothing of the messages' text or of any token is in the trail.
    let all = app.cli(&["audit", "list"], "").await.stdout;
    let all = String::from_utf8(all).unwrap();
    assert!(!all.contains("hello") && !all.contains("a client message") && !all.contains(&tess_token));
}

#[tokio::test]
async fn a_flag_and_its_acknowledgement_are_recorded_without_the_words() {
    let app = TestApp::spawn().await;
    app.add_therapist(TESS, "Dr Tess Example").await;
    let tess: LoginResponse = app.login(TESS, PASSWORD).await.json().await.unwrap();
    let session = app.create_session().await;
    let mut client = app.connect(session.session_id, &session.client_token).await;
    let words = "i am going to kill myself tonight";
    let sent = client.send_message(words).await;
    client.ack(&sent).await;
    let mut therapist = app.connect(session.session_id, &tess.token).await;
    first_message(&mut therapist).await;
    let response = app
        .http
        .post(app.url(&format!("/api/sessions/{}/risk/acknowledge", session.session_id)))
        .bearer_auth(&tess.token)
        .json(&json!({"note": "called the client"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let lines = audit_list(&app, &["--session", &session.session_id.to_string()]).await;
    let actions: Vec<(&str, &str)> =
        lines.iter().map(|line| (line.actor.as_str(), line.action.as_str())).collect();
    let flag = actions.iter().position(|action| *action == ("system", "flag")).expect("the flag is recorded");
    let acknowledged = actions.iter().position(|action| *action == ("therapist", "acknowledge"));
    assert!(acknowledged.is_some_and(|at| at > flag), "{actions:?}");
    let text = String::from_utf8(app.cli(&["audit", "list"], "").await.stdout).unwrap();
    assert!(text.contains("level high") || text.contains("level imminent"), "{text}");
    assert!(!text.contains("kill") && !text.contains("called the client"), "no words in the trail: {text}");
}

/// Runs SQL on the suite's database, with the server stopped.
async fn tamper(app: &TestApp, sql: &[&str]) {
    use sqlx::Connection;
    if on_postgres() {
        let mut db = sqlx::PgConnection::connect(&app.database_url).await.unwrap();
        for statement in sql {
            sqlx::query(sqlx::AssertSqlSafe(*statement)).execute(&mut db).await.unwrap();
        }
    } else {
        let mut db = sqlx::SqliteConnection::connect(&app.database_url).await.unwrap();
        for statement in sql {
            sqlx::query(sqlx::AssertSqlSafe(*statement)).execute(&mut db).await.unwrap();
        }
    }
}

#[tokio::test]
async fn verify_names_the_first_edited_deleted_or_moved_record() {
    let mut app = TestApp::spawn().await;
    app.add_therapist(TESS, "Dr Tess Example").await;
    for _ in 0..3 {
        assert_eq!(app.login(TESS, PASSWORD).await.status(), 200);
        assert_eq!(app.login(TESS, "wrong").await.status(), 401);
    }
    // 1 account, then 6 logins.
    app.stop().await;
    let (intact, text) = audit_verify(&app).await;
    assert!(intact && text.contains("7 records"), "{text}");

    // Each tampering is undone before the next, in one transaction.
    let cases: [(&[&str], &str, &[&str]); 4] = [
        (
            &["UPDATE audit_trail SET outcome = 'ok' WHERE seq = 3"],
            "record 3: its contents were changed",
            &["UPDATE audit_trail SET outcome = 'refused' WHERE seq = 3"],
        ),
        (
            &[
                "CREATE TABLE kept AS SELECT * FROM audit_trail WHERE seq = 4",
                "DELETE FROM audit_trail WHERE seq = 4",
            ],
            "record 5: the record before it is missing",
            &["INSERT INTO audit_trail SELECT * FROM kept", "DROP TABLE kept"],
        ),
        (
            // Deleted and the rest renumbered: the chain no longer links.
            &[
                "CREATE TABLE kept AS SELECT * FROM audit_trail",
                "DELETE FROM audit_trail WHERE seq = 4",
                "UPDATE audit_trail SET seq = seq - 1 WHERE seq > 4",
            ],
            "record 4: it does not follow the record before it",
            &["DELETE FROM audit_trail", "INSERT INTO audit_trail SELECT * FROM kept", "DROP TABLE kept"],
        ),
        (
            // Two records swapped, each keeping its place's number.
            &[
                "UPDATE audit_trail SET seq = 100 WHERE seq = 2",
                "UPDATE audit_trail SET seq = 2 WHERE seq = 5",
                "UPDATE audit_trail SET seq = 5 WHERE seq = 100",
            ],
            "record 2: it does not follow the record before it",
            &[
                "UPDATE audit_trail SET seq = 100 WHERE seq = 2",
                "UPDATE audit_trail SET seq = 2 WHERE seq = 5",
                "UPDATE audit_trail SET seq = 5 WHERE seq = 100",
            ],
        ),
    ];
    for (change, found, undo) in cases {
        tamper(&app, change).await;
        let (intact, text) = audit_verify(&app).await;
        assert!(!intact, "verify must fail after {change:?}: {text}");
        assert!(text.contains(found), "after {change:?} expected {found:?}, got {text}");
        tamper(&app, undo).await;
        let (intact, text) = audit_verify(&app).await;
        assert!(intact, "undone: {text}");
    }
}
