-- A payout case whose compensating entry did not land in time, where policy keeps the hold,
-- gives the entry up under the case row's lock: an attempt still running can no longer post
-- behind a case that told finance the entry failed (they would post it by hand again).
ALTER TABLE payout_cases ADD COLUMN reversal_given_up_at TIMESTAMPTZ;
