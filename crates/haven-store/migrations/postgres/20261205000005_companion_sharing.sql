-- The client's choice for the companion part, and where that part ends;
-- see migrations/sqlite.
ALTER TABLE chat_sessions ADD COLUMN companion_shared BOOLEAN;
ALTER TABLE chat_sessions ADD COLUMN first_join_seq BIGINT;

UPDATE chat_sessions SET first_join_seq = (
    SELECT MIN(seq) FROM messages m WHERE m.session_id = chat_sessions.id AND m.kind = 'join'
);
UPDATE chat_sessions SET companion_shared = TRUE WHERE first_join_seq IS NOT NULL;
