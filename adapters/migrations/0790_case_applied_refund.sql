-- What the case's refund workflow itself applied: the provider refund and status written
-- by its own case steps (write_case_steps), never by reconciliation, the submit's record or
-- ops. The relay compares a webhook with it and does not signal one that would change
-- nothing in the workflow (the same refund in the same settled status): a signal, a workflow
-- task and, at the close, a task run again saved per repeated event. NULL (executions before
-- issue 21's shape, tracking cases): every event is signalled, as before.
ALTER TABLE refund_cases ADD COLUMN applied_refund_id TEXT, ADD COLUMN applied_status TEXT;
