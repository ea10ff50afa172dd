-- A therapist's private name for a client; see migrations/sqlite.
CREATE TABLE client_labels (
    therapist_id UUID NOT NULL REFERENCES therapists (id) ON DELETE CASCADE,
    session_id   UUID NOT NULL REFERENCES chat_sessions (id) ON DELETE CASCADE,
    label        TEXT NOT NULL,
    updated_at   TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (therapist_id, session_id)
);
