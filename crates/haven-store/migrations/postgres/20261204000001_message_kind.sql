-- What a message is to its session (chat, join, close, crisis, notice),
-- so that readers never tell them apart by their text. Existing system
-- messages are classified by the texts Haven wrote until now: the join and
-- closing messages, the companion's "unavailable" notice; every other
-- system message was a crisis message.
ALTER TABLE messages ADD COLUMN kind TEXT NOT NULL DEFAULT 'chat';
UPDATE messages SET kind = CASE
    WHEN content = '🧑‍⚕️ Therapist has joined. You can talk directly now.' THEN 'join'
    WHEN content = 'This chat has been closed by the therapist. Thank you for talking with us.' THEN 'close'
    WHEN content = 'The companion is unavailable right now. Your message is saved, and a therapist can still join this chat.' THEN 'notice'
    ELSE 'crisis'
END
WHERE sender = 'system';
