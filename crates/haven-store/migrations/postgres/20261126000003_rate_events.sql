-- Events counted by rate limits that must hold across instances: failed
-- logins (per account and per address) and new chat sessions (per address).
-- `at` is Unix time in milliseconds.
CREATE TABLE rate_events (
    kind TEXT NOT NULL,
    key  TEXT NOT NULL,
    at   BIGINT NOT NULL
);

CREATE INDEX rate_events_by_key ON rate_events (kind, key, at);
