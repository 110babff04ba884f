-- Fences: barriers an emergency revocation put up at a provider for
-- credentials that cannot be revoked one by one (AWS deny policies on roles).
-- A fence stands until an operator lifts it.
CREATE TABLE fences (
    id            TEXT PRIMARY KEY,
    revocation_id TEXT NOT NULL REFERENCES revocations (id),
    provider      TEXT NOT NULL,
    target        TEXT NOT NULL,            -- e.g. a role ARN
    name          TEXT NOT NULL,            -- e.g. an inline policy name
    agent         TEXT,                     -- NULL: the fence stops everyone
    description   TEXT NOT NULL,
    handle        TEXT NOT NULL,            -- JSON, opaque to the core, never secret
    created_at    INTEGER NOT NULL,
    lifted_at     INTEGER,
    lifted_by     TEXT,
    lift_reason   TEXT
);
CREATE INDEX fences_revocation ON fences (revocation_id);
CREATE INDEX fences_standing ON fences (provider, target, name) WHERE lifted_at IS NULL;
