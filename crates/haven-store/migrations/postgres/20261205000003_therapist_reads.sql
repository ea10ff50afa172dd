-- How far each therapist has read each chat; see migrations/sqlite.
CREATE TABLE therapist_reads (
    therapist_id  UUID NOT NULL REFERENCES therapists (id) ON DELETE CASCADE,
    session_id    UUID NOT NULL REFERENCES chat_sessions (id) ON DELETE CASCADE,
    last_read_seq BIGINT NOT NULL,
    updated_at    TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (therapist_id, session_id)
);

CREATE INDEX chat_sessions_closed ON chat_sessions (therapist_id, closed_at) WHERE closed_at IS NOT NULL;
