-- Governance: reissue links and execution methods, notices outbox, manual refunds.

ALTER TABLE refund_cases
    ADD COLUMN parent_refund_request_id TEXT REFERENCES refund_cases (refund_request_id),
    ADD COLUMN method TEXT NOT NULL DEFAULT 'provider';
CREATE INDEX refund_cases_parent ON refund_cases (parent_refund_request_id)
    WHERE parent_refund_request_id IS NOT NULL;

-- Transactional outbox of notices (operator, customer, approvers); the integrations
-- deliver them. One row per dedup key, so a retried activity never notifies twice.
CREATE TABLE notices (
    id                 BIGSERIAL PRIMARY KEY,
    dedup_key          TEXT NOT NULL UNIQUE,
    refund_request_id  TEXT,
    kind               TEXT NOT NULL,
    audience           TEXT NOT NULL,
    detail             JSONB NOT NULL DEFAULT '{}'::jsonb,
    created_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    delivered_at       TIMESTAMPTZ
);
CREATE INDEX notices_undelivered ON notices (created_at) WHERE delivered_at IS NULL;

-- Refunds paid outside a provider (bank transfer, cash): an instruction ops carry out
-- and confirm; the case workflow treats it like a provider refund.
CREATE TABLE manual_refunds (
    id                 TEXT PRIMARY KEY,
    refund_request_id  TEXT NOT NULL UNIQUE REFERENCES refund_cases (refund_request_id),
    charge_id          TEXT NOT NULL,
    amount             BIGINT NOT NULL CHECK (amount > 0),
    currency           TEXT NOT NULL,
    method             TEXT NOT NULL,
    status             TEXT NOT NULL,
    failure_reason     TEXT,
    created_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    confirmed_by       TEXT,
    confirmed_at       TIMESTAMPTZ
);
