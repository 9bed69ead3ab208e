-- A notice the sweeper could not deliver everywhere is swept again after a delay, up to a
-- bound of tries (`attempts`, shared with the dispatcher's notices), instead of once: for
-- reconciliation breaks' and payout cases' notices the sweeper is the only courier. The
-- index covers what the sweep reads; its bound is `OutboxRepository.SWEEP_ATTEMPTS`.
-- Notices swept (once) before this change and never delivered count as done: sweeping them
-- now would send months-old notices of long-settled cases.
UPDATE notices SET attempts = 8 WHERE swept_at IS NOT NULL AND delivered_at IS NULL
    AND dispatch_queue IS NULL;
DROP INDEX IF EXISTS notices_unswept;
CREATE INDEX notices_sweepable ON notices (id)
    WHERE delivered_at IS NULL AND dispatch_queue IS NULL AND attempts < 8;
