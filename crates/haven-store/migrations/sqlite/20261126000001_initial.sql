-- Haven's initial schema (SQLite).
--
-- Ids are UUIDv7 stored as 16-byte BLOBs; timestamps are UTC RFC 3339 text
-- written by the application. Credentials are stored only as SHA-256 hashes
-- of high-entropy random tokens, so a copy of this file grants no access.

-- Therapist accounts. `email` is normalised to lower case by the application;
-- `password_hash` is an argon2id PHC string.
CREATE TABLE therapists (
    id            BLOB PRIMARY KEY NOT NULL,
    email         TEXT NOT NULL UNIQUE,
    name          TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    created_at    TEXT NOT NULL
);

-- A therapist's logins. Deleting the row revokes the token at once.
CREATE TABLE therapist_auth_sessions (
    token_hash   BLOB PRIMARY KEY NOT NULL,
    therapist_id BLOB NOT NULL REFERENCES therapists (id) ON DELETE CASCADE,
    created_at   TEXT NOT NULL,
    expires_at   TEXT NOT NULL
);

-- One chat session is one appointment: created by "Chat Now", open until a
-- therapist claims it, then assigned to that therapist alone.
CREATE TABLE chat_sessions (
    id              BLOB PRIMARY KEY NOT NULL,
    appointment_id  BLOB NOT NULL UNIQUE,
    therapist_id    BLOB REFERENCES therapists (id),
    status          TEXT NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'assigned')),
    chat_mode       TEXT NOT NULL DEFAULT 'BOT_ONLY'
                    CHECK (chat_mode IN ('BOT_ONLY', 'THERAPIST_JOINED')),
    -- The seq of the session's newest message. Every insert into `messages`
    -- increments it in the same transaction, which is what makes seqs
    -- gap-free, and is also where the companion's "still BOT_ONLY?" check
    -- happens, so the check and the insert cannot be separated.
    last_seq        INTEGER NOT NULL DEFAULT 0,
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL,
    last_message_at TEXT
);

CREATE INDEX chat_sessions_by_therapist ON chat_sessions (therapist_id);

-- The client's credential: bound to exactly one session.
CREATE TABLE client_credentials (
    token_hash BLOB PRIMARY KEY NOT NULL,
    session_id BLOB NOT NULL REFERENCES chat_sessions (id) ON DELETE CASCADE,
    created_at TEXT NOT NULL
);

CREATE TABLE messages (
    id         BLOB PRIMARY KEY NOT NULL,
    session_id BLOB NOT NULL REFERENCES chat_sessions (id) ON DELETE CASCADE,
    seq        INTEGER NOT NULL,
    sender     TEXT NOT NULL CHECK (sender IN ('user', 'therapist', 'ai', 'system')),
    content    TEXT NOT NULL,
    client_id  TEXT,
    created_at TEXT NOT NULL,
    UNIQUE (session_id, seq)
);

-- Re-sending a message with the same client_id must not store it twice.
CREATE UNIQUE INDEX messages_by_client_id ON messages (session_id, sender, client_id)
    WHERE client_id IS NOT NULL;
