-- Acting for a user: a task may carry a user context (from a verified user
-- ID token, or asserted by an agent an admin allowed to), which policy
-- evaluates beside the agent and every audit event of the task records.
ALTER TABLE agents ADD COLUMN may_assert_users INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN on_behalf_of TEXT;           -- JSON {id, issuer, groups}
ALTER TABLE audit_events ADD COLUMN on_behalf_of TEXT;    -- the task's user id
