//! The store contract: what every [`Store`] promises, checked on both
//! implementations. Each test runs on a fresh SQLite file and on a fresh
//! PostgreSQL database (`HAVEN_TEST_POSTGRES_URL`, by default the local
//! server with trust authentication). PostgreSQL is required: without it
//! these tests fail.

use std::sync::Arc;

use haven_protocol::{ChatMessage, ChatMode, MessageKind, RiskLevel, Sender};
use haven_store::{
    AcknowledgeOutcome, Appended, AuditKind, BotMessage, CloseOutcome, Committed, CurrentRisk, Flagged,
    HandBackOutcome, JoinOutcome, NewMessage, NewTherapist, Origin, PgStore, ResumeOutcome, RiskFlag,
    SessionEvent, SqliteStore, Store, StoreError, Therapist,
};
use time::OffsetDateTime;
use uuid::Uuid;

/// A store under test, and what keeps it alive (its directory).
struct Subject {
    name: &'static str,
    store: Arc<dyn Store>,
    _dir: Option<tempfile::TempDir>,
}

/// A fresh SQLite store and a fresh PostgreSQL store.
async fn subjects() -> Vec<Subject> {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("test.db").display());
    let sqlite = SqliteStore::connect(&url).await.unwrap();
    vec![
        Subject { name: "sqlite", store: Arc::new(sqlite), _dir: Some(dir) },
        Subject { name: "postgres", store: Arc::new(fresh_postgres().await), _dir: None },
    ]
}

async fn fresh_postgres() -> PgStore {
    PgStore::connect(&fresh_postgres_url().await, Uuid::now_v7()).await.unwrap()
}

/// A fresh, empty PostgreSQL database.
async fn fresh_postgres_url() -> String {
    use sqlx::Connection;
    let server = std::env::var("HAVEN_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned());
    let name = format!("haven_contract_{}", Uuid::now_v7().simple());
    let mut admin = sqlx::PgConnection::connect(&format!("{server}/postgres"))
        .await
        .unwrap_or_else(|error| panic!("PostgreSQL is required at {server}: {error}"));
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut admin).await.unwrap();
    format!("{server}/{name}")
}

async fn therapist(store: &dyn Store, email: &str) -> Therapist {
    let new = NewTherapist { email: email.into(), name: "T".into(), password_hash: "x".into() };
    store.create_therapist(new, Origin::OPERATOR).await.unwrap()
}

async fn session(store: &dyn Store, token: &[u8]) -> Uuid {
    store.create_chat_session(token).await.unwrap().outcome.id
}

fn user_message(client_id: &str) -> NewMessage {
    NewMessage { sender: Sender::User, content: "hi".into(), client_id: client_id.into(), risk: None }
}

fn flag(level: RiskLevel) -> RiskFlag {
    RiskFlag {
        level,
        rules: vec!["en.test.rule".into(), "en.test.other".into()],
        detector_version: "test".into(),
        crisis_message: format!("resources for {}", level.as_str()),
    }
}

/// The messages among a write's events, as written.
fn messages(events: &[SessionEvent]) -> Vec<ChatMessage> {
    events
        .iter()
        .filter_map(|event| match event {
            SessionEvent::Message { message, .. } => {
                Some(*message.clone().expect("a local event has its message"))
            }
            _ => None,
        })
        .collect()
}

/// A stored message's seq.
fn stored_seq(appended: &Appended) -> Option<i64> {
    match appended {
        Appended::Stored { seq, .. } => Some(*seq),
        _ => None,
    }
}

/// Appends a flagged client message and returns what flagging did, with
/// the write's events.
async fn flagged(store: &dyn Store, session: Uuid, client_id: &str, level: RiskLevel) -> Committed<Flagged> {
    let new = NewMessage { risk: Some(flag(level)), ..user_message(client_id) };
    let committed = store.append_message(session, new).await.unwrap();
    match committed.outcome {
        Appended::Stored { flagged: Some(flagged), .. } => {
            Committed { outcome: flagged, events: committed.events }
        }
        other => panic!("expected a flagged message, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flags_only_rise_send_resources_when_they_do_and_are_audited() {
    for Subject { name, store, .. } in subjects().await {
        let store = store.as_ref();
        let session = session(store, b"client").await;
        let tess = therapist(store, "t@x").await;

        let first = flagged(store, session, "a", RiskLevel::Concern).await;
        assert!(first.outcome.referred, "{name}");
        let written = messages(&first.events);
        assert_eq!(
            written.iter().map(|m| (m.seq, m.sender, m.kind, m.content.as_str())).collect::<Vec<_>>(),
            [
                (1, Sender::User, MessageKind::Chat, "hi"),
                (2, Sender::System, MessageKind::Crisis, "resources for concern")
            ],
            "{name}: the message, then the resources"
        );
        assert_eq!(
            first.events.last(),
            Some(&SessionEvent::Flagged {
                session_id: session,
                level: RiskLevel::Concern,
                therapist_id: None,
                at: first.outcome.at
            }),
            "{name}"
        );
        // Every later commit reports the flag as stored, whichever way it is
        // written: one by one (flagged) or in the batch's shared statement.
        let concern = CurrentRisk { level: RiskLevel::Concern, last_flagged_at: first.outcome.at };
        let stored = store.chat_session(session).await.unwrap().unwrap().risk.unwrap();
        assert_eq!(
            (stored.level, stored.last_flagged_at),
            (concern.level, concern.last_flagged_at),
            "{name}"
        );
        let plain = store.append_message(session, user_message("plain")).await.unwrap().outcome;
        assert!(
            matches!(plain, Appended::Stored { risk: Some(risk), .. } if risk == concern),
            "{name}: {plain:?}"
        );
        // The same level again: flagged and audited, no second crisis message.
        let again = flagged(store, session, "b", RiskLevel::Concern).await;
        assert!(!again.outcome.referred && messages(&again.events).len() == 1, "{name}");
        let high = flagged(store, session, "c", RiskLevel::High).await;
        assert_eq!((high.outcome.level, messages(&high.events)[1].seq), (RiskLevel::High, 6), "{name}");
        // A lower level never lowers the session's.
        let lower = flagged(store, session, "d", RiskLevel::Concern).await;
        assert_eq!((lower.outcome.level, lower.outcome.referred), (RiskLevel::High, false), "{name}");

        let risk = store.chat_session(session).await.unwrap().unwrap().risk.unwrap();
        assert_eq!(risk.level, RiskLevel::High, "{name}");
        assert!(risk.needs_attention() && risk.first_flagged_at < risk.last_flagged_at, "{name}");

        let acknowledged =
            store.acknowledge_risk(session, tess.id, Some("called the client"), None).await.unwrap();
        assert_eq!(acknowledged.events, [SessionEvent::Acknowledged { session_id: session }], "{name}");
        let AcknowledgeOutcome::Acknowledged(acked) = acknowledged.outcome else {
            panic!("{name}: expected an acknowledgement");
        };
        assert!(!acked.needs_attention(), "{name}");
        assert_eq!(acked.level, RiskLevel::High, "{name}: acknowledging never clears the level");
        // A new flag after the acknowledgement needs attention again.
        flagged(store, session, "e", RiskLevel::Concern).await;
        assert!(
            store.chat_session(session).await.unwrap().unwrap().risk.unwrap().needs_attention(),
            "{name}"
        );

        let audit = store.safety_audit(session).await.unwrap();
        let kinds: Vec<_> = audit
            .iter()
            .map(|record| match &record.kind {
                AuditKind::Flagged { referred, rules, .. } => {
                    assert_eq!(rules, &["en.test.rule", "en.test.other"]);
                    format!("{}{}", record.level.as_str(), if *referred { "+referred" } else { "" })
                }
                AuditKind::Acknowledged { therapist_id, note } => {
                    assert_eq!((*therapist_id, note.as_deref()), (tess.id, Some("called the client")));
                    "ack".to_owned()
                }
            })
            .collect();
        assert_eq!(
            kinds,
            ["concern+referred", "concern", "high+referred", "concern", "ack", "concern"].map(String::from),
            "{name}"
        );
        let report = store.safety_report(OffsetDateTime::UNIX_EPOCH).await.unwrap();
        assert_eq!(report.referrals, vec![(RiskLevel::Concern, 1), (RiskLevel::High, 1)], "{name}");
        assert_eq!(report.flags, vec![(RiskLevel::Concern, 4), (RiskLevel::High, 1)], "{name}");
        assert_eq!((report.flagged_sessions, report.unacknowledged_sessions), (1, 1), "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_assigned_therapist_acknowledges_and_only_a_flag() {
    for Subject { name, store, .. } in subjects().await {
        let store = store.as_ref();
        let session = session(store, b"client").await;
        let (tess, other) = (therapist(store, "t@x").await, therapist(store, "o@x").await);
        let not_flagged = store.acknowledge_risk(session, tess.id, None, None).await.unwrap();
        assert!(
            matches!(not_flagged.outcome, AcknowledgeOutcome::NotFlagged) && not_flagged.events.is_empty()
        );
        store.join_as_therapist(session, tess.id, "joined", None).await.unwrap();
        let mut imminent = flagged(store, session, "a", RiskLevel::Imminent).await;
        assert_eq!(
            imminent.events.pop(),
            Some(SessionEvent::Flagged {
                session_id: session,
                level: RiskLevel::Imminent,
                therapist_id: Some(tess.id),
                at: imminent.outcome.at
            }),
            "{name}: the alert names the assigned therapist"
        );
        assert!(matches!(
            store.acknowledge_risk(session, other.id, None, None).await.unwrap().outcome,
            AcknowledgeOutcome::NotYours
        ));
        assert!(
            store.chat_session(session).await.unwrap().unwrap().risk.unwrap().needs_attention(),
            "{name}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_companion_reply_after_the_join_is_not_written() {
    for Subject { name, store, .. } in subjects().await {
        let store = store.as_ref();
        let session = session(store, b"client").await;
        let tess = therapist(store, "t@x").await;
        let reply = |content: &str| BotMessage::Reply { id: Uuid::now_v7(), content: content.into() };
        let before = store.append_if_bot_only(session, reply("before")).await.unwrap();
        let stored = before.outcome.expect("written while BOT_ONLY");
        assert_eq!(
            (stored.sender, stored.kind, stored.reply_id),
            (Sender::Ai, MessageKind::Chat, Some(stored.id))
        );
        assert_eq!(messages(&before.events), [stored], "{name}");
        let joined = store.join_as_therapist(session, tess.id, "joined", None).await.unwrap();
        assert!(matches!(joined.outcome, JoinOutcome::Joined), "{name}");
        let join = &messages(&joined.events)[0];
        assert_eq!((join.seq, join.sender, join.kind), (2, Sender::System, MessageKind::Join), "{name}");
        let late = store.append_if_bot_only(session, reply("too late")).await.unwrap();
        assert!(late.outcome.is_none() && late.events.is_empty(), "{name}");
        let notice = BotMessage::Notice { content: "unavailable".into() };
        assert!(store.append_if_bot_only(session, notice).await.unwrap().outcome.is_none(), "{name}");
        let history = store.messages_after(session, 0, 10).await.unwrap();
        assert_eq!(
            history.iter().map(|m| m.kind).collect::<Vec<_>>(),
            [MessageKind::Chat, MessageKind::Join]
        );
        assert_eq!(store.chat_session(session).await.unwrap().unwrap().last_seq, 2, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_is_once_per_transition_and_exclusive() {
    for Subject { name, store, .. } in subjects().await {
        let store = store.as_ref();
        let session = session(store, b"client").await;
        let tess = therapist(store, "t@x").await;
        let omar = therapist(store, "o@x").await;
        let outcome =
            |result: Result<Committed<JoinOutcome>, StoreError>| result.map(|c| (c.outcome, c.events.len()));
        assert!(matches!(
            outcome(store.join_as_therapist(session, tess.id, "j", None).await),
            Ok((JoinOutcome::Joined, 1))
        ));
        assert!(matches!(
            outcome(store.join_as_therapist(session, tess.id, "j", None).await),
            Ok((JoinOutcome::AlreadyJoined, 0))
        ));
        assert!(matches!(
            outcome(store.join_as_therapist(session, omar.id, "j", None).await),
            Ok((JoinOutcome::ClaimedByOther, 0))
        ));
        assert!(matches!(
            outcome(store.join_as_therapist(Uuid::now_v7(), tess.id, "j", None).await),
            Err(StoreError::NotFound)
        ));
        let stored = store.chat_session(session).await.unwrap().unwrap();
        assert_eq!(
            (stored.therapist_id, stored.chat_mode, stored.last_seq),
            (Some(tess.id), ChatMode::TherapistJoined, 1),
            "{name}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hand_back_pauses_the_companion_until_the_client_says_yes_and_a_later_join_is_new() {
    for Subject { name, store, .. } in subjects().await {
        let store = store.as_ref();
        let session = session(store, b"client").await;
        let tess = therapist(store, "t@x").await;
        let omar = therapist(store, "o@x").await;
        let reply = || BotMessage::Reply { id: Uuid::now_v7(), content: "companion".into() };
        let hand_back = |who: Uuid, note: Option<&'static str>| {
            store.hand_back(session, who, note, "handed back", Origin::OPERATOR)
        };
        // Only a joined chat can be handed back, and only by its therapist.
        assert!(
            matches!(hand_back(tess.id, None).await.unwrap().outcome, HandBackOutcome::NotYours),
            "{name}"
        );
        store.join_as_therapist(session, tess.id, "joined", None).await.unwrap();
        assert!(
            matches!(hand_back(omar.id, None).await.unwrap().outcome, HandBackOutcome::NotYours),
            "{name}"
        );
        let handed = hand_back(tess.id, Some("take care")).await.unwrap();
        assert!(matches!(handed.outcome, HandBackOutcome::HandedBack), "{name}");
        let written: Vec<_> =
            messages(&handed.events).into_iter().map(|m| (m.seq, m.sender, m.kind, m.content)).collect();
        assert_eq!(
            written,
            [
                (2, Sender::Therapist, MessageKind::Chat, "take care".to_owned()),
                (3, Sender::System, MessageKind::Handback, "handed back".to_owned()),
            ],
            "{name}"
        );
        let again = hand_back(tess.id, None).await.unwrap();
        assert!(matches!(again.outcome, HandBackOutcome::NotJoined) && again.events.is_empty(), "{name}");
        let stored = store.chat_session(session).await.unwrap().unwrap();
        assert_eq!(
            (stored.chat_mode, stored.companion_paused, stored.therapist_id, stored.last_seq),
            (ChatMode::BotOnly, true, Some(tess.id), 3),
            "{name}"
        );

        // Paused: the client's message is stored and says so; the companion
        // writes nothing.
        let waiting = store.append_message(session, user_message("still there?")).await.unwrap().outcome;
        assert!(
            matches!(
                waiting,
                Appended::Stored { seq: 4, chat_mode: ChatMode::BotOnly, companion_paused: true, .. }
            ),
            "{name}: {waiting:?}"
        );
        assert!(store.append_if_bot_only(session, reply()).await.unwrap().outcome.is_none(), "{name}");

        // The client's yes, once; the message that waited is to be answered.
        let resumed = store.resume_companion(session, "resumed").await.unwrap();
        let resume = &messages(&resumed.events)[0];
        assert_eq!(resume.kind, MessageKind::Resume, "{name}");
        assert!(
            matches!(resumed.outcome, ResumeOutcome::Resumed { unanswered: true, seq, risk: None } if seq == resume.seq),
            "{name}: {:?}",
            resumed.outcome
        );
        let twice = store.resume_companion(session, "resumed").await.unwrap();
        assert!(matches!(twice.outcome, ResumeOutcome::NotPaused) && twice.events.is_empty(), "{name}");
        let answered = store.append_if_bot_only(session, reply()).await.unwrap().outcome;
        assert_eq!(answered.map(|m| m.seq), Some(6), "{name}");
        let after = store.append_message(session, user_message("thanks")).await.unwrap().outcome;
        assert!(matches!(after, Appended::Stored { companion_paused: false, .. }), "{name}: {after:?}");

        // The same therapist joins again: a new transition with its own
        // message; another one still cannot.
        assert!(matches!(
            store.join_as_therapist(session, omar.id, "j", None).await.unwrap().outcome,
            JoinOutcome::ClaimedByOther
        ));
        let rejoined = store.join_as_therapist(session, tess.id, "joined again", None).await.unwrap();
        assert!(matches!(rejoined.outcome, JoinOutcome::Joined), "{name}");
        assert!(store.append_if_bot_only(session, reply()).await.unwrap().outcome.is_none(), "{name}");
        // A hand-back with nothing said after it: nothing waits for an answer.
        store.hand_back(session, tess.id, None, "handed back", Origin::OPERATOR).await.unwrap();
        let quiet = store.resume_companion(session, "resumed").await.unwrap();
        assert!(matches!(quiet.outcome, ResumeOutcome::Resumed { unanswered: false, .. }), "{name}");
        let kinds: Vec<_> =
            store.messages_after(session, 0, 20).await.unwrap().iter().map(|m| m.kind).collect();
        use MessageKind::{Chat, Handback, Join, Resume};
        assert_eq!(kinds, [Join, Chat, Handback, Chat, Resume, Chat, Chat, Join, Handback, Resume], "{name}");
        // Closed: no hand-back, no resume.
        store.join_as_therapist(session, tess.id, "joined", None).await.unwrap();
        store.close_chat_session(session, tess.id, "closed", None).await.unwrap();
        assert!(matches!(hand_back(tess.id, None).await.unwrap().outcome, HandBackOutcome::Closed), "{name}");
        assert!(matches!(store.resume_companion(Uuid::now_v7(), "resumed").await, Err(StoreError::NotFound)));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_label_is_one_therapists_own_and_can_be_changed_or_forgotten() {
    for Subject { name, store, .. } in subjects().await {
        let store = store.as_ref();
        let (first, second) = (session(store, b"one").await, session(store, b"two").await);
        let tess = therapist(store, "t@x").await;
        let omar = therapist(store, "o@x").await;
        store.set_client_label(tess.id, first, Some("Sam, Tuesday group")).await.unwrap();
        store.set_client_label(tess.id, second, Some("Alex")).await.unwrap();
        store.set_client_label(omar.id, first, Some("S.")).await.unwrap();
        store.set_client_label(tess.id, second, Some("Alex R.")).await.unwrap();
        let labels = store.client_labels(tess.id).await.unwrap();
        let expected = [(first, "Sam, Tuesday group".to_owned()), (second, "Alex R.".to_owned())];
        assert_eq!(labels, expected.into_iter().collect(), "{name}");
        store.set_client_label(tess.id, first, None).await.unwrap();
        assert_eq!(store.client_labels(tess.id).await.unwrap().len(), 1, "{name}");
        let omars = store.client_labels(omar.id).await.unwrap();
        assert_eq!(omars.get(&first).map(String::as_str), Some("S."), "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_only_move_forward_and_unread_counts_the_client_and_the_companion() {
    for Subject { name, store, .. } in subjects().await {
        let store = store.as_ref();
        let chat = session(store, b"client").await;
        let tess = therapist(store, "t@x").await;
        let since = OffsetDateTime::now_utc() - time::Duration::hours(1);
        let glance = async || store.glances_for(tess.id, since).await.unwrap().remove(&chat).unwrap();
        assert_eq!((glance().await.unread, glance().await.last), (0, None), "{name}");
        store.append_message(chat, user_message("one")).await.unwrap();
        let reply = BotMessage::Reply { id: Uuid::now_v7(), content: "hello".into() };
        store.append_if_bot_only(chat, reply).await.unwrap();
        let seen = glance().await;
        let last = seen.last.unwrap();
        assert_eq!((seen.unread, last.seq, last.sender), (2, 2, Sender::Ai), "{name}");

        store.join_as_therapist(chat, tess.id, "joined", None).await.unwrap();
        store.mark_read(tess.id, chat, 3).await.unwrap();
        // An older page's record does not take it back.
        store.mark_read(tess.id, chat, 1).await.unwrap();
        assert_eq!(glance().await.unread, 0, "{name}");
        store.append_message(chat, user_message("two")).await.unwrap();
        assert_eq!(glance().await.unread, 1, "{name}");
        // Another therapist's reading is their own (the chat is not on
        // their list, being Tess's).
        let omar = therapist(store, "o@x").await;
        store.mark_read(omar.id, chat, 4).await.unwrap();
        assert_eq!(glance().await.unread, 1, "{name}");

        // Closed, it is listed apart, newest first, in pages.
        let other = session(store, b"other").await;
        store.join_as_therapist(other, tess.id, "joined", None).await.unwrap();
        store.close_chat_session(chat, tess.id, "closed", None).await.unwrap();
        store.close_chat_session(other, tess.id, "closed", None).await.unwrap();
        let first = store.closed_for(tess.id, None, 1).await.unwrap();
        assert_eq!(first.iter().map(|s| s.id).collect::<Vec<_>>(), vec![other], "{name}");
        let cursor = (first[0].closed_at.unwrap(), first[0].id);
        let next = store.closed_for(tess.id, Some(cursor), 5).await.unwrap();
        assert_eq!(next.iter().map(|s| s.id).collect::<Vec<_>>(), vec![chat], "{name}");
        assert!(store.closed_for(omar.id, None, 5).await.unwrap().is_empty(), "{name}");
        assert!(store.glances_for(tess.id, since).await.unwrap().is_empty(), "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_chat_takes_no_more_writes_of_any_kind() {
    for Subject { name, store, .. } in subjects().await {
        let session = session(store.as_ref(), b"client").await;
        let tess = therapist(store.as_ref(), "t@x").await;
        store.append_message(session, user_message("before")).await.unwrap();
        store.join_as_therapist(session, tess.id, "joined", None).await.unwrap();
        let closed = store.close_chat_session(session, tess.id, "closed", None).await.unwrap();
        assert!(matches!(closed.outcome, CloseOutcome::Closed), "{name}");
        let close = &messages(&closed.events)[0];
        assert_eq!((close.seq, close.kind), (3, MessageKind::Close), "{name}");
        let again = store.close_chat_session(session, tess.id, "closed", None).await.unwrap();
        assert!(matches!(again.outcome, CloseOutcome::AlreadyClosed) && again.events.is_empty(), "{name}");
        // The client keeps a credential that reads the transcript.
        assert_eq!(store.session_for_client_token(b"client").await.unwrap(), Some(session), "{name}");

        // Plain messages from both sides (sent together, so they share a
        // batch), a flagged one (written one by one), and the companion.
        let writes: Vec<_> = (0..10)
            .map(|n| {
                let store = store.clone();
                tokio::spawn(async move {
                    let sender = if n % 2 == 0 { Sender::User } else { Sender::Therapist };
                    let risk = (n == 3).then(|| flag(RiskLevel::High));
                    let new = NewMessage { sender, risk, ..user_message(&format!("after {n}")) };
                    store.append_message(session, new).await.unwrap()
                })
            })
            .collect();
        for write in writes {
            let refused = write.await.unwrap();
            assert!(
                matches!(refused.outcome, Appended::Closed) && refused.events.is_empty(),
                "{name}: {refused:?}"
            );
        }
        let reply = BotMessage::Reply { id: Uuid::now_v7(), content: "late".into() };
        assert!(store.append_if_bot_only(session, reply).await.unwrap().outcome.is_none(), "{name}");
        // A message sent again after the close still gets its first seq.
        let resent = store.append_message(session, user_message("before")).await.unwrap().outcome;
        assert!(matches!(resent, Appended::Duplicate { seq: 1 }), "{name}: {resent:?}");
        // A flag raised afterwards (a second opinion) is recorded, without
        // a crisis message after the closing one.
        let late_flag = store.flag_risk(session, 1, flag(RiskLevel::Imminent)).await.unwrap();
        assert!(!late_flag.outcome.referred && messages(&late_flag.events).is_empty(), "{name}");
        let kinds: Vec<_> =
            store.messages_after(session, 0, 10).await.unwrap().iter().map(|m| m.kind).collect();
        assert_eq!(kinds, [MessageKind::Chat, MessageKind::Join, MessageKind::Close], "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creating_a_session_is_an_event() {
    for Subject { name, store, .. } in subjects().await {
        let created = store.create_chat_session(b"client").await.unwrap();
        assert_eq!(created.events, [SessionEvent::Created { session_id: created.outcome.id }], "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_get_gap_free_seqs_and_duplicates_are_not_stored() {
    for Subject { name, store, .. } in subjects().await {
        let session = session(store.as_ref(), b"client").await;
        let writers = (0..40).map(|n| {
            let store = store.clone();
            // Every id is sent twice, concurrently.
            tokio::spawn(
                async move { store.append_message(session, user_message(&format!("c{}", n % 20))).await },
            )
        });
        let mut stored = Vec::new();
        let mut duplicates = 0;
        for writer in writers {
            let committed = writer.await.unwrap().unwrap();
            match committed.outcome {
                Appended::Stored { seq, .. } => {
                    assert_eq!(
                        messages(&committed.events)[0].seq,
                        seq,
                        "{name}: the event carries the message"
                    );
                    stored.push(seq);
                }
                Appended::Duplicate { .. } => duplicates += 1,
                Appended::Closed => panic!("{name}: the session is open"),
            }
        }
        stored.sort_unstable();
        assert_eq!(stored, (1..=20).collect::<Vec<_>>(), "{name}");
        assert_eq!(duplicates, 20, "{name}");
        let seqs: Vec<i64> =
            store.messages_after(session, 0, 100).await.unwrap().iter().map(|m| m.seq).collect();
        assert_eq!(seqs, (1..=20).collect::<Vec<_>>(), "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_batch_numbers_each_session_without_gaps_and_stores_what_each_writer_sent() {
    for Subject { name, store, .. } in subjects().await {
        let sessions = [session(store.as_ref(), b"one").await, session(store.as_ref(), b"two").await];
        // Plain, flagged, therapist and companion writes to both sessions,
        // sent together so they share batches.
        let writers: Vec<_> = (0..90)
            .map(|n| {
                let store = store.clone();
                let session = sessions[n % 2];
                tokio::spawn(async move {
                    let content = format!("write {n}");
                    let client_id = format!("c{n}");
                    let written = match n % 5 {
                        0 => store
                            .append_if_bot_only(session, BotMessage::Notice { content })
                            .await
                            .map(|c| c.events),
                        kind => {
                            let sender = if kind == 1 { Sender::Therapist } else { Sender::User };
                            let risk = (kind == 2).then(|| flag(RiskLevel::Concern));
                            let new = NewMessage { sender, content, client_id, risk };
                            store.append_message(session, new).await.map(|c| c.events)
                        }
                    };
                    (session, n, messages(&written.unwrap()).remove(0))
                })
            })
            .collect();
        for writer in writers {
            let (session, n, message) = writer.await.unwrap();
            assert_eq!(message.content, format!("write {n}"), "{name}");
            let expected = if n % 5 == 0 { MessageKind::Notice } else { MessageKind::Chat };
            assert_eq!(message.kind, expected, "{name}");
            let read = store.messages_after(session, message.seq - 1, 1).await.unwrap();
            assert_eq!(read[0], message, "{name}: seq {} holds what its writer sent", message.seq);
        }
        for session in sessions {
            let seqs: Vec<i64> =
                store.messages_after(session, 0, 200).await.unwrap().iter().map(|m| m.seq).collect();
            // 45 writes, and the crisis message of the first concern flag.
            assert_eq!(seqs, (1..=46).collect::<Vec<_>>(), "{name}");
            assert_eq!(store.chat_session(session).await.unwrap().unwrap().last_seq, 46, "{name}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_append_does_not_undo_the_others_in_its_batch() {
    for Subject { name, store, .. } in subjects().await {
        let session = session(store.as_ref(), b"client").await;
        // Sent together, so most land in one batch with the failing ones.
        let writers: Vec<_> = (0..60)
            .map(|n| {
                let store = store.clone();
                let target = if n % 3 == 0 { Uuid::now_v7() } else { session };
                tokio::spawn(
                    async move { store.append_message(target, user_message(&format!("c{n}"))).await },
                )
            })
            .collect();
        let mut stored = Vec::new();
        for (n, writer) in writers.into_iter().enumerate() {
            match writer.await.unwrap() {
                Ok(committed) => stored.push(stored_seq(&committed.outcome).expect("stored")),
                Err(StoreError::NotFound) => assert_eq!(n % 3, 0, "{name}: only appends to no session fail"),
                Err(other) => panic!("{name}: append {n}: {other:?}"),
            }
        }
        stored.sort_unstable();
        assert_eq!(stored, (1..=40).collect::<Vec<_>>(), "{name}");
        assert_eq!(store.messages_after(session, 0, 100).await.unwrap().len(), 40, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_refused_for_what_it_holds_does_not_fail_its_batch() {
    for Subject { name, store, .. } in subjects().await {
        let session = session(store.as_ref(), &[7; 32]).await;
        // Twenty writes at once share batches; one holds a character
        // PostgreSQL refuses (the edge refuses it too; the store must not
        // rely on that; SQLite stores it).
        let writes: Vec<_> = (0..20)
            .map(|n| {
                let store = store.clone();
                let content = if n == 7 { "hello\u{0}world".to_owned() } else { format!("message {n}") };
                let message =
                    NewMessage { sender: Sender::User, content, client_id: format!("c{n}"), risk: None };
                tokio::spawn(async move { store.append_message(session, message).await })
            })
            .collect();
        let mut refused = Vec::new();
        for (n, write) in writes.into_iter().enumerate() {
            if write.await.unwrap().is_err() {
                refused.push(n);
            }
        }
        let expected: &[usize] = if name == "postgres" { &[7] } else { &[] };
        assert_eq!(refused, expected, "{name}: only the write holding U+0000 may be refused");
        let stored = store.messages_after(session, 0, 100).await.unwrap();
        assert_eq!(stored.len(), 20 - expected.len(), "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_logins_and_unknown_sessions_find_nothing() {
    for Subject { name, store, .. } in subjects().await {
        let store = store.as_ref();
        let tess = therapist(store, "t@x").await;
        let now = haven_store::now();
        let hour = time::Duration::hours(1);
        store.create_auth_session(tess.id, b"live", now + hour, None).await.unwrap();
        store.create_auth_session(tess.id, b"old", now - time::Duration::seconds(1), None).await.unwrap();
        let found = store.therapist_by_token(b"live", now, hour, true).await.unwrap();
        assert_eq!(found.map(|t| t.id), Some(tess.id), "{name}");
        assert!(store.therapist_by_token(b"old", now, hour, true).await.unwrap().is_none(), "{name}");
        store.revoke_auth_session(b"live", None).await.unwrap();
        assert!(store.therapist_by_token(b"live", now, hour, true).await.unwrap().is_none(), "{name}");
        assert!(matches!(
            store.append_message(Uuid::now_v7(), user_message("a")).await,
            Err(StoreError::NotFound)
        ));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_logins_end_and_password_changes_or_disabling_end_every_login() {
    for Subject { name, store, .. } in subjects().await {
        let store = store.as_ref();
        let tess = therapist(store, "t@x").await;
        let start = haven_store::now();
        let (hour, idle) = (time::Duration::hours(1), time::Duration::minutes(30));
        let minutes = time::Duration::minutes;
        store.create_auth_session(tess.id, b"a", start + hour, None).await.unwrap();
        store.create_auth_session(tess.id, b"b", start + hour, None).await.unwrap();
        // Used at minute 20, so still valid at minute 45; unused by minute 31.
        assert!(
            store.therapist_by_token(b"a", start + minutes(20), idle, true).await.unwrap().is_some(),
            "{name}"
        );
        assert!(
            store.therapist_by_token(b"a", start + minutes(45), idle, true).await.unwrap().is_some(),
            "{name}"
        );
        assert!(
            store.therapist_by_token(b"b", start + minutes(31), idle, true).await.unwrap().is_none(),
            "{name}"
        );

        store.set_password("t@x", "new hash", Origin::OPERATOR).await.unwrap().expect("known account");
        assert!(
            store.therapist_by_token(b"a", start, idle, true).await.unwrap().is_none(),
            "{name}: password change ends logins"
        );
        assert_eq!(store.therapist_with_password("t@x").await.unwrap().unwrap().1, "new hash");

        store.create_auth_session(tess.id, b"c", start + hour, None).await.unwrap();
        let disabled =
            store.disable_therapist("t@x", Origin::OPERATOR).await.unwrap().expect("known account");
        assert!(disabled.disabled, "{name}");
        assert!(
            store.therapist_by_token(b"c", start, idle, true).await.unwrap().is_none(),
            "{name}: disabling ends logins"
        );
        assert!(
            store.therapist_with_password("t@x").await.unwrap().is_none(),
            "{name}: a disabled account cannot log in"
        );
        assert!(store.set_password("nobody@x", "h", Origin::OPERATOR).await.unwrap().is_none(), "{name}");
    }
}

/// The migration that added `messages.kind` classifies earlier system
/// messages by the texts Haven wrote then: those must be today's texts.
#[test]
fn the_kind_migration_knows_the_join_and_closing_texts() {
    for migration in [
        include_str!("../migrations/sqlite/20261204000001_message_kind.sql"),
        include_str!("../migrations/postgres/20261204000001_message_kind.sql"),
    ] {
        assert!(migration.contains(&format!("'{}'", haven_protocol::JOIN_MESSAGE)));
        assert!(migration.contains(&format!("'{}'", haven_protocol::CLOSE_MESSAGE)));
    }
}

/// What keeping the audit trail one chain costs on PostgreSQL, where each
/// audited action takes one advisory lock held to its commit: a therapist's
/// reads of a chat through two stores on one database (two instances),
/// with their audit record and without (`messages_after`, as before the
/// trail), at 1, 4 and 16 readers. A benchmark, not a check; docs/privacy.md
/// has its figures:
/// `cargo test -p haven-store --release --test contract -- --ignored --nocapture trail_cost`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark"]
async fn trail_cost_on_postgres() {
    use haven_store::trail::Verifier;
    use haven_store::{Action, Actor, TrailEntry, TrailFilter};
    use std::time::{Duration, Instant};

    const RUN: Duration = Duration::from_secs(5);
    let url = fresh_postgres_url().await;
    let mut instances: Vec<Arc<dyn Store>> = Vec::new();
    for _ in 0..2 {
        instances.push(Arc::new(PgStore::connect(&url, Uuid::now_v7()).await.unwrap()));
    }
    let store = &*instances[0];
    let reader = therapist(store, "reader@x").await.id;
    let chat = session(store, b"client").await;
    for n in 0..20 {
        store.append_message(chat, user_message(&format!("c{n}"))).await.unwrap();
    }
    println!("readers\tplain reads/s\taudited reads/s\tratio");
    for readers in [1, 4, 16] {
        let mut rates = [0.0; 2];
        for (audited, rate) in rates.iter_mut().enumerate() {
            let until = Instant::now() + RUN;
            let tasks: Vec<_> = (0..readers)
                .map(|index| {
                    let store = instances[index % 2].clone();
                    tokio::spawn(async move {
                        let mut reads = 0_u64;
                        while Instant::now() < until {
                            let read = if audited == 1 {
                                let entry = TrailEntry::new(Actor::Therapist(reader), Action::Read);
                                store.read_messages(chat, 0, 50, entry).await
                            } else {
                                store.messages_after(chat, 0, 50).await
                            };
                            assert_eq!(read.unwrap().len(), 20);
                            reads += 1;
                        }
                        reads
                    })
                })
                .collect();
            let mut reads = 0;
            for task in tasks {
                reads += task.await.unwrap();
            }
            *rate = reads as f64 / RUN.as_secs_f64();
        }
        println!("{readers}\t{:.0}\t{:.0}\t{:.2}", rates[0], rates[1], rates[1] / rates[0]);
    }
    // Every audited read is in one unbroken chain.
    let mut verifier = Verifier::default();
    let mut filter = TrailFilter { limit: 1_000, ..TrailFilter::default() };
    loop {
        let page = store.trail(&filter).await.unwrap();
        let Some(last) = page.last() else { break };
        filter.after = last.seq;
        for record in &page {
            verifier.check(record).unwrap();
        }
    }
    println!("{} records, one chain", verifier.count());
}
