-- The people behind a case's triggering event (e.g. a ticket's opener) are kept with the
-- case, so a reissue, a policy simulation or the console knows who may not approve it.
ALTER TABLE refund_cases ADD COLUMN trigger_identities TEXT[] NOT NULL DEFAULT '{}';
