-- A fence can now be put up by a policy change as well as by an emergency
-- revocation: `revocation_id` names either (`rv_…`, or `policy-<hash>` for
-- the policy set that stopped permitting the sessions), so it no longer
-- references `revocations`. `expires_at` is when the fence becomes moot
-- (every session it denies has expired): Keygate lifts it then. NULL: it
-- stands until an operator lifts it (the kill switch's fences).
CREATE TABLE fences_new (
    id            TEXT PRIMARY KEY,
    revocation_id TEXT NOT NULL,
    provider      TEXT NOT NULL,
    target        TEXT NOT NULL,
    name          TEXT NOT NULL,
    agent         TEXT,
    description   TEXT NOT NULL,
    handle        TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    lifted_at     INTEGER,
    lifted_by     TEXT,
    lift_reason   TEXT,
    expires_at    INTEGER
);
INSERT INTO fences_new (id, revocation_id, provider, target, name, agent, description,
                        handle, created_at, lifted_at, lifted_by, lift_reason)
    SELECT id, revocation_id, provider, target, name, agent, description,
           handle, created_at, lifted_at, lifted_by, lift_reason FROM fences;
DROP TABLE fences;
ALTER TABLE fences_new RENAME TO fences;
CREATE INDEX fences_revocation ON fences (revocation_id);
CREATE INDEX fences_standing ON fences (provider, target, name) WHERE lifted_at IS NULL;
CREATE INDEX fences_moot ON fences (expires_at) WHERE lifted_at IS NULL AND expires_at IS NOT NULL;
