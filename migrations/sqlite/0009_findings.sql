-- Governance findings: a compliance issue of one agent (and, for an unused
-- scope, one scope) from when the sweep found it until it was resolved.
-- At most one open finding per (agent, kind, subject).
CREATE TABLE findings (
    id TEXT PRIMARY KEY,
    agent_id TEXT NOT NULL REFERENCES agents (id),
    kind TEXT NOT NULL,
    subject TEXT NOT NULL DEFAULT '',
    detail TEXT NOT NULL,
    opened_at INTEGER NOT NULL,
    -- When the lifecycle action falls due (NULL: notify only).
    action_due_at INTEGER,
    action TEXT,
    acted_at INTEGER,
    closed_at INTEGER,
    close_reason TEXT
);
CREATE UNIQUE INDEX findings_open ON findings (agent_id, kind, subject) WHERE closed_at IS NULL;
CREATE INDEX findings_agent ON findings (agent_id, opened_at);
-- Per-scope last use is read from the leases an agent was issued.
CREATE INDEX leases_agent_scope ON leases (agent_id, scope, created_at);
