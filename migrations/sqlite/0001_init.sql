-- Keygate schema v1. Times are unix seconds unless named *_ms.

CREATE TABLE agents (
    id              TEXT PRIMARY KEY,
    team            TEXT NOT NULL,
    sponsor         TEXT NOT NULL,
    risk_tier       INTEGER NOT NULL CHECK (risk_tier BETWEEN 1 AND 3),
    environment     TEXT NOT NULL,
    purpose         TEXT NOT NULL,
    labels          TEXT NOT NULL,            -- JSON object
    status          TEXT NOT NULL,
    auth_method     TEXT NOT NULL,
    jwks            TEXT NOT NULL,            -- JSON, public keys only
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    last_used_at    INTEGER,
    last_review_at  INTEGER
);
CREATE INDEX agents_team ON agents (team);

-- Client-assertion ids seen, kept until the assertion expires: replay defence.
CREATE TABLE assertion_jtis (
    agent_id    TEXT NOT NULL,
    jti         TEXT NOT NULL,
    expires_at  INTEGER NOT NULL,
    PRIMARY KEY (agent_id, jti)
);
CREATE INDEX assertion_jtis_expiry ON assertion_jtis (expires_at);

CREATE TABLE tasks (
    id          TEXT PRIMARY KEY,
    agent_id    TEXT NOT NULL REFERENCES agents (id),
    description TEXT NOT NULL,
    state       TEXT NOT NULL,
    opened_at   INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    ended_at    INTEGER,
    end_reason  TEXT
);
CREATE INDEX tasks_agent_state ON tasks (agent_id, state);
CREATE INDEX tasks_open_expiry ON tasks (expires_at) WHERE state = 'open';

CREATE TABLE revocations (
    id          TEXT PRIMARY KEY,
    selector    TEXT NOT NULL,                -- JSON
    reason      TEXT NOT NULL,
    operator    TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    tasks_ended INTEGER NOT NULL
);

-- One row per minted credential. Written (pending) before the provider is
-- called; the revocation queue is the set of rows in state 'revoking'.
CREATE TABLE leases (
    id              TEXT PRIMARY KEY,
    agent_id        TEXT NOT NULL REFERENCES agents (id),
    task_id         TEXT NOT NULL REFERENCES tasks (id),
    scope           TEXT NOT NULL,
    provider        TEXT NOT NULL,
    state           TEXT NOT NULL,
    revocability    TEXT,
    handle          TEXT,                     -- JSON, opaque revoke handle, never secret
    created_at      INTEGER NOT NULL,
    expires_at      INTEGER NOT NULL,
    ended_at        INTEGER,
    end_reason      TEXT,
    attempts        INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT,
    next_attempt_at INTEGER,
    revocation_id   TEXT REFERENCES revocations (id)
);
CREATE INDEX leases_task ON leases (task_id);
CREATE INDEX leases_agent_state ON leases (agent_id, state);
CREATE INDEX leases_state_expiry ON leases (state, expires_at);
CREATE INDEX leases_queue ON leases (next_attempt_at) WHERE state = 'revoking';
CREATE INDEX leases_revocation ON leases (revocation_id) WHERE revocation_id IS NOT NULL;

-- Append-only, hash-chained.
CREATE TABLE audit_events (
    seq         INTEGER PRIMARY KEY,
    at_ms       INTEGER NOT NULL,
    actor       TEXT NOT NULL,
    action      TEXT NOT NULL,
    agent       TEXT,
    task        TEXT,
    scope       TEXT,
    lease       TEXT,
    decision    TEXT,
    policy_ids  TEXT NOT NULL,                -- JSON array
    policy_hash TEXT,
    outcome     TEXT NOT NULL,
    reason      TEXT,
    details     TEXT NOT NULL,                -- JSON
    prev_hash   TEXT NOT NULL,
    hash        TEXT NOT NULL
);
CREATE INDEX audit_agent ON audit_events (agent, seq);
CREATE INDEX audit_task ON audit_events (task, seq);

CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events
BEGIN SELECT RAISE(ABORT, 'audit events are append-only'); END;
CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events
BEGIN SELECT RAISE(ABORT, 'audit events are append-only'); END;
