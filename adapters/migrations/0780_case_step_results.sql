-- A case step's answer, kept with its writes (issue 21's local activities). A local
-- activity runs again whenever its workflow task does not complete (the worker died before
-- reporting, or a signal landed while the task tried to close the workflow); the step's key
-- (workflow run, activity id and the input's digest: the same in every run of the step)
-- finds the first run's answer, committed in the same transaction as its writes, so a
-- second run writes nothing again.
-- Pruned after a retention by the worker's pruning loop.
CREATE TABLE case_step_results (
    step_key          TEXT PRIMARY KEY,
    refund_request_id TEXT NOT NULL,
    result            JSONB NOT NULL,
    recorded_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX case_step_results_age ON case_step_results (recorded_at);
