-- Reconciliation, finished: a run reads the provider's refunds and then its payouts (the
-- phase says which list the cursor belongs to); an object with a status no adapter maps is
-- a break left to ops (`ops_review`); dismissed and expired breaks can be reopened, and
-- `reopened` counts it (the exception case stays one per break).

ALTER TABLE reconciliation_runs
    ADD COLUMN phase TEXT NOT NULL DEFAULT 'refunds' CHECK (phase IN ('refunds', 'payouts'));

ALTER TABLE reconciliation_breaks
    ADD COLUMN reopened INT NOT NULL DEFAULT 0,
    DROP CONSTRAINT reconciliation_breaks_state_check,
    ADD CONSTRAINT reconciliation_breaks_state_check CHECK (state IN (
        'new', 'handed_to_case', 'awaiting_approval', 'resolved', 'dismissed', 'expired',
        'ops_review'));
