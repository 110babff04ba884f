-- Continuous validation (as SQLite's 0014_validation.sql).
--
-- A step-up on an agent (JSON: the incident, which scopes, since when).
ALTER TABLE agents ADD COLUMN step_up TEXT;

-- What each agent was seen to do, saved every `snapshot_secs` (JSON).
CREATE TABLE validation_state (
    agent_id  TEXT PRIMARY KEY,
    state     TEXT NOT NULL,
    saved_at  BIGINT NOT NULL
);

-- The outbox also carries incident alerts: exactly one of an approval, a
-- review item or an incident.
ALTER TABLE notifications ADD COLUMN incident_id TEXT;
ALTER TABLE notifications DROP CONSTRAINT notifications_check;
ALTER TABLE notifications ADD CONSTRAINT notifications_subject CHECK (
    (approval_id IS NOT NULL)::int + (review_item_id IS NOT NULL)::int + (incident_id IS NOT NULL)::int = 1
);
