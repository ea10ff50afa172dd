-- Crisis detection (docs/safety.md).
--
-- A session's flag: the highest level the detector has seen in its client
-- messages, when it was first and last raised, and the latest
-- acknowledgement. A flag is never cleared; a flag raised after the
-- acknowledgement makes the session need attention again.
ALTER TABLE chat_sessions ADD COLUMN risk_level TEXT
    CHECK (risk_level IN ('concern', 'high', 'imminent'));
ALTER TABLE chat_sessions ADD COLUMN risk_first_at TEXT;
ALTER TABLE chat_sessions ADD COLUMN risk_last_at TEXT;
ALTER TABLE chat_sessions ADD COLUMN risk_acknowledged_at TEXT;
ALTER TABLE chat_sessions ADD COLUMN risk_acknowledged_by BLOB REFERENCES therapists (id);

-- The audit trail: every flag (with the rules that fired, never the words)
-- and every acknowledgement (with the therapist's note). Append-only.
CREATE TABLE safety_audit (
    id               BLOB PRIMARY KEY NOT NULL,
    session_id       BLOB NOT NULL REFERENCES chat_sessions (id),
    kind             TEXT NOT NULL CHECK (kind IN ('flagged', 'acknowledged')),
    level            TEXT NOT NULL CHECK (level IN ('concern', 'high', 'imminent')),
    -- For flags: the flagged message, the rule ids (space-separated), the
    -- detector's version, and whether crisis resources were sent.
    message_seq      INTEGER,
    rules            TEXT,
    detector_version TEXT,
    referred         INTEGER NOT NULL DEFAULT 0,
    -- For acknowledgements.
    therapist_id     BLOB REFERENCES therapists (id),
    note             TEXT,
    created_at       TEXT NOT NULL
);

CREATE INDEX safety_audit_by_session ON safety_audit (session_id, created_at);
CREATE INDEX safety_audit_by_time ON safety_audit (created_at);

-- The referral counter: crisis messages sent, per UTC day and level.
CREATE TABLE safety_referrals (
    day   TEXT NOT NULL,
    level TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (day, level)
);
