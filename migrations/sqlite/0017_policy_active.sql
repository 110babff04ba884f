-- The policy set the broker decides with: the one it last started with or
-- reloaded (its files, by name). With provisioning approval on, a start
-- whose policy files on disk differ from it starts on this set and reloads
-- the files as a reload would, so a widening edited on disk waits for its
-- approval across a restart too (server.rs, `build_broker`).
CREATE TABLE policy_active (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    hash        TEXT NOT NULL,
    files       TEXT NOT NULL,
    at          INTEGER NOT NULL
);
