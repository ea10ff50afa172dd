//! Group commit of messages, shared by both stores.
//!
//! Message writes (client and therapist messages, companion replies) go
//! into a bounded queue. One task takes every write waiting, writes them in
//! one transaction and commits once: one fsync, and one round of statements,
//! for the whole batch. Each caller gets its result only after that commit,
//! so an ack still means "on disk".
//!
//! In a batch, the usual writes — companion writes, and client and
//! therapist messages without a safety flag, each (session, sender,
//! `client_id`) once — are stored by one statement for the whole batch,
//! which skips a re-sent `client_id`, an unknown session and, for the
//! companion, a session that is no longer `BOT_ONLY`. Flagged messages, and
//! the messages that statement did not store, follow one by one: inside the
//! same transaction on PostgreSQL; on SQLite, whose shared statement is
//! begun and committed in one call, in a second transaction. A write that
//! finds no session writes nothing and does not disturb the others; an
//! unexpected database error fails the writes of its transaction, and each
//! of their callers may retry.

use std::collections::{HashMap, HashSet};

use haven_protocol::{ChatMessage, ChatMode, MessageKind, Sender};
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::rows::new_message;
use crate::{Appended, BotMessage, Committed, CurrentRisk, NewMessage, Result, SessionEvent, StoreError};

/// Writes waiting for the group-commit task; senders wait when it is full.
const WRITE_QUEUE: usize = 4_096;

/// Writes a batch may hold: everything waiting. A larger batch costs less
/// per message, not only for its one fsync: messages of many sessions share
/// index and session pages, and each page is written once per batch.
const MAX_BATCH: usize = WRITE_QUEUE;

/// A message write waiting for its batch to commit.
#[derive(Debug)]
pub(crate) struct Pending {
    pub session_id: Uuid,
    pub write: Write,
    done: oneshot::Sender<Result<Written>>,
}

#[derive(Debug)]
pub(crate) enum Write {
    /// [`crate::Store::append_message`]
    Message(NewMessage),
    /// [`crate::Store::append_if_bot_only`]
    Bot(BotMessage),
}

#[derive(Debug)]
pub(crate) enum Written {
    Message(Committed<Appended>),
    Bot(Committed<Option<ChatMessage>>),
}

/// The sending end of the queue; clones share it. The commit task ends
/// when the last clone is dropped.
#[derive(Debug, Clone)]
pub(crate) struct Writes(mpsc::Sender<Pending>);

impl Writes {
    pub fn new() -> (Self, mpsc::Receiver<Pending>) {
        let (writes, queue) = mpsc::channel(WRITE_QUEUE);
        (Self(writes), queue)
    }

    pub async fn message(&self, session_id: Uuid, new: NewMessage) -> Result<Committed<Appended>> {
        match self.write(session_id, Write::Message(new)).await? {
            Written::Message(appended) => Ok(appended),
            Written::Bot(_) => Err(StoreError::Corrupt("a message write answered as a companion's".into())),
        }
    }

    pub async fn bot(&self, session_id: Uuid, message: BotMessage) -> Result<Committed<Option<ChatMessage>>> {
        match self.write(session_id, Write::Bot(message)).await? {
            Written::Bot(written) => Ok(written),
            Written::Message(_) => Err(StoreError::Corrupt("a companion write answered as a message".into())),
        }
    }

    async fn write(&self, session_id: Uuid, write: Write) -> Result<Written> {
        let (done, written) = oneshot::channel();
        let closed = || StoreError::Unavailable(sqlx::Error::PoolClosed);
        self.0.send(Pending { session_id, write, done }).await.map_err(|_| closed())?;
        written.await.map_err(|_| closed())?
    }
}

/// What writes a batch: in one transaction (on SQLite, up to two: see
/// the module's description).
pub(crate) trait WriteBatch {
    /// One result per write, in order; `Err` when the batch failed as a
    /// whole (normally: nothing was committed).
    fn write_batch(&self, batch: &[Pending]) -> impl Future<Output = Result<Vec<Result<Written>>>> + Send;

    /// Upkeep between batches, once the last one's callers have their
    /// results and no write is waiting; nothing, unless the store needs
    /// some. Under a steady backlog it waits for a gap.
    fn between_batches(&self) {}
}

/// The group-commit loop: every write waiting when the previous batch
/// committed goes into the next one.
pub(crate) async fn commit_batches(mut queue: mpsc::Receiver<Pending>, writer: impl WriteBatch) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let started = std::time::Instant::now();
        match writer.write_batch(&batch).await {
            Ok(results) => {
                let took = started.elapsed();
                tracing::debug!(writes = batch.len(), micros = took.as_micros(), "batch committed");
                metrics::histogram!("haven_commit_batch_size").record(batch.len() as f64);
                metrics::histogram!("haven_commit_batch_duration_seconds").record(took.as_secs_f64());
                for (pending, result) in batch.drain(..).zip(results) {
                    let _ = pending.done.send(result);
                }
            }
            Err(error) if batch.len() > 1 && refused_for_its_data(&error) => {
                // One write may have been refused for what it holds: write
                // each alone, so the others commit and only it gets an error.
                tracing::warn!(error = %error, batch = batch.len(), "a batch was refused for its data: writing its writes one by one");
                for pending in batch.drain(..) {
                    let result = match writer.write_batch(std::slice::from_ref(&pending)).await {
                        Ok(mut results) => results.pop().unwrap_or_else(|| {
                            Err(StoreError::Corrupt("a write of the batch was left unsettled".into()))
                        }),
                        Err(error) => {
                            tracing::error!(error = %error, "a message was not committed");
                            Err(not_committed(&error))
                        }
                    };
                    let _ = pending.done.send(result);
                }
            }
            Err(error) => {
                tracing::error!(error = %error, batch = batch.len(), "a batch of messages was not committed");
                for pending in batch.drain(..) {
                    let _ = pending.done.send(Err(not_committed(&error)));
                }
            }
        }
        if queue.is_empty() {
            writer.between_batches();
        }
    }
}

/// Did the database refuse the batch for what one of its rows holds (a
/// constraint, a value it cannot store), rather than for being unreachable?
fn refused_for_its_data(error: &StoreError) -> bool {
    use sqlx::error::ErrorKind;
    let StoreError::Unavailable(sqlx::Error::Database(error)) = error else {
        return false;
    };
    // SQLSTATE class 22 is PostgreSQL's "data exception" (U+0000 in text,
    // a value out of range); SQLite's codes are numbers of four digits or fewer.
    !matches!(error.kind(), ErrorKind::Other)
        || error.code().is_some_and(|code| code.len() == 5 && code.starts_with("22"))
}

/// One row for the batch's shared insert.
#[derive(Debug)]
pub(crate) struct Row<'a> {
    /// Its write's place in the batch.
    pub index: usize,
    pub id: Uuid,
    pub session_id: Uuid,
    pub sender: Sender,
    pub kind: MessageKind,
    pub content: &'a str,
    /// `None` for the companion's writes, which are stored only while the
    /// session is `BOT_ONLY`.
    pub client_id: Option<&'a str>,
}

/// The rows of the batch's usual writes, and the results already settled:
/// a companion write is not stored unless the shared insert stores it.
pub(crate) fn usual_rows(batch: &[Pending]) -> (Vec<Row<'_>>, Settled) {
    let mut keys = HashSet::new();
    let mut rows = Vec::new();
    let mut settled = HashMap::new();
    for (index, pending) in batch.iter().enumerate() {
        let session_id = pending.session_id;
        let row = match &pending.write {
            Write::Message(new) => {
                if new.risk.is_some() || !keys.insert((session_id, new.sender, new.client_id.as_str())) {
                    continue;
                }
                let client_id = Some(new.client_id.as_str());
                Row {
                    index,
                    id: Uuid::now_v7(),
                    session_id,
                    sender: new.sender,
                    kind: MessageKind::Chat,
                    content: &new.content,
                    client_id,
                }
            }
            Write::Bot(BotMessage::Reply { id, content }) => Row {
                index,
                id: *id,
                session_id,
                sender: Sender::Ai,
                kind: MessageKind::Chat,
                content,
                client_id: None,
            },
            Write::Bot(BotMessage::Notice { content }) => Row {
                index,
                id: Uuid::now_v7(),
                session_id,
                sender: Sender::System,
                kind: MessageKind::Notice,
                content,
                client_id: None,
            },
        };
        if row.client_id.is_none() {
            settled.insert(index, Ok(Written::Bot(Committed::nothing(None))));
        }
        rows.push(row);
    }
    (rows, settled)
}

/// The result of a row the shared insert stored with `seq`, in a session
/// whose mode is `chat_mode` (its companion paused or not, and flagged as
/// `risk` says).
pub(crate) fn stored(
    row: &Row,
    seq: i64,
    (chat_mode, companion_paused, risk): (ChatMode, bool, Option<CurrentRisk>),
    at: OffsetDateTime,
) -> Written {
    let message = new_message(row.id, seq, row.sender, row.kind, row.content, row.client_id, at);
    match row.client_id {
        Some(_) => {
            let events = vec![SessionEvent::message(row.session_id, message)];
            Written::Message(Committed::new(
                Appended::Stored { seq, chat_mode, companion_paused, risk, flagged: None },
                events,
            ))
        }
        None => Written::Bot(Committed::new(
            Some(message.clone()),
            vec![SessionEvent::message(row.session_id, message)],
        )),
    }
}

/// The events of what [`Written`] results committed, in batch order: what
/// a store announces to other instances in the batch's transaction.
pub(crate) fn events_of<'a>(settled: impl Iterator<Item = &'a Result<Written>>) -> Vec<&'a SessionEvent> {
    settled
        .filter_map(|result| match result {
            Ok(Written::Message(committed)) => Some(committed.events.iter()),
            Ok(Written::Bot(committed)) => Some(committed.events.iter()),
            Err(_) => None,
        })
        .flatten()
        .collect()
}

/// The error a write's caller gets when its transaction failed: nothing of
/// it was stored, and it may be sent again.
pub(crate) fn not_committed(error: &StoreError) -> StoreError {
    StoreError::Unavailable(sqlx::Error::Protocol(format!("the write was not committed: {error}")))
}

/// Results by place in the batch.
pub(crate) type Settled = HashMap<usize, Result<Written>>;

/// The messages the shared insert did not settle, to write one by one.
pub(crate) fn left_over<'a>(batch: &'a [Pending], settled: &Settled) -> Vec<(usize, Uuid, &'a NewMessage)> {
    let unsettled = batch.iter().enumerate().filter(|(index, _)| !settled.contains_key(index));
    unsettled
        .filter_map(|(index, pending)| match &pending.write {
            Write::Message(new) => Some((index, pending.session_id, new)),
            Write::Bot(_) => None,
        })
        .collect()
}

/// Records the result of a message written one by one. `NotFound` is its
/// own result: it wrote nothing. Any other error is returned: part of the
/// write may be in the transaction, so the batch must be given up.
pub(crate) fn settle(settled: &mut Settled, index: usize, result: Result<Committed<Appended>>) -> Result<()> {
    match result {
        Ok(appended) => settled.insert(index, Ok(Written::Message(appended))),
        Err(StoreError::NotFound) => settled.insert(index, Err(StoreError::NotFound)),
        Err(error) => return Err(error),
    };
    Ok(())
}

/// Every write's result, in batch order.
pub(crate) fn in_batch_order(batch: &[Pending], mut settled: Settled) -> Result<Vec<Result<Written>>> {
    (0..batch.len())
        .map(|index| {
            settled
                .remove(&index)
                .ok_or_else(|| StoreError::Corrupt("a write of the batch was left unsettled".into()))
        })
        .collect()
}
