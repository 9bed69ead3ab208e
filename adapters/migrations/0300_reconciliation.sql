-- Reconciliation: runs over a provider's objects in a window, the breaks they find (one
-- exception case per provider, object and class, however often it is found again), and
-- which runs saw which breaks (for per-run reports).

CREATE TABLE reconciliation_runs (
    id              TEXT PRIMARY KEY,
    provider        TEXT        NOT NULL,
    task_queue      TEXT        NOT NULL,  -- the deployment that runs it
    kind            TEXT        NOT NULL CHECK (kind IN ('scheduled', 'backfill')),
    window_start    TIMESTAMPTZ NOT NULL,
    window_end      TIMESTAMPTZ NOT NULL CHECK (window_end > window_start),
    requested_by    TEXT        NOT NULL,
    state           TEXT        NOT NULL DEFAULT 'running' CHECK (state IN ('running', 'completed')),
    -- Where the run stands: the provider's cursor (the last object read, newest first) and
    -- that object's creation time, written in the transaction that stored its batch.
    cursor          TEXT,
    cursor_created  TIMESTAMPTZ,
    objects_seen    BIGINT      NOT NULL DEFAULT 0,
    batches         BIGINT      NOT NULL DEFAULT 0,
    report_files    JSONB       NOT NULL DEFAULT '[]'::jsonb,
    started_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at     TIMESTAMPTZ
);
CREATE INDEX reconciliation_runs_recent ON reconciliation_runs (started_at DESC);
-- One unfinished backfill per provider and deployment: asking again resumes it.
CREATE UNIQUE INDEX reconciliation_runs_open_backfill ON reconciliation_runs (provider, task_queue)
    WHERE kind = 'backfill' AND state = 'running';

CREATE TABLE reconciliation_breaks (
    id                 BIGSERIAL PRIMARY KEY,
    provider           TEXT        NOT NULL,
    object_kind        TEXT        NOT NULL DEFAULT 'refund',
    object_id          TEXT        NOT NULL,
    break_class        TEXT        NOT NULL,
    refund_request_id  TEXT,       -- the case; NULL while the object is unknown to us
    chain              TEXT        NOT NULL,  -- audit chain: the case, or the tracking case it would open
    charge_id          TEXT        NOT NULL,
    amount             BIGINT      NOT NULL,  -- the provider's, minor units of `currency`
    currency           TEXT        NOT NULL,
    provider_status    TEXT        NOT NULL,
    raw_status         TEXT        NOT NULL,
    failure_reason     TEXT,
    case_status        TEXT,
    ledger_delta       BIGINT,     -- what brings the ledger to the provider's truth; NULL: not computable
    object_created_at  TIMESTAMPTZ NOT NULL,
    evidence           JSONB       NOT NULL,
    first_run_id       TEXT        NOT NULL REFERENCES reconciliation_runs (id),
    found_at           TIMESTAMPTZ NOT NULL DEFAULT now(),
    state              TEXT        NOT NULL DEFAULT 'new' CHECK (state IN (
                           'new', 'handed_to_case', 'awaiting_approval', 'resolved', 'dismissed',
                           'expired')),
    dispatched_at      TIMESTAMPTZ,
    resolved_at        TIMESTAMPTZ,
    resolution         JSONB,
    UNIQUE (provider, object_id, break_class)
);
CREATE INDEX reconciliation_breaks_undispatched ON reconciliation_breaks (first_run_id)
    WHERE dispatched_at IS NULL;

CREATE TABLE reconciliation_run_breaks (
    run_id    TEXT   NOT NULL REFERENCES reconciliation_runs (id),
    break_id  BIGINT NOT NULL REFERENCES reconciliation_breaks (id),
    PRIMARY KEY (run_id, break_id)
);

-- The classification joins every provider object to its case's ledger position.
CREATE INDEX ledger_entries_case ON ledger_entries (refund_request_id);
