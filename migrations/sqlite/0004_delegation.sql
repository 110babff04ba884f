-- Delegation (RFC 8693 token exchange): a sub-agent's task hangs under its
-- orchestrator's task, holds at most the scopes it was given, and ends with it.
ALTER TABLE agents ADD COLUMN delegation TEXT NOT NULL DEFAULT '{"max_depth":0,"targets":[]}';

ALTER TABLE tasks ADD COLUMN parent_task_id TEXT REFERENCES tasks (id);
ALTER TABLE tasks ADD COLUMN depth INTEGER NOT NULL DEFAULT 0;
-- How many more levels of delegation may hang below this task.
ALTER TABLE tasks ADD COLUMN delegation_budget INTEGER NOT NULL DEFAULT 0;
-- JSON array of scope names; NULL: whatever policy allows the agent.
ALTER TABLE tasks ADD COLUMN scopes TEXT;
-- JSON array of the delegating agents, the root orchestrator first.
ALTER TABLE tasks ADD COLUMN chain TEXT NOT NULL DEFAULT '[]';
CREATE INDEX tasks_parent ON tasks (parent_task_id) WHERE parent_task_id IS NOT NULL;
