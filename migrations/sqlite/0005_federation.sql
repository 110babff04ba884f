-- Workload identity federation: an agent may be bound to exactly one subject
-- of one trusted issuer, and a subject to at most one agent.
ALTER TABLE agents ADD COLUMN federated_issuer TEXT;
ALTER TABLE agents ADD COLUMN federated_subject TEXT;
CREATE UNIQUE INDEX agents_federated ON agents (federated_issuer, federated_subject)
    WHERE federated_issuer IS NOT NULL;
