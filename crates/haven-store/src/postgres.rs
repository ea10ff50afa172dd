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
//! Fan-out between instances uses `LISTEN/NOTIFY` on one channel:
//! - a committed message is announced by `pg_notify` inside the transaction
//!   that stores it, so the notification goes out on commit, in commit
//!   order; it carries ids and a seq, never content — the receiver reads
//!   the row;
//! - companion deltas, which are not stored, are announced as they stream.
//!
//! Notifications are lossy (a listener that reconnects misses some): the
//! listener reports [`Notification::Reconnected`], and the server then reads
//! what it missed by seq.

use std::time::Duration;

use async_trait::async_trait;
use haven_protocol::{ChatMessage, ChatMode, RiskLevel, Sender, api::AppointmentStatus};
use serde_json::{Value, json};
use sqlx::postgres::{PgListener, PgPoolOptions};
use sqlx::{FromRow, PgConnection, PgPool};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::batch::{
    self, Pending, Settled, WriteBatch, Writes, Written, commit_batches, in_batch_order, left_over,
    usual_rows,
};
use crate::rows::{
    AUDIT_COLUMNS, AuditRow, MessageRow, SESSION_COLUMNS, SessionRow, THERAPIST_COLUMNS, TOUCH_INTERVAL,
    TherapistRow, is_unique_violation, join_rules, new_message, parse_mode, report_from_rows, stored_level,
};
use crate::{
    AcknowledgeOutcome, Announcement, Appended, AuditRecord, BotMessage, ChatSession, CloseOutcome, Flagged,
    JoinOutcome, Listener, NewMessage, NewTherapist, Notification, Result, RiskFlag, SafetyReport, Store,
    StoreError, Therapist, now,
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

impl Db {
    /// Queues a notification inside `tx`; PostgreSQL sends it on commit.
    async fn notify(&self, tx: &mut PgConnection, mut payload: Value) -> Result<()> {
        payload["origin"] = json!(self.instance);
        self.notify_all(tx, &[payload.to_string()]).await
    }

    /// Queues notifications inside `tx`, in order, in one statement.
    async fn notify_all(&self, tx: &mut PgConnection, payloads: &[String]) -> Result<()> {
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

    /// A committed message's announcement: ids and a seq, never content.
    fn message_payload(&self, session_id: Uuid, seq: i64, join: bool) -> String {
        json!({"kind": "message", "session": session_id, "seq": seq, "join": join, "origin": self.instance})
            .to_string()
    }

    async fn notify_message(
        &self,
        tx: &mut PgConnection,
        message: &ChatMessage,
        session_id: Uuid,
        join: bool,
    ) -> Result<()> {
        self.notify_all(tx, &[self.message_payload(session_id, message.seq, join)]).await
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
    ) -> Result<Flagged> {
        let (stored, therapist_id): (Option<String>, Option<Uuid>) =
            sqlx::query_as("SELECT risk_level, therapist_id FROM chat_sessions WHERE id = $1 FOR UPDATE")
                .bind(session_id)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or(StoreError::NotFound)?;
        let before = stored_level(stored)?;
        let level = before.max(flag.level);
        let raised = flag.level > before;
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
        let crisis_message = if raised {
            let seq: i64 = sqlx::query_scalar(
                "UPDATE chat_sessions SET last_seq = last_seq + 1, updated_at = $1, last_message_at = $1
                 WHERE id = $2 RETURNING last_seq",
            )
            .bind(at)
            .bind(session_id)
            .fetch_one(&mut *tx)
            .await?;
            let message = new_message(Uuid::now_v7(), seq, Sender::System, &flag.crisis_message, None, at);
            insert_message(tx, session_id, &message).await?;
            self.notify_message(tx, &message, session_id, false).await?;
            sqlx::query(
                "INSERT INTO safety_referrals (day, level, count) VALUES ($1, $2, 1)
                 ON CONFLICT (day, level) DO UPDATE SET count = safety_referrals.count + 1",
            )
            .bind(at.date())
            .bind(flag.level.as_str())
            .execute(&mut *tx)
            .await?;
            Some(message)
        } else {
            None
        };
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
        let payload =
            json!({"kind": "risk", "session": session_id, "level": level, "therapist": therapist_id});
        self.notify(tx, payload).await?;
        Ok(Flagged { level, crisis_message, therapist_id })
    }

    /// One client's or therapist's message, for what the batch's insert
    /// left: the next seq, unless its `client_id` is already stored for this
    /// sender, then its safety flag if any.
    async fn append_in_tx(
        &self,
        tx: &mut PgConnection,
        session_id: Uuid,
        new: &NewMessage,
    ) -> Result<Appended> {
        // The batch holds the session's lock: a concurrent re-send of the
        // same client_id on another instance waited for it, and finds the
        // first one stored.
        let known: Option<i32> = sqlx::query_scalar("SELECT 1 FROM chat_sessions WHERE id = $1")
            .bind(session_id)
            .fetch_optional(&mut *tx)
            .await?;
        known.ok_or(StoreError::NotFound)?;
        let existing: Option<i64> = sqlx::query_scalar(
            "SELECT seq FROM messages WHERE session_id = $1 AND sender = $2 AND client_id = $3",
        )
        .bind(session_id)
        .bind(new.sender.as_str())
        .bind(&new.client_id)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(seq) = existing {
            return Ok(Appended::Duplicate { seq });
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
        let message = new_message(Uuid::now_v7(), seq, new.sender, &new.content, Some(&new.client_id), at);
        insert_message(tx, session_id, &message).await?;
        self.notify_message(tx, &message, session_id, false).await?;
        let flagged = match &new.risk {
            Some(flag) => Some(Box::new(self.flag_in_tx(tx, session_id, seq, flag).await?)),
            None => None,
        };
        Ok(Appended::Stored { message, chat_mode: parse_mode(&mode)?, flagged })
    }

    /// The batch's usual writes ([`usual_rows`]) in one statement, bound as
    /// arrays: it numbers them after each session's `last_seq` in batch
    /// order, skipping a key (session, sender, `client_id`) stored already
    /// and an unknown session, and a companion's write unless the session is
    /// `BOT_ONLY`; stores them; moves those sessions' `last_seq`; and
    /// returns the seq and session mode of every row stored. A second
    /// statement queues one notification per stored message, in seq order.
    /// Returns the results it settled, by index in the batch.
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
        let contents: Vec<&str> = rows.iter().map(|row| row.content).collect();
        let client_ids: Vec<Option<&str>> = rows.iter().map(|row| row.client_id).collect();
        let stored: Vec<(i64, i64, String)> = sqlx::query_as(
            "WITH batch AS (
                 SELECT * FROM unnest($1::bigint[], $2::uuid[], $3::uuid[], $4::text[], $5::text[], $6::text[])
                     AS b (place, id, session_id, sender, content, client_id)
             ),
             fresh AS (
                 SELECT b.*, s.chat_mode,
                        s.last_seq + row_number() OVER (PARTITION BY b.session_id ORDER BY b.place) AS seq
                 FROM batch AS b JOIN chat_sessions AS s ON s.id = b.session_id
                 WHERE CASE WHEN b.client_id IS NULL THEN s.chat_mode = 'BOT_ONLY'
                            ELSE NOT EXISTS (
                                SELECT 1 FROM messages AS m
                                WHERE m.session_id = b.session_id AND m.sender = b.sender
                                  AND m.client_id = b.client_id)
                       END
             ),
             inserted AS (
                 INSERT INTO messages (id, session_id, seq, sender, content, client_id, created_at)
                 SELECT id, session_id, seq, sender, content, client_id, $7 FROM fresh
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
        .fetch_all(&mut *tx)
        .await?;
        let mut payloads = Vec::with_capacity(stored.len());
        for (place, seq, mode) in stored {
            let Some(row) = usize::try_from(place).ok().and_then(|place| rows.get(place)) else {
                let unknown = sqlx::Error::Protocol("a batched insert reported an unknown row".into());
                return Err(StoreError::Unavailable(unknown));
            };
            payloads.push(self.message_payload(row.session_id, seq, false));
            settled.insert(row.index, Ok(batch::stored(row, seq, parse_mode(&mode)?, at)));
        }
        self.notify_all(tx, &payloads).await?;
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
        for (index, session_id, new) in left_over(batch, &settled) {
            let result = self.append_in_tx(&mut tx, session_id, new).await;
            batch::settle(&mut settled, index, result)?;
        }
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

    async fn create_chat_session(&self, client_token_hash: &[u8]) -> Result<ChatSession> {
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
        self.db.notify(&mut tx, json!({"kind": "session"})).await?;
        tx.commit().await?;
        Ok(session)
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
    ) -> Result<JoinOutcome> {
        let mut tx = self.db.pool.begin().await?;
        // The row lock makes racing therapists (on any instance) take turns.
        let current: Option<(Option<Uuid>, String)> =
            sqlx::query_as("SELECT therapist_id, chat_mode FROM chat_sessions WHERE id = $1 FOR UPDATE")
                .bind(session_id)
                .fetch_optional(&mut *tx)
                .await?;
        let (holder, mode) = current.ok_or(StoreError::NotFound)?;
        match holder {
            Some(holder) if holder != therapist_id => return Ok(JoinOutcome::ClaimedByOther),
            Some(_) if parse_mode(&mode)? == ChatMode::TherapistJoined => {
                return Ok(JoinOutcome::AlreadyJoined);
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
        let message = new_message(Uuid::now_v7(), seq, Sender::System, join_message, None, at);
        insert_message(&mut tx, session_id, &message).await?;
        self.db.notify_message(&mut tx, &message, session_id, true).await?;
        tx.commit().await?;
        Ok(JoinOutcome::Joined { message })
    }

    async fn close_chat_session(
        &self,
        session_id: Uuid,
        therapist_id: Uuid,
        closing_message: &str,
    ) -> Result<CloseOutcome> {
        let mut tx = self.db.pool.begin().await?;
        let current: Option<(Option<Uuid>, Option<OffsetDateTime>)> =
            sqlx::query_as("SELECT therapist_id, closed_at FROM chat_sessions WHERE id = $1 FOR UPDATE")
                .bind(session_id)
                .fetch_optional(&mut *tx)
                .await?;
        let (holder, closed_at) = current.ok_or(StoreError::NotFound)?;
        if holder != Some(therapist_id) {
            return Ok(CloseOutcome::NotYours);
        }
        if closed_at.is_some() {
            return Ok(CloseOutcome::AlreadyClosed);
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
        let message = new_message(Uuid::now_v7(), seq, Sender::System, closing_message, None, at);
        insert_message(&mut tx, session_id, &message).await?;
        self.db.notify_message(&mut tx, &message, session_id, false).await?;
        tx.commit().await?;
        Ok(CloseOutcome::Closed { message })
    }

    async fn append_message(&self, session_id: Uuid, new: NewMessage) -> Result<Appended> {
        self.writes.message(session_id, new).await
    }

    async fn append_if_bot_only(&self, session_id: Uuid, message: BotMessage) -> Result<Option<ChatMessage>> {
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

    async fn flag_risk(&self, session_id: Uuid, seq: i64, flag: RiskFlag) -> Result<Flagged> {
        let mut tx = self.db.pool.begin().await?;
        let flagged = self.db.flag_in_tx(&mut tx, session_id, seq, &flag).await?;
        tx.commit().await?;
        Ok(flagged)
    }

    async fn acknowledge_risk(
        &self,
        session_id: Uuid,
        therapist_id: Uuid,
        note: Option<&str>,
    ) -> Result<AcknowledgeOutcome> {
        let mut tx = self.db.pool.begin().await?;
        let row: Option<SessionRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {SESSION_COLUMNS} FROM chat_sessions WHERE id = $1 FOR UPDATE"
        )))
        .bind(session_id)
        .fetch_optional(&mut *tx)
        .await?;
        let session: ChatSession = row.ok_or(StoreError::NotFound)?.try_into()?;
        if session.therapist_id.is_some_and(|holder| holder != therapist_id) {
            return Ok(AcknowledgeOutcome::NotYours);
        }
        let Some(mut risk) = session.risk else {
            return Ok(AcknowledgeOutcome::NotFlagged);
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
        // Other instances' dashboards refresh.
        self.db.notify(&mut tx, json!({"kind": "session"})).await?;
        tx.commit().await?;
        risk.acknowledged_at = Some(at);
        risk.acknowledged_by = Some(therapist_id);
        Ok(AcknowledgeOutcome::Acknowledged(risk))
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
        let rows: Vec<MessageRow> = sqlx::query_as(
            "SELECT seq, id, sender, content, created_at, client_id FROM messages
             WHERE session_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
        )
        .bind(session_id)
        .bind(after)
        .bind(limit)
        .fetch_all(&self.db.pool)
        .await?;
        rows.into_iter().map(TryInto::try_into).collect()
    }

    async fn recent_messages(&self, session_id: Uuid, limit: i64) -> Result<Vec<ChatMessage>> {
        let rows: Vec<MessageRow> = sqlx::query_as(
            "SELECT seq, id, sender, content, created_at, client_id FROM (
                 SELECT * FROM messages WHERE session_id = $1 ORDER BY seq DESC LIMIT $2
             ) AS newest ORDER BY seq",
        )
        .bind(session_id)
        .bind(limit)
        .fetch_all(&self.db.pool)
        .await?;
        rows.into_iter().map(TryInto::try_into).collect()
    }

    async fn announce(&self, announcement: Announcement) -> Result<()> {
        let payloads = match &announcement {
            Announcement::Delta { session_id, reply_id, delta } => split(delta, MAX_DELTA_BYTES)
                .map(|piece| json!({"kind": "delta", "session": session_id, "reply": reply_id, "delta": piece}))
                .collect(),
            Announcement::Cancelled { session_id, reply_id } => {
                vec![json!({"kind": "cancelled", "session": session_id, "reply": reply_id})]
            }
        };
        let mut connection = self.db.pool.acquire().await?;
        for payload in payloads {
            self.db.notify(&mut connection, payload).await?;
        }
        Ok(())
    }

    async fn listen(&self) -> Result<Option<Box<dyn Listener>>> {
        let mut listener = PgListener::connect_with(&self.db.pool).await?;
        listener.listen(CHANNEL).await?;
        Ok(Some(Box::new(PgNotifications { listener, instance: self.db.instance })))
    }
}

async fn insert_message(tx: &mut PgConnection, session_id: Uuid, message: &ChatMessage) -> Result<()> {
    sqlx::query(
        "INSERT INTO messages (id, session_id, seq, sender, content, client_id, created_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(message.id)
    .bind(session_id)
    .bind(message.seq)
    .bind(message.sender.as_str())
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

/// `text` in pieces of at most `max` bytes, cut at character boundaries.
fn split(text: &str, max: usize) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut end = rest.len().min(max);
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
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
    let value: Value = serde_json::from_str(payload).ok()?;
    let uuid = |field: &str| value[field].as_str().and_then(|text| Uuid::parse_str(text).ok());
    if uuid("origin") == Some(instance) {
        return None;
    }
    match value["kind"].as_str()? {
        "message" => Some(Notification::Message {
            session_id: uuid("session")?,
            seq: value["seq"].as_i64()?,
            join: value["join"].as_bool().unwrap_or(false),
        }),
        "session" => Some(Notification::AppointmentsChanged),
        "risk" => Some(Notification::Risk {
            session_id: uuid("session")?,
            level: RiskLevel::parse(value["level"].as_str()?)?,
            therapist_id: uuid("therapist"),
        }),
        "delta" => Some(Notification::Announced(Announcement::Delta {
            session_id: uuid("session")?,
            reply_id: uuid("reply")?,
            delta: value["delta"].as_str()?.to_owned(),
        })),
        "cancelled" => Some(Notification::Announced(Announcement::Cancelled {
            session_id: uuid("session")?,
            reply_id: uuid("reply")?,
        })),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_deltas_are_split_at_character_boundaries() {
        let text = "é".repeat(10);
        let pieces: Vec<&str> = split(&text, 5).collect();
        assert!(pieces.iter().all(|piece| piece.len() <= 5));
        assert_eq!(pieces.concat(), text);
    }

    #[test]
    fn own_notifications_are_ignored() {
        let me = Uuid::now_v7();
        let session = Uuid::now_v7();
        let payload =
            json!({"kind": "message", "session": session, "seq": 3, "join": true, "origin": me}).to_string();
        assert_eq!(parse(&payload, me), None);
        assert_eq!(
            parse(&payload, Uuid::now_v7()),
            Some(Notification::Message { session_id: session, seq: 3, join: true })
        );
    }

    /// A fresh database on the PostgreSQL server of the tests
    /// (`HAVEN_TEST_POSTGRES_URL`, by default the local one with trust
    /// authentication). PostgreSQL is required: without it the test fails.
    async fn fresh_store() -> PgStore {
        use sqlx::Connection;
        let server = std::env::var("HAVEN_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned());
        let name = format!("haven_store_test_{}", Uuid::now_v7().simple());
        let mut admin = PgConnection::connect(&format!("{server}/postgres"))
            .await
            .unwrap_or_else(|error| panic!("PostgreSQL is required at {server}: {error}"));
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .unwrap();
        PgStore::connect(&format!("{server}/{name}"), Uuid::now_v7()).await.unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_refused_for_what_it_holds_does_not_fail_its_batch() {
        let store = fresh_store().await;
        let session = store.create_chat_session(&[7; 32]).await.unwrap().id;
        // Twenty writes at once share batches; one holds a character
        // PostgreSQL refuses (the edge refuses it too; the store must not
        // rely on that).
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
        assert_eq!(refused, [7], "only the write holding U+0000 is refused");
        let stored = store.messages_after(session, 0, 100).await.unwrap();
        assert_eq!(stored.len(), 19);
        assert!(stored.iter().all(|message| !message.content.contains('\0')));
    }
}
