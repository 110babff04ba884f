-- What a console session was signed in with, as a fingerprint (a SHA-256
-- prefix of the operator's configured `token_sha256`, or of its
-- `oidc_subject`): once the operator's token is rotated (or its subject
-- changed) in config, the sessions it opened end. NULL (a session from
-- before this column) signs in again.
ALTER TABLE console_sessions ADD COLUMN credential TEXT;
