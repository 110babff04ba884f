-- Web console sessions: the cookie carries a random value; only its
-- SHA-256 is kept, so the store never holds a usable session. Signing out
-- deletes the row; expired rows are deleted as new sessions start.
CREATE TABLE console_sessions (
    id_sha256   TEXT PRIMARY KEY,
    operator    TEXT NOT NULL,
    method      TEXT NOT NULL,          -- token | oidc
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL
);
CREATE INDEX console_sessions_expiry ON console_sessions (expires_at);
