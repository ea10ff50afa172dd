-- Haven's schema on PostgreSQL. The same model as the SQLite schema (see
-- migrations/sqlite for the reasons behind each table), in native types.
-- Credentials are stored only as SHA-256 hashes of random tokens.

CREATE TABLE therapists (
    id            UUID PRIMARY KEY,
    email         TEXT NOT NULL UNIQUE,
    name          TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    created_at    TIMESTAMPTZ NOT NULL,
    disabled_at   TIMESTAMPTZ
);

CREATE TABLE therapist_auth_sessions (
    token_hash   BYTEA PRIMARY KEY,
    therapist_id UUID NOT NULL REFERENCES therapists (id) ON DELETE CASCADE,
    created_at   TIMESTAMPTZ NOT NULL,
    expires_at   TIMESTAMPTZ NOT NULL,
    last_seen_at TIMESTAMPTZ
);

CREATE INDEX therapist_auth_sessions_by_therapist ON therapist_auth_sessions (therapist_id);

CREATE TABLE chat_sessions (
    id              UUID PRIMARY KEY,
    appointment_id  UUID NOT NULL UNIQUE,
    therapist_id    UUID REFERENCES therapists (id),
    status          TEXT NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'assigned')),
    chat_mode       TEXT NOT NULL DEFAULT 'BOT_ONLY'
                    CHECK (chat_mode IN ('BOT_ONLY', 'THERAPIST_JOINED')),
    -- The seq of the newest message. Writers lock this row (UPDATE …
    -- RETURNING) to allocate the next seq, so seqs stay gap-free across
    -- instances, and the companion's "still BOT_ONLY?" check is in the same
    -- statement.
    last_seq        BIGINT NOT NULL DEFAULT 0,
    created_at      TIMESTAMPTZ NOT NULL,
    updated_at      TIMESTAMPTZ NOT NULL,
    last_message_at TIMESTAMPTZ
);

CREATE INDEX chat_sessions_by_therapist ON chat_sessions (therapist_id);

CREATE TABLE client_credentials (
    token_hash BYTEA PRIMARY KEY,
    session_id UUID NOT NULL REFERENCES chat_sessions (id) ON DELETE CASCADE,
    created_at TIMESTAMPTZ NOT NULL
);

CREATE TABLE messages (
    id         UUID PRIMARY KEY,
    session_id UUID NOT NULL REFERENCES chat_sessions (id) ON DELETE CASCADE,
    seq        BIGINT NOT NULL,
    sender     TEXT NOT NULL CHECK (sender IN ('user', 'therapist', 'ai', 'system')),
    content    TEXT NOT NULL,
    client_id  TEXT,
    created_at TIMESTAMPTZ NOT NULL,
    UNIQUE (session_id, seq)
);

CREATE UNIQUE INDEX messages_by_client_id ON messages (session_id, sender, client_id)
    WHERE client_id IS NOT NULL;
