-- Approvals: human sign-off for sensitive credentials and provisioning
-- changes (new agents, widened permissions). Decisions are rows of their own;
-- the primary key makes "nobody decides twice" a database rule.
CREATE TABLE approvals (
    id              TEXT PRIMARY KEY,
    kind            TEXT NOT NULL,            -- credential | provisioning
    state           TEXT NOT NULL,            -- pending | approved | denied | expired | cancelled
    requester       TEXT NOT NULL,            -- audit actor: agent:<id> | operator:<name> | system
    agent_id        TEXT NOT NULL REFERENCES agents (id),
    task_id         TEXT REFERENCES tasks (id),
    scope           TEXT,
    request         TEXT NOT NULL,            -- JSON: what is asked (ttl and params, or the change)
    justification   TEXT NOT NULL,
    required        INTEGER NOT NULL CHECK (required >= 1),
    approver_teams  TEXT NOT NULL,            -- JSON array; empty = any approver
    sponsor         TEXT NOT NULL,            -- the agent's sponsor when the request was made
    sponsor_alone   INTEGER NOT NULL,         -- 1: the sponsor may be the only approver
    confirm_in_api  INTEGER NOT NULL,         -- 1: Slack links to the API instead of deciding
    created_at      INTEGER NOT NULL,
    expires_at      INTEGER NOT NULL,
    decided_at      INTEGER,
    end_reason      TEXT,
    redeemed_at     INTEGER,
    lease_id        TEXT
);
CREATE INDEX approvals_state ON approvals (state, expires_at);
CREATE INDEX approvals_task ON approvals (task_id) WHERE task_id IS NOT NULL;
CREATE INDEX approvals_agent ON approvals (agent_id);

CREATE TABLE approval_decisions (
    approval_id TEXT NOT NULL REFERENCES approvals (id),
    operator    TEXT NOT NULL,
    decision    TEXT NOT NULL,                -- approve | deny
    channel     TEXT NOT NULL,                -- api | slack
    reason      TEXT,
    at          INTEGER NOT NULL,
    PRIMARY KEY (approval_id, operator)
);

-- The notification outbox: written in the same commit as the approval, so a
-- crash or a channel outage delays a notification but never loses it.
CREATE TABLE notifications (
    id              TEXT PRIMARY KEY,
    approval_id     TEXT NOT NULL REFERENCES approvals (id),
    channel         TEXT NOT NULL,            -- slack | webhook:<name>
    event           TEXT NOT NULL,            -- requested | decided | reply
    payload         TEXT NOT NULL,            -- JSON, never secret
    created_at      INTEGER NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER,                  -- NULL once delivered or dropped
    last_error      TEXT,
    delivered_at    INTEGER,
    receipt         TEXT                      -- JSON: what the channel answered (a Slack ts)
);
CREATE INDEX notifications_due ON notifications (next_attempt_at) WHERE next_attempt_at IS NOT NULL;
CREATE INDEX notifications_approval ON notifications (approval_id);

-- Signed inbound hook requests seen, kept for the replay window.
CREATE TABLE hook_replays (
    digest      TEXT PRIMARY KEY,
    expires_at  INTEGER NOT NULL
);
CREATE INDEX hook_replays_expiry ON hook_replays (expires_at);
