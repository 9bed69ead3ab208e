-- Incidents a case raises itself (a second provider refund carrying its reference) are
-- recorded as reconciliation breaks too, so ops work them where they work every other
-- difference. A break needs the run that found it: an `incident` run, completed at once.

ALTER TABLE reconciliation_runs
    DROP CONSTRAINT reconciliation_runs_kind_check,
    ADD CONSTRAINT reconciliation_runs_kind_check CHECK (kind IN ('scheduled', 'backfill', 'incident'));
