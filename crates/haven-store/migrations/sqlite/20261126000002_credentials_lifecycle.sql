-- Credentials that end: idle therapist logins, disabled accounts.

-- When the login was last used; a login unused for longer than the idle
-- limit is no longer valid (it also expires absolutely at `expires_at`).
ALTER TABLE therapist_auth_sessions ADD COLUMN last_seen_at TEXT;

-- A disabled account cannot log in, and its logins are deleted.
ALTER TABLE therapists ADD COLUMN disabled_at TEXT;
