-- The outbox also carries review reminders: a row is about an approval or
-- a review item, exactly one of them, so both columns are nullable
-- references with a check.
CREATE TABLE notifications_new (
    id              TEXT PRIMARY KEY,
    approval_id     TEXT REFERENCES approvals (id),
    review_item_id  TEXT REFERENCES review_items (id),
    channel         TEXT NOT NULL,            -- slack | webhook:<name>
    event           TEXT NOT NULL,            -- requested | decided | reply | review_requested | review_escalated | review_decided
    payload         TEXT NOT NULL,            -- JSON, never secret
    created_at      INTEGER NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER,                  -- NULL once delivered or dropped
    last_error      TEXT,
    delivered_at    INTEGER,
    receipt         TEXT,                     -- JSON: what the channel answered (a Slack ts)
    CHECK ((approval_id IS NULL) <> (review_item_id IS NULL))
);
INSERT INTO notifications_new (id, approval_id, channel, event, payload, created_at, attempts,
                               next_attempt_at, last_error, delivered_at, receipt)
    SELECT id, approval_id, channel, event, payload, created_at, attempts,
           next_attempt_at, last_error, delivered_at, receipt FROM notifications;
DROP TABLE notifications;
ALTER TABLE notifications_new RENAME TO notifications;
CREATE INDEX notifications_due ON notifications (next_attempt_at) WHERE next_attempt_at IS NOT NULL;
CREATE INDEX notifications_approval ON notifications (approval_id);
CREATE INDEX notifications_review_item ON notifications (review_item_id);
