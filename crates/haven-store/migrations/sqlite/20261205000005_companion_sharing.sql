-- Whether the therapist who joins a chat sees its conversation with the
-- companion, that is every message before the first join: the client's
-- choice, made before a therapist joins. NULL until they choose, which
-- counts as private; 1 shared; 0 private. `first_join_seq` is the seq of
-- the first join message, where the companion part ends.
ALTER TABLE chat_sessions ADD COLUMN companion_shared BOOLEAN;
ALTER TABLE chat_sessions ADD COLUMN first_join_seq INTEGER;

UPDATE chat_sessions SET first_join_seq = (
    SELECT MIN(seq) FROM messages m WHERE m.session_id = chat_sessions.id AND m.kind = 'join'
);
-- Chats joined before the choice existed were shown whole to their
-- therapist already; they stay so.
UPDATE chat_sessions SET companion_shared = TRUE WHERE first_join_seq IS NOT NULL;
