-- Resume returns an agent to the state it was suspended from: a `pending`
-- agent (its provisioning approval not yet granted) goes back to `pending`,
-- never to `active` on one admin's word.
ALTER TABLE agents ADD COLUMN suspended_from TEXT;
