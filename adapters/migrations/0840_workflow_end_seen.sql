-- The closed-workflow sweep marks a case whose ended workflow left it as it should be (in ops
-- review on purpose, or remediated past its reissue window): it is not asked about again on
-- every pass, for good, until something moves it: the mark is the `updated_at` it saw, and
-- any later write stamps another.
ALTER TABLE refund_cases ADD COLUMN workflow_end_seen_at TIMESTAMPTZ;
ALTER TABLE payout_cases ADD COLUMN workflow_end_seen_at TIMESTAMPTZ;
