-- The audit trail: who did what to which chat, when, from which address,
-- and with what outcome; never a message's text or a secret. Rows are
-- numbered without gaps (`seq`), and each carries the hash of the row
-- before it, so that `haven audit verify` finds any edit, deletion or
-- reordering. `session_id` has no foreign key on purpose: the record that
-- a chat was read or erased outlives the chat.
CREATE TABLE audit_trail (
    seq          INTEGER PRIMARY KEY,
    at           TEXT NOT NULL,
    actor        TEXT NOT NULL,
    therapist_id BLOB,
    action       TEXT NOT NULL,
    session_id   BLOB,
    address      TEXT,
    outcome      TEXT NOT NULL,
    detail       TEXT,
    prev_hash    BLOB NOT NULL,
    hash         BLOB NOT NULL
);

CREATE INDEX audit_trail_session ON audit_trail (session_id, seq);
CREATE INDEX audit_trail_therapist ON audit_trail (therapist_id, seq);
