-- The worker pool's notice dispatcher (issue 21): a refund case queues its notices in its
-- steps' transactions and no longer delivers them from an activity of its own. A notice
-- names the task queue whose workers deliver it (NULL: a workflow's courier does, or the
-- sweeper after its grace); each is tried in order within its case, again after a certain
-- failure with backoff, and `dispatched_at` is set once it is done with (delivered, no
-- channel for it, or given up).
ALTER TABLE notices ADD COLUMN dispatch_queue TEXT,
    ADD COLUMN attempts INT NOT NULL DEFAULT 0,
    ADD COLUMN next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    ADD COLUMN claimed_until TIMESTAMPTZ,
    ADD COLUMN dispatched_at TIMESTAMPTZ;
CREATE INDEX notices_to_dispatch ON notices (dispatch_queue, id)
    WHERE dispatch_queue IS NOT NULL AND dispatched_at IS NULL;
CREATE INDEX notices_pending_by_case ON notices (refund_request_id, id)
    WHERE dispatch_queue IS NOT NULL AND dispatched_at IS NULL;
