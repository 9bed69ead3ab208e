-- A reconciliation run ends `completed` or `failed` (with the reason, so the CLI, the API and
-- the console can say why instead of showing it running forever); a list the provider refused
-- while the rest of the run went on (payouts, for a key restricted to refunds) is a warning.

ALTER TABLE reconciliation_runs
    ADD COLUMN warnings JSONB NOT NULL DEFAULT '[]'::jsonb,
    ADD COLUMN failure TEXT,
    DROP CONSTRAINT reconciliation_runs_state_check,
    ADD CONSTRAINT reconciliation_runs_state_check CHECK (state IN ('running', 'completed', 'failed'));
