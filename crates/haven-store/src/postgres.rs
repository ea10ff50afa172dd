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

use std::time::Duration;

use async_trait::async_trait;
use haven_protocol::{ChatMessage, ChatMode, MessageKind, Sender, api::AppointmentStatus};
use serde::{Deserialize, Serialize};
use sqlx::postgres::{PgListener, PgPoolOptions};
use sqlx::{FromRow, PgConnection, PgPool};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::batch::{
    self, Pending, Settled, WriteBatch, Writes, Written, commit_batches, in_batch_order, left_over,
    usual_rows,
};
use crate::rows::{
    AUDIT_COLUMNS, AuditRow, MESSAGE_COLUMNS, MessageRow, SESSION_COLUMNS, SessionRow, THERAPIST_COLUMNS,
    TOUCH_INTERVAL, TherapistRow, is_unique_violation, join_rules, new_message, parse_mode, report_from_rows,
    stored_level,
};
use crate::{
    AcknowledgeOutcome, Appended, AuditRecord, BotMessage, ChatSession, CloseOutcome, Committed, Flagged,
    JoinOutcome, Listener, NewMessage, NewTherapist, Notification, Result, RiskFlag, SafetyReport,
    SessionEvent, Store, StoreError, Therapist, now,
};

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

    /// Raises a session's flag for its message `seq`, inside a transaction
    /// that holds the session's row lock: the level, the audit record, and —
    /// when the level rises — the crisis message and the referral counter.
    async fn flag_in_tx(
        &self,
        tx: &mut PgConnection,
        session_id: Uuid,
        seq: i64,
        flag: &RiskFlag,
    ) -> Result<Committed<Flagged>> {
        let (stored, therapist_id, closed_at): (Option<String>, Option<Uuid>, Option<OffsetDateTime>) =
            sqlx::query_as(
                "SELECT risk_level, therapist_id, closed_at FROM chat_sessions WHERE id = $1 FOR UPDATE",
            )
            .bind(session_id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or(StoreError::NotFound)?;
        let before = stored_level(stored)?;
        let level = before.max(flag.level);
        // Nothing follows a closed chat's closing message, crisis resources
        // included; the flag itself is still recorded.
        let raised = flag.level > before && closed_at.is_none();
        let mut events = Vec::new();
        let at = now();
        sqlx::query(
            "UPDATE chat_sessions SET risk_level = $1, risk_first_at = COALESCE(risk_first_at, $2),
             risk_last_at = $2 WHERE id = $3",
        )
        .bind(level.as_str())
        .bind(at)
        .bind(session_id)
        .execute(&mut *tx)
        .await?;
        if raised {
            let seq: i64 = sqlx::query_scalar(
                "UPDATE chat_sessions SET last_seq = last_seq + 1, updated_at = $1, last_message_at = $1
                 WHERE id = $2 RETURNING last_seq",
            )
            .bind(at)
            .bind(session_id)
            .fetch_one(&mut *tx)
            .await?;
            let message = new_message(
                Uuid::now_v7(),
                seq,
                Sender::System,
                MessageKind::Crisis,
                &flag.crisis_message,
                None,
                at,
            );
            insert_message(tx, session_id, &message).await?;
            events.push(SessionEvent::message(session_id, message));
            sqlx::query(
                "INSERT INTO safety_referrals (day, level, count) VALUES ($1, $2, 1)
                 ON CONFLICT (day, level) DO UPDATE SET count = safety_referrals.count + 1",
            )
            .bind(at.date())
            .bind(flag.level.as_str())
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query(
            "INSERT INTO safety_audit
                 (id, session_id, kind, level, message_seq, rules, detector_version, referred, created_at)
             VALUES ($1, $2, 'flagged', $3, $4, $5, $6, $7, $8)",
        )
        .bind(Uuid::now_v7())
        .bind(session_id)
        .bind(flag.level.as_str())
        .bind(seq)
        .bind(join_rules(&flag.rules))
        .bind(&flag.detector_version)
        .bind(raised)
        .bind(at)
        .execute(&mut *tx)
        .await?;
        events.push(SessionEvent::Flagged { session_id, level, therapist_id });
        Ok(Committed::new(Flagged { level, referred: raised }, events))
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
        let existing: Option<i64> = sqlx::query_scalar(
            "SELECT seq FROM messages WHERE session_id = $1 AND sender = $2 AND client_id = $3",
        )
        .bind(session_id)
        .bind(new.sender.as_str())
        .bind(&new.client_id)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(seq) = existing {
            return Ok(Committed::nothing(Appended::Duplicate { seq }));
        }
        if closed_at.is_some() {
            return Ok(Committed::nothing(Appended::Closed));
        }
        let at = now();
        let (seq, mode): (i64, String) = sqlx::query_as(
            "UPDATE chat_sessions SET last_seq = last_seq + 1, updated_at = $1, last_message_at = $1
             WHERE id = $2 RETURNING last_seq, chat_mode",
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
        insert_message(tx, session_id, &message).await?;
        let mut events = vec![SessionEvent::message(session_id, message)];
        let flagged = match &new.risk {
            Some(flag) => {
                let flagged = self.flag_in_tx(tx, session_id, seq, flag).await?;
                events.extend(flagged.events);
                Some(flagged.outcome)
            }
            None => None,
        };
        Ok(Committed::new(Appended::Stored { seq, chat_mode: parse_mode(&mode)?, flagged }, events))
    }

    /// The batch's usual writes ([`usual_rows`]) in one statement, bound as
    /// arrays: it numbers them after each session's `last_seq` in batch
    /// order, skipping a key (session, sender, `client_id`) stored already
    /// and an unknown session, and a companion's write unless the session is
    /// `BOT_ONLY`, and any write to a closed session; stores them; moves
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
        let stored: Vec<(i64, i64, String)> = sqlx::query_as(
            "WITH batch AS (
                 SELECT * FROM unnest($1::bigint[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::text[],
                                      $8::text[])
                     AS b (place, id, session_id, sender, content, client_id, kind)
             ),
             fresh AS (
                 SELECT b.*, s.chat_mode,
                        s.last_seq + row_number() OVER (PARTITION BY b.session_id ORDER BY b.place) AS seq
                 FROM batch AS b JOIN chat_sessions AS s ON s.id = b.session_id
                 WHERE s.closed_at IS NULL AND CASE WHEN b.client_id IS NULL THEN s.chat_mode = 'BOT_ONLY'
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
             SELECT place, seq, chat_mode FROM fresh ORDER BY place",
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
        for (place, seq, mode) in stored {
            let Some(row) = usize::try_from(place).ok().and_then(|place| rows.get(place)) else {
                let unknown = sqlx::Error::Protocol("a batched insert reported an unknown row".into());
                return Err(StoreError::Unavailable(unknown));
            };
            settled.insert(row.index, Ok(batch::stored(row, seq, parse_mode(&mode)?, at)));
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

#[async_trait]
impl Store for PgStore {
    async fn create_therapist(&self, new: NewTherapist) -> Result<Therapist> {
        let therapist = Therapist {
            id: Uuid::now_v7(),
            email: new.email,
            name: new.name,
            created_at: now(),
            disabled: false,
        };
        let inserted = sqlx::query(
            "INSERT INTO therapists (id, email, name, password_hash, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(therapist.id)
        .bind(&therapist.email)
        .bind(&therapist.name)
        .bind(&new.password_hash)
        .bind(therapist.created_at)
        .execute(&self.db.pool)
        .await;
        match inserted {
            Ok(_) => Ok(therapist),
            Err(error) if is_unique_violation(&error) => {
                Err(StoreError::Conflict("email already registered"))
            }
            Err(error) => Err(error.into()),
        }
    }

    async fn therapists(&self) -> Result<Vec<Therapist>> {
        let rows: Vec<TherapistRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {THERAPIST_COLUMNS} FROM therapists ORDER BY id"
        )))
        .fetch_all(&self.db.pool)
        .await?;
        Ok(rows.into_iter().map(Into::into).collect())
    }

    async fn count_therapists(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM therapists").fetch_one(&self.db.pool).await?)
    }

    async fn therapist_with_password(&self, email: &str) -> Result<Option<(Therapist, String)>> {
        #[derive(FromRow)]
        struct Row {
            #[sqlx(flatten)]
            therapist: TherapistRow,
            password_hash: String,
        }
        let row: Option<Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {THERAPIST_COLUMNS}, password_hash FROM therapists WHERE email = $1 AND disabled_at IS NULL"
        )))
        .bind(email)
        .fetch_optional(&self.db.pool)
        .await?;
        Ok(row.map(|row| (row.therapist.into(), row.password_hash)))
    }

    async fn create_auth_session(
        &self,
        therapist_id: Uuid,
        token_hash: &[u8],
        expires_at: OffsetDateTime,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO therapist_auth_sessions (token_hash, therapist_id, created_at, expires_at)
             VALUES ($1, $2, $3, $4)",
        )
        .bind(token_hash)
        .bind(therapist_id)
        .bind(now())
        .bind(expires_at)
        .execute(&self.db.pool)
        .await?;
        Ok(())
    }

    async fn therapist_by_token(
        &self,
        token_hash: &[u8],
        now: OffsetDateTime,
        idle: time::Duration,
        touch: bool,
    ) -> Result<Option<Therapist>> {
        #[derive(FromRow)]
        struct Row {
            #[sqlx(flatten)]
            therapist: TherapistRow,
            logged_in_at: OffsetDateTime,
            last_seen_at: Option<OffsetDateTime>,
            expires_at: OffsetDateTime,
        }
        let row: Option<Row> = sqlx::query_as(
            "SELECT t.id, t.email, t.name, t.created_at, t.disabled_at,
                    s.created_at AS logged_in_at, s.last_seen_at, s.expires_at
             FROM therapist_auth_sessions s JOIN therapists t ON t.id = s.therapist_id
             WHERE s.token_hash = $1",
        )
        .bind(token_hash)
        .fetch_optional(&self.db.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let last_seen = row.last_seen_at.unwrap_or(row.logged_in_at);
        if row.expires_at <= now || last_seen + idle <= now || row.therapist.disabled_at.is_some() {
            return Ok(None);
        }
        if touch && now - last_seen >= TOUCH_INTERVAL {
            sqlx::query("UPDATE therapist_auth_sessions SET last_seen_at = $1 WHERE token_hash = $2")
                .bind(now)
                .bind(token_hash)
                .execute(&self.db.pool)
                .await?;
        }
        Ok(Some(row.therapist.into()))
    }

    async fn revoke_auth_session(&self, token_hash: &[u8]) -> Result<()> {
        sqlx::query("DELETE FROM therapist_auth_sessions WHERE token_hash = $1")
            .bind(token_hash)
            .execute(&self.db.pool)
            .await?;
        Ok(())
    }

    async fn revoke_therapist_sessions(&self, therapist_id: Uuid) -> Result<()> {
        sqlx::query("DELETE FROM therapist_auth_sessions WHERE therapist_id = $1")
            .bind(therapist_id)
            .execute(&self.db.pool)
            .await?;
        Ok(())
    }

    async fn set_password(&self, email: &str, password_hash: &str) -> Result<Option<Therapist>> {
        let mut tx = self.db.pool.begin().await?;
        let row: Option<TherapistRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "UPDATE therapists SET password_hash = $1 WHERE email = $2 RETURNING {THERAPIST_COLUMNS}"
        )))
        .bind(password_hash)
        .bind(email)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else { return Ok(None) };
        end_logins(&mut tx, row.id).await?;
        tx.commit().await?;
        Ok(Some(row.into()))
    }

    async fn disable_therapist(&self, email: &str) -> Result<Option<Therapist>> {
        let mut tx = self.db.pool.begin().await?;
        let row: Option<TherapistRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "UPDATE therapists SET disabled_at = COALESCE(disabled_at, $1) WHERE email = $2
             RETURNING {THERAPIST_COLUMNS}"
        )))
        .bind(now())
        .bind(email)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else { return Ok(None) };
        end_logins(&mut tx, row.id).await?;
        tx.commit().await?;
        Ok(Some(row.into()))
    }

    async fn create_chat_session(&self, client_token_hash: &[u8]) -> Result<Committed<ChatSession>> {
        let session = ChatSession {
            id: Uuid::now_v7(),
            appointment_id: Uuid::now_v7(),
            therapist_id: None,
            status: AppointmentStatus::Open,
            chat_mode: ChatMode::BotOnly,
            last_seq: 0,
            created_at: now(),
            last_message_at: None,
            closed: false,
            risk: None,
        };
        let mut tx = self.db.pool.begin().await?;
        sqlx::query(
            "INSERT INTO chat_sessions (id, appointment_id, status, chat_mode, created_at, updated_at)
             VALUES ($1, $2, 'open', 'BOT_ONLY', $3, $3)",
        )
        .bind(session.id)
        .bind(session.appointment_id)
        .bind(session.created_at)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO client_credentials (token_hash, session_id, created_at) VALUES ($1, $2, $3)",
        )
        .bind(client_token_hash)
        .bind(session.id)
        .bind(session.created_at)
        .execute(&mut *tx)
        .await?;
        let events = vec![SessionEvent::Created { session_id: session.id }];
        self.db.notify(&mut tx, &events).await?;
        tx.commit().await?;
        Ok(Committed::new(session, events))
    }

    async fn chat_session(&self, session_id: Uuid) -> Result<Option<ChatSession>> {
        let row: Option<SessionRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {SESSION_COLUMNS} FROM chat_sessions WHERE id = $1"
        )))
        .bind(session_id)
        .fetch_optional(&self.db.pool)
        .await?;
        row.map(TryInto::try_into).transpose()
    }

    async fn session_for_client_token(&self, token_hash: &[u8]) -> Result<Option<Uuid>> {
        Ok(sqlx::query_scalar("SELECT session_id FROM client_credentials WHERE token_hash = $1")
            .bind(token_hash)
            .fetch_optional(&self.db.pool)
            .await?)
    }

    async fn appointments_for(
        &self,
        therapist_id: Uuid,
        waiting_since: OffsetDateTime,
    ) -> Result<Vec<ChatSession>> {
        let rows: Vec<SessionRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {SESSION_COLUMNS} FROM chat_sessions WHERE closed_at IS NULL AND (therapist_id = $1 OR (therapist_id IS NULL
               AND (risk_level IS NOT NULL OR COALESCE(last_message_at, created_at) >= $2))) ORDER BY id"
        )))
        .bind(therapist_id)
        .bind(waiting_since)
        .fetch_all(&self.db.pool)
        .await?;
        rows.into_iter().map(TryInto::try_into).collect()
    }

    async fn join_as_therapist(
        &self,
        session_id: Uuid,
        therapist_id: Uuid,
        join_message: &str,
    ) -> Result<Committed<JoinOutcome>> {
        let mut tx = self.db.pool.begin().await?;
        // The row lock makes racing therapists (on any instance) take turns.
        let current: Option<(Option<Uuid>, String)> =
            sqlx::query_as("SELECT therapist_id, chat_mode FROM chat_sessions WHERE id = $1 FOR UPDATE")
                .bind(session_id)
                .fetch_optional(&mut *tx)
                .await?;
        let (holder, mode) = current.ok_or(StoreError::NotFound)?;
        match holder {
            Some(holder) if holder != therapist_id => {
                return Ok(Committed::nothing(JoinOutcome::ClaimedByOther));
            }
            Some(_) if parse_mode(&mode)? == ChatMode::TherapistJoined => {
                return Ok(Committed::nothing(JoinOutcome::AlreadyJoined));
            }
            _ => {}
        }
        let at = now();
        let seq: i64 = sqlx::query_scalar(
            "UPDATE chat_sessions
             SET therapist_id = $1, status = 'assigned', chat_mode = 'THERAPIST_JOINED',
                 last_seq = last_seq + 1, updated_at = $2, last_message_at = $2
             WHERE id = $3 RETURNING last_seq",
        )
        .bind(therapist_id)
        .bind(at)
        .bind(session_id)
        .fetch_one(&mut *tx)
        .await?;
        let message =
            new_message(Uuid::now_v7(), seq, Sender::System, MessageKind::Join, join_message, None, at);
        insert_message(&mut tx, session_id, &message).await?;
        let events = vec![SessionEvent::message(session_id, message)];
        self.db.notify(&mut tx, &events).await?;
        tx.commit().await?;
        Ok(Committed::new(JoinOutcome::Joined, events))
    }

    async fn close_chat_session(
        &self,
        session_id: Uuid,
        therapist_id: Uuid,
        closing_message: &str,
    ) -> Result<Committed<CloseOutcome>> {
        let mut tx = self.db.pool.begin().await?;
        let current: Option<(Option<Uuid>, Option<OffsetDateTime>)> =
            sqlx::query_as("SELECT therapist_id, closed_at FROM chat_sessions WHERE id = $1 FOR UPDATE")
                .bind(session_id)
                .fetch_optional(&mut *tx)
                .await?;
        let (holder, closed_at) = current.ok_or(StoreError::NotFound)?;
        if holder != Some(therapist_id) {
            return Ok(Committed::nothing(CloseOutcome::NotYours));
        }
        if closed_at.is_some() {
            return Ok(Committed::nothing(CloseOutcome::AlreadyClosed));
        }
        let at = now();
        let seq: i64 = sqlx::query_scalar(
            "UPDATE chat_sessions SET closed_at = $1, updated_at = $1, last_message_at = $1, last_seq = last_seq + 1
             WHERE id = $2 RETURNING last_seq",
        )
        .bind(at)
        .bind(session_id)
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM client_credentials WHERE session_id = $1")
            .bind(session_id)
            .execute(&mut *tx)
            .await?;
        let message =
            new_message(Uuid::now_v7(), seq, Sender::System, MessageKind::Close, closing_message, None, at);
        insert_message(&mut tx, session_id, &message).await?;
        let events = vec![SessionEvent::message(session_id, message)];
        self.db.notify(&mut tx, &events).await?;
        tx.commit().await?;
        Ok(Committed::new(CloseOutcome::Closed, events))
    }

    async fn append_message(&self, session_id: Uuid, new: NewMessage) -> Result<Committed<Appended>> {
        self.writes.message(session_id, new).await
    }

    async fn append_if_bot_only(
        &self,
        session_id: Uuid,
        message: BotMessage,
    ) -> Result<Committed<Option<ChatMessage>>> {
        self.writes.bot(session_id, message).await
    }

    async fn count_rate_events(&self, kind: &str, key: &str, since_ms: i64) -> Result<(i64, Option<i64>)> {
        sqlx::query("DELETE FROM rate_events WHERE kind = $1 AND key = $2 AND at < $3")
            .bind(kind)
            .bind(key)
            .bind(since_ms)
            .execute(&self.db.pool)
            .await?;
        let (count, oldest): (i64, Option<i64>) =
            sqlx::query_as("SELECT COUNT(*), MIN(at) FROM rate_events WHERE kind = $1 AND key = $2")
                .bind(kind)
                .bind(key)
                .fetch_one(&self.db.pool)
                .await?;
        Ok((count, oldest))
    }

    async fn record_rate_event(&self, kind: &str, key: &str, at_ms: i64) -> Result<()> {
        sqlx::query("INSERT INTO rate_events (kind, key, at) VALUES ($1, $2, $3)")
            .bind(kind)
            .bind(key)
            .bind(at_ms)
            .execute(&self.db.pool)
            .await?;
        Ok(())
    }

    async fn clear_rate_events(&self, kind: &str, key: &str) -> Result<()> {
        sqlx::query("DELETE FROM rate_events WHERE kind = $1 AND key = $2")
            .bind(kind)
            .bind(key)
            .execute(&self.db.pool)
            .await?;
        Ok(())
    }

    async fn flag_risk(&self, session_id: Uuid, seq: i64, flag: RiskFlag) -> Result<Committed<Flagged>> {
        let mut tx = self.db.pool.begin().await?;
        let flagged = self.db.flag_in_tx(&mut tx, session_id, seq, &flag).await?;
        self.db.notify(&mut tx, &flagged.events).await?;
        tx.commit().await?;
        Ok(flagged)
    }

    async fn acknowledge_risk(
        &self,
        session_id: Uuid,
        therapist_id: Uuid,
        note: Option<&str>,
    ) -> Result<Committed<AcknowledgeOutcome>> {
        let mut tx = self.db.pool.begin().await?;
        let row: Option<SessionRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {SESSION_COLUMNS} FROM chat_sessions WHERE id = $1 FOR UPDATE"
        )))
        .bind(session_id)
        .fetch_optional(&mut *tx)
        .await?;
        let session: ChatSession = row.ok_or(StoreError::NotFound)?.try_into()?;
        if session.therapist_id.is_some_and(|holder| holder != therapist_id) {
            return Ok(Committed::nothing(AcknowledgeOutcome::NotYours));
        }
        let Some(mut risk) = session.risk else {
            return Ok(Committed::nothing(AcknowledgeOutcome::NotFlagged));
        };
        let at = now();
        sqlx::query(
            "UPDATE chat_sessions SET risk_acknowledged_at = $1, risk_acknowledged_by = $2 WHERE id = $3",
        )
        .bind(at)
        .bind(therapist_id)
        .bind(session_id)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO safety_audit (id, session_id, kind, level, therapist_id, note, created_at)
             VALUES ($1, $2, 'acknowledged', $3, $4, $5, $6)",
        )
        .bind(Uuid::now_v7())
        .bind(session_id)
        .bind(risk.level.as_str())
        .bind(therapist_id)
        .bind(note)
        .bind(at)
        .execute(&mut *tx)
        .await?;
        let events = vec![SessionEvent::Acknowledged { session_id }];
        self.db.notify(&mut tx, &events).await?;
        tx.commit().await?;
        risk.acknowledged_at = Some(at);
        risk.acknowledged_by = Some(therapist_id);
        Ok(Committed::new(AcknowledgeOutcome::Acknowledged(risk), events))
    }

    async fn safety_audit(&self, session_id: Uuid) -> Result<Vec<AuditRecord>> {
        let rows: Vec<AuditRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {AUDIT_COLUMNS} FROM safety_audit WHERE session_id = $1 ORDER BY created_at, id"
        )))
        .bind(session_id)
        .fetch_all(&self.db.pool)
        .await?;
        rows.into_iter().map(TryInto::try_into).collect()
    }

    async fn safety_report(&self, since: OffsetDateTime) -> Result<SafetyReport> {
        let referrals: Vec<(String, i64)> = sqlx::query_as(
            "SELECT level, SUM(count)::BIGINT FROM safety_referrals WHERE day >= $1 GROUP BY level ORDER BY level",
        )
        .bind(since.date())
        .fetch_all(&self.db.pool)
        .await?;
        let flags: Vec<(String, i64)> = sqlx::query_as(
            "SELECT level, COUNT(*) FROM safety_audit WHERE kind = 'flagged' AND created_at >= $1
             GROUP BY level ORDER BY level",
        )
        .bind(since)
        .fetch_all(&self.db.pool)
        .await?;
        let (flagged_sessions, unacknowledged_sessions): (i64, i64) = sqlx::query_as(
            "SELECT COUNT(*), COUNT(*) FILTER (WHERE risk_acknowledged_at IS NULL OR risk_acknowledged_at < risk_last_at)
             FROM chat_sessions WHERE risk_level IS NOT NULL AND risk_last_at >= $1",
        )
        .bind(since)
        .fetch_one(&self.db.pool)
        .await?;
        report_from_rows(referrals, flags, flagged_sessions, unacknowledged_sessions)
    }

    async fn messages_after(&self, session_id: Uuid, after: i64, limit: i64) -> Result<Vec<ChatMessage>> {
        let rows: Vec<MessageRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE session_id = $1 AND seq > $2 ORDER BY seq LIMIT $3"
        )))
        .bind(session_id)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.db.pool)
        .await?;
        rows.into_iter().map(TryInto::try_into).collect()
    }

    async fn recent_messages(&self, session_id: Uuid, limit: i64) -> Result<Vec<ChatMessage>> {
        let rows: Vec<MessageRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {MESSAGE_COLUMNS} FROM (
                 SELECT * FROM messages WHERE session_id = $1 ORDER BY seq DESC LIMIT $2
             ) AS newest ORDER BY seq"
        )))
        .bind(session_id)
        .bind(limit)
        .fetch_all(&self.db.pool)
        .await?;
        rows.into_iter().map(TryInto::try_into).collect()
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
        Ok(Some(Box::new(PgNotifications { listener, instance: self.db.instance })))
    }
}

async fn insert_message(tx: &mut PgConnection, session_id: Uuid, message: &ChatMessage) -> Result<()> {
    sqlx::query(
        "INSERT INTO messages (id, session_id, seq, sender, kind, content, client_id, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(message.id)
    .bind(session_id)
    .bind(message.seq)
    .bind(message.sender.as_str())
    .bind(message.kind.as_str())
    .bind(&message.content)
    .bind(message.client_id.as_deref())
    .bind(message.created_at)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Ends every login of a therapist, inside a transaction.
async fn end_logins(tx: &mut PgConnection, therapist_id: Uuid) -> Result<()> {
    sqlx::query("DELETE FROM therapist_auth_sessions WHERE therapist_id = $1")
        .bind(therapist_id)
        .execute(&mut *tx)
        .await?;
    Ok(())
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
}

#[async_trait]
impl Listener for PgNotifications {
    async fn next(&mut self) -> Notification {
        loop {
            match self.listener.try_recv().await {
                Ok(Some(notification)) => {
                    if let Some(parsed) = parse(notification.payload(), self.instance) {
                        return parsed;
                    }
                }
                // The connection was lost and has been re-established.
                Ok(None) => return Notification::Reconnected,
                // The database went away (a restart ends sessions with an
                // error, not only a closed socket). Listen again until it is
                // back; whatever was announced meanwhile is lost.
                Err(error) => {
                    tracing::warn!(error = %error, "notification listener lost the database; reconnecting");
                    loop {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        if self.listener.listen(CHANNEL).await.is_ok() {
                            tracing::info!("notification listener reconnected");
                            return Notification::Reconnected;
                        }
                    }
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
        events.push(SessionEvent::Flagged { session_id: id, level, therapist_id: Some(id) });
        for event in events {
            let payload = serde_json::to_string(&Envelope { origin: id, event }).unwrap();
            assert!(payload.len() < 8_000, "{} bytes", payload.len());
        }
    }
}
