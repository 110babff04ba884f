-- Where each credential was asked from (the client address the broker saw),
-- written with the lease itself: per-scope usage lists the addresses seen
-- without one extra write per request.
ALTER TABLE leases ADD COLUMN source TEXT;
-- When the agent's team or sponsor last changed: it must be reviewed within
-- the lifecycle's `deprovision_within_hours` of that.
ALTER TABLE agents ADD COLUMN owner_changed_at INTEGER;
