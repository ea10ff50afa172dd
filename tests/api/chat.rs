//! The takeover loop: companion until a therapist joins, then silence.

use std::collections::HashSet;

use haven_protocol::{ChatMode, Sender, ServerFrame};
use serde_json::Value;

use crate::helpers::{Options, TestApp, from_companion, messages};

#[tokio::test]
async fn user_hello_gets_a_companion_reply_stored_as_seqs_1_and_2() {
    let app = TestApp::spawn().await;
    let session = app.create_session().await;
    assert_eq!(session.chat_mode, ChatMode::BotOnly);
    let mut client = app.connect(session.session_id, &session.client_token).await;
    assert_eq!(client.mode().await, ChatMode::BotOnly);

    let client_id = client.send_message("hello").await;
    let (seq, before) = client.ack(&client_id).await;
    assert_eq!(seq, 1);
    assert!(before.is_empty(), "nothing precedes the ack: {before:?}");
    let own = client.message().await;
    assert_eq!((own.seq, own.sender, own.content.as_str()), (1, Sender::User, "hello"));
    assert_eq!(own.client_id.as_deref(), Some(client_id.as_str()));
    let reply = client.message().await;
    assert_eq!((reply.seq, reply.sender), (2, Sender::Ai));
    assert!(reply.content.contains("automated companion"), "{}", reply.content);

    let history = app.history(session.session_id, &session.client_token).await;
    let stored: Vec<_> = history.iter().map(|m| (m.seq, m.sender, m.content.clone())).collect();
    assert_eq!(stored, vec![(1, Sender::User, "hello".to_owned()), (2, Sender::Ai, reply.content.clone())]);
}

#[tokio::test]
async fn therapist_join_reaches_every_client_tab_and_is_stored() {
    let app = TestApp::spawn().await;
    let session = app.create_session().await;
    let mut tabs = Vec::new();
    for _ in 0..2 {
        let mut tab = app.connect(session.session_id, &session.client_token).await;
        assert_eq!(tab.mode().await, ChatMode::BotOnly);
        tabs.push(tab);
    }
    let therapist = app.therapist("Tess").await;
    let mut desk = app.connect(session.session_id, &therapist.token).await;
    assert_eq!(desk.mode().await, ChatMode::TherapistJoined);
    let joined = desk.message().await;
    let named = "🧑\u{200d}⚕️ Therapist has joined: Tess. You can talk directly now.";
    assert_eq!((joined.seq, joined.sender, joined.content.as_str()), (1, Sender::System, named));

    for tab in &mut tabs {
        assert_eq!(tab.message().await, joined);
        assert_eq!(tab.mode().await, ChatMode::TherapistJoined);
    }

    let appointments: Vec<Value> = app
        .http
        .get(app.url("/api/appointments"))
        .bearer_auth(&therapist.token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let row = appointments.iter().find(|row| row["session_id"] == session.session_id.to_string()).unwrap();
    assert_eq!(row["chat_mode"], "THERAPIST_JOINED");
    assert_eq!(row["status"], "assigned");
    assert_eq!(row["therapist_id"], therapist.therapist.id.to_string());

    // A reconnect of the same therapist is not a new transition.
    desk.close().await;
    let mut again = app.connect(session.session_id, &therapist.token).await;
    assert_eq!(again.mode().await, ChatMode::TherapistJoined);
    let id = again.send_message("I'm here").await;
    let (seq, _) = again.ack(&id).await;
    assert_eq!(seq, 2, "no second join message was stored");
    let history = app.history(session.session_id, &session.client_token).await;
    assert_eq!(history.iter().filter(|m| m.sender == Sender::System).count(), 1);
}

#[tokio::test]
async fn after_the_join_user_messages_reach_the_therapist_and_the_companion_stays_silent() {
    let app = TestApp::spawn().await;
    let session = app.create_session().await;
    let mut client = app.connect(session.session_id, &session.client_token).await;
    client.mode().await;
    let therapist = app.therapist("Tess").await;
    let mut desk = app.connect(session.session_id, &therapist.token).await;
    desk.mode().await;
    desk.message().await;
    client.until_seq(1).await;

    // Not "is anyone there?": the crisis classifier reads that as `concern`
    // (docs/safety.md, known limits), and its crisis message would be seq 3.
    let question = client.send_message("hello, are you the therapist?").await;
    let (_, mut frames) = client.ack(&question).await;
    let received = desk.message().await;
    assert_eq!((received.sender, received.content.as_str()), (Sender::User, "hello, are you the therapist?"));

    let answer = desk.send_message("Yes, I'm Tess. I'm here.").await;
    desk.ack(&answer).await;
    // The client's next message is handled only after the first one's
    // commit, where the server decided whether the companion answers.
    let later = client.send_message("thank you").await;
    frames.extend(client.ack(&later).await.1);
    frames.extend(client.until_seq(4).await);
    let seen: Vec<_> = messages(&frames).iter().map(|m| (m.seq, m.sender)).collect();
    assert_eq!(seen, vec![(2, Sender::User), (3, Sender::Therapist), (4, Sender::User)]);
    assert!(!from_companion(&frames), "the companion spoke after the join: {frames:?}");
    let history = app.history(session.session_id, &session.client_token).await;
    assert!(history.iter().all(|m| m.sender != Sender::Ai), "{history:?}");
}

#[tokio::test]
async fn a_therapist_message_reaches_the_client_as_therapist_without_a_companion_reply() {
    let app = TestApp::spawn().await;
    let session = app.create_session().await;
    let mut client = app.connect(session.session_id, &session.client_token).await;
    client.mode().await;
    // Some companion history first.
    let hello = client.send_message("hello").await;
    client.ack(&hello).await;
    client.until_seq(2).await;

    let therapist = app.therapist("Tess").await;
    let mut desk = app.connect(session.session_id, &therapist.token).await;
    desk.mode().await;
    desk.message().await;
    let id = desk.send_message("Hi, I'm Tess, a therapist at the clinic.").await;
    let (seq, _) = desk.ack(&id).await;
    assert_eq!(seq, 4);

    let frames = client.until_seq(4).await;
    assert!(!from_companion(&frames), "only the client's hello had a reply: {frames:?}");
    let last = messages(&frames).last().copied().cloned().unwrap();
    assert_eq!(
        (last.sender, last.content.as_str()),
        (Sender::Therapist, "Hi, I'm Tess, a therapist at the clinic.")
    );
    assert!(
        frames.contains(&ServerFrame::Mode { chat_mode: ChatMode::TherapistJoined, companion_paused: false })
    );
    let history = app.history(session.session_id, &session.client_token).await;
    let senders: Vec<_> = history.iter().map(|m| m.sender).collect();
    assert_eq!(senders, vec![Sender::User, Sender::Ai, Sender::System, Sender::Therapist]);
}

#[tokio::test]
async fn three_client_tabs_and_a_therapist_see_every_frame_in_the_same_order() {
    let app = TestApp::spawn().await;
    let session = app.create_session().await;
    let therapist = app.therapist("Tess").await;
    let mut tabs = Vec::new();
    for _ in 0..3 {
        let mut tab = app.connect(session.session_id, &session.client_token).await;
        tab.mode().await;
        tabs.push(tab);
    }
    // Every tab talks to the companion at once; the therapist joins while
    // those replies are being written.
    for (index, tab) in tabs.iter_mut().enumerate() {
        tab.send_message(&format!("tab {index} before the join")).await;
    }
    let mut desk = app.connect(session.session_id, &therapist.token).await;
    assert_eq!(desk.mode().await, ChatMode::TherapistJoined);
    for round in 0..4 {
        for (index, tab) in tabs.iter_mut().enumerate() {
            tab.send_message(&format!("tab {index} round {round}")).await;
        }
        desk.send_message(&format!("therapist round {round}")).await;
    }
    let last = desk.send_message("that's all").await;
    let (total, _) = desk.ack(&last).await;

    let mut transcripts = Vec::new();
    for tab in &mut tabs {
        // Acks go to their sender only; every other frame goes to every tab.
        let frames: Vec<ServerFrame> = tab
            .until_seq(total)
            .await
            .into_iter()
            .filter(|frame| !matches!(frame, ServerFrame::Ack { .. }))
            .collect();
        let seqs: Vec<i64> = messages(&frames).iter().map(|m| m.seq).collect();
        assert_eq!(seqs, (1..=total).collect::<Vec<_>>(), "every message once, in seq order");
        transcripts.push(frames);
    }
    assert!(
        transcripts.windows(2).all(|pair| pair[0] == pair[1]),
        "all tabs saw the same frames in the same order"
    );
    let joined = transcripts[0]
        .iter()
        .position(|frame| matches!(frame, ServerFrame::Message(m) if m.sender == Sender::System))
        .unwrap();
    assert_eq!(
        transcripts[0][joined + 1],
        ServerFrame::Mode { chat_mode: ChatMode::TherapistJoined, companion_paused: false }
    );
    let after_join = &transcripts[0][joined..];
    assert!(messages(after_join).iter().all(|m| m.sender != Sender::Ai), "no companion after the join");

    let desk_frames = desk.until_seq(total).await;
    let desk_messages = messages(&desk_frames);
    let client_messages = messages(&transcripts[0]);
    assert_eq!(
        desk_messages,
        client_messages[client_messages.len() - desk_messages.len()..],
        "the therapist sees the same stream"
    );
}

#[tokio::test]
async fn a_slow_companion_never_speaks_after_the_join_across_many_sessions() {
    const SESSIONS: usize = 12;
    // Replies pending long enough that joins, even on a loaded machine,
    // overtake some of them (300 ms let every reply land first once).
    let app = TestApp::spawn_with(Options { companion_delay_ms: 2_000, ..Options::default() }).await;
    let therapist = app.therapist("Tess").await;

    let mut clients = Vec::new();
    for _ in 0..SESSIONS {
        let session = app.create_session().await;
        let mut client = app.connect(session.session_id, &session.client_token).await;
        client.mode().await;
        clients.push((session, client));
    }
    // Every client asks; every reply is now pending in the slow companion.
    for (_, client) in &mut clients {
        let id = client.send_message("hello, is someone there?").await;
        client.ack(&id).await;
    }
    // The therapist joins every session while the replies are pending.
    let mut desks = Vec::new();
    for (session, _) in &clients {
        let mut desk = app.connect(session.session_id, &therapist.token).await;
        assert_eq!(desk.mode().await, ChatMode::TherapistJoined);
        desks.push(desk);
    }
    // Each pending reply ends where its client can see it: withdrawn
    // (`ai_cancelled`, before the join) or stored. Wait until all have.
    let mut ended = Vec::new();
    let mut silenced = 0;
    for (_, client) in &mut clients {
        let mut frames = Vec::new();
        loop {
            let frame = client.frame().await;
            let cancelled = matches!(frame, ServerFrame::AiCancelled { .. });
            let stored = matches!(&frame, ServerFrame::Message(m) if m.sender == Sender::Ai);
            frames.push(frame);
            if cancelled || stored {
                silenced += usize::from(cancelled);
                break;
            }
        }
        ended.push(frames);
    }
    assert!(silenced > 0, "the join overtook no pending reply: the race was not exercised");

    let mut seen_sessions = HashSet::new();
    for (((session, client), desk), mut frames) in clients.iter_mut().zip(&mut desks).zip(ended) {
        // A message sent now is delivered after anything published before it.
        let id = desk.send_message("I'm here now.").await;
        let (last, _) = desk.ack(&id).await;
        frames.extend(client.until_seq(last).await);
        let delivered = messages(&frames);
        let join = delivered.iter().position(|m| m.sender == Sender::System).expect("join message delivered");
        let join_frame = frames
            .iter()
            .position(|frame| matches!(frame, ServerFrame::Message(m) if m.sender == Sender::System))
            .unwrap();
        assert!(
            !frames[join_frame..].iter().any(|frame| matches!(frame, ServerFrame::AiDelta { .. })),
            "a companion delta was delivered after the join: {frames:?}"
        );
        assert!(
            delivered[join..].iter().all(|m| m.sender != Sender::Ai),
            "an ai message was delivered after the join: {delivered:?}"
        );
        let history = app.history(session.session_id, &session.client_token).await;
        let join_seq = history.iter().find(|m| m.sender == Sender::System).unwrap().seq;
        assert!(history.iter().filter(|m| m.seq > join_seq).all(|m| m.sender != Sender::Ai), "{history:?}");
        seen_sessions.insert(session.session_id);
    }
    assert_eq!(seen_sessions.len(), SESSIONS);
}

#[tokio::test]
async fn typing_reaches_the_other_side_once_a_second_and_ends_at_send_and_at_disconnect() {
    let app = TestApp::spawn().await;
    let session = app.create_session().await;
    let mut client = app.connect(session.session_id, &session.client_token).await;
    client.mode().await;
    // Before any therapist: typing, then stopping, reaches nobody and wakes
    // no companion.
    client.send_json(serde_json::json!({"type": "typing"})).await;
    client.send_json(serde_json::json!({"type": "typing", "active": false})).await;
    let therapist = app.therapist("Tess").await;
    let mut desk = app.connect(session.session_id, &therapist.token).await;
    desk.mode().await;
    desk.message().await;
    let mut seen = client.until_seq(1).await;

    // A burst: passed on once; the client's own tabs never get it back.
    for _ in 0..10 {
        client.send_json(serde_json::json!({"type": "typing"})).await;
    }
    let typing = |sender, active| ServerFrame::Typing { sender, active };
    assert_eq!(desk.frame().await, typing(Sender::User, true));
    // Sending ends it, before the message arrives.
    let id = client.send_message("hello").await;
    let (seq, frames) = client.ack(&id).await;
    seen.extend(frames);
    let at_desk = desk.until_seq(seq).await;
    // One signal a second: the burst took far less, so at most a stalled
    // moment lets a second one through.
    let (last, earlier) = at_desk.split_last().unwrap();
    assert!(matches!(last, ServerFrame::Message(m) if m.seq == seq), "{at_desk:?}");
    let (stop, burst) = earlier.split_last().expect("the end of typing before the message");
    assert_eq!(*stop, typing(Sender::User, false));
    assert!(burst.iter().all(|frame| *frame == typing(Sender::User, true)) && burst.len() < 5, "{at_desk:?}");

    // The therapist's typing reaches the client; leaving ends it.
    desk.send_json(serde_json::json!({"type": "typing", "active": true})).await;
    loop {
        match client.frame().await {
            frame @ ServerFrame::Typing { .. } => {
                assert_eq!(frame, typing(Sender::Therapist, true));
                break;
            }
            other => seen.push(other),
        }
    }
    desk.close().await;
    assert_eq!(client.frame().await, typing(Sender::Therapist, false), "the indicator ends with the socket");
    assert!(
        !seen.iter().any(|frame| matches!(frame, ServerFrame::Typing { .. })
            || from_companion(std::slice::from_ref(frame))),
        "no typing of its own, nothing from the companion: {seen:?}"
    );

    // Not stored; a malformed signal is refused like any bad frame.
    let history = app.history(session.session_id, &session.client_token).await;
    assert_eq!(history.len(), 2, "{history:?}");
    client.send_json(serde_json::json!({"type": "typing", "active": "yes"})).await;
    assert!(matches!(
        client.frame().await,
        ServerFrame::Error { code: haven_protocol::ErrorCode::InvalidJson, .. }
    ));
}

#[tokio::test]
async fn a_waiting_client_is_told_how_many_therapists_are_online_and_how_many_chats_wait_before_it() {
    let app = TestApp::spawn().await;
    let first = app.create_session().await;
    let mut a = app.connect(first.session_id, &first.client_token).await;
    assert_eq!(a.queue().await, (0, 0), "nobody online, nobody waiting before");
    let second = app.create_session().await;
    let mut b = app.connect(second.session_id, &second.client_token).await;
    assert_eq!(b.queue().await, (0, 1), "the first chat waits before the second");

    // A therapist with the appointments list open is online.
    let therapist = app.therapist("Tess Example").await;
    let list = app.http.get(app.url("/api/appointments/events")).bearer_auth(&therapist.token).send();
    let list = list.await.unwrap();
    assert_eq!(list.status(), 200);
    assert_eq!(a.queue().await, (1, 0));
    assert_eq!(b.queue().await, (1, 1));

    // A flagged chat comes first on the therapists' list: before both.
    let third = app.create_session().await;
    let mut c = app.connect(third.session_id, &third.client_token).await;
    assert_eq!(c.queue().await, (1, 2), "a new chat waits last");
    let sent = c.send_message("i want to kill myself").await;
    c.ack(&sent).await;
    assert_eq!(c.queue().await, (1, 0), "flagged: first");
    assert_eq!(a.queue().await, (1, 1));
    assert_eq!(b.queue().await, (1, 2));

    // The therapist takes the flagged chat (and is counted once with the
    // list open too): the others move up.
    let mut desk = app.connect(third.session_id, &therapist.token).await;
    assert_eq!(desk.mode().await, ChatMode::TherapistJoined);
    assert_eq!(a.queue().await, (1, 0));
    assert_eq!(b.queue().await, (1, 1));

    // The therapist closes the chat and the list: nobody is online.
    desk.close().await;
    drop(list);
    assert_eq!(a.queue().await, (0, 0));
    assert_eq!(b.queue().await, (0, 1));
    // A taken chat is told no more of the queue, and a therapist never is:
    // nothing was set aside by the time a later message arrived.
    let mut desk = app.connect(third.session_id, &therapist.token).await;
    assert_eq!(desk.mode().await, ChatMode::TherapistJoined);
    assert_eq!(a.queue().await, (1, 0), "the therapist is back");
    let seq = app.history(third.session_id, &therapist.token).await.len() as i64;
    c.send_message("thank you").await;
    desk.until_seq(seq + 1).await;
    c.until_seq(seq + 1).await;
    assert_eq!((c.queued(), desk.queued()), (0, 0));
}

#[tokio::test]
async fn each_side_is_told_whether_the_other_is_here_at_connect_and_when_it_comes_and_goes() {
    let app = TestApp::spawn().await;
    let session = app.create_session().await;
    let mut client = app.connect(session.session_id, &session.client_token).await;
    assert_eq!(client.presence().await, (Sender::Therapist, false, None), "no therapist yet");

    let therapist = app.therapist("Tess Example").await;
    let online = async |token: &str| {
        let list = app.appointments(token).await;
        list.iter().find(|row| row.session_id == session.session_id).expect("listed").client_online
    };
    assert!(online(&therapist.token).await, "the dashboard shows the client online");
    let mut desk = app.connect(session.session_id, &therapist.token).await;
    assert_eq!(desk.presence().await, (Sender::User, true, None), "the therapist sees the client is here");
    let here = (Sender::Therapist, true, Some("Tess Example".to_owned()));
    assert_eq!(client.presence().await, here, "the client sees the therapist, by name");

    // The client's only tab goes and comes back.
    client.close().await;
    assert_eq!(desk.presence().await, (Sender::User, false, None), "the client has left");
    assert!(!online(&therapist.token).await, "and is offline on the dashboard");
    let mut client = app.connect(session.session_id, &session.client_token).await;
    assert_eq!(desk.presence().await, (Sender::User, true, None), "the client is back");
    assert!(online(&therapist.token).await);
    assert_eq!(client.presence().await, here, "a new tab is told at once");

    // The therapist leaves: the chat stays theirs, the client is told.
    desk.close().await;
    assert_eq!(client.presence().await, (Sender::Therapist, false, None), "the therapist has left");
    assert_eq!(client.mode().await, ChatMode::TherapistJoined, "leaving is not a hand-back");
}
