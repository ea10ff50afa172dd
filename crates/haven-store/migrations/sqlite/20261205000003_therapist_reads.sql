-- How far each therapist has read each chat: the seq of the newest message
-- their chat page was sent. The appointments list counts what came after
-- it from the client and the companion as unread.
CREATE TABLE therapist_reads (
    therapist_id  BLOB NOT NULL REFERENCES therapists (id) ON DELETE CASCADE,
    session_id    BLOB NOT NULL REFERENCES chat_sessions (id) ON DELETE CASCADE,
    last_read_seq INTEGER NOT NULL,
    updated_at    TEXT NOT NULL,
    PRIMARY KEY (therapist_id, session_id)
);

-- A therapist's closed chats, newest first (the "Closed" tab).
CREATE INDEX chat_sessions_closed ON chat_sessions (therapist_id, closed_at) WHERE closed_at IS NOT NULL;
