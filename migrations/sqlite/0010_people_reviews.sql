-- Governance, part two: per-agent TTL caps, registry exclusions, the people
-- directory's departures and access review campaigns.

-- The longest any session or credential of the agent may live (NULL: the
-- broker's and the scopes' limits only).
ALTER TABLE agents ADD COLUMN max_ttl_secs INTEGER;
-- Scopes the registry denies the agent whatever policy says, until an admin
-- lifts them: JSON object scope -> {reason, by, at}.
ALTER TABLE agents ADD COLUMN excluded_scopes TEXT NOT NULL DEFAULT '{}';
-- When its keys last changed (NULL: never since registration).
ALTER TABLE agents ADD COLUMN keys_rotated_at INTEGER;

-- People who left, by email: marked through the API, or noticed by the sweep
-- when a sponsor is no longer in the directory. The directory itself is
-- config (`[[people]]`, operators' emails); this is what changed since.
CREATE TABLE departures (
    email       TEXT PRIMARY KEY,
    departed_at INTEGER NOT NULL,
    actor       TEXT NOT NULL,
    reason      TEXT NOT NULL
);

-- An access review campaign and its items, one per agent in scope.
CREATE TABLE review_campaigns (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    team        TEXT,                    -- NULL: every team
    created_at  INTEGER NOT NULL,
    created_by  TEXT NOT NULL,
    due_at      INTEGER NOT NULL
);
CREATE TABLE review_items (
    id            TEXT PRIMARY KEY,
    campaign_id   TEXT NOT NULL REFERENCES review_campaigns (id),
    agent_id      TEXT NOT NULL REFERENCES agents (id),
    reviewer      TEXT NOT NULL,         -- email: the sponsor, else the team's lead
    attestations  INTEGER NOT NULL,      -- distinct attestations needed
    snapshot      TEXT NOT NULL,         -- JSON: what the reviewer is shown
    state         TEXT NOT NULL,         -- open | attested | narrowed | retired | cancelled
    decisions     TEXT NOT NULL DEFAULT '[]', -- JSON: [{by, email, decision, scopes, note, at}]
    decided_at    INTEGER,
    escalated_at  INTEGER,
    UNIQUE (campaign_id, agent_id)
);
CREATE INDEX review_items_open ON review_items (state, campaign_id);
CREATE INDEX review_items_agent ON review_items (agent_id);
