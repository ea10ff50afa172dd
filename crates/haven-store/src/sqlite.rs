//! The embedded SQLite store.
//!
//! One file in WAL mode with `synchronous = FULL`: a commit has reached the
//! disk before Haven acknowledges it. Writes go through a pool of exactly one
//! connection, so they queue in the process instead of spinning on SQLite's
//! busy handler, and every write transaction starts with `BEGIN IMMEDIATE`
//! so a read-then-write can never fail to upgrade its lock (another process,
//! such as `haven therapist add`, may write to the same file). Reads use a
//! separate pool and see every committed write.
//!
//! Messages, the hot path, are written by group commit ([`crate::batch`]):
//! the commit task runs on a thread of its own, and writes the batch's
//! usual writes through a SQLite connection of that thread's own
//! (`rusqlite`), with no hand-off to another thread. A second connection
//! checkpoints the WAL in the background; after each of its checkpoints,
//! the commit thread copies the little committed meanwhile, at the first
//! moment no write waits, so the WAL starts over and no commit has to copy
//! a large part of it while every write waits.
//!
//! Every other operation is a transaction script written once for both
//! stores ([`crate::scripts`]); this module is SQLite's [`Backend`]: its two
//! pools, `BEGIN IMMEDIATE`, no row lock and no notifications.

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use haven_protocol::MessageKind;
use serde::Serialize;
use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use uuid::Uuid;

use crate::batch::{
    self, Pending, Settled, WriteBatch, Writes, Written, commit_batches, in_batch_order, left_over,
    not_committed, usual_rows,
};
use crate::rows::{current_risk, new_message, parse_mode};
use crate::scripts::{Backend, Scripts};
use crate::{Appended, Committed, NewMessage, Result, SessionEvent, StoreError, now};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// How long the background checkpointer lets commits gather in the WAL
/// before it copies them into the database file: a page written by many
/// commits in that time is copied once. Each checkpoint is followed by the
/// commit thread's ([`Writer::between_batches`]), which holds up writes for
/// as long as it takes: the shorter this is, the less that one has to copy.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(100);

/// WAL pages after which the writer checkpoints by itself, in its commit
/// (SQLite's default is 1,000). Normally the commit thread has let the
/// WAL start over long before ([`Writer::between_batches`]), so this only
/// bounds its size (about 40 MB).
const WRITER_CHECKPOINT_PAGES: u32 = 10_000;

/// How long an erasure tries to reset the WAL ([`Backend::scrub`]) while
/// another checkpoint holds it.
const SCRUB_PATIENCE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct SqliteStore {
    /// Exactly one connection: SQLite has one writer at a time anyway.
    writer: SqlitePool,
    /// Read-only connections for everything that does not write.
    reader: SqlitePool,
    /// The group-commit queue of message writes.
    writes: Writes,
}

/// The database file holds transcripts: it is created readable and
/// writable by its owner only (0600), and an existing one, with its WAL and
/// shared-memory files, is narrowed to that. SQLite creates those two files
/// with the database file's mode.
fn owner_only(path: &std::path::Path) -> Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let io = |error: std::io::Error| StoreError::Unavailable(sqlx::Error::Io(error));
    std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path).map_err(io)?;
    for suffix in ["", "-wal", "-shm"] {
        let mut file = path.as_os_str().to_owned();
        file.push(suffix);
        match std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(io(error)),
            _ => {}
        }
    }
    Ok(())
}

impl SqliteStore {
    /// Opens (creating if missing) the database at `url`, e.g.
    /// `sqlite://haven.db`, and runs pending migrations.
    pub async fn connect(url: &str) -> Result<Self> {
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5))
            .pragma("temp_store", "memory")
            // A deleted row's bytes are overwritten with zeros, not left in
            // free pages: an erased chat is gone from the file once the
            // WAL is checkpointed.
            .pragma("secure_delete", "ON")
            .pragma("wal_autocheckpoint", WRITER_CHECKPOINT_PAGES.to_string());
        // The commit thread's connection opens the same file: an in-memory
        // database would be a different one for each connection, and could
        // not keep what it acknowledged anyway.
        let in_memory = options.get_filename().as_os_str().is_empty()
            || url.contains(":memory:")
            || url.contains("mode=memory");
        if in_memory {
            let refused = "an in-memory SQLite database is not supported: give a file".to_owned();
            return Err(StoreError::Unavailable(sqlx::Error::Configuration(refused.into())));
        }
        owner_only(options.get_filename())?;
        // Neither pool pings a connection before lending it: a connection to
        // a file cannot drop like a network link, and each ping is a round
        // trip to the connection's thread (one more per batch of messages).
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .test_before_acquire(false)
            .connect_with(options.clone().pragma("cache_size", "-65536"))
            .await?;
        MIGRATOR.run(&writer).await.map_err(|error| StoreError::Unavailable(error.into()))?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .test_before_acquire(false)
            .connect_with(options.clone().read_only(true))
            .await?;
        let direct = direct_connection(options.get_filename())?;
        let (writes, queue) = Writes::new();
        // The group-commit loop has a thread and a runtime of its own: it
        // runs each batch's shared statements on its own connection
        // (`direct`), with no hand-off, and on the server's runtime it would
        // wait behind every socket's task (milliseconds under load, for
        // every batch). The thread ends when the last clone of this store
        // is dropped.
        let unavailable = |error| StoreError::Unavailable(sqlx::Error::Io(error));
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(unavailable)?;
        let copied = Arc::new(AtomicBool::new(false));
        let batches = commit_batches(
            queue,
            Writer { pool: writer.clone(), direct: Mutex::new(direct), copied: copied.clone() },
        );
        let checkpointer = sqlx::ConnectOptions::connect(&options).await?;
        std::thread::Builder::new()
            .name("haven-commit".into())
            .spawn(move || {
                runtime.block_on(async move {
                    // The checkpointer stops with the loop.
                    tokio::select! {
                        () = batches => {}
                        () = checkpoints(checkpointer, copied) => {}
                    }
                })
            })
            .map_err(unavailable)?;
        Ok(Self { writer, reader, writes })
    }

    /// Closes both pools, waiting for in-flight statements.
    pub async fn close(&self) {
        self.writer.close().await;
        self.reader.close().await;
    }
}

/// Copies committed pages from the WAL into the database file every
/// [`CHECKPOINT_INTERVAL`], on a connection of its own, so that commits
/// seldom have to (SQLite's automatic checkpoint runs inside the commit
/// that crosses the threshold, and holds every write behind it). A
/// passive checkpoint never waits for the writer or readers; what it cannot
/// copy yet, the next one does. Each sets `copied`, for the commit thread
/// to copy what was committed meanwhile.
async fn checkpoints(mut connection: sqlx::SqliteConnection, copied: Arc<AtomicBool>) {
    let mut interval = tokio::time::interval(CHECKPOINT_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        match sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").execute(&mut connection).await {
            Ok(_) => copied.store(true, Ordering::Release),
            Err(error) => tracing::warn!(error = %error, "background checkpoint failed"),
        }
    }
}

/// The group-commit task's connections.
struct Writer {
    /// The writer pool, whose one connection is the process's write lock:
    /// a batch holds it, so that no other write of this process waits on
    /// SQLite's busy handler behind it.
    pool: SqlitePool,
    /// The commit thread's own connection to the same file, for the
    /// batch's usual writes (only this thread uses it; the lock satisfies
    /// `Sync`).
    direct: Mutex<rusqlite::Connection>,
    /// The background checkpointer copied the WAL as far as it reached.
    copied: Arc<AtomicBool>,
}

impl WriteBatch for Writer {
    /// The batch's usual writes in a transaction of their own, on this
    /// thread ([`write_together`]); what it left (flagged messages,
    /// re-sent `client_id`s, unknown sessions) in a second transaction.
    /// `NotFound` for one write is its own result: it wrote nothing.
    async fn write_batch(&self, batch: &[Pending]) -> Result<Vec<Result<Written>>> {
        let mut connection = self.pool.acquire().await?;
        let mut settled = {
            let mut direct = self.direct.lock().unwrap_or_else(PoisonError::into_inner);
            write_together(&mut direct, batch)?
        };
        let left = left_over(batch, &settled);
        if !left.is_empty() {
            match write_one_by_one(&mut connection, &left).await {
                Ok(results) => settled.extend(results),
                // The usual writes are committed; only these were not.
                Err(error) => {
                    for (index, ..) in left {
                        settled.insert(index, Err(not_committed(&error)));
                    }
                }
            }
        }
        in_batch_order(batch, settled)
    }

    /// After a background checkpoint, copies what was committed while it
    /// ran. Under steady writes the background checkpointer alone never
    /// catches up, and the commit that takes the WAL past
    /// [`WRITER_CHECKPOINT_PAGES`] then copies everything since the last
    /// background checkpoint (11–18 ms at 7,000 messages/s here) while
    /// every write waits. Here no batch adds to the WAL meanwhile, so all of
    /// it is then in the database file, and the next commit starts the WAL
    /// over. Called only when no write waits: under a steady backlog the
    /// copy would hold up the batches (10 % of the rate at saturation in one
    /// measurement), and the commit past the threshold does it.
    fn between_batches(&self) {
        if !self.copied.swap(false, Ordering::Acquire) {
            return;
        }
        let started = std::time::Instant::now();
        let direct = self.direct.lock().unwrap_or_else(PoisonError::into_inner);
        // Its row: busy, frames in the WAL, frames copied in all.
        let frames = |row: &rusqlite::Row| Ok((row.get::<_, i64>(1)?, row.get::<_, i64>(2)?));
        match direct.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], frames) {
            Ok((frames, copied)) => {
                let micros = started.elapsed().as_micros();
                tracing::debug!(frames, copied, micros, "WAL copied on the commit thread");
            }
            Err(error) => tracing::warn!(error = %error, "checkpoint on the commit thread failed"),
        }
    }
}

/// Messages one by one, in a transaction of their own; their results once
/// it has committed.
async fn write_one_by_one(
    connection: &mut sqlx::SqliteConnection,
    left: &[(usize, Uuid, &NewMessage)],
) -> Result<Settled> {
    let mut tx = sqlx::Connection::begin_with(&mut *connection, "BEGIN IMMEDIATE").await?;
    let mut results = Settled::new();
    for &(index, session_id, new) in left {
        let result = append_in_tx(&mut tx, session_id, new).await;
        batch::settle(&mut results, index, result)?;
    }
    tx.commit().await?;
    Ok(results)
}

/// The batch's usual writes ([`usual_rows`]) in one transaction, bound to
/// the batch as one JSON array: `BEGIN IMMEDIATE`; an insert that numbers
/// them after each session's `last_seq` in batch order; an update that
/// moves those sessions' `last_seq`; a select that reports the seq, the
/// session's mode and its flag for every row stored; `COMMIT`. The insert
/// skips a key (session, sender, `client_id`) stored already and an unknown
/// session, a closed session, and stores a companion's write only if the
/// session is `BOT_ONLY`. That mode check is part of the insert, in the
/// transaction: a join that commits first makes it store nothing.
///
/// The statements run on the commit thread's own connection, so none is a
/// hand-off to another thread. The array is read with `jsonb_each`, whose
/// rows stay in SQLite's binary form: `json_each` would turn each row back
/// into text for every field read. Returns the results it settled, by
/// index in the batch.
fn write_together(connection: &mut rusqlite::Connection, batch: &[Pending]) -> Result<Settled> {
    let (rows, mut settled) = usual_rows(batch);
    if rows.is_empty() {
        return Ok(settled);
    }
    let json: Vec<RowJson> = rows
        .iter()
        .map(|row| RowJson {
            id: row.id.simple(),
            session_id: row.session_id.simple(),
            sender: row.sender.as_str(),
            kind: row.kind.as_str(),
            content: row.content,
            client_id: row.client_id,
        })
        .collect();
    let json = serde_json::to_string(&json).map_err(|error| StoreError::Corrupt(error.to_string()))?;
    let at = now();
    // As sqlx writes times to SQLite: RFC 3339 text.
    let at_text = at.format(&Rfc3339).map_err(|error| StoreError::Corrupt(error.to_string()))?;
    // Dropped without its commit (an error below), the transaction rolls
    // back, and the connection is ready for the next batch.
    let tx =
        connection.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(direct)?;
    tx.prepare_cached(
        "INSERT INTO messages (id, session_id, seq, sender, kind, content, client_id, created_at)
         SELECT unhex(j.value ->> 'id'), s.id,
                s.last_seq + row_number() OVER (PARTITION BY s.id ORDER BY j.key),
                j.value ->> 'sender', j.value ->> 'kind', j.value ->> 'content', j.value ->> 'client_id', ?2
         FROM jsonb_each(?1) AS j
         JOIN chat_sessions AS s ON s.id = unhex(j.value ->> 'session_id')
         WHERE s.closed_at IS NULL AND CASE WHEN j.value ->> 'client_id' IS NULL
                    THEN s.chat_mode = 'BOT_ONLY' AND NOT s.companion_paused
                    ELSE NOT EXISTS (
                        SELECT 1 FROM messages AS m
                        WHERE m.session_id = s.id AND m.sender = j.value ->> 'sender'
                          AND m.client_id = j.value ->> 'client_id')
               END",
    )
    .and_then(|mut insert| insert.execute((&json, &at_text)))
    .map_err(direct)?;
    tx.prepare_cached(
        "UPDATE chat_sessions
         SET last_seq = (SELECT max(m.seq) FROM messages AS m WHERE m.session_id = chat_sessions.id),
             updated_at = ?2, last_message_at = ?2
         WHERE id IN (SELECT m.session_id FROM jsonb_each(?1) AS j
                      JOIN messages AS m ON m.id = unhex(j.value ->> 'id'))",
    )
    .and_then(|mut update| update.execute((&json, &at_text)))
    .map_err(direct)?;
    type Report = (i64, i64, String, bool, Option<String>, Option<String>);
    let stored: Vec<Report> = tx
        .prepare_cached(
            "SELECT j.key, m.seq, s.chat_mode, s.companion_paused, s.risk_level, s.risk_last_at
             FROM jsonb_each(?1) AS j
             JOIN messages AS m ON m.id = unhex(j.value ->> 'id')
             JOIN chat_sessions AS s ON s.id = m.session_id",
        )
        .and_then(|mut select| {
            let reports = select.query_map([&json], |row| {
                Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?, row.get(5)?))
            })?;
            reports.collect()
        })
        .map_err(direct)?;
    tx.commit().map_err(direct)?;
    // Committed. A report that cannot be read (which would be a bug) fails
    // every write of the batch; a message sent again is then found stored.
    let unreadable = |what: String| StoreError::Unavailable(sqlx::Error::Protocol(what));
    for (row, seq, mode, paused, risk_level, risk_at) in stored {
        let Some(row) = usize::try_from(row).ok().and_then(|row| rows.get(row)) else {
            return Err(unreadable("a batched insert reported an unknown row".into()));
        };
        let risk_at = risk_at
            .map(|text| OffsetDateTime::parse(&text, &Rfc3339))
            .transpose()
            .map_err(|error| unreadable(format!("a batched insert reported a flag time: {error}")))?;
        let session = (parse_mode(&mode)?, paused, current_risk(risk_level, risk_at)?);
        settled.insert(row.index, Ok(batch::stored(row, seq, session, at)));
    }
    Ok(settled)
}

/// A failure of the commit thread's own connection: the transaction rolled
/// back, and the writes may be sent again.
fn direct(error: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(sqlx::Error::Protocol(format!("sqlite: {error}")))
}

/// The commit thread's own connection to the database file, set up as the
/// pools' are (`SqliteStore::connect`): WAL (already the file's mode), every
/// commit on disk before it returns (`synchronous = FULL`), foreign keys,
/// freed bytes zeroed, and the same automatic checkpoint threshold.
fn direct_connection(path: &std::path::Path) -> Result<rusqlite::Connection> {
    let connection = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(direct)?;
    connection.busy_timeout(Duration::from_secs(5)).map_err(direct)?;
    connection
        .execute_batch(&format!(
            "PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; PRAGMA temp_store = memory;
             PRAGMA secure_delete = ON; PRAGMA wal_autocheckpoint = {WRITER_CHECKPOINT_PAGES};
             PRAGMA cache_size = -65536;"
        ))
        .map_err(direct)?;
    let mode: String = connection.query_row("PRAGMA journal_mode", [], |row| row.get(0)).map_err(direct)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Corrupt(format!("the database is in {mode} mode, not WAL")));
    }
    Ok(connection)
}

/// A row of the batch's insert as the statement reads it (ids in hex).
#[derive(Serialize)]
struct RowJson<'a> {
    id: uuid::fmt::Simple,
    session_id: uuid::fmt::Simple,
    sender: &'a str,
    kind: &'a str,
    content: &'a str,
    client_id: Option<&'a str>,
}

/// One client's or therapist's message, for what the batch's insert left:
/// the next seq, unless its `client_id` is already stored for this sender
/// or the session is closed, then its safety flag if any. A new message is
/// two statements: the insert (which takes the seq from the session row)
/// and the session's update.
async fn append_in_tx(
    tx: &mut sqlx::SqliteConnection,
    session_id: Uuid,
    new: &NewMessage,
) -> Result<Committed<Appended>> {
    let (id, at) = (Uuid::now_v7(), now());
    let seq: Option<i64> = sqlx::query_scalar(
        "INSERT INTO messages (id, session_id, seq, sender, kind, content, client_id, created_at)
         SELECT $1, id, last_seq + 1, $2, 'chat', $3, $4, $5 FROM chat_sessions WHERE id = $6 AND closed_at IS NULL
         ON CONFLICT (session_id, sender, client_id) WHERE client_id IS NOT NULL DO NOTHING
         RETURNING seq",
    )
    .bind(id)
    .bind(new.sender.as_str())
    .bind(&new.content)
    .bind(&new.client_id)
    .bind(at)
    .bind(session_id)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(seq) = seq else {
        // Nothing was written: a re-sent client_id, a closed session, or
        // no such session.
        if let Some(seq) = Scripts::<SqliteStore>::stored_seq(tx, session_id, new).await? {
            return Ok(Committed::nothing(Appended::Duplicate { seq }));
        }
        let known: Option<i64> = sqlx::query_scalar("SELECT 1 FROM chat_sessions WHERE id = $1")
            .bind(session_id)
            .fetch_optional(&mut *tx)
            .await?;
        known.ok_or(StoreError::NotFound)?;
        return Ok(Committed::nothing(Appended::Closed));
    };
    let (mode, paused, risk_level, risk_at): (String, bool, Option<String>, Option<OffsetDateTime>) =
        sqlx::query_as(
            "UPDATE chat_sessions SET last_seq = $1, updated_at = $2, last_message_at = $2 WHERE id = $3
             RETURNING chat_mode, companion_paused, risk_level, risk_last_at",
        )
        .bind(seq)
        .bind(at)
        .bind(session_id)
        .fetch_one(&mut *tx)
        .await?;
    let message = new_message(id, seq, new.sender, MessageKind::Chat, &new.content, Some(&new.client_id), at);
    let session = (mode.as_str(), paused, current_risk(risk_level, risk_at)?);
    Scripts::<SqliteStore>::stored(tx, session_id, message, session, new.risk.as_ref()).await
}

impl Backend for SqliteStore {
    type Db = sqlx::Sqlite;

    /// Nothing: a write transaction's `BEGIN IMMEDIATE` already holds the
    /// database's only write lock.
    const LOCK: &'static str = "";

    /// Nothing, for the same reason.
    const TRAIL_LOCK: &'static str = "";

    fn reader(&self) -> &SqlitePool {
        &self.reader
    }

    fn writer(&self) -> &SqlitePool {
        &self.writer
    }

    fn writes(&self) -> &Writes {
        &self.writes
    }

    /// A write transaction on the writer connection, outside the batches.
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>> {
        Ok(self.writer.begin_with("BEGIN IMMEDIATE").await?)
    }

    /// Nothing to do: no other instance shares the file.
    async fn notify(&self, _tx: &mut sqlx::SqliteConnection, _events: &[SessionEvent]) -> Result<()> {
        Ok(())
    }

    /// `secure_delete` zeroed the deleted rows in their pages; the WAL
    /// still holds the pages as they were until it is reset. This copies
    /// every page into the file and truncates the WAL.
    ///
    /// SQLite waits (its busy timeout) for readers of an older snapshot,
    /// but not for another checkpoint: while the background checkpointer
    /// runs one, the pragma reports "busy" without an error and leaves the
    /// WAL as it was. So a busy result is tried again, for up to
    /// [`SCRUB_PATIENCE`].
    async fn scrub(&self) -> Result<()> {
        let deadline = std::time::Instant::now() + SCRUB_PATIENCE;
        loop {
            let (busy, _, _): (i64, i64, i64) =
                sqlx::query_as("PRAGMA wal_checkpoint(TRUNCATE)").fetch_one(&self.writer).await?;
            if busy == 0 {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                let busy = std::io::Error::new(std::io::ErrorKind::WouldBlock, "the WAL stayed busy");
                return Err(StoreError::Unavailable(sqlx::Error::Io(busy)));
            }
            tokio::time::sleep(CHECKPOINT_INTERVAL / 50).await;
        }
    }
}

#[cfg(test)]
mod tests {
    //! What only the SQLite store does; the contract both stores keep is
    //! checked in `tests/contract.rs`.
    use super::*;
    use crate::{BotMessage, JoinOutcome, NewTherapist, Store};
    use haven_protocol::Sender;

    async fn store() -> (SqliteStore, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("test.db").display());
        (SqliteStore::connect(&url).await.unwrap(), dir)
    }

    fn user_message(client_id: &str) -> NewMessage {
        NewMessage { sender: Sender::User, content: "hi".into(), client_id: client_id.into(), risk: None }
    }

    /// The commit thread's connection is set up as durably as the pools':
    /// an ack still means the message is on disk.
    #[tokio::test]
    async fn the_commit_threads_connection_commits_to_disk_and_an_in_memory_database_is_refused() {
        let (_store, dir) = store().await;
        let direct = direct_connection(&dir.path().join("test.db")).unwrap();
        let pragma = |name: &str| -> i64 {
            direct.query_row(&format!("PRAGMA {name}"), [], |row| row.get(0)).unwrap()
        };
        // synchronous = FULL is 2; secure_delete and foreign_keys are on.
        let settings = [pragma("synchronous"), pragma("foreign_keys"), pragma("secure_delete")];
        assert_eq!(settings, [2, 1, 1]);
        assert_eq!(pragma("wal_autocheckpoint"), i64::from(WRITER_CHECKPOINT_PAGES));

        let refused = SqliteStore::connect("sqlite::memory:").await.map(|_| ()).unwrap_err();
        let said = anyhow_like(&refused);
        assert!(said.contains("in-memory SQLite database is not supported"), "{said}");
    }

    /// An error with its sources, as the server prints it.
    fn anyhow_like(error: &dyn std::error::Error) -> String {
        let mut said = error.to_string();
        let mut source = error.source();
        while let Some(error) = source {
            said.push_str(&format!(": {error}"));
            source = error.source();
        }
        said
    }

    #[tokio::test]
    async fn commits_reach_the_database_file_from_the_background_checkpointer() {
        let (store, dir) = store().await;
        let session = store.create_chat_session(b"client").await.unwrap().outcome;
        let marker = format!("checkpoint marker {}", Uuid::now_v7());
        let new = NewMessage { content: marker.clone(), ..user_message("c1") };
        store.append_message(session.id, new).await.unwrap();
        // Committed, the message is in the WAL. The writer itself would copy
        // it into the database file only after WRITER_CHECKPOINT_PAGES.
        let file = dir.path().join("test.db");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let bytes = std::fs::read(&file).unwrap();
            if bytes.windows(marker.len()).any(|window| window == marker.as_bytes()) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "the message never reached the database file");
            tokio::time::sleep(CHECKPOINT_INTERVAL / 10).await;
        }
    }

    /// Another connection's checkpoints, back to back, as the background
    /// checkpointer's may fall: an erasure still leaves nothing of the chat
    /// in the WAL (a concurrent checkpoint makes SQLite's TRUNCATE report
    /// busy without an error).
    #[tokio::test]
    async fn an_erasure_resets_the_wal_while_other_checkpoints_run() {
        let (store, dir) = store().await;
        let file = dir.path().join("test.db");
        let url = format!("sqlite://{}", file.display());
        let mut other =
            sqlx::ConnectOptions::connect(&SqliteConnectOptions::from_str(&url).unwrap()).await.unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let hammer = tokio::spawn(async move {
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").execute(&mut other).await.unwrap();
            }
        });
        let wal = dir.path().join("test.db-wal");
        for round in 0..40 {
            let session = store.create_chat_session(b"client").await.unwrap().outcome;
            let canary = format!("erasure canary {}", Uuid::now_v7());
            for n in 0..20 {
                let new = NewMessage { content: canary.clone(), ..user_message(&format!("c{n}")) };
                store.append_message(session.id, new).await.unwrap();
            }
            store.erase_chat(session.id).await.unwrap();
            let bytes = std::fs::read(&wal).unwrap_or_default();
            let left = bytes.windows(canary.len()).any(|window| window == canary.as_bytes());
            assert!(!left, "round {round}: the erased chat is still in the WAL");
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        hammer.await.unwrap();
    }

    #[tokio::test]
    async fn a_batch_that_fails_writes_nothing_and_the_next_one_commits() {
        let (store, dir) = store().await;
        let session = store.create_chat_session(b"client").await.unwrap().outcome;
        let id = Uuid::now_v7();
        let reply = |content: &str| BotMessage::Reply { id, content: content.into() };
        store.append_if_bot_only(session.id, reply("first")).await.unwrap().outcome.unwrap();
        // A second row with the same id breaks the insert's key: the whole
        // call fails, inside its transaction.
        let failed = store.append_if_bot_only(session.id, reply("same id")).await;
        assert!(matches!(failed, Err(StoreError::Unavailable(_))), "{failed:?}");
        assert_eq!(store.chat_session(session.id).await.unwrap().unwrap().last_seq, 1);
        // The writer is not left inside that transaction: the next write
        // commits, and it is on disk for a new connection to read.
        let next = store.append_message(session.id, user_message("c1")).await.unwrap().outcome;
        assert!(matches!(next, Appended::Stored { seq: 2, .. }), "{next:?}");
        let new = NewTherapist { email: "t@x".into(), name: "T".into(), password_hash: "x".into() };
        let tess = store.create_therapist(new, crate::Origin::OPERATOR).await.unwrap();
        assert!(matches!(
            store.join_as_therapist(session.id, tess.id, "joined", None).await.unwrap().outcome,
            JoinOutcome::Joined
        ));
        let url = format!("sqlite://{}", dir.path().join("test.db").display());
        let reopened = SqliteStore::connect(&url).await.unwrap();
        let contents: Vec<String> = reopened
            .messages_after(session.id, 0, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|message| message.content)
            .collect();
        assert_eq!(contents, ["first", "hi", "joined"]);
    }
}
