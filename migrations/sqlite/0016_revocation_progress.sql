-- A kill switch's progress (leases of one revocation counted by state) is
-- read from the index alone: over 100,000 leases, a lookup of every row
-- per poll was what slowed the revocation it reported on.
DROP INDEX leases_revocation;
CREATE INDEX leases_revocation ON leases (revocation_id, state) WHERE revocation_id IS NOT NULL;
