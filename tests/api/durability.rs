//! What is committed stays: restarts, replay with `since`, re-sent messages.

use haven_protocol::{ChatMode, Sender};

use crate::helpers::{TestApp, from_companion, messages};

#[tokio::test]
async fn the_mode_survives_a_restart_and_the_companion_stays_silent() {
    let mut app = TestApp::spawn().await;
    let session = app.create_session().await;
    let therapist = app.therapist("Tess").await;
    let mut desk = app.connect(session.session_id, &therapist.token).await;
    desk.mode().await;
    desk.message().await;

    app.restart().await;

    let mut client = app.connect(session.session_id, &session.client_token).await;
    assert_eq!(client.mode().await, ChatMode::TherapistJoined);
    let id = client.send_message("are you still there?").await;
    let (seq, mut frames) = client.ack(&id).await;
    assert_eq!(seq, 2);
    let mut desk = app.connect(session.session_id, &therapist.token).await;
    assert_eq!(desk.mode().await, ChatMode::TherapistJoined);
    let answer = desk.send_message("Yes.").await;
    desk.ack(&answer).await;
    frames.extend(client.until_seq(3).await);
    assert!(!from_companion(&frames), "the companion spoke after the restart: {frames:?}");
    assert_eq!(
        messages(&frames).iter().map(|m| m.sender).collect::<Vec<_>>(),
        vec![Sender::User, Sender::Therapist]
    );
    let history = app.history(session.session_id, &session.client_token).await;
    assert_eq!(
        history.iter().map(|m| m.sender).collect::<Vec<_>>(),
        vec![Sender::System, Sender::User, Sender::Therapist]
    );
}

#[tokio::test]
async fn since_replays_exactly_the_missing_messages_before_live_ones() {
    let app = TestApp::spawn().await;
    let session = app.create_session().await;
    let mut first = app.connect(session.session_id, &session.client_token).await;
    first.mode().await;
    // Each reply before the next message: messages sent while the
    // companion is answering would share one reply.
    for (round, text) in ["one", "two", "three"].into_iter().enumerate() {
        let id = first.send_message(text).await;
        first.ack(&id).await;
        first.until_seq(2 * (round as i64 + 1)).await;
    }
    first.close().await;

    let mut resumed = app
        .connect_with(
            &format!("/api/chat/ws/{}?since=2", session.session_id),
            &[("authorization", format!("Bearer {}", session.client_token))],
        )
        .await;
    assert_eq!(resumed.mode().await, ChatMode::BotOnly);
    let replayed = resumed.until_seq(6).await;
    let seqs: Vec<i64> = messages(&replayed).iter().map(|m| m.seq).collect();
    assert_eq!(seqs, vec![3, 4, 5, 6]);

    let id = resumed.send_message("four").await;
    let (seq, _) = resumed.ack(&id).await;
    assert_eq!(seq, 7);
    let live = resumed.until_seq(8).await;
    let seqs: Vec<i64> = messages(&live).iter().map(|m| m.seq).collect();
    assert_eq!(seqs, vec![7, 8], "no duplicate and no gap between replay and live");

    // since=0 replays the whole session.
    let mut everything = app
        .connect_with(
            &format!("/api/chat/ws/{}?since=0", session.session_id),
            &[("authorization", format!("Bearer {}", session.client_token))],
        )
        .await;
    everything.mode().await;
    let all = everything.until_seq(8).await;
    assert_eq!(messages(&all).iter().map(|m| m.seq).collect::<Vec<_>>(), (1..=8).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_resent_client_id_gets_the_original_ack_and_is_stored_once() {
    let mut app = TestApp::spawn().await;
    let session = app.create_session().await;
    let mut client = app.connect(session.session_id, &session.client_token).await;
    client.mode().await;
    let frame = serde_json::json!({"type": "message", "content": "only once", "client_id": "resend-me"});
    client.send_json(frame.clone()).await;
    let (seq, _) = client.ack("resend-me").await;
    client.until_seq(2).await;
    client.send_json(frame.clone()).await;
    assert_eq!(client.ack("resend-me").await.0, seq);

    // Also across a restart, as a client that never saw its ack would do.
    app.restart().await;
    let mut again = app.connect(session.session_id, &session.client_token).await;
    again.mode().await;
    again.send_json(frame).await;
    assert_eq!(again.ack("resend-me").await.0, seq);

    let history = app.history(session.session_id, &session.client_token).await;
    assert_eq!(history.iter().filter(|m| m.content == "only once").count(), 1);
    assert_eq!(history.len(), 2, "one message and one companion reply");
}
