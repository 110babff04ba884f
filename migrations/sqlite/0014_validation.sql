-- Continuous validation.
--
-- A step-up on an agent (JSON: the incident, which scopes, since when):
-- its credential requests need a human until an operator resolves the
-- incident.
ALTER TABLE agents ADD COLUMN step_up TEXT;

-- What each agent was seen to do (networks, scopes, delegates, its learned
-- hourly rate), saved every `snapshot_secs` so a restart keeps it. JSON,
-- never a secret.
CREATE TABLE validation_state (
    agent_id  TEXT PRIMARY KEY,
    state     TEXT NOT NULL,
    saved_at  INTEGER NOT NULL
);

-- The outbox also carries incident alerts: a row is about an approval, a
-- review item or an incident (an `incident.opened` audit event, so no
-- foreign key), exactly one of them.
CREATE TABLE notifications_new (
    id              TEXT PRIMARY KEY,
    approval_id     TEXT REFERENCES approvals (id),
    review_item_id  TEXT REFERENCES review_items (id),
    incident_id     TEXT,
    channel         TEXT NOT NULL,            -- slack | webhook:<name>
    event           TEXT NOT NULL,            -- requested | decided | reply | review_* | incident_opened
    payload         TEXT NOT NULL,            -- JSON, never secret
    created_at      INTEGER NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER,                  -- NULL once delivered or dropped
    last_error      TEXT,
    delivered_at    INTEGER,
    receipt         TEXT,                     -- JSON: what the channel answered (a Slack ts)
    CHECK ((approval_id IS NOT NULL) + (review_item_id IS NOT NULL) + (incident_id IS NOT NULL) = 1)
);
INSERT INTO notifications_new (id, approval_id, review_item_id, channel, event, payload, created_at,
                               attempts, next_attempt_at, last_error, delivered_at, receipt)
    SELECT id, approval_id, review_item_id, channel, event, payload, created_at, attempts,
           next_attempt_at, last_error, delivered_at, receipt FROM notifications;
DROP TABLE notifications;
ALTER TABLE notifications_new RENAME TO notifications;
CREATE INDEX notifications_due ON notifications (next_attempt_at) WHERE next_attempt_at IS NOT NULL;
CREATE INDEX notifications_approval ON notifications (approval_id);
CREATE INDEX notifications_review_item ON notifications (review_item_id);
