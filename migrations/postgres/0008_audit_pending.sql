-- A transaction's audit events, staged with its change and chained into
-- audit_events moments later by a replica's chainer
-- (src/store/postgres/chain.rs): one row a transaction, its events in order
-- as JSON text, kept byte for byte (not jsonb, which would reorder keys).
-- Every read of the log chains what is pending first.
CREATE TABLE audit_pending (
    id     BIGSERIAL PRIMARY KEY,
    events TEXT NOT NULL
);
