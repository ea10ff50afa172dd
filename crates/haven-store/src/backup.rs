//! Backups of a SQLite database: a consistent copy made while Haven serves
//! it (`VACUUM INTO`, which reads one snapshot of the database), and a
//! restore into a stopped deployment. PostgreSQL has `pg_dump` for this
//! (docs/deployment.md).
//!
//! `haven serve` holds an advisory lock (`flock`) on its SQLite file for as
//! long as it runs ([`ServingLock`]): a restore, which replaces the file,
//! refuses while it is held. SQLite's own locks are POSIX record locks,
//! independent of `flock`, so the two never interfere.

use std::fs::{File, OpenOptions, TryLockError};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection, SqliteConnection};

/// Why a backup, a restore or a check did not happen.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// Not done, for the reason given (nothing was changed).
    #[error("{0}")]
    Refused(String),
    #[error("file error: {0}")]
    Io(#[from] std::io::Error),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

type Result<T> = std::result::Result<T, BackupError>;

/// What a check of a database file found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupSummary {
    pub sessions: i64,
    pub messages: i64,
}

/// Held by `haven serve` on its SQLite file while it runs.
#[derive(Debug)]
pub struct ServingLock {
    _file: File,
}

impl ServingLock {
    /// Locks the SQLite file of `url`, or fails naming who holds it. `None`
    /// for a database that is not a SQLite file.
    pub fn acquire(url: &str) -> Result<Option<Self>> {
        let Some(path) = sqlite_file(url)? else { return Ok(None) };
        let file = OpenOptions::new().create(true).append(true).mode(0o600).open(&path).map_err(io)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(Self { _file: file })),
            Err(TryLockError::WouldBlock) => Err(in_use(&path)),
            Err(TryLockError::Error(error)) => Err(io(error)),
        }
    }
}

/// Copies the SQLite database of `url` to `to`, which must not exist, while
/// Haven may be serving it; the copy is checked before this returns.
pub async fn backup(url: &str, to: &Path) -> Result<BackupSummary> {
    let from = sqlite_file(url)?.ok_or_else(not_sqlite)?;
    if !from.exists() {
        return Err(refused(format!("no database at {}", from.display())));
    }
    // Created empty and owner-only first: `VACUUM INTO` writes into an
    // empty file, and the copy holds transcripts.
    OpenOptions::new().write(true).create_new(true).mode(0o600).open(to).map_err(|error| {
        match error.kind() {
            std::io::ErrorKind::AlreadyExists => refused(format!("{} exists already", to.display())),
            _ => io(error),
        }
    })?;
    let copied = async {
        let mut source = open_read_only(&from).await?;
        sqlx::query("VACUUM INTO $1").bind(path_text(to)?).execute(&mut source).await?;
        source.close().await?;
        check(to).await
    };
    let copied = copied.await;
    if copied.is_err() {
        let _ = std::fs::remove_file(to);
    }
    copied
}

/// Replaces the SQLite database of `url` with the backup `from`, after
/// checking it. Refused while Haven serves the database. The database it
/// replaces is kept beside it, renamed `….before-restore-UNIXTIME`.
pub async fn restore(url: &str, from: &Path) -> Result<(BackupSummary, Option<PathBuf>)> {
    let target = sqlite_file(url)?.ok_or_else(not_sqlite)?;
    let summary = check(from).await?;
    let _lock = ServingLock::acquire(url)?;
    let staged = with_suffix(&target, ".restoring");
    let _ = std::fs::remove_file(&staged);
    OpenOptions::new().write(true).create_new(true).mode(0o600).open(&staged).map_err(io)?;
    let mut source = open_read_only(from).await?;
    sqlx::query("VACUUM INTO $1").bind(path_text(&staged)?).execute(&mut source).await?;
    source.close().await?;
    // The database replaced keeps its WAL and shared-memory files beside
    // it: a WAL left next to the restored file would be read into it.
    let replaced = match std::fs::metadata(&target) {
        Ok(metadata) if metadata.len() > 0 => {
            let stamp = format!(".before-restore-{}", crate::now().unix_timestamp());
            for suffix in ["", "-wal", "-shm"] {
                let from = with_suffix(&target, suffix);
                if from.exists() {
                    std::fs::rename(&from, with_suffix(&with_suffix(&target, &stamp), suffix)).map_err(io)?;
                }
            }
            Some(with_suffix(&target, &stamp))
        }
        _ => {
            for suffix in ["-wal", "-shm"] {
                let _ = std::fs::remove_file(with_suffix(&target, suffix));
            }
            None
        }
    };
    std::fs::rename(&staged, &target).map_err(io)?;
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    if let Some(directory) = target.parent().filter(|parent| !parent.as_os_str().is_empty()) {
        File::open(directory).and_then(|directory| directory.sync_all()).map_err(io)?;
    }
    Ok((summary, replaced))
}

/// Checks a database file: SQLite's `integrity_check`, and that it is a
/// Haven database; counts what it holds.
pub async fn check(path: &Path) -> Result<BackupSummary> {
    if !path.exists() {
        return Err(refused(format!("no file at {}", path.display())));
    }
    let mut connection = open_read_only(path).await?;
    let verdict: Vec<(String,)> = sqlx::query_as("PRAGMA integrity_check").fetch_all(&mut connection).await?;
    if verdict.len() != 1 || verdict[0].0 != "ok" {
        let found: Vec<String> = verdict.into_iter().take(5).map(|(line,)| line).collect();
        return Err(refused(format!(
            "{} fails SQLite's integrity check: {}",
            path.display(),
            found.join("; ")
        )));
    }
    let counts: Result<(i64, i64)> =
        sqlx::query_as("SELECT (SELECT count(*) FROM chat_sessions), (SELECT count(*) FROM messages)")
            .fetch_one(&mut connection)
            .await
            .map_err(|_| refused(format!("{} is not a Haven database", path.display())));
    connection.close().await?;
    let (sessions, messages) = counts?;
    Ok(BackupSummary { sessions, messages })
}

async fn open_read_only(path: &Path) -> Result<SqliteConnection> {
    Ok(SqliteConnectOptions::new().filename(path).read_only(true).connect().await?)
}

/// The file of a `sqlite:` URL; `None` for another database, an error for
/// an in-memory one.
fn sqlite_file(url: &str) -> Result<Option<PathBuf>> {
    if !url.starts_with("sqlite:") {
        return Ok(None);
    }
    let options = SqliteConnectOptions::from_str(url)?;
    let path = options.get_filename();
    if path.as_os_str().is_empty() || url.contains(":memory:") || url.contains("mode=memory") {
        return Err(refused("an in-memory database has no file".into()));
    }
    Ok(Some(path.to_owned()))
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

fn path_text(path: &Path) -> Result<&str> {
    path.to_str().ok_or_else(|| refused(format!("{} is not valid UTF-8", path.display())))
}

fn io(error: std::io::Error) -> BackupError {
    BackupError::Io(error)
}

fn refused(message: String) -> BackupError {
    BackupError::Refused(message)
}

fn in_use(path: &Path) -> BackupError {
    refused(format!("Haven is serving {} (it holds the file's lock): stop it first", path.display()))
}

fn not_sqlite() -> BackupError {
    refused("backup and restore work on a SQLite file; for PostgreSQL use pg_dump and pg_restore (docs/deployment.md)".into())
}
