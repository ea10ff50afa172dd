-- A therapist can close a chat: its client credential is deleted, and the
-- session leaves every appointments list. Closed sessions keep their history.
ALTER TABLE chat_sessions ADD COLUMN closed_at TEXT;
