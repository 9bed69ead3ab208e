-- The console lists every break waiting for approval, longest waiting first, whatever run
-- found it: a small partial index keeps that read off the table's resolved history.
CREATE INDEX reconciliation_breaks_waiting ON reconciliation_breaks (found_at, id)
    WHERE state = 'awaiting_approval';
