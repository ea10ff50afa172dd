//! The PostgreSQL store: one database shared by any number of Haven
//! instances.
//!
//! Everything that must hold across instances is kept by the database:
//! - seqs: writers lock the session row (`SELECT … FOR UPDATE`) and number
//!   after its `last_seq`, so allocation is serial per session;
//! - `client_id` de-duplication: checked under that lock, and backed by a
//!   unique index;
//! - the takeover and the claim: one transaction under that lock; a
//!   companion message is stored only while the locked row is `BOT_ONLY`.
//!
//! Messages are written by group commit ([`crate::batch`]): a task takes
//! every write waiting, locks all their sessions (sorted, so two instances'
//! batches cannot deadlock), stores the usual ones with one statement, and
//! commits once.
//!
//! Fan-out between instances uses `LISTEN/NOTIFY` on one channel, and
//! carries [`SessionEvent`]s, serialised by one encoder ([`Db::notify`]):
//! - the events a write committed are sent by `pg_notify` inside its
//!   transaction, so they go out on commit, in commit order; they carry
//!   ids, seqs and kinds, never content — the receiver reads the row;
//! - companion deltas, which are not stored, are announced as they stream.
//!
//! Notifications are lossy (a listener that reconnects misses some): the
//! listener reports [`Notification::Reconnected`], and the server then reads
//! what it missed by seq.
//!
//! Every other operation is a transaction script written once for both
//! stores ([`crate::scripts`]); this module is PostgreSQL's [`Backend`]:
//! its pool, `FOR UPDATE` on the session row, and the in-transaction
//! `NOTIFY`.

use std::time::Duration;

use async_trait::async_trait;
use haven_protocol::MessageKind;
use serde::{Deserialize, Serialize};
use sqlx::postgres::{PgListener, PgPoolOptions};
use sqlx::{PgConnection, PgPool};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::batch::{
    self, Pending, Settled, WriteBatch, Writes, Written, commit_batches, in_batch_order, left_over,
    usual_rows,
};
use crate::rows::{current_risk, new_message, parse_mode};
use crate::scripts::{Backend, Scripts};
use crate::{Appended, Committed, Listener, NewMessage, Notification, Result, SessionEvent, StoreError, now};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// The channel every instance listens on.
const CHANNEL: &str = "haven_events";

/// NOTIFY payloads must stay under 8000 bytes; deltas longer than this are
/// announced in pieces.
const MAX_DELTA_BYTES: usize = 6_000;

#[derive(Debug, Clone)]
pub struct PgStore {
    db: Db,
    /// The group-commit queue of message writes.
    writes: Writes,
}

/// The pool, and this instance's name in notifications (so it can ignore
/// its own).
#[derive(Debug, Clone)]
struct Db {
    pool: PgPool,
    instance: Uuid,
}

impl PgStore {
    /// Connects to `url` (e.g. `postgres://haven@db/haven`) and runs pending
    /// migrations. `instance` names this process in notifications.
    pub async fn connect(url: &str, instance: Uuid) -> Result<Self> {
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(5))
            .connect(url)
            .await?;
        // sqlx takes an advisory lock: instances starting together migrate once.
        MIGRATOR.run(&pool).await.map_err(|error| StoreError::Unavailable(error.into()))?;
        let db = Db { pool, instance };
        let (writes, queue) = Writes::new();
        // The task ends when the last clone of this store is dropped.
        tokio::spawn(commit_batches(queue, db.clone()));
        Ok(Self { db, writes })
    }
}

/// A notification's payload: an event and the instance that committed it.
#[derive(Serialize, Deserialize)]
struct Envelope<E> {
    origin: Uuid,
    event: E,
}

impl Db {
    /// Queues `events` inside `tx`, in order, in one statement; PostgreSQL
    /// sends them on commit. The one place that encodes a notification.
    async fn notify<'a>(
        &self,
        tx: &mut PgConnection,
        events: impl IntoIterator<Item = &'a SessionEvent>,
    ) -> Result<()> {
        let payloads: Vec<String> = events
            .into_iter()
            .map(|event| serde_json::to_string(&Envelope { origin: self.instance, event }))
            .collect::<std::result::Result<_, _>>()
            .map_err(|error| StoreError::Corrupt(error.to_string()))?;
        if payloads.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "SELECT pg_notify($1, p.payload)
             FROM (SELECT payload FROM unnest($2::text[]) WITH ORDINALITY AS u (payload, place)
                   ORDER BY place) AS p",
        )
        .bind(CHANNEL)
        .bind(payloads)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }

    /// One client's or therapist's message, for what the batch's insert
    /// left: the next seq, unless its `client_id` is already stored for this
    /// sender, then its safety flag if any.
    async fn append_in_tx(
        &self,
        tx: &mut PgConnection,
        session_id: Uuid,
        new: &NewMessage,
    ) -> Result<Committed<Appended>> {
        // The batch holds the session's lock: a concurrent re-send of the
        // same client_id on another instance waited for it, and finds the
        // first one stored.
        let closed_at: Option<OffsetDateTime> =
            sqlx::query_scalar("SELECT closed_at FROM chat_sessions WHERE id = $1")
                .bind(session_id)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or(StoreError::NotFound)?;
        if let Some(seq) = Scripts::<PgStore>::stored_seq(tx, session_id, new).await? {
            return Ok(Committed::nothing(Appended::Duplicate { seq }));
        }
        if closed_at.is_some() {
            return Ok(Committed::nothing(Appended::Closed));
        }
        let at = now();
        type Row = (i64, String, bool, Option<String>, Option<OffsetDateTime>);
        let (seq, mode, paused, risk_level, risk_at): Row = sqlx::query_as(
            "UPDATE chat_sessions SET last_seq = last_seq + 1, updated_at = $1, last_message_at = $1
             WHERE id = $2 RETURNING last_seq, chat_mode, companion_paused, risk_level, risk_last_at",
        )
        .bind(at)
        .bind(session_id)
        .fetch_one(&mut *tx)
        .await?;
        let message = new_message(
            Uuid::now_v7(),
            seq,
            new.sender,
            MessageKind::Chat,
            &new.content,
            Some(&new.client_id),
            at,
        );
        Scripts::<PgStore>::insert_message(tx, session_id, &message).await?;
        let session = (mode.as_str(), paused, current_risk(risk_level, risk_at)?);
        Scripts::<PgStore>::stored(tx, session_id, message, session, new.risk.as_ref()).await
    }

    /// The batch's usual writes ([`usual_rows`]) in one statement, bound as
    /// arrays: it numbers them after each session's `last_seq` in batch
    /// order, skipping a key (session, sender, `client_id`) stored already
    /// and an unknown session, and a companion's write unless the session is
    /// `BOT_ONLY` with the companion not paused, and any write to a closed session; stores them; moves
    /// those sessions' `last_seq`; and returns the seq and session mode of
    /// every row stored. Returns the results it settled, by index in the
    /// batch.
    async fn write_together_in_tx(&self, tx: &mut PgConnection, batch: &[Pending]) -> Result<Settled> {
        let (rows, mut settled) = usual_rows(batch);
        if rows.is_empty() {
            return Ok(settled);
        }
        let at = now();
        let places: Vec<i64> = (0..rows.len() as i64).collect();
        let ids: Vec<Uuid> = rows.iter().map(|row| row.id).collect();
        let sessions: Vec<Uuid> = rows.iter().map(|row| row.session_id).collect();
        let senders: Vec<&str> = rows.iter().map(|row| row.sender.as_str()).collect();
        let kinds: Vec<&str> = rows.iter().map(|row| row.kind.as_str()).collect();
        let contents: Vec<&str> = rows.iter().map(|row| row.content).collect();
        let client_ids: Vec<Option<&str>> = rows.iter().map(|row| row.client_id).collect();
        type Report = (i64, i64, String, bool, Option<String>, Option<OffsetDateTime>);
        let stored: Vec<Report> = sqlx::query_as(
            "WITH batch AS (
                 SELECT * FROM unnest($1::bigint[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::text[],
                                      $8::text[])
                     AS b (place, id, session_id, sender, content, client_id, kind)
             ),
             fresh AS (
                 SELECT b.*, s.chat_mode, s.companion_paused, s.risk_level, s.risk_last_at,
                        s.last_seq + row_number() OVER (PARTITION BY b.session_id ORDER BY b.place) AS seq
                 FROM batch AS b JOIN chat_sessions AS s ON s.id = b.session_id
                 WHERE s.closed_at IS NULL AND CASE WHEN b.client_id IS NULL
                            THEN s.chat_mode = 'BOT_ONLY' AND NOT s.companion_paused
                            ELSE NOT EXISTS (
                                SELECT 1 FROM messages AS m
                                WHERE m.session_id = b.session_id AND m.sender = b.sender
                                  AND m.client_id = b.client_id)
                       END
             ),
             inserted AS (
                 INSERT INTO messages (id, session_id, seq, sender, kind, content, client_id, created_at)
                 SELECT id, session_id, seq, sender, kind, content, client_id, $7 FROM fresh
             ),
             moved AS (
                 UPDATE chat_sessions AS s SET last_seq = f.seq, updated_at = $7, last_message_at = $7
                 FROM (SELECT session_id, max(seq) AS seq FROM fresh GROUP BY session_id) AS f
                 WHERE s.id = f.session_id
             )
             SELECT place, seq, chat_mode, companion_paused, risk_level, risk_last_at FROM fresh ORDER BY place",
        )
        .bind(&places)
        .bind(&ids)
        .bind(&sessions)
        .bind(&senders)
        .bind(&contents)
        .bind(&client_ids)
        .bind(at)
        .bind(&kinds)
        .fetch_all(&mut *tx)
        .await?;
        for (place, seq, mode, paused, risk_level, risk_at) in stored {
            let Some(row) = usize::try_from(place).ok().and_then(|place| rows.get(place)) else {
                let unknown = sqlx::Error::Protocol("a batched insert reported an unknown row".into());
                return Err(StoreError::Unavailable(unknown));
            };
            let session = (parse_mode(&mode)?, paused, current_risk(risk_level, risk_at)?);
            settled.insert(row.index, Ok(batch::stored(row, seq, session, at)));
        }
        Ok(settled)
    }
}

impl WriteBatch for Db {
    /// The batch in one transaction. Every session it writes to is locked
    /// first, in one order, so that two instances' batches cannot deadlock,
    /// and a write to one of them elsewhere waits for this commit.
    async fn write_batch(&self, batch: &[Pending]) -> Result<Vec<Result<Written>>> {
        let mut sessions: Vec<Uuid> = batch.iter().map(|pending| pending.session_id).collect();
        sessions.sort_unstable();
        sessions.dedup();
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT id FROM chat_sessions WHERE id = ANY($1) ORDER BY id FOR UPDATE")
            .bind(&sessions)
            .execute(&mut *tx)
            .await?;
        let mut settled = self.write_together_in_tx(&mut tx, batch).await?;
        // The shared insert's events in batch order (each session's in seq
        // order), then those written one by one, as they were written.
        let mut order: Vec<usize> = settled.keys().copied().collect();
        order.sort_unstable();
        for (index, session_id, new) in left_over(batch, &settled) {
            let result = self.append_in_tx(&mut tx, session_id, new).await;
            batch::settle(&mut settled, index, result)?;
            order.push(index);
        }
        self.notify(&mut tx, batch::events_of(order.iter().filter_map(|index| settled.get(index)))).await?;
        tx.commit().await?;
        in_batch_order(batch, settled)
    }
}

impl Backend for PgStore {
    type Db = sqlx::Postgres;

    /// Writers lock the session row, so that they take turns on it across
    /// instances.
    const LOCK: &'static str = " FOR UPDATE";

    /// One advisory lock for the whole trail, held to the transaction's
    /// end: appends from every instance take turns, so the chain stays one.
    /// Its key is arbitrary, and Haven's alone in its database.
    const TRAIL_LOCK: &'static str = "SELECT pg_advisory_xact_lock(7368426865)";

    fn reader(&self) -> &PgPool {
        &self.db.pool
    }

    fn writer(&self) -> &PgPool {
        &self.db.pool
    }

    fn writes(&self) -> &Writes {
        &self.writes
    }

    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Postgres>> {
        Ok(self.db.pool.begin().await?)
    }

    async fn notify(&self, tx: &mut PgConnection, events: &[SessionEvent]) -> Result<()> {
        self.db.notify(tx, events).await
    }

    async fn announce(&self, event: SessionEvent) -> Result<()> {
        let events = match event {
            SessionEvent::Delta { session_id, reply_id, delta } => split(&delta, MAX_DELTA_BYTES)
                .map(|piece| SessionEvent::Delta { session_id, reply_id, delta: piece.to_owned() })
                .collect(),
            other => vec![other],
        };
        let mut connection = self.db.pool.acquire().await?;
        self.db.notify(&mut connection, &events).await
    }

    async fn listen(&self) -> Result<Option<Box<dyn Listener>>> {
        let mut listener = PgListener::connect_with(&self.db.pool).await?;
        listener.listen(CHANNEL).await?;
        Ok(Some(Box::new(PgNotifications { listener, instance: self.db.instance, lost: false })))
    }
}

/// `text` in pieces of at most `max` bytes once written as JSON (a quote
/// takes two, a control character up to six), cut at character boundaries.
fn split(text: &str, max: usize) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut size = 0;
        let end = rest
            .char_indices()
            .find(|&(_, c)| {
                size += match c {
                    '"' | '\\' => 2,
                    c if u32::from(c) < 0x20 => 6,
                    c => c.len_utf8(),
                };
                size > max
            })
            .map_or(rest.len(), |(at, _)| at.max(rest.chars().next().map_or(0, char::len_utf8)));
        let (piece, tail) = rest.split_at(end);
        rest = tail;
        Some(piece)
    })
}

struct PgNotifications {
    listener: PgListener,
    instance: Uuid,
    /// The database went away: the next call listens again until it is back.
    lost: bool,
}

#[async_trait]
impl Listener for PgNotifications {
    async fn next(&mut self) -> Notification {
        // The database went away (a restart ends sessions with an error, not
        // only a closed socket). Listen again until it is back; whatever
        // was announced meanwhile is lost.
        if std::mem::take(&mut self.lost) {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if self.listener.listen(CHANNEL).await.is_ok() {
                    tracing::info!("notification listener reconnected");
                    return Notification::Reconnected;
                }
            }
        }
        loop {
            match self.listener.try_recv().await {
                Ok(Some(notification)) => {
                    if let Some(parsed) = parse(notification.payload(), self.instance) {
                        return parsed;
                    }
                }
                // The connection was lost and has been re-established.
                Ok(None) => return Notification::Reconnected,
                Err(error) => {
                    tracing::warn!(error = %error, "notification listener lost the database; reconnecting");
                    self.lost = true;
                    return Notification::Lost;
                }
            }
        }
    }
}

/// A notification from another instance; `None` for this instance's own
/// and for anything unreadable.
fn parse(payload: &str, instance: Uuid) -> Option<Notification> {
    let envelope: Envelope<SessionEvent> = serde_json::from_str(payload).ok()?;
    (envelope.origin != instance).then_some(Notification::Event(envelope.event))
}

#[cfg(test)]
mod tests {
    use super::*;
    use haven_protocol::Sender;

    #[test]
    fn long_deltas_are_split_at_character_boundaries_by_their_json_size() {
        let text = "é".repeat(10);
        let pieces: Vec<&str> = split(&text, 5).collect();
        assert!(pieces.iter().all(|piece| piece.len() <= 5));
        assert_eq!(pieces.concat(), text);
        let quoted = "\"\\\n".repeat(10);
        let pieces: Vec<&str> = split(&quoted, 11).collect();
        for piece in &pieces {
            assert!(serde_json::to_string(piece).unwrap().len() <= 11 + 2, "{piece:?}");
        }
        assert_eq!(pieces.concat(), quoted);
    }

    #[test]
    fn own_notifications_are_ignored_and_messages_travel_without_their_text() {
        let me = Uuid::now_v7();
        let session = Uuid::now_v7();
        let message =
            new_message(Uuid::now_v7(), 3, Sender::System, MessageKind::Join, "secret words", None, now());
        let event = SessionEvent::message(session, message);
        let payload = serde_json::to_string(&Envelope { origin: me, event: &event }).unwrap();
        assert!(!payload.contains("secret"), "{payload}");
        assert_eq!(parse(&payload, me), None);
        let received =
            SessionEvent::Message { session_id: session, seq: 3, kind: MessageKind::Join, message: None };
        assert_eq!(parse(&payload, Uuid::now_v7()), Some(Notification::Event(received)));
    }

    /// A flag's time travels exactly (the replies elsewhere compare it with
    /// their messages' times); an instance of an earlier release sends
    /// none, and the flag still counts, as raised when it arrives.
    #[test]
    fn a_flag_travels_with_its_time_and_one_without_is_still_read() {
        let (me, session) = (Uuid::now_v7(), Uuid::now_v7());
        let level = haven_protocol::RiskLevel::High;
        let event = SessionEvent::Flagged { session_id: session, level, therapist_id: None, at: now() };
        let payload = serde_json::to_string(&Envelope { origin: me, event: &event }).unwrap();
        assert_eq!(parse(&payload, Uuid::now_v7()), Some(Notification::Event(event)));

        let before = now();
        let older = format!(
            r#"{{"origin":"{me}","event":{{"event":"flagged","session_id":"{session}","level":"high","therapist_id":null}}}}"#
        );
        let Some(Notification::Event(SessionEvent::Flagged { at, level: read, .. })) =
            parse(&older, Uuid::now_v7())
        else {
            panic!("a flag without its time was not read");
        };
        assert!(at >= before && read == level);
    }

    #[test]
    fn every_notification_fits_in_a_payload() {
        let id = Uuid::now_v7();
        // Long deltas of characters JSON writes longest, cut as `announce` cuts them.
        let mut events: Vec<SessionEvent> = ["\u{1F9D1}", "\"", "\\", "\u{1}", "a"]
            .iter()
            .flat_map(|text| {
                let delta = text.repeat(3 * MAX_DELTA_BYTES);
                split(&delta, MAX_DELTA_BYTES)
                    .map(|piece| SessionEvent::Delta {
                        session_id: id,
                        reply_id: id,
                        delta: piece.to_owned(),
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        let level = haven_protocol::RiskLevel::Imminent;
        let at = crate::now();
        events.push(SessionEvent::Flagged { session_id: id, level, therapist_id: Some(id), at });
        for event in events {
            let payload = serde_json::to_string(&Envelope { origin: id, event }).unwrap();
            assert!(payload.len() < 8_000, "{} bytes", payload.len());
        }
    }
}
