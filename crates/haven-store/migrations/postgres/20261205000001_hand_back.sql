-- After a therapist hands a chat back to the companion, the companion stays
-- silent until the client says yes: set at the hand-back, cleared by the
-- client's yes and by a join.
ALTER TABLE chat_sessions ADD COLUMN companion_paused BOOLEAN NOT NULL DEFAULT FALSE;
