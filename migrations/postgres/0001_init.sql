-- Keygate schema for PostgreSQL: the SQLite schema as of its migration 0013,
-- in one step (this engine has no older deployments to upgrade). Times are
-- unix seconds unless named *_ms; every integer is BIGINT, every flag
-- BOOLEAN and every JSON value TEXT, so both engines map rows with the same
-- code (src/store/rows.rs).

CREATE TABLE agents (
    id                TEXT PRIMARY KEY,
    team              TEXT NOT NULL,
    sponsor           TEXT NOT NULL,
    risk_tier         BIGINT NOT NULL CHECK (risk_tier BETWEEN 1 AND 3),
    environment       TEXT NOT NULL,
    purpose           TEXT NOT NULL,
    labels            TEXT NOT NULL,
    status            TEXT NOT NULL,
    auth_method       TEXT NOT NULL,
    jwks              TEXT NOT NULL,
    created_at        BIGINT NOT NULL,
    updated_at        BIGINT NOT NULL,
    last_used_at      BIGINT,
    last_review_at    BIGINT,
    delegation        TEXT NOT NULL DEFAULT '{"max_depth":0,"targets":[]}',
    federated_issuer  TEXT,
    federated_subject TEXT,
    may_assert_users  BOOLEAN NOT NULL DEFAULT false,
    suspended_from    TEXT,
    max_ttl_secs      BIGINT,
    excluded_scopes   TEXT NOT NULL DEFAULT '{}',
    keys_rotated_at   BIGINT,
    owner_changed_at  BIGINT
);
CREATE INDEX agents_team ON agents (team);
CREATE UNIQUE INDEX agents_federated ON agents (federated_issuer, federated_subject)
    WHERE federated_issuer IS NOT NULL;

CREATE TABLE assertion_jtis (
    agent_id    TEXT NOT NULL,
    jti         TEXT NOT NULL,
    expires_at  BIGINT NOT NULL,
    PRIMARY KEY (agent_id, jti)
);
CREATE INDEX assertion_jtis_expiry ON assertion_jtis (expires_at);

CREATE TABLE tasks (
    id                TEXT PRIMARY KEY,
    agent_id          TEXT NOT NULL REFERENCES agents (id),
    description       TEXT NOT NULL,
    state             TEXT NOT NULL,
    opened_at         BIGINT NOT NULL,
    expires_at        BIGINT NOT NULL,
    ended_at          BIGINT,
    end_reason        TEXT,
    parent_task_id    TEXT REFERENCES tasks (id),
    depth             BIGINT NOT NULL DEFAULT 0,
    delegation_budget BIGINT NOT NULL DEFAULT 0,
    scopes            TEXT,
    chain             TEXT NOT NULL DEFAULT '[]',
    on_behalf_of      TEXT
);
CREATE INDEX tasks_agent_state ON tasks (agent_id, state);
CREATE INDEX tasks_open_expiry ON tasks (expires_at) WHERE state = 'open';
CREATE INDEX tasks_parent ON tasks (parent_task_id) WHERE parent_task_id IS NOT NULL;

CREATE TABLE revocations (
    id          TEXT PRIMARY KEY,
    selector    TEXT NOT NULL,
    reason      TEXT NOT NULL,
    operator    TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    tasks_ended BIGINT NOT NULL
);

CREATE TABLE leases (
    id              TEXT PRIMARY KEY,
    agent_id        TEXT NOT NULL REFERENCES agents (id),
    task_id         TEXT NOT NULL REFERENCES tasks (id),
    scope           TEXT NOT NULL,
    provider        TEXT NOT NULL,
    state           TEXT NOT NULL,
    revocability    TEXT,
    handle          TEXT,
    created_at      BIGINT NOT NULL,
    expires_at      BIGINT NOT NULL,
    ended_at        BIGINT,
    end_reason      TEXT,
    attempts        BIGINT NOT NULL DEFAULT 0,
    last_error      TEXT,
    next_attempt_at BIGINT,
    revocation_id   TEXT REFERENCES revocations (id),
    boot_id         TEXT,
    source          TEXT
);
CREATE INDEX leases_task ON leases (task_id);
CREATE INDEX leases_agent_state ON leases (agent_id, state);
CREATE INDEX leases_state_expiry ON leases (state, expires_at);
CREATE INDEX leases_queue ON leases (next_attempt_at) WHERE state = 'revoking';
CREATE INDEX leases_revocation ON leases (revocation_id) WHERE revocation_id IS NOT NULL;
CREATE INDEX leases_agent_scope ON leases (agent_id, scope, created_at);

-- Append-only, hash-chained. Writers serialise on a transaction-scoped
-- advisory lock (store/postgres.rs), so replicas extend one chain.
CREATE TABLE audit_events (
    seq          BIGINT PRIMARY KEY,
    at_ms        BIGINT NOT NULL,
    actor        TEXT NOT NULL,
    action       TEXT NOT NULL,
    agent        TEXT,
    task         TEXT,
    scope        TEXT,
    lease        TEXT,
    decision     TEXT,
    policy_ids   TEXT NOT NULL,
    policy_hash  TEXT,
    outcome      TEXT NOT NULL,
    reason       TEXT,
    details      TEXT NOT NULL,
    prev_hash    TEXT NOT NULL,
    hash         TEXT NOT NULL,
    on_behalf_of TEXT
);
CREATE INDEX audit_agent ON audit_events (agent, seq);
CREATE INDEX audit_task ON audit_events (task, seq);

CREATE FUNCTION audit_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit events are append-only';
END;
$$;
CREATE TRIGGER audit_events_no_update BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_append_only();
CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only();

CREATE TABLE fences (
    id            TEXT PRIMARY KEY,
    revocation_id TEXT NOT NULL,
    provider      TEXT NOT NULL,
    target        TEXT NOT NULL,
    name          TEXT NOT NULL,
    agent         TEXT,
    description   TEXT NOT NULL,
    handle        TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    lifted_at     BIGINT,
    lifted_by     TEXT,
    lift_reason   TEXT,
    expires_at    BIGINT
);
CREATE INDEX fences_revocation ON fences (revocation_id);
CREATE INDEX fences_standing ON fences (provider, target, name) WHERE lifted_at IS NULL;
CREATE INDEX fences_moot ON fences (expires_at) WHERE lifted_at IS NULL AND expires_at IS NOT NULL;

CREATE TABLE approvals (
    id              TEXT PRIMARY KEY,
    kind            TEXT NOT NULL,
    state           TEXT NOT NULL,
    requester       TEXT NOT NULL,
    agent_id        TEXT NOT NULL REFERENCES agents (id),
    task_id         TEXT REFERENCES tasks (id),
    scope           TEXT,
    request         TEXT NOT NULL,
    justification   TEXT NOT NULL,
    required        BIGINT NOT NULL CHECK (required >= 1),
    approver_teams  TEXT NOT NULL,
    sponsor         TEXT NOT NULL,
    sponsor_alone   BOOLEAN NOT NULL,
    confirm_in_api  BOOLEAN NOT NULL,
    created_at      BIGINT NOT NULL,
    expires_at      BIGINT NOT NULL,
    decided_at      BIGINT,
    end_reason      TEXT,
    redeemed_at     BIGINT,
    lease_id        TEXT
);
CREATE INDEX approvals_state ON approvals (state, expires_at);
CREATE INDEX approvals_task ON approvals (task_id) WHERE task_id IS NOT NULL;
CREATE INDEX approvals_agent ON approvals (agent_id);

CREATE TABLE approval_decisions (
    n           BIGSERIAL,                -- insertion order (SQLite's rowid)
    approval_id TEXT NOT NULL REFERENCES approvals (id),
    operator    TEXT NOT NULL,
    decision    TEXT NOT NULL,
    channel     TEXT NOT NULL,
    reason      TEXT,
    at          BIGINT NOT NULL,
    PRIMARY KEY (approval_id, operator)
);

CREATE TABLE hook_replays (
    digest      TEXT PRIMARY KEY,
    expires_at  BIGINT NOT NULL
);
CREATE INDEX hook_replays_expiry ON hook_replays (expires_at);

CREATE TABLE findings (
    id            TEXT PRIMARY KEY,
    agent_id      TEXT NOT NULL REFERENCES agents (id),
    kind          TEXT NOT NULL,
    subject       TEXT NOT NULL DEFAULT '',
    detail        TEXT NOT NULL,
    opened_at     BIGINT NOT NULL,
    action_due_at BIGINT,
    action        TEXT,
    acted_at      BIGINT,
    closed_at     BIGINT,
    close_reason  TEXT
);
CREATE UNIQUE INDEX findings_open ON findings (agent_id, kind, subject) WHERE closed_at IS NULL;
CREATE INDEX findings_agent ON findings (agent_id, opened_at);

CREATE TABLE departures (
    email       TEXT PRIMARY KEY,
    departed_at BIGINT NOT NULL,
    actor       TEXT NOT NULL,
    reason      TEXT NOT NULL
);

CREATE TABLE review_campaigns (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    team        TEXT,
    created_at  BIGINT NOT NULL,
    created_by  TEXT NOT NULL,
    due_at      BIGINT NOT NULL
);
CREATE TABLE review_items (
    id            TEXT PRIMARY KEY,
    campaign_id   TEXT NOT NULL REFERENCES review_campaigns (id),
    agent_id      TEXT NOT NULL REFERENCES agents (id),
    reviewer      TEXT NOT NULL,
    attestations  BIGINT NOT NULL,
    snapshot      TEXT NOT NULL,
    state         TEXT NOT NULL,
    decisions     TEXT NOT NULL DEFAULT '[]',
    decided_at    BIGINT,
    escalated_at  BIGINT,
    UNIQUE (campaign_id, agent_id)
);
CREATE INDEX review_items_open ON review_items (state, campaign_id);
CREATE INDEX review_items_agent ON review_items (agent_id);

CREATE TABLE notifications (
    id              TEXT PRIMARY KEY,
    approval_id     TEXT REFERENCES approvals (id),
    review_item_id  TEXT REFERENCES review_items (id),
    channel         TEXT NOT NULL,
    event           TEXT NOT NULL,
    payload         TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT,
    last_error      TEXT,
    delivered_at    BIGINT,
    receipt         TEXT,
    CHECK ((approval_id IS NULL) <> (review_item_id IS NULL))
);
CREATE INDEX notifications_due ON notifications (next_attempt_at) WHERE next_attempt_at IS NOT NULL;
CREATE INDEX notifications_approval ON notifications (approval_id);
CREATE INDEX notifications_review_item ON notifications (review_item_id);
