-- The approvals a case shows (who asked, granted, denied, refused; when; why; the roles of a
-- grant), one row per approval step. Written by the audit log in the same transaction as the
-- step's audit row (adapters/db/audit.py), so it can never disagree with the trail; read by
-- the API and the console instead of parsing the trail. Filled here from the trail so cases
-- from before keep their approvals. Re-runnable: a second run adds nothing.
CREATE TABLE IF NOT EXISTS case_approvals (
    chain        TEXT NOT NULL,
    seq          BIGINT NOT NULL,
    approver     TEXT NOT NULL,
    action       TEXT NOT NULL,
    roles        TEXT[] NOT NULL DEFAULT '{}',
    reason       TEXT NOT NULL DEFAULT '',
    occurred_at  TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (chain, seq),
    FOREIGN KEY (chain, seq) REFERENCES audit_events (chain, seq)
);

INSERT INTO case_approvals (chain, seq, approver, action, roles, reason, occurred_at)
SELECT chain, seq, actor, action,
       CASE WHEN jsonb_typeof(detail->'roles') = 'array'
            THEN ARRAY(SELECT jsonb_array_elements_text(detail->'roles')) ELSE '{}' END,
       coalesce(nullif(detail->>'reason', ''), nullif(detail->>'refusal', ''), ''),
       occurred_at
FROM audit_events WHERE action LIKE 'approval\_%'
ON CONFLICT (chain, seq) DO NOTHING;
