-- A therapist's private name for a client ("Client 59e7" until renamed),
-- seen by that therapist only.
CREATE TABLE client_labels (
    therapist_id BLOB NOT NULL REFERENCES therapists (id) ON DELETE CASCADE,
    session_id   BLOB NOT NULL REFERENCES chat_sessions (id) ON DELETE CASCADE,
    label        TEXT NOT NULL,
    updated_at   TEXT NOT NULL,
    PRIMARY KEY (therapist_id, session_id)
);
