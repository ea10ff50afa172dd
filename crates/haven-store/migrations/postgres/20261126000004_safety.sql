-- Crisis detection (docs/safety.md); see migrations/sqlite for the reasons.
ALTER TABLE chat_sessions
    ADD COLUMN risk_level TEXT CHECK (risk_level IN ('concern', 'high', 'imminent')),
    ADD COLUMN risk_first_at TIMESTAMPTZ,
    ADD COLUMN risk_last_at TIMESTAMPTZ,
    ADD COLUMN risk_acknowledged_at TIMESTAMPTZ,
    ADD COLUMN risk_acknowledged_by UUID REFERENCES therapists (id);

CREATE TABLE safety_audit (
    id               UUID PRIMARY KEY,
    session_id       UUID NOT NULL REFERENCES chat_sessions (id),
    kind             TEXT NOT NULL CHECK (kind IN ('flagged', 'acknowledged')),
    level            TEXT NOT NULL CHECK (level IN ('concern', 'high', 'imminent')),
    message_seq      BIGINT,
    rules            TEXT,
    detector_version TEXT,
    referred         BOOLEAN NOT NULL DEFAULT FALSE,
    therapist_id     UUID REFERENCES therapists (id),
    note             TEXT,
    created_at       TIMESTAMPTZ NOT NULL
);

CREATE INDEX safety_audit_by_session ON safety_audit (session_id, created_at);
CREATE INDEX safety_audit_by_time ON safety_audit (created_at);

CREATE TABLE safety_referrals (
    day   DATE NOT NULL,
    level TEXT NOT NULL,
    count BIGINT NOT NULL,
    PRIMARY KEY (day, level)
);
