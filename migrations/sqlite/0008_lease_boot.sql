-- The process that wrote a lease. A `pending` lease written by an earlier
-- process is an orphan at once, whatever the clock says: its provider call
-- died with that process (a restart in the same second as the crash too).
ALTER TABLE leases ADD COLUMN boot_id TEXT;
