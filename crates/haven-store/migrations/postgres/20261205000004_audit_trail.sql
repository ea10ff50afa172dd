-- The audit trail, hash-chained; see migrations/sqlite. Appends take a
-- transaction-scoped advisory lock, so that every instance extends one
-- chain.
CREATE TABLE audit_trail (
    seq          BIGINT PRIMARY KEY,
    at           TIMESTAMPTZ NOT NULL,
    actor        TEXT NOT NULL,
    therapist_id UUID,
    action       TEXT NOT NULL,
    session_id   UUID,
    address      TEXT,
    outcome      TEXT NOT NULL,
    detail       TEXT,
    prev_hash    BYTEA NOT NULL,
    hash         BYTEA NOT NULL
);

CREATE INDEX audit_trail_session ON audit_trail (session_id, seq);
CREATE INDEX audit_trail_therapist ON audit_trail (therapist_id, seq);
