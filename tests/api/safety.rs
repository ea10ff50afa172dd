//! Crisis detection and escalation (docs/safety.md), through the real
//! server: every client message is screened, a flagged one brings crisis
//! resources at once and the safety script instead of the model, the flag
//! reaches therapists, and the audit trail and referral counter keep it.

use std::time::Duration;

use haven::safety::{SAFETY_SCRIPT, SECOND_OPINION_RULE};
use haven_protocol::api::Appointment;
use haven_protocol::{ChatMessage, RiskLevel, Sender, ServerFrame};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{Options, TestApp, Ws};
use crate::mock_llm::{MockLlm, Script};

const IMMINENT: &str = "i have the pills in front of me and im going to take them all tonight";
const HIGH: &str = "I've been cutting myself again";

/// A server whose language model is the mock; crisis resources configured.
/// It logs at `debug`, where each second opinion is logged.
async fn with_model(mock: &MockLlm) -> TestApp {
    let args = [
        "--ai-provider",
        "openai",
        "--ai-base-url",
        &mock.openai_url(),
        "--ai-model",
        "mock",
        "--ai-api-key",
        "test-key",
        "--ai-retries",
        "0",
        "--crisis-line",
        "988 (call or text)",
        "--emergency-number",
        "911",
    ];
    let env = vec![("RUST_LOG".to_owned(), "info,haven=debug".to_owned())];
    TestApp::spawn_with(Options { args: args.map(String::from).to_vec(), env, ..Options::default() }).await
}

async fn get(app: &TestApp, path: &str, token: &str) -> (u16, Value) {
    let response = app.http.get(app.url(path)).bearer_auth(token).send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

async fn post(app: &TestApp, path: &str, token: Option<&str>, body: Value) -> (u16, Value) {
    let mut request = app.http.post(app.url(path)).json(&body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

async fn appointments(app: &TestApp, token: &str) -> Vec<Appointment> {
    let (status, body) = get(app, "/api/appointments", token).await;
    assert_eq!(status, 200);
    serde_json::from_value(body).unwrap()
}

/// Sends `text` and returns its seq and the frames up to its ack.
async fn say(ws: &mut Ws, text: &str) -> i64 {
    let client_id = ws.send_message(text).await;
    ws.ack(&client_id).await.0
}

/// The next risk frame, passing over everything else.
async fn next_risk(ws: &mut Ws) -> (Uuid, RiskLevel) {
    loop {
        if let ServerFrame::Risk { session_id, level } = ws.frame().await {
            return (session_id, level);
        }
    }
}

#[tokio::test]
async fn the_classify_api_and_cli_explain_the_verdict() {
    let app = TestApp::spawn().await;
    let tess = app.therapist("Tess").await;

    let (status, _) = post(&app, "/api/safety/classify", None, json!({"text": HIGH})).await;
    assert_eq!(status, 401, "therapists only");
    let client = app.create_session().await;
    let (status, _) =
        post(&app, "/api/safety/classify", Some(&client.client_token), json!({"text": HIGH})).await;
    assert_eq!(status, 401, "a client credential is not a therapist's");

    let (status, verdict) =
        post(&app, "/api/safety/classify", Some(&tess.token), json!({"text": HIGH})).await;
    assert_eq!(status, 200);
    assert_eq!(verdict["level"], "high", "{verdict}");
    let rules = verdict["rules"].as_array().unwrap();
    assert!(!rules.is_empty(), "the rules that fired are named: {verdict}");
    for rule in rules {
        assert!(rule["id"].as_str().is_some_and(|id| !id.is_empty()), "{rule}");
        assert!(rule["matched"].as_str().is_some_and(|words| !words.is_empty()), "{rule}");
    }
    assert!(verdict["version"].as_str().is_some_and(|version| !version.is_empty()));

    let (_, idiom) =
        post(&app, "/api/safety/classify", Some(&tess.token), json!({"text": "this traffic is killing me"}))
            .await;
    assert_eq!((idiom["level"].as_str(), idiom["rules"].as_array().map(Vec::len)), (Some("none"), Some(0)));

    let (status, error) =
        post(&app, "/api/safety/classify", Some(&tess.token), json!({"text": "a".repeat(4_001)})).await;
    assert_eq!((status, error["error"].as_str()), (400, Some("content_too_long")));

    // The CLI gives the same verdict, without a server or a database.
    let output = app.cli(&["safety", "check", HIGH], "").await;
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let cli: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(cli, verdict);
    // Nothing the detector saw is logged.
    assert!(!app.logs.text().contains("cutting"), "message words must not be logged");
}

#[tokio::test]
async fn a_risky_message_gets_resources_and_the_script_while_the_model_is_down() {
    let mock = MockLlm::start().await;
    mock.script("", Script { failures: vec![500; 100], ..Script::default() });
    let app = with_model(&mock).await;
    let tess = app.therapist("Tess").await;
    let calm = app.create_session().await;
    let session = app.create_session().await;
    let mut client = app.connect(session.session_id, &session.client_token).await;
    client.mode().await;

    let sent = tokio::time::Instant::now();
    let seq = say(&mut client, IMMINENT).await;
    let own = client.message().await;
    assert_eq!((own.seq, own.sender), (seq, Sender::User));
    let crisis = tokio::time::timeout(Duration::from_secs(1), client.message())
        .await
        .expect("the crisis message arrives within 1 s, whatever the model does");
    let elapsed = sent.elapsed();
    assert_eq!((crisis.seq, crisis.sender), (seq + 1, Sender::System), "{crisis:?}");
    assert!(crisis.content.contains("911") && crisis.content.contains("988"), "{}", crisis.content);
    assert!(elapsed < Duration::from_secs(1), "{elapsed:?}");

    // The companion answers with the safety script, not the (failing) model.
    let reply = client.message().await;
    assert_eq!((reply.sender, reply.content.as_str()), (Sender::Ai, SAFETY_SCRIPT[0]));
    let seq = say(&mut client, "no").await;
    let frames = client.until_seq(seq + 1).await;
    let second: Vec<&ChatMessage> = crate::helpers::messages(&frames);
    assert_eq!(second.last().map(|m| m.content.as_str()), Some(SAFETY_SCRIPT[1]), "{second:?}");
    let streamed = mock.requests().iter().filter(|request| request.body["stream"] == json!(true)).count();
    assert_eq!(streamed, 0, "no free-form generation was even asked for");

    // The session is first in every therapist's list, flagged.
    let list = appointments(&app, &tess.token).await;
    assert_eq!(list.iter().map(|a| a.session_id).collect::<Vec<_>>(), [session.session_id, calm.session_id]);
    let flagged = &list[0];
    assert_eq!((flagged.risk_level, flagged.risk_needs_attention), (RiskLevel::Imminent, true));
    assert!(flagged.risk_first_flagged_at.is_some() && flagged.risk_last_flagged_at.is_some());
    assert_eq!(list[1].risk_level, RiskLevel::None);

    // The audit record and the referral counter.
    let (status, risk) = get(&app, &format!("/api/sessions/{}/risk", session.session_id), &tess.token).await;
    assert_eq!(status, 200);
    let audit = risk["audit"].as_array().unwrap();
    assert_eq!(audit.len(), 1, "{risk}");
    assert_eq!(
        (&audit[0]["kind"], &audit[0]["level"], &audit[0]["seq"], &audit[0]["referred"]),
        (&json!("flagged"), &json!("imminent"), &json!(1), &json!(true))
    );
    assert!(audit[0]["rules"].as_array().is_some_and(|rules| !rules.is_empty()));
    let (_, report) = get(&app, "/api/safety/report", &tess.token).await;
    assert_eq!(report["referrals"], json!({"concern": 0, "high": 0, "imminent": 1, "total": 1}), "{report}");
    assert_eq!(
        (report["flagged_sessions"].as_i64(), report["unacknowledged_sessions"].as_i64()),
        (Some(1), Some(1))
    );
    let output = app.cli(&["safety", "report"], "").await;
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let cli: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(cli["referrals"], report["referrals"]);

    let logs = app.logs.text();
    assert!(!logs.contains("pills") && !logs.contains("cutting"), "message words must not be logged");
    assert!(
        !app.logs
            .matching(|event| crate::helpers::message_of(event).contains("flagged by the crisis detector"))
            .is_empty()
    );
}

#[tokio::test]
async fn a_flag_after_the_join_alerts_that_therapist_and_only_those_who_can_see_it() {
    let app = TestApp::spawn().await;
    let tess = app.therapist("Tess").await;
    let omar = app.therapist("Omar").await;
    let joined = app.create_session().await;
    let omars = app.create_session().await;
    let open = app.create_session().await;
    let mut client = app.connect(joined.session_id, &joined.client_token).await;
    client.mode().await;
    let mut therapist = app.connect(joined.session_id, &tess.token).await;
    therapist.mode().await;
    client.message().await; // the join message
    // Omar is in his own chat; Tess's is not his to see.
    let mut other = app.connect(omars.session_id, &omar.token).await;
    other.mode().await;

    let seq = say(&mut client, HIGH).await;
    let crisis = client.message().await;
    let crisis = if crisis.seq == seq { client.message().await } else { crisis };
    assert_eq!(
        (crisis.seq, crisis.sender),
        (seq + 1, Sender::System),
        "resources even with a therapist there"
    );
    assert_eq!(next_risk(&mut therapist).await, (joined.session_id, RiskLevel::High));
    let list = appointments(&app, &tess.token).await;
    assert_eq!((list[0].session_id, list[0].risk_level), (joined.session_id, RiskLevel::High));
    assert!(appointments(&app, &omar.token).await.iter().all(|a| a.session_id != joined.session_id));

    // A flag in the open session reaches both: Omar's first risk frame is it.
    let mut open_client = app.connect(open.session_id, &open.client_token).await;
    open_client.mode().await;
    say(&mut open_client, "I want to kill myself").await;
    assert_eq!(next_risk(&mut other).await, (open.session_id, RiskLevel::High));
    assert_eq!(next_risk(&mut therapist).await, (open.session_id, RiskLevel::High));

    // The companion stayed silent in the joined session.
    let history = app.history(joined.session_id, &tess.token).await;
    assert!(history.iter().all(|message| message.sender != Sender::Ai), "{history:?}");
    // Clients never get risk frames.
    let seq = say(&mut client, "thank you").await;
    for frame in client.until_seq(seq).await {
        assert!(!matches!(frame, ServerFrame::Risk { .. }), "{frame:?}");
    }
}

#[tokio::test]
async fn acknowledging_records_a_note_keeps_the_level_and_a_new_flag_alerts_again() {
    let app = TestApp::spawn().await;
    let tess = app.therapist("Tess").await;
    let omar = app.therapist("Omar").await;
    let session = app.create_session().await;
    let path = format!("/api/sessions/{}/risk/acknowledge", session.session_id);

    let (status, body) = post(&app, &path, Some(&tess.token), json!({})).await;
    assert_eq!((status, body["error"].as_str()), (409, Some("conflict")), "{body}");

    let mut client = app.connect(session.session_id, &session.client_token).await;
    client.mode().await;
    say(&mut client, "honestly what's the point of anything anymore, i wish i could just not wake up").await;
    let flagged = appointments(&app, &tess.token).await.remove(0);
    assert_eq!((flagged.risk_level, flagged.risk_needs_attention), (RiskLevel::Concern, true));

    let (status, body) = post(&app, &path, Some(&tess.token), json!({"note": "x".repeat(2_001)})).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("note_too_long")));
    let (status, risk) =
        post(&app, &path, Some(&tess.token), json!({"note": "Called the client; safe at home."})).await;
    assert_eq!(status, 200, "{risk}");
    assert_eq!((risk["level"].as_str(), risk["needs_attention"].as_bool()), (Some("concern"), Some(false)));
    let note = risk["audit"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(
        (note["kind"].as_str(), note["note"].as_str(), note["therapist_id"].as_str()),
        (
            Some("acknowledged"),
            Some("Called the client; safe at home."),
            Some(tess.therapist.id.to_string().as_str())
        )
    );
    let listed = appointments(&app, &tess.token).await.remove(0);
    assert_eq!((listed.risk_level, listed.risk_needs_attention), (RiskLevel::Concern, false));

    // A new flag needs attention again; the level only rises.
    say(&mut client, IMMINENT).await;
    let listed = appointments(&app, &omar.token).await.remove(0);
    assert_eq!((listed.risk_level, listed.risk_needs_attention), (RiskLevel::Imminent, true));

    // Once Tess holds the session, Omar may neither see nor acknowledge it.
    let mut therapist = app.connect(session.session_id, &tess.token).await;
    therapist.mode().await;
    let (status, _) = post(&app, &path, Some(&omar.token), json!({})).await;
    assert_eq!(status, 403);
    let (status, _) = get(&app, &format!("/api/sessions/{}/risk", session.session_id), &omar.token).await;
    assert_eq!(status, 403);
    let logs = app.logs.text();
    assert!(!logs.contains("Called the client"), "notes are not logged");
}

#[tokio::test]
async fn the_models_second_opinion_can_raise_a_level_but_never_lower_it() {
    let mock = MockLlm::start().await;
    // The model's answers, keyed by words of the client's message.
    mock.script("quiet evening", Script { chunks: vec!["imminent".into()], ..Script::default() });
    mock.script("kill myself", Script { chunks: vec!["none".into()], ..Script::default() });
    let app = with_model(&mock).await;
    let tess = app.therapist("Tess").await;

    let calm = app.create_session().await;
    let mut client = app.connect(calm.session_id, &calm.client_token).await;
    client.mode().await;
    let mut therapist_view = app.connect(calm.session_id, &tess.token).await;
    therapist_view.mode().await;
    client.message().await; // the join message
    let seq = say(&mut client, "a quiet evening at home, all sorted now").await;
    assert_eq!(next_risk(&mut therapist_view).await, (calm.session_id, RiskLevel::Imminent));
    let (_, risk) = get(&app, &format!("/api/sessions/{}/risk", calm.session_id), &tess.token).await;
    assert_eq!(risk["audit"][0]["rules"], json!([SECOND_OPINION_RULE]), "{risk}");
    assert_eq!(risk["audit"][0]["seq"], json!(seq));
    let crisis = client.until_seq(seq + 1).await;
    assert!(
        crate::helpers::messages(&crisis)
            .iter()
            .any(|m| m.sender == Sender::System && m.content.contains("911")),
        "{crisis:?}"
    );

    let risky = app.create_session().await;
    let mut client = app.connect(risky.session_id, &risky.client_token).await;
    client.mode().await;
    say(&mut client, "I want to kill myself").await;
    // The model answered "none": the level stays.
    let session = risky.session_id.to_string();
    app.logs
        .wait_for(1, |event| {
            crate::helpers::message_of(event) == "second opinion received"
                && crate::helpers::session_of(event).as_deref() == Some(session.as_str())
        })
        .await;
    let listed = appointments(&app, &tess.token).await;
    let risky_row = listed.iter().find(|a| a.session_id == risky.session_id).unwrap();
    assert_eq!(risky_row.risk_level, RiskLevel::High);
}

#[tokio::test]
async fn at_concern_the_companion_checks_in_once_per_flag() {
    let app = TestApp::spawn().await;
    let session = app.create_session().await;
    let mut client = app.connect(session.session_id, &session.client_token).await;
    client.mode().await;
    let check_in = haven_responder::Companion::SAFETY_CHECK_IN;

    let mut reply_to = async |text: &str| {
        let seq = say(&mut client, text).await;
        loop {
            let message = client.message().await;
            if message.seq > seq && message.sender == Sender::Ai {
                return message.content;
            }
        }
    };
    let first = reply_to("what's the point of anything anymore").await;
    assert!(first.starts_with(check_in), "{first}");
    let second = reply_to("work was long today").await;
    assert!(!second.contains(check_in), "once per flag: {second}");
    let again = reply_to("honestly i wish i could just not wake up").await;
    assert!(again.starts_with(check_in), "a new flag checks in again: {again}");
}

/// The companion's reply reads the session's flag from what the commits
/// and the flags since told the room, not from the database: a flag raised
/// after a message's commit, while the reply before it was still being
/// generated, decides the follow-up reply all the same.
#[tokio::test]
async fn a_flag_raised_between_the_commit_and_the_reply_shapes_the_reply() {
    let mock = MockLlm::start().await;
    let (release, held) = tokio::sync::watch::channel(false);
    // The reply to the first message streams a piece, then waits.
    let slow =
        Script { chunks: vec!["Tell me ".into(), "more.".into()], hold: Some(held), ..Script::default() };
    mock.script("alpha", slow);
    // The model's second opinion on the second message (with the first in
    // its window): imminent, where the detector sees nothing.
    mock.script("zulu", Script { chunks: vec!["imminent".into()], ..Script::default() });
    let app = with_model(&mock).await;
    let tess = app.therapist("Tess").await;
    // Tess is in another chat: the alert about this one reaches her there.
    let elsewhere = app.create_session().await;
    let mut tess_ws = app.connect(elsewhere.session_id, &tess.token).await;
    tess_ws.mode().await;

    let session = app.create_session().await;
    let mut client = app.connect(session.session_id, &session.client_token).await;
    client.mode().await;
    say(&mut client, "alpha: how was your weekend").await;
    mock.until("the first reply to stream", |mock| mock.streams_open() == 1).await;
    let seq = say(&mut client, "zulu: a quiet evening at home, all sorted now").await;
    // Its commit reported no flag; the second opinion raises one after it.
    assert_eq!(next_risk(&mut tess_ws).await, (session.session_id, RiskLevel::Imminent));

    // The first reply ends; the follow-up answers the second message.
    release.send(true).unwrap();
    let follow_up = loop {
        let message = client.message().await;
        if message.sender == Sender::Ai && message.seq > seq {
            if message.content == "Tell me more." {
                continue;
            }
            break message;
        }
    };
    assert_eq!(follow_up.content, SAFETY_SCRIPT[0], "the safety script, never the model");
    let streamed = mock.requests().iter().filter(|request| request.body["stream"] == json!(true)).count();
    assert_eq!(streamed, 1, "only the first reply asked the model");
}

/// A client message is read with the client's earlier ones, through the
/// socket: the window keeps each message as the detector read it before
/// its commit, and a time after earlier ideation raises the level, with
/// `context.window` first in the flag's rules.
#[tokio::test]
async fn a_time_after_earlier_ideation_is_flagged_through_the_window() {
    let app = TestApp::spawn().await;
    let tess = app.therapist("Tess").await;
    let session = app.create_session().await;
    let mut client = app.connect(session.session_id, &session.client_token).await;
    client.mode().await;
    let path = format!("/api/sessions/{}/risk", session.session_id);

    let ideation = say(&mut client, "i keep thinking i want to kill myself").await;
    let (status, risk) = get(&app, &path, &tess.token).await;
    assert_eq!(status, 200, "{risk}");
    let first = risk["level"].as_str().map(str::to_owned);
    assert!(matches!(first.as_deref(), Some("concern" | "high")), "{risk}");

    let when = say(&mut client, "after everyone is asleep").await;
    let (_, risk) = get(&app, &path, &tess.token).await;
    assert_eq!(risk["level"].as_str(), Some("imminent"), "{risk}");
    let flags: Vec<&Value> =
        risk["audit"].as_array().unwrap().iter().filter(|r| r["kind"] == "flagged").collect();
    assert_eq!(
        flags.iter().map(|flag| flag["seq"].as_i64()).collect::<Vec<_>>(),
        [Some(ideation), Some(when)]
    );
    assert_eq!(flags[1]["rules"][0].as_str(), Some("context.window"), "{risk}");
}
