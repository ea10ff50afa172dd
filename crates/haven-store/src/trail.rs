//! The audit trail: who did what to which chat, when, from which address,
//! and with what outcome.
//!
//! Every action that reads or changes a chat, an account or a login is
//! recorded in the same transaction as the action itself, so that the
//! trail and what it describes cannot disagree. A record holds ids, kinds
//! and counts, never a message's text, a token or a password.
//!
//! The records are numbered without gaps and hash-chained: each carries the
//! SHA-256 of the record before it together with its own fields, so that
//! [`Verifier`] finds any edit, deletion or reordering and names the first
//! record that no longer fits. Removing records from the end leaves a
//! shorter chain that still fits: `haven audit verify` prints the head
//! (the count and the last hash) for an operator to keep elsewhere.

use std::net::IpAddr;

use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use uuid::Uuid;

/// The hash the first record carries as its predecessor's.
pub const GENESIS: [u8; 32] = [0; 32];

/// Who acted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Actor {
    /// A therapist, by account: logged in, or the account a failed login
    /// named.
    Therapist(Uuid),
    /// A chat's client, by the chat's credential. Clients' addresses are
    /// never recorded.
    Client,
    /// Haven itself: the crisis detector, the retention job.
    System,
    /// An operator at the server's command line.
    Operator,
    /// Nobody known: a failed login for an e-mail with no account.
    Unknown,
}

impl Actor {
    pub fn as_str(self) -> &'static str {
        match self {
            Actor::Therapist(_) => "therapist",
            Actor::Client => "client",
            Actor::System => "system",
            Actor::Operator => "operator",
            Actor::Unknown => "unknown",
        }
    }

    fn therapist_id(self) -> Option<Uuid> {
        match self {
            Actor::Therapist(id) => Some(id),
            _ => None,
        }
    }
}

/// What was done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Login,
    Logout,
    /// Messages of a chat sent to a therapist: the messages API, or the
    /// chat page's history over the socket.
    Read,
    /// A chat's transcript downloaded.
    Export,
    Join,
    HandBack,
    Close,
    /// The crisis detector flagged a client message.
    Flag,
    /// A therapist acknowledged a chat's flag.
    Acknowledge,
    AccountAdd,
    AccountPassword,
    AccountDisable,
    /// A retention run: what it found, or removed.
    Retention,
    /// A chat erased by its client.
    Erase,
    /// The client's choice whether the therapist who joins sees the
    /// conversation with the companion.
    Sharing,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Login => "login",
            Action::Logout => "logout",
            Action::Read => "read",
            Action::Export => "export",
            Action::Join => "join",
            Action::HandBack => "hand_back",
            Action::Close => "close",
            Action::Flag => "flag",
            Action::Acknowledge => "acknowledge",
            Action::AccountAdd => "account_add",
            Action::AccountPassword => "account_password",
            Action::AccountDisable => "account_disable",
            Action::Retention => "retention",
            Action::Erase => "erase",
            Action::Sharing => "sharing",
        }
    }
}

/// How it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// Not allowed or not possible (a wrong password, someone else's chat);
    /// nothing else was written.
    Refused,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Refused => "refused",
        }
    }
}

/// Who asks for an action, and from where: what its record says of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    pub actor: Actor,
    pub address: Option<IpAddr>,
}

impl Origin {
    pub fn new(actor: Actor, address: Option<IpAddr>) -> Self {
        Self { actor, address }
    }

    /// The operator at the command line, with no address.
    pub const OPERATOR: Origin = Origin { actor: Actor::Operator, address: None };

    /// A successful `action` by this origin.
    pub fn entry(self, action: Action) -> TrailEntry {
        TrailEntry::new(self.actor, action).address(self.address)
    }
}

/// A record to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrailEntry {
    pub actor: Actor,
    pub action: Action,
    pub session_id: Option<Uuid>,
    pub address: Option<IpAddr>,
    pub outcome: Outcome,
    /// A few words without content: a range of seqs, a level, a count.
    pub detail: Option<String>,
}

impl TrailEntry {
    /// A successful action.
    pub fn new(actor: Actor, action: Action) -> Self {
        Self { actor, action, session_id: None, address: None, outcome: Outcome::Ok, detail: None }
    }

    pub fn session(mut self, session_id: Uuid) -> Self {
        self.session_id = Some(session_id);
        self
    }

    pub fn address(mut self, address: Option<IpAddr>) -> Self {
        self.address = address;
        self
    }

    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn refused(mut self) -> Self {
        self.outcome = Outcome::Refused;
        self
    }

    /// The record this entry becomes as record `seq`, after `prev_hash`.
    pub(crate) fn into_record(self, seq: i64, at: OffsetDateTime, prev_hash: Vec<u8>) -> TrailRecord {
        let mut record = TrailRecord {
            seq,
            at,
            actor: self.actor.as_str().to_owned(),
            therapist_id: self.actor.therapist_id(),
            action: self.action.as_str().to_owned(),
            session_id: self.session_id,
            address: self.address.map(|address| address.to_string()),
            outcome: self.outcome.as_str().to_owned(),
            detail: self.detail,
            prev_hash,
            hash: Vec::new(),
        };
        record.hash = record.computed_hash().to_vec();
        record
    }
}

/// A stored record, as it reads back.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct TrailRecord {
    /// Its place in the chain, from 1, without gaps.
    pub seq: i64,
    pub at: OffsetDateTime,
    pub actor: String,
    pub therapist_id: Option<Uuid>,
    pub action: String,
    pub session_id: Option<Uuid>,
    pub address: Option<String>,
    pub outcome: String,
    pub detail: Option<String>,
    pub prev_hash: Vec<u8>,
    pub hash: Vec<u8>,
}

impl TrailRecord {
    /// SHA-256 of the previous record's hash and this record's fields,
    /// each length-delimited (as a JSON array), so that no two different
    /// records hash alike.
    pub fn computed_hash(&self) -> [u8; 32] {
        let fields = serde_json::json!([
            self.seq,
            (self.at.unix_timestamp_nanos() / 1_000) as i64,
            self.actor,
            self.therapist_id,
            self.action,
            self.session_id,
            self.address,
            self.outcome,
            self.detail,
        ]);
        let mut hasher = Sha256::new();
        hasher.update(&self.prev_hash);
        hasher.update(fields.to_string().as_bytes());
        hasher.finalize().into()
    }
}

/// What [`Verifier`] found wrong with the first record that does not fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Break {
    #[error("record {seq}: the record before it is missing (expected number {expected})")]
    Missing { seq: i64, expected: i64 },
    #[error("record {seq}: it does not follow the record before it (deleted or reordered)")]
    Unlinked { seq: i64 },
    #[error("record {seq}: its contents were changed after it was written")]
    Edited { seq: i64 },
}

impl Break {
    /// The first record that does not fit.
    pub fn seq(self) -> i64 {
        match self {
            Break::Missing { seq, .. } | Break::Unlinked { seq } | Break::Edited { seq } => seq,
        }
    }
}

/// Walks the chain in order, record by record.
#[derive(Debug, Clone)]
pub struct Verifier {
    next_seq: i64,
    prev_hash: Vec<u8>,
}

impl Default for Verifier {
    fn default() -> Self {
        Self { next_seq: 1, prev_hash: GENESIS.to_vec() }
    }
}

impl Verifier {
    /// Checks the next record: its number, its link to the one before, and
    /// its own hash.
    pub fn check(&mut self, record: &TrailRecord) -> Result<(), Break> {
        if record.seq != self.next_seq {
            return Err(Break::Missing { seq: record.seq, expected: self.next_seq });
        }
        if record.prev_hash != self.prev_hash {
            return Err(Break::Unlinked { seq: record.seq });
        }
        if record.computed_hash()[..] != record.hash[..] {
            return Err(Break::Edited { seq: record.seq });
        }
        self.next_seq += 1;
        self.prev_hash.clone_from(&record.hash);
        Ok(())
    }

    /// How many records fit so far.
    pub fn count(&self) -> i64 {
        self.next_seq - 1
    }

    /// The last record's hash ([`GENESIS`] for an empty trail), in hex.
    pub fn head(&self) -> String {
        self.prev_hash.iter().map(|byte| format!("{byte:02x}")).collect()
    }
}

/// Which records `haven audit list` and the access log show.
#[derive(Debug, Clone, Default)]
pub struct TrailFilter {
    pub session_id: Option<Uuid>,
    pub therapist_id: Option<Uuid>,
    pub since: Option<OffsetDateTime>,
    /// Records after this seq (a page's last), oldest first.
    pub after: i64,
    pub limit: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: i64) -> Vec<TrailRecord> {
        let mut prev = GENESIS.to_vec();
        (1..=n)
            .map(|seq| {
                let entry = TrailEntry::new(Actor::Therapist(Uuid::now_v7()), Action::Read)
                    .session(Uuid::now_v7())
                    .detail(format!("seq 1-{seq}"));
                let record = entry.into_record(seq, crate::now(), prev.clone());
                prev.clone_from(&record.hash);
                record
            })
            .collect()
    }

    fn verify(records: &[TrailRecord]) -> Result<i64, Break> {
        let mut verifier = Verifier::default();
        for record in records {
            verifier.check(record)?;
        }
        Ok(verifier.count())
    }

    #[test]
    fn an_untouched_chain_verifies() {
        assert_eq!(verify(&chain(5)), Ok(5));
    }

    #[test]
    fn an_edit_a_deletion_and_a_swap_are_each_found_at_their_record() {
        let mut edited = chain(5);
        edited[2].detail = Some("seq 1-99".into());
        assert_eq!(verify(&edited), Err(Break::Edited { seq: 3 }));

        let mut deleted = chain(5);
        deleted.remove(1);
        assert_eq!(verify(&deleted), Err(Break::Missing { seq: 3, expected: 2 }));

        // Renumbered after the deletion: the link still breaks.
        let mut renumbered = chain(5);
        renumbered.remove(1);
        for (index, record) in renumbered.iter_mut().enumerate() {
            record.seq = index as i64 + 1;
        }
        assert_eq!(verify(&renumbered), Err(Break::Unlinked { seq: 2 }));

        let mut swapped = chain(5);
        swapped.swap(1, 3);
        let (one, three) = (swapped[1].seq, swapped[3].seq);
        swapped[1].seq = three;
        swapped[3].seq = one;
        assert_eq!(verify(&swapped), Err(Break::Unlinked { seq: 2 }));
    }
}
