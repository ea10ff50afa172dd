//! The transaction scripts both stores run, each written once.
//!
//! Every operation here is the same on SQLite and on PostgreSQL: the same
//! statements, in the same transactions, returning the same events. The SQL
//! is what both databases read (`$N` placeholders, which sqlx binds by
//! number on SQLite too). What really differs is behind [`Backend`], which
//! each store implements:
//! - where reads and writes go ([`Backend::reader`], [`Backend::writer`]):
//!   SQLite has a read pool and a one-connection write pool, PostgreSQL one
//!   pool;
//! - how a write transaction begins ([`Backend::begin_write`]): `BEGIN
//!   IMMEDIATE` on SQLite, so a read-then-write never fails to upgrade its
//!   lock; a plain `BEGIN` on PostgreSQL;
//! - how a session row is read before a write that depends on it
//!   ([`Backend::LOCK`]): `FOR UPDATE` on PostgreSQL, where several
//!   instances write; nothing on SQLite, whose writer already holds the
//!   database's only write lock;
//! - how committed events reach other instances ([`Backend::notify`]): in
//!   the transaction on PostgreSQL; nowhere on SQLite.
//!
//! [`Store`] is implemented once, below, for every [`Backend`]. Connection
//! set-up, the message writes (group commit, [`crate::batch`]), listening
//! and SQLite's checkpointer differ for real and stay in each store's
//! module, which calls [`Scripts`] for the steps its group commit shares
//! with these scripts (inserting a message, raising a flag).

use std::marker::PhantomData;
use std::net::IpAddr;

use async_trait::async_trait;
use haven_protocol::{ChatMessage, ChatMode, MessageKind, Sender, api::AppointmentStatus};
use sqlx::{
    ColumnIndex, Database, Decode, Encode, Executor, FromRow, IntoArguments, Pool, Transaction, Type,
};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::batch::Writes;
use crate::rows::{
    AUDIT_COLUMNS, AuditRow, MESSAGE_COLUMNS, MessageRow, SESSION_COLUMNS, SessionRow, THERAPIST_COLUMNS,
    TOUCH_INTERVAL, TherapistRow, current_risk, is_unique_violation, join_rules, new_message, parse_mode,
    report_from_rows, stored_level,
};
use crate::trail::{Action, Actor, Origin, TrailEntry, TrailFilter, TrailRecord};
use crate::{
    AcknowledgeOutcome, Appended, AuditRecord, BotMessage, ChatSession, CloseOutcome, Committed, CurrentRisk,
    EraseOutcome, Flagged, Glance, HandBackOutcome, JoinOutcome, Listener, NewMessage, NewTherapist, Result,
    ResumeOutcome, RetentionCutoffs, RetentionReport, RiskFlag, SafetyReport, SessionEvent, SharingOutcome,
    Store, StoreError, Therapist, now,
};

/// The sessions on a therapist's appointments list (`$1`: the therapist,
/// `$2`: the waiting window's start), for a query on `chat_sessions s`:
/// open ones of theirs, and unclaimed ones still waiting: flagged, or with
/// activity (a message, or creation) in the window.
const LISTED: &str = "s.closed_at IS NULL AND (s.therapist_id = $1 OR (s.therapist_id IS NULL
    AND (s.risk_level IS NOT NULL OR COALESCE(s.last_message_at, s.created_at) >= $2)))";

/// What a store tells the shared scripts: the few things that differ.
pub(crate) trait Backend: Send + Sync + 'static {
    type Db: Database;

    /// Appended to the select that reads a session row before a write that
    /// depends on it: `" FOR UPDATE"`, or `""` where the write transaction
    /// already excludes every other writer.
    const LOCK: &'static str;

    /// Run before appending to the audit trail, so that appends take turns
    /// across instances and the chain stays one chain: an advisory lock
    /// held to the end of the transaction, or `""` where the write
    /// transaction already excludes every other writer.
    const TRAIL_LOCK: &'static str;

    /// Where reads that are not part of a write go.
    fn reader(&self) -> &Pool<Self::Db>;

    /// Where single-statement writes go.
    fn writer(&self) -> &Pool<Self::Db>;

    /// The group-commit queue of message writes ([`crate::batch`]).
    fn writes(&self) -> &Writes;

    /// A write transaction (on SQLite, `BEGIN IMMEDIATE`).
    fn begin_write(&self) -> impl Future<Output = Result<Transaction<'static, Self::Db>>> + Send;

    /// Tells the other instances, inside `tx`, about `events` (sent on commit).
    fn notify(
        &self,
        tx: &mut <Self::Db as Database>::Connection,
        events: &[SessionEvent],
    ) -> impl Future<Output = Result<()>> + Send;

    /// [`Store::announce`]: nothing for a store that only one instance uses.
    fn announce(&self, _event: SessionEvent) -> impl Future<Output = Result<()>> + Send {
        async { Ok(()) }
    }

    /// After chats were deleted: makes their bytes leave every file the
    /// database keeps (SQLite: a checkpoint that truncates the WAL). Nothing
    /// by default.
    fn scrub(&self) -> impl Future<Output = Result<()>> + Send {
        async { Ok(()) }
    }

    /// [`Store::listen`]: `None` for a store that only one instance uses.
    fn listen(&self) -> impl Future<Output = Result<Option<Box<dyn Listener>>>> + Send {
        async { Ok(None) }
    }
}

/// A type stored in a column of both databases: bound, and read back.
pub(crate) trait Column<DB: Database>:
    for<'q> Encode<'q, DB> + for<'r> Decode<'r, DB> + Type<DB> + Send
{
}

impl<DB: Database, T> Column<DB> for T where
    T: for<'q> Encode<'q, DB> + for<'r> Decode<'r, DB> + Type<DB> + Send
{
}

/// Every operation of [`Store`], written once for any [`Backend`] whose
/// database binds and reads Haven's column types (the bounds below; the
/// same on [`Scripts`]). A store's message writes go to its group commit.
#[async_trait]
impl<B, DB> Store for B
where
    B: Backend<Db = DB>,
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    DB::Arguments: IntoArguments<DB>,
    usize: ColumnIndex<DB::Row>,
    for<'n> &'n str: ColumnIndex<DB::Row>,
    Uuid: Column<DB>,
    OffsetDateTime: Column<DB>,
    time::Date: Column<DB>,
    i64: Column<DB>,
    bool: Column<DB>,
    String: Column<DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> Option<&'q str>: Encode<'q, DB>,
    for<'q> &'q [u8]: Encode<'q, DB> + Type<DB>,
    Vec<u8>: Column<DB>,
    for<'q> Option<Uuid>: Encode<'q, DB>,
    for<'q> Option<OffsetDateTime>: Encode<'q, DB>,
{
    // Accounts.

    async fn create_therapist(&self, new: NewTherapist, by: Origin) -> Result<Therapist> {
        let therapist = Therapist {
            id: Uuid::now_v7(),
            email: new.email,
            name: new.name,
            created_at: now(),
            disabled: false,
        };
        let mut tx = self.begin_write().await?;
        let inserted = sqlx::query(
            "INSERT INTO therapists (id, email, name, password_hash, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(therapist.id)
        .bind(&therapist.email)
        .bind(&therapist.name)
        .bind(&new.password_hash)
        .bind(therapist.created_at)
        .execute(&mut *tx)
        .await;
        match inserted {
            Ok(_) => {}
            Err(error) if is_unique_violation(&error) => {
                return Err(StoreError::Conflict("email already registered"));
            }
            Err(error) => return Err(error.into()),
        }
        let record = by.entry(Action::AccountAdd).detail(format!("account {}", therapist.id));
        Scripts::<B>::trail_in_tx(&mut tx, vec![record]).await?;
        tx.commit().await?;
        Ok(therapist)
    }

    async fn therapists(&self) -> Result<Vec<Therapist>> {
        let rows: Vec<TherapistRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {THERAPIST_COLUMNS} FROM therapists ORDER BY id"
        )))
        .fetch_all(self.reader())
        .await?;
        Ok(rows.into_iter().map(Into::into).collect())
    }

    async fn count_therapists(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT COUNT(*) FROM therapists").fetch_one(self.reader()).await?)
    }

    async fn sessions_by_mode(&self) -> Result<Vec<(ChatMode, i64)>> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT chat_mode, COUNT(*) FROM chat_sessions WHERE closed_at IS NULL GROUP BY chat_mode",
        )
        .fetch_all(self.reader())
        .await?;
        rows.into_iter().map(|(mode, count)| Ok((parse_mode(&mode)?, count))).collect()
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(self.reader()).await?;
        Ok(())
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
        .fetch_optional(self.reader())
        .await?;
        Ok(row.map(|row| (row.therapist.into(), row.password_hash)))
    }

    /// Replaces an account's password hash and ends its logins.
    async fn set_password(&self, email: &str, password_hash: &str, by: Origin) -> Result<Option<Therapist>> {
        let mut tx = self.begin_write().await?;
        let row: Option<TherapistRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "UPDATE therapists SET password_hash = $1 WHERE email = $2 RETURNING {THERAPIST_COLUMNS}"
        )))
        .bind(password_hash)
        .bind(email)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else { return Ok(None) };
        Scripts::<B>::end_logins(&mut tx, row.id).await?;
        let record = by.entry(Action::AccountPassword).detail(format!("account {}", row.id));
        Scripts::<B>::trail_in_tx(&mut tx, vec![record]).await?;
        tx.commit().await?;
        Ok(Some(row.into()))
    }

    /// Disables an account and ends its logins.
    async fn disable_therapist(&self, email: &str, by: Origin) -> Result<Option<Therapist>> {
        let mut tx = self.begin_write().await?;
        let row: Option<TherapistRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "UPDATE therapists SET disabled_at = COALESCE(disabled_at, $1) WHERE email = $2
             RETURNING {THERAPIST_COLUMNS}"
        )))
        .bind(now())
        .bind(email)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else { return Ok(None) };
        Scripts::<B>::end_logins(&mut tx, row.id).await?;
        let record = by.entry(Action::AccountDisable).detail(format!("account {}", row.id));
        Scripts::<B>::trail_in_tx(&mut tx, vec![record]).await?;
        tx.commit().await?;
        Ok(Some(row.into()))
    }

    // Logins.

    async fn create_auth_session(
        &self,
        therapist_id: Uuid,
        token_hash: &[u8],
        expires_at: OffsetDateTime,
        address: Option<IpAddr>,
    ) -> Result<()> {
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO therapist_auth_sessions (token_hash, therapist_id, created_at, expires_at)
             VALUES ($1, $2, $3, $4)",
        )
        .bind(token_hash)
        .bind(therapist_id)
        .bind(now())
        .bind(expires_at)
        .execute(&mut *tx)
        .await?;
        let record = TrailEntry::new(Actor::Therapist(therapist_id), Action::Login).address(address);
        Scripts::<B>::trail_in_tx(&mut tx, vec![record]).await?;
        tx.commit().await?;
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
        .fetch_optional(self.reader())
        .await?;
        // Compared here rather than in SQL: SQLite stores RFC 3339 text, whose
        // variable-length fractions do not sort as text.
        let Some(row) = row else { return Ok(None) };
        let last_seen = row.last_seen_at.unwrap_or(row.logged_in_at);
        if row.expires_at <= now || last_seen + idle <= now || row.therapist.disabled_at.is_some() {
            return Ok(None);
        }
        if touch && now - last_seen >= TOUCH_INTERVAL {
            sqlx::query("UPDATE therapist_auth_sessions SET last_seen_at = $1 WHERE token_hash = $2")
                .bind(now)
                .bind(token_hash)
                .execute(self.writer())
                .await?;
        }
        Ok(Some(row.therapist.into()))
    }

    async fn revoke_auth_session(&self, token_hash: &[u8], address: Option<IpAddr>) -> Result<()> {
        let mut tx = self.begin_write().await?;
        let ended: Option<Uuid> = sqlx::query_scalar(
            "DELETE FROM therapist_auth_sessions WHERE token_hash = $1 RETURNING therapist_id",
        )
        .bind(token_hash)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(therapist_id) = ended {
            let record = TrailEntry::new(Actor::Therapist(therapist_id), Action::Logout).address(address);
            Scripts::<B>::trail_in_tx(&mut tx, vec![record]).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn revoke_therapist_sessions(&self, therapist_id: Uuid) -> Result<()> {
        sqlx::query("DELETE FROM therapist_auth_sessions WHERE therapist_id = $1")
            .bind(therapist_id)
            .execute(self.writer())
            .await?;
        Ok(())
    }

    // Sessions.

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
            closed_at: None,
            companion_paused: false,
            companion_shared: None,
            first_join_seq: None,
            risk: None,
        };
        let mut tx = self.begin_write().await?;
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
        self.notify(&mut tx, &events).await?;
        tx.commit().await?;
        Ok(Committed::new(session, events))
    }

    async fn chat_session(&self, session_id: Uuid) -> Result<Option<ChatSession>> {
        let row: Option<SessionRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {SESSION_COLUMNS} FROM chat_sessions WHERE id = $1"
        )))
        .bind(session_id)
        .fetch_optional(self.reader())
        .await?;
        row.map(TryInto::try_into).transpose()
    }

    async fn session_for_client_token(&self, token_hash: &[u8]) -> Result<Option<Uuid>> {
        Ok(sqlx::query_scalar("SELECT session_id FROM client_credentials WHERE token_hash = $1")
            .bind(token_hash)
            .fetch_optional(self.reader())
            .await?)
    }

    async fn appointments_for(
        &self,
        therapist_id: Uuid,
        waiting_since: OffsetDateTime,
    ) -> Result<Vec<ChatSession>> {
        let rows: Vec<SessionRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {SESSION_COLUMNS} FROM chat_sessions s WHERE {LISTED} ORDER BY id"
        )))
        .bind(therapist_id)
        .bind(waiting_since)
        .fetch_all(self.reader())
        .await?;
        rows.into_iter().map(TryInto::try_into).collect()
    }

    async fn glances_for(
        &self,
        therapist_id: Uuid,
        waiting_since: OffsetDateTime,
    ) -> Result<std::collections::HashMap<Uuid, Glance>> {
        #[derive(FromRow)]
        struct GlanceRow {
            session_id: Uuid,
            unread: i64,
            // The newest message's columns, all null when there is none.
            seq: Option<i64>,
            id: Option<Uuid>,
            sender: Option<String>,
            kind: Option<String>,
            content: Option<String>,
            created_at: Option<OffsetDateTime>,
            client_id: Option<String>,
        }
        let rows: Vec<GlanceRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT s.id AS session_id,
               (SELECT count(*) FROM messages m WHERE m.session_id = s.id AND m.sender IN ('user', 'ai')
                  AND m.seq > COALESCE(r.last_read_seq, 0)) AS unread,
               l.seq, l.id, l.sender, l.kind, l.content, l.created_at, l.client_id
             FROM chat_sessions s
             LEFT JOIN therapist_reads r ON r.therapist_id = $1 AND r.session_id = s.id
             LEFT JOIN messages l ON l.session_id = s.id AND l.seq = s.last_seq
             WHERE {LISTED}"
        )))
        .bind(therapist_id)
        .bind(waiting_since)
        .fetch_all(self.reader())
        .await?;
        rows.into_iter()
            .map(|row| {
                let last = match (row.seq, row.id, row.sender, row.kind, row.content, row.created_at) {
                    (Some(seq), Some(id), Some(sender), Some(kind), Some(content), Some(created_at)) => {
                        let client_id = row.client_id;
                        Some(
                            MessageRow { seq, id, sender, kind, content, created_at, client_id }
                                .try_into()?,
                        )
                    }
                    _ => None,
                };
                Ok((row.session_id, Glance { unread: row.unread, last }))
            })
            .collect()
    }

    async fn mark_read(&self, therapist_id: Uuid, session_id: Uuid, seq: i64) -> Result<()> {
        sqlx::query(
            "INSERT INTO therapist_reads (therapist_id, session_id, last_read_seq, updated_at)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (therapist_id, session_id) DO UPDATE
               SET last_read_seq = excluded.last_read_seq, updated_at = excluded.updated_at
               WHERE therapist_reads.last_read_seq < excluded.last_read_seq",
        )
        .bind(therapist_id)
        .bind(session_id)
        .bind(seq)
        .bind(now())
        .execute(self.writer())
        .await?;
        Ok(())
    }

    async fn closed_for(
        &self,
        therapist_id: Uuid,
        before: Option<(OffsetDateTime, Uuid)>,
        limit: u32,
    ) -> Result<Vec<ChatSession>> {
        // With no page before, a bound after every possible one.
        let (closed_at, id) =
            before.unwrap_or((OffsetDateTime::now_utc() + time::Duration::days(1), Uuid::max()));
        let rows: Vec<SessionRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {SESSION_COLUMNS} FROM chat_sessions
             WHERE therapist_id = $1 AND closed_at IS NOT NULL AND (closed_at < $2 OR (closed_at = $2 AND id < $3))
             ORDER BY closed_at DESC, id DESC LIMIT $4"
        )))
        .bind(therapist_id)
        .bind(closed_at)
        .bind(id)
        .bind(i64::from(limit))
        .fetch_all(self.reader())
        .await?;
        rows.into_iter().map(TryInto::try_into).collect()
    }

    async fn set_client_label(
        &self,
        therapist_id: Uuid,
        session_id: Uuid,
        label: Option<&str>,
    ) -> Result<()> {
        match label {
            Some(label) => {
                sqlx::query(
                    "INSERT INTO client_labels (therapist_id, session_id, label, updated_at) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (therapist_id, session_id) DO UPDATE SET label = $3, updated_at = $4",
                )
                .bind(therapist_id)
                .bind(session_id)
                .bind(label)
                .bind(now())
                .execute(self.writer())
                .await?;
            }
            None => {
                sqlx::query("DELETE FROM client_labels WHERE therapist_id = $1 AND session_id = $2")
                    .bind(therapist_id)
                    .bind(session_id)
                    .execute(self.writer())
                    .await?;
            }
        }
        Ok(())
    }

    async fn client_labels(&self, therapist_id: Uuid) -> Result<std::collections::HashMap<Uuid, String>> {
        let rows: Vec<(Uuid, String)> =
            sqlx::query_as("SELECT session_id, label FROM client_labels WHERE therapist_id = $1")
                .bind(therapist_id)
                .fetch_all(self.reader())
                .await?;
        Ok(rows.into_iter().collect())
    }

    /// The takeover, in one transaction.
    async fn join_as_therapist(
        &self,
        session_id: Uuid,
        therapist_id: Uuid,
        join_message: &str,
        address: Option<IpAddr>,
    ) -> Result<Committed<JoinOutcome>> {
        let record = TrailEntry::new(Actor::Therapist(therapist_id), Action::Join)
            .session(session_id)
            .address(address);
        let mut tx = self.begin_write().await?;
        // The lock makes racing therapists (on any instance) take turns.
        let lock = B::LOCK;
        let current: Option<(Option<Uuid>, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT therapist_id, chat_mode FROM chat_sessions WHERE id = $1{lock}"
        )))
        .bind(session_id)
        .fetch_optional(&mut *tx)
        .await?;
        let (holder, mode) = current.ok_or(StoreError::NotFound)?;
        match holder {
            Some(holder) if holder != therapist_id => {
                Scripts::<B>::refuse(tx, record).await?;
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
             SET therapist_id = $1, status = 'assigned', chat_mode = 'THERAPIST_JOINED', companion_paused = FALSE,
                 last_seq = last_seq + 1, updated_at = $2, last_message_at = $2,
                 first_join_seq = COALESCE(first_join_seq, last_seq + 1)
             WHERE id = $3 RETURNING last_seq",
        )
        .bind(therapist_id)
        .bind(at)
        .bind(session_id)
        .fetch_one(&mut *tx)
        .await?;
        let message =
            new_message(Uuid::now_v7(), seq, Sender::System, MessageKind::Join, join_message, None, at);
        let events = Scripts::<B>::commit_messages(self, tx, session_id, vec![message], vec![record]).await?;
        Ok(Committed::new(JoinOutcome::Joined, events))
    }

    /// Closes a session, in one transaction.
    async fn close_chat_session(
        &self,
        session_id: Uuid,
        therapist_id: Uuid,
        closing_message: &str,
        address: Option<IpAddr>,
    ) -> Result<Committed<CloseOutcome>> {
        let record = TrailEntry::new(Actor::Therapist(therapist_id), Action::Close)
            .session(session_id)
            .address(address);
        let mut tx = self.begin_write().await?;
        let lock = B::LOCK;
        let current: Option<(Option<Uuid>, Option<OffsetDateTime>)> = sqlx::query_as(sqlx::AssertSqlSafe(
            format!("SELECT therapist_id, closed_at FROM chat_sessions WHERE id = $1{lock}"),
        ))
        .bind(session_id)
        .fetch_optional(&mut *tx)
        .await?;
        let (holder, closed_at) = current.ok_or(StoreError::NotFound)?;
        if holder != Some(therapist_id) {
            Scripts::<B>::refuse(tx, record).await?;
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
        let message =
            new_message(Uuid::now_v7(), seq, Sender::System, MessageKind::Close, closing_message, None, at);
        let events = Scripts::<B>::commit_messages(self, tx, session_id, vec![message], vec![record]).await?;
        Ok(Committed::new(CloseOutcome::Closed, events))
    }

    /// The hand-back, in one transaction.
    async fn hand_back(
        &self,
        session_id: Uuid,
        therapist_id: Uuid,
        note: Option<&str>,
        hand_back_message: &str,
        by: Origin,
    ) -> Result<Committed<HandBackOutcome>> {
        let record = by.entry(Action::HandBack).session(session_id);
        let mut tx = self.begin_write().await?;
        let lock = B::LOCK;
        let current: Option<(Option<Uuid>, String, Option<OffsetDateTime>)> =
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT therapist_id, chat_mode, closed_at FROM chat_sessions WHERE id = $1{lock}"
            )))
            .bind(session_id)
            .fetch_optional(&mut *tx)
            .await?;
        let (holder, mode, closed_at) = current.ok_or(StoreError::NotFound)?;
        if holder != Some(therapist_id) {
            Scripts::<B>::refuse(tx, record).await?;
            return Ok(Committed::nothing(HandBackOutcome::NotYours));
        }
        if closed_at.is_some() {
            return Ok(Committed::nothing(HandBackOutcome::Closed));
        }
        if parse_mode(&mode)? != ChatMode::TherapistJoined {
            return Ok(Committed::nothing(HandBackOutcome::NotJoined));
        }
        let at = now();
        let written = 1 + i64::from(note.is_some());
        let last_seq: i64 = sqlx::query_scalar(
            "UPDATE chat_sessions
             SET chat_mode = 'BOT_ONLY', companion_paused = TRUE, last_seq = last_seq + $1,
                 updated_at = $2, last_message_at = $2
             WHERE id = $3 RETURNING last_seq",
        )
        .bind(written)
        .bind(at)
        .bind(session_id)
        .fetch_one(&mut *tx)
        .await?;
        let mut messages = Vec::new();
        if let Some(note) = note {
            let seq = last_seq - 1;
            messages.push(new_message(
                Uuid::now_v7(),
                seq,
                Sender::Therapist,
                MessageKind::Chat,
                note,
                None,
                at,
            ));
        }
        let kind = MessageKind::Handback;
        messages.push(new_message(
            Uuid::now_v7(),
            last_seq,
            Sender::System,
            kind,
            hand_back_message,
            None,
            at,
        ));
        let events = Scripts::<B>::commit_messages(self, tx, session_id, messages, vec![record]).await?;
        Ok(Committed::new(HandBackOutcome::HandedBack, events))
    }

    /// The client's yes after a hand-back, in one transaction.
    async fn resume_companion(
        &self,
        session_id: Uuid,
        resume_message: &str,
    ) -> Result<Committed<ResumeOutcome>> {
        let mut tx = self.begin_write().await?;
        let lock = B::LOCK;
        type Row = (bool, Option<OffsetDateTime>, Option<String>, Option<OffsetDateTime>);
        let current: Option<Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT companion_paused, closed_at, risk_level, risk_last_at FROM chat_sessions WHERE id = $1{lock}"
        )))
        .bind(session_id)
        .fetch_optional(&mut *tx)
        .await?;
        let (paused, closed_at, risk_level, risk_at) = current.ok_or(StoreError::NotFound)?;
        if !paused || closed_at.is_some() {
            return Ok(Committed::nothing(ResumeOutcome::NotPaused));
        }
        // A client message after the hand-back waits for the companion.
        let unanswered: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM messages WHERE session_id = $1 AND sender = 'user' AND seq > (
                 SELECT COALESCE(MAX(seq), 0) FROM messages WHERE session_id = $1 AND kind = 'handback'))",
        )
        .bind(session_id)
        .fetch_one(&mut *tx)
        .await?;
        let at = now();
        let seq: i64 = sqlx::query_scalar(
            "UPDATE chat_sessions
             SET companion_paused = FALSE, last_seq = last_seq + 1, updated_at = $1, last_message_at = $1
             WHERE id = $2 RETURNING last_seq",
        )
        .bind(at)
        .bind(session_id)
        .fetch_one(&mut *tx)
        .await?;
        let message =
            new_message(Uuid::now_v7(), seq, Sender::System, MessageKind::Resume, resume_message, None, at);
        let events = Scripts::<B>::commit_messages(self, tx, session_id, vec![message], Vec::new()).await?;
        let risk = current_risk(risk_level, risk_at)?;
        Ok(Committed::new(ResumeOutcome::Resumed { unanswered, seq, risk }, events))
    }

    // Messages.

    /// The newest `limit` messages, in seq order.
    async fn recent_messages(&self, session_id: Uuid, limit: i64) -> Result<Vec<ChatMessage>> {
        let rows: Vec<MessageRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {MESSAGE_COLUMNS} FROM (
                 SELECT * FROM messages WHERE session_id = $1 ORDER BY seq DESC LIMIT $2
             ) AS newest ORDER BY seq"
        )))
        .bind(session_id)
        .bind(limit)
        .fetch_all(self.reader())
        .await?;
        rows.into_iter().map(TryInto::try_into).collect()
    }

    async fn messages_after(&self, session_id: Uuid, after: i64, limit: i64) -> Result<Vec<ChatMessage>> {
        let mut connection = self.reader().acquire().await?;
        Scripts::<B>::messages_after_in(&mut connection, session_id, after, limit).await
    }

    async fn read_messages(
        &self,
        session_id: Uuid,
        after: i64,
        limit: i64,
        read: TrailEntry,
    ) -> Result<Vec<ChatMessage>> {
        let mut tx = self.begin_write().await?;
        let messages = Scripts::<B>::messages_after_in(&mut tx, session_id, after, limit).await?;
        if let (Some(first), Some(last)) = (messages.first(), messages.last()) {
            let record = read.session(session_id).detail(format!("messages {}-{}", first.seq, last.seq));
            Scripts::<B>::trail_in_tx(&mut tx, vec![record]).await?;
            tx.commit().await?;
        }
        Ok(messages)
    }

    async fn set_companion_shared(
        &self,
        session_id: Uuid,
        shared: bool,
    ) -> Result<Committed<SharingOutcome>> {
        let mut tx = self.begin_write().await?;
        let lock = B::LOCK;
        let holder: Option<Option<Uuid>> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT therapist_id FROM chat_sessions WHERE id = $1{lock}"
        )))
        .bind(session_id)
        .fetch_optional(&mut *tx)
        .await?;
        if holder.ok_or(StoreError::NotFound)?.is_some() {
            return Ok(Committed::nothing(SharingOutcome::Joined));
        }
        sqlx::query("UPDATE chat_sessions SET companion_shared = $1 WHERE id = $2")
            .bind(shared)
            .bind(session_id)
            .execute(&mut *tx)
            .await?;
        let choice = if shared { "shared" } else { "private" };
        let record = TrailEntry::new(Actor::Client, Action::Sharing).session(session_id).detail(choice);
        Scripts::<B>::trail_in_tx(&mut tx, vec![record]).await?;
        let events = vec![SessionEvent::Sharing { session_id, shared }];
        self.notify(&mut tx, &events).await?;
        tx.commit().await?;
        Ok(Committed::new(SharingOutcome::Set, events))
    }

    async fn erase_chat(&self, session_id: Uuid) -> Result<Committed<EraseOutcome>> {
        let mut tx = self.begin_write().await?;
        let lock = B::LOCK;
        let row: Option<(Option<Uuid>, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT therapist_id, last_seq FROM chat_sessions WHERE id = $1{lock}"
        )))
        .bind(session_id)
        .fetch_optional(&mut *tx)
        .await?;
        let (holder, messages) = row.ok_or(StoreError::NotFound)?;
        // A hand-back keeps the therapist: a chat once joined stays joined.
        if holder.is_some() {
            return Ok(Committed::nothing(EraseOutcome::Joined));
        }
        Scripts::<B>::delete_chat(&mut tx, session_id).await?;
        let record = TrailEntry::new(Actor::Client, Action::Erase)
            .session(session_id)
            .detail(format!("{messages} messages"));
        Scripts::<B>::trail_in_tx(&mut tx, vec![record]).await?;
        let events = vec![SessionEvent::Erased { session_id }];
        self.notify(&mut tx, &events).await?;
        tx.commit().await?;
        Scripts::<B>::scrub_after_deleting(self).await;
        Ok(Committed::new(EraseOutcome::Erased { messages }, events))
    }

    async fn apply_retention(
        &self,
        cutoffs: RetentionCutoffs,
        apply: bool,
        by: Origin,
    ) -> Result<Committed<RetentionReport>> {
        let mut tx = self.begin_write().await?;
        let lock = B::LOCK;
        // A chat's tier: clinical once a therapist joined it or the crisis
        // detector flagged it; its age: its last activity.
        let expired: Vec<(Uuid, i64, bool)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT id, last_seq, (therapist_id IS NOT NULL OR risk_level IS NOT NULL) AS clinical
             FROM chat_sessions
             WHERE COALESCE(last_message_at, created_at) < CASE
                 WHEN therapist_id IS NULL AND risk_level IS NULL THEN $1 ELSE $2 END
             ORDER BY id{lock}"
        )))
        .bind(cutoffs.bot_only_before)
        .bind(cutoffs.clinical_before)
        .fetch_all(&mut *tx)
        .await?;
        let mut report = RetentionReport { applied: apply, ..RetentionReport::default() };
        let mut events = Vec::new();
        for (session_id, messages, clinical) in expired {
            if clinical {
                report.clinical_chats += 1;
                report.clinical_messages += messages;
            } else {
                report.bot_only_chats += 1;
                report.bot_only_messages += messages;
            }
            if apply {
                Scripts::<B>::delete_chat(&mut tx, session_id).await?;
                events.push(SessionEvent::Erased { session_id });
            }
        }
        let detail = format!(
            "{}{} chats no therapist joined ({} messages), {} clinical chats ({} messages)",
            if apply { "removed " } else { "dry run: " },
            report.bot_only_chats,
            report.bot_only_messages,
            report.clinical_chats,
            report.clinical_messages,
        );
        let found = report.bot_only_chats + report.clinical_chats > 0;
        if found || by.actor != Actor::System {
            Scripts::<B>::trail_in_tx(&mut tx, vec![by.entry(Action::Retention).detail(detail)]).await?;
        }
        self.notify(&mut tx, &events).await?;
        tx.commit().await?;
        if !events.is_empty() {
            Scripts::<B>::scrub_after_deleting(self).await;
        }
        Ok(Committed::new(report, events))
    }

    async fn append_trail(&self, entry: TrailEntry) -> Result<()> {
        let mut tx = self.begin_write().await?;
        Scripts::<B>::trail_in_tx(&mut tx, vec![entry]).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn trail(&self, filter: &TrailFilter) -> Result<Vec<TrailRecord>> {
        Ok(sqlx::query_as(
            "SELECT seq, at, actor, therapist_id, action, session_id, address, outcome, detail, prev_hash, hash
             FROM audit_trail
             WHERE seq > $1 AND ($2 IS NULL OR session_id = $2) AND ($3 IS NULL OR therapist_id = $3)
               AND ($4 IS NULL OR at >= $4)
             ORDER BY seq LIMIT $5",
        )
        .bind(filter.after)
        .bind(filter.session_id)
        .bind(filter.therapist_id)
        .bind(filter.since)
        .bind(filter.limit)
        .fetch_all(self.reader())
        .await?)
    }

    // Rate limits.

    async fn count_rate_events(&self, kind: &str, key: &str, since_ms: i64) -> Result<(i64, Option<i64>)> {
        sqlx::query("DELETE FROM rate_events WHERE kind = $1 AND key = $2 AND at < $3")
            .bind(kind)
            .bind(key)
            .bind(since_ms)
            .execute(self.writer())
            .await?;
        let (count, oldest): (i64, Option<i64>) =
            sqlx::query_as("SELECT COUNT(*), MIN(at) FROM rate_events WHERE kind = $1 AND key = $2")
                .bind(kind)
                .bind(key)
                .fetch_one(self.writer())
                .await?;
        Ok((count, oldest))
    }

    async fn record_rate_event(&self, kind: &str, key: &str, at_ms: i64) -> Result<()> {
        sqlx::query("INSERT INTO rate_events (kind, key, at) VALUES ($1, $2, $3)")
            .bind(kind)
            .bind(key)
            .bind(at_ms)
            .execute(self.writer())
            .await?;
        Ok(())
    }

    async fn clear_rate_events(&self, kind: &str, key: &str) -> Result<()> {
        sqlx::query("DELETE FROM rate_events WHERE kind = $1 AND key = $2")
            .bind(kind)
            .bind(key)
            .execute(self.writer())
            .await?;
        Ok(())
    }

    // Safety.

    /// Flags the stored message `seq` after the fact, in a transaction of
    /// its own.
    async fn flag_risk(&self, session_id: Uuid, seq: i64, flag: RiskFlag) -> Result<Committed<Flagged>> {
        let mut tx = self.begin_write().await?;
        let flagged = Scripts::<B>::flag_in_tx(&mut tx, session_id, seq, &flag).await?;
        self.notify(&mut tx, &flagged.events).await?;
        tx.commit().await?;
        Ok(Committed::new(flagged.outcome, flagged.events))
    }

    async fn acknowledge_risk(
        &self,
        session_id: Uuid,
        therapist_id: Uuid,
        note: Option<&str>,
        address: Option<IpAddr>,
    ) -> Result<Committed<AcknowledgeOutcome>> {
        let record = TrailEntry::new(Actor::Therapist(therapist_id), Action::Acknowledge)
            .session(session_id)
            .address(address);
        let mut tx = self.begin_write().await?;
        let lock = B::LOCK;
        let row: Option<SessionRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {SESSION_COLUMNS} FROM chat_sessions WHERE id = $1{lock}"
        )))
        .bind(session_id)
        .fetch_optional(&mut *tx)
        .await?;
        let session: ChatSession = row.ok_or(StoreError::NotFound)?.try_into()?;
        if session.therapist_id.is_some_and(|holder| holder != therapist_id) {
            Scripts::<B>::refuse(tx, record).await?;
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
        let record = record.detail(format!("level {}", risk.level.as_str()));
        Scripts::<B>::trail_in_tx(&mut tx, vec![record]).await?;
        let events = vec![SessionEvent::Acknowledged { session_id }];
        self.notify(&mut tx, &events).await?;
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
        .fetch_all(self.reader())
        .await?;
        rows.into_iter().map(TryInto::try_into).collect()
    }

    async fn safety_report(&self, since: OffsetDateTime) -> Result<SafetyReport> {
        let referrals: Vec<(String, i64)> = sqlx::query_as(
            "SELECT level, CAST(SUM(count) AS BIGINT) FROM safety_referrals WHERE day >= $1
             GROUP BY level ORDER BY level",
        )
        .bind(since.date())
        .fetch_all(self.reader())
        .await?;
        let flags: Vec<(String, i64)> = sqlx::query_as(
            "SELECT level, COUNT(*) FROM safety_audit WHERE kind = 'flagged' AND created_at >= $1
             GROUP BY level ORDER BY level",
        )
        .bind(since)
        .fetch_all(self.reader())
        .await?;
        let (flagged_sessions, unacknowledged_sessions): (i64, i64) = sqlx::query_as(
            "SELECT COUNT(*),
                    COUNT(*) FILTER (WHERE risk_acknowledged_at IS NULL OR risk_acknowledged_at < risk_last_at)
             FROM chat_sessions WHERE risk_level IS NOT NULL AND risk_last_at >= $1",
        )
        .bind(since)
        .fetch_one(self.reader())
        .await?;
        report_from_rows(referrals, flags, flagged_sessions, unacknowledged_sessions)
    }

    // Messages written by group commit, and notifications.

    async fn append_message(&self, session_id: Uuid, new: NewMessage) -> Result<Committed<Appended>> {
        self.writes().message(session_id, new).await
    }

    async fn append_if_bot_only(
        &self,
        session_id: Uuid,
        message: BotMessage,
    ) -> Result<Committed<Option<ChatMessage>>> {
        self.writes().bot(session_id, message).await
    }

    async fn announce(&self, event: SessionEvent) -> Result<()> {
        Backend::announce(self, event).await
    }

    async fn listen(&self) -> Result<Option<Box<dyn Listener>>> {
        Backend::listen(self).await
    }
}

/// The steps of a write that several transactions share, and that each
/// store's group commit runs too, for a [`Backend`] `B`. Its bounds are
/// those of `impl Store for B` above: Rust does not carry an impl's bounds
/// over to another.
pub(crate) struct Scripts<B>(PhantomData<B>);

impl<B, DB> Scripts<B>
where
    B: Backend<Db = DB>,
    DB: Database,
    for<'c> &'c mut DB::Connection: Executor<'c, Database = DB>,
    DB::Arguments: IntoArguments<DB>,
    usize: ColumnIndex<DB::Row>,
    for<'n> &'n str: ColumnIndex<DB::Row>,
    Uuid: Column<DB>,
    OffsetDateTime: Column<DB>,
    time::Date: Column<DB>,
    i64: Column<DB>,
    bool: Column<DB>,
    String: Column<DB>,
    for<'q> &'q str: Encode<'q, DB> + Type<DB>,
    for<'q> Option<&'q str>: Encode<'q, DB>,
    for<'q> &'q [u8]: Encode<'q, DB> + Type<DB>,
    Vec<u8>: Column<DB>,
    for<'q> Option<Uuid>: Encode<'q, DB>,
    for<'q> Option<OffsetDateTime>: Encode<'q, DB>,
{
    /// Ends every login of a therapist, inside a transaction.
    async fn end_logins(tx: &mut DB::Connection, therapist_id: Uuid) -> Result<()> {
        sqlx::query("DELETE FROM therapist_auth_sessions WHERE therapist_id = $1")
            .bind(therapist_id)
            .execute(&mut *tx)
            .await?;
        Ok(())
    }

    /// Up to `limit` messages with `seq > after`, in seq order, on this
    /// connection (a reader's, or a write transaction's).
    async fn messages_after_in(
        connection: &mut DB::Connection,
        session_id: Uuid,
        after: i64,
        limit: i64,
    ) -> Result<Vec<ChatMessage>> {
        let rows: Vec<MessageRow> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {MESSAGE_COLUMNS} FROM messages WHERE session_id = $1 AND seq > $2 ORDER BY seq LIMIT $3"
        )))
        .bind(session_id)
        .bind(after)
        .bind(limit)
        .fetch_all(&mut *connection)
        .await?;
        rows.into_iter().map(TryInto::try_into).collect()
    }

    /// Appends `records` to the audit trail, inside a write transaction,
    /// after every row lock the transaction takes (on PostgreSQL the
    /// trail's advisory lock comes last, so that no two writers wait on
    /// each other in opposite orders).
    pub(crate) async fn trail_in_tx(tx: &mut DB::Connection, records: Vec<TrailEntry>) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        if !B::TRAIL_LOCK.is_empty() {
            sqlx::query(B::TRAIL_LOCK).execute(&mut *tx).await?;
        }
        let last: Option<(i64, Vec<u8>)> =
            sqlx::query_as("SELECT seq, hash FROM audit_trail ORDER BY seq DESC LIMIT 1")
                .fetch_optional(&mut *tx)
                .await?;
        let (mut seq, mut prev_hash) = last.unwrap_or((0, crate::trail::GENESIS.to_vec()));
        let at = now();
        for entry in records {
            seq += 1;
            let record = entry.into_record(seq, at, prev_hash);
            sqlx::query(
                "INSERT INTO audit_trail (seq, at, actor, therapist_id, action, session_id, address, outcome,
                                          detail, prev_hash, hash)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            )
            .bind(record.seq)
            .bind(record.at)
            .bind(&record.actor)
            .bind(record.therapist_id)
            .bind(&record.action)
            .bind(record.session_id)
            .bind(record.address.as_deref())
            .bind(&record.outcome)
            .bind(record.detail.as_deref())
            .bind(&record.prev_hash[..])
            .bind(&record.hash[..])
            .execute(&mut *tx)
            .await?;
            prev_hash = record.hash;
        }
        Ok(())
    }

    /// Deletes a chat and every row that belongs to it, inside a write
    /// transaction that holds its lock: nothing of it is left, and the
    /// audit trail (which holds no content) keeps its records.
    async fn delete_chat(tx: &mut DB::Connection, session_id: Uuid) -> Result<()> {
        for table in ["messages", "safety_audit", "therapist_reads", "client_labels", "client_credentials"] {
            sqlx::query(sqlx::AssertSqlSafe(format!("DELETE FROM {table} WHERE session_id = $1")))
                .bind(session_id)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("DELETE FROM chat_sessions WHERE id = $1").bind(session_id).execute(&mut *tx).await?;
        Ok(())
    }

    /// [`Backend::scrub`] after a committed deletion. A failure is logged,
    /// not returned: the deletion stands, and the next checkpoint finishes
    /// what this one could not.
    async fn scrub_after_deleting(backend: &B) {
        if let Err(error) = backend.scrub().await {
            tracing::warn!(error = %error, "checkpoint after a deletion failed; the next one finishes it");
        }
    }

    /// Ends a write transaction that was refused: only its audit record,
    /// as refused, is committed.
    async fn refuse(mut tx: Transaction<'static, DB>, record: TrailEntry) -> Result<()> {
        Self::trail_in_tx(&mut tx, vec![record.refused()]).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The seq of the message already stored with this sender and
    /// `client_id`, if any: a re-sent message.
    pub(crate) async fn stored_seq(
        tx: &mut DB::Connection,
        session_id: Uuid,
        new: &NewMessage,
    ) -> Result<Option<i64>> {
        Ok(sqlx::query_scalar(
            "SELECT seq FROM messages WHERE session_id = $1 AND sender = $2 AND client_id = $3",
        )
        .bind(session_id)
        .bind(new.sender.as_str())
        .bind(&new.client_id)
        .fetch_optional(&mut *tx)
        .await?)
    }

    /// A client's or therapist's message just stored in a session of this
    /// `mode` (its companion paused or not, flagged as `current` says),
    /// then its safety flag if any, raised in the same transaction: the
    /// write's result and events.
    pub(crate) async fn stored(
        tx: &mut DB::Connection,
        session_id: Uuid,
        message: ChatMessage,
        (mode, companion_paused, current): (&str, bool, Option<CurrentRisk>),
        risk: Option<&RiskFlag>,
    ) -> Result<Committed<Appended>> {
        let seq = message.seq;
        let mut events = vec![SessionEvent::message(session_id, message)];
        let (risk, flagged) = match risk {
            Some(flag) => {
                let flagged = Self::flag_in_tx(tx, session_id, seq, flag).await?;
                events.extend(flagged.events);
                let Flagged { level, at, .. } = flagged.outcome;
                let raised = CurrentRisk { level, last_flagged_at: at };
                (Some(current.map_or(raised, |current| current.max(raised))), Some(flagged.outcome))
            }
            None => (current, None),
        };
        Ok(Committed::new(
            Appended::Stored { seq, chat_mode: parse_mode(mode)?, companion_paused, risk, flagged },
            events,
        ))
    }

    /// Ends a write that appended `messages` (numbered already, the session
    /// row updated): inserts them, appends `records` to the audit trail,
    /// tells the other instances in the transaction, and commits. Returns
    /// the write's events.
    pub(crate) async fn commit_messages(
        backend: &B,
        mut tx: Transaction<'static, DB>,
        session_id: Uuid,
        messages: Vec<ChatMessage>,
        records: Vec<TrailEntry>,
    ) -> Result<Vec<SessionEvent>> {
        let mut events = Vec::new();
        for message in messages {
            Self::insert_message(&mut tx, session_id, &message).await?;
            events.push(SessionEvent::message(session_id, message));
        }
        Self::trail_in_tx(&mut tx, records).await?;
        backend.notify(&mut tx, &events).await?;
        tx.commit().await?;
        Ok(events)
    }

    /// Inserts a message row; the caller has already advanced `last_seq`.
    pub(crate) async fn insert_message(
        tx: &mut DB::Connection,
        session_id: Uuid,
        message: &ChatMessage,
    ) -> Result<()> {
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

    /// Raises a session's flag for its message `seq`, inside a write
    /// transaction (holding the session's lock): the level, the audit
    /// record, and — when the level rises — the crisis message and the
    /// referral counter.
    pub(crate) async fn flag_in_tx(
        tx: &mut DB::Connection,
        session_id: Uuid,
        seq: i64,
        flag: &RiskFlag,
    ) -> Result<Committed<Flagged>> {
        let lock = B::LOCK;
        let (stored, therapist_id, closed_at): (Option<String>, Option<Uuid>, Option<OffsetDateTime>) =
            sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT risk_level, therapist_id, closed_at FROM chat_sessions WHERE id = $1{lock}"
            )))
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
            Self::insert_message(tx, session_id, &message).await?;
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
        let record = TrailEntry::new(Actor::System, Action::Flag)
            .session(session_id)
            .detail(format!("level {} at message {seq}", flag.level.as_str()));
        Self::trail_in_tx(tx, vec![record]).await?;
        events.push(SessionEvent::Flagged { session_id, level, therapist_id, at });
        // Not counted here: the write it is part of commits it, and
        // counts it then (`Committed::new`).
        Ok(Committed { outcome: Flagged { level, referred: raised, at }, events })
    }
}
