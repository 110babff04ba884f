-- Several replicas on one database.
--
-- A replica is alive while it holds its session-level advisory lock
-- (class 19298, key `lock_key`) on a connection of its own: PostgreSQL
-- drops the lock the instant that connection ends, so a replica killed with
-- SIGKILL is known dead at once, even if a new one starts the same second.
CREATE TABLE replicas (
    boot_id     TEXT PRIMARY KEY,
    lock_key    BIGINT NOT NULL UNIQUE CHECK (lock_key BETWEEN 1 AND 2147483647),
    started_at  BIGINT NOT NULL,
    host        TEXT NOT NULL
);

-- Work a replica took from a queue (the revocation queue, the notification
-- outbox): nobody else takes it while the claim holds and its holder lives;
-- when either ends, any replica may.
ALTER TABLE leases ADD COLUMN claimed_by TEXT;
ALTER TABLE leases ADD COLUMN claim_until BIGINT;
ALTER TABLE notifications ADD COLUMN claimed_by TEXT;
ALTER TABLE notifications ADD COLUMN claim_until BIGINT;

-- Periodic jobs that must run on one replica at a time (the reaper, each
-- provider's sweep, the governance sweep): the holder renews its claim each
-- run; another replica takes over when the claim runs out or its holder is
-- dead.
CREATE TABLE jobs (
    name        TEXT PRIMARY KEY,
    holder      TEXT NOT NULL,
    until_ms    BIGINT NOT NULL
);

-- The local CA's revocation list, shared by every replica (SQLite keeps it
-- in the CA's `revocation_file`). One row per revoked serial or JWT id;
-- every replica reads it on each check, so none serves a stale answer.
CREATE TABLE ca_revocations (
    provider    TEXT NOT NULL,
    kind        TEXT NOT NULL CHECK (kind IN ('serial', 'jti')),
    key         TEXT NOT NULL,
    expires_at  BIGINT NOT NULL,
    revoked_at  BIGINT NOT NULL,
    -- How many more times it was revoked after the first: a repeat is
    -- harmless, and counting it shows whether work was ever done twice.
    repeats     BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (provider, kind, key)
);
CREATE INDEX ca_revocations_expiry ON ca_revocations (expires_at);

-- The policy set every replica decides with: the one a replica last started
-- with or reloaded (its files, by name). The others follow it within a
-- second (`Broker::follow_policy`).
CREATE TABLE policy_active (
    id          BIGINT PRIMARY KEY CHECK (id = 1),
    hash        TEXT NOT NULL,
    files       TEXT NOT NULL,
    at          BIGINT NOT NULL
);
