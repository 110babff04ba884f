-- Leases an emergency revocation found already being revoked for an
-- earlier one: each lease keeps the first revocation's id and counts
-- towards both (the second no longer takes it from the first).
CREATE TABLE revocation_overlaps (
    revocation_id TEXT NOT NULL,
    lease_id      TEXT NOT NULL,
    PRIMARY KEY (revocation_id, lease_id)
);

-- What a revocation did beside its leases, for its status later.
ALTER TABLE revocations ADD COLUMN agents_suspended BIGINT NOT NULL DEFAULT 0;
ALTER TABLE revocations ADD COLUMN fence_failures TEXT NOT NULL DEFAULT '[]';
