-- Foundation schema: receipts, cases with reservations, double-entry ledger, audit, tokens.

CREATE TABLE webhook_receipts (
    id            BIGSERIAL PRIMARY KEY,
    provider      TEXT        NOT NULL,
    event_id      TEXT,
    event_type    TEXT,
    received_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    body_sha256   TEXT        NOT NULL,
    body          BYTEA,
    headers       JSONB       NOT NULL DEFAULT '{}'::jsonb,
    verdict       TEXT        NOT NULL CHECK (verdict IN (
                      'accepted', 'duplicate', 'bad_signature', 'stale', 'malformed',
                      'unknown_type', 'too_large', 'unknown_provider')),
    error         TEXT,
    workflow_id   TEXT,
    processed_at  TIMESTAMPTZ
);
CREATE INDEX webhook_receipts_event ON webhook_receipts (provider, event_id);
CREATE INDEX webhook_receipts_unprocessed ON webhook_receipts (received_at)
    WHERE verdict = 'accepted' AND processed_at IS NULL;

-- The dedup gate: one row per provider event; the first receipt owns it.
CREATE TABLE webhook_events (
    provider          TEXT   NOT NULL,
    event_id          TEXT   NOT NULL,
    first_receipt_id  BIGINT NOT NULL REFERENCES webhook_receipts (id),
    PRIMARY KEY (provider, event_id)
);

-- Anchor row per charge: locked while reservations are taken, so concurrent requests
-- from every entry point serialise on it.
CREATE TABLE charges (
    provider         TEXT   NOT NULL,
    charge_id        TEXT   NOT NULL,
    currency         TEXT   NOT NULL,
    amount_captured  BIGINT NOT NULL CHECK (amount_captured >= 0),
    updated_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, charge_id)
);

CREATE TABLE refund_cases (
    refund_request_id      TEXT PRIMARY KEY,
    provider               TEXT        NOT NULL,
    charge_id              TEXT        NOT NULL,
    amount                 BIGINT      NOT NULL CHECK (amount > 0),
    currency               TEXT        NOT NULL,
    merchant_account       TEXT        NOT NULL,
    reason                 TEXT        NOT NULL,
    evidence               JSONB       NOT NULL DEFAULT '{}'::jsonb,
    source                 TEXT        NOT NULL,
    requester              TEXT        NOT NULL,
    params_hash            TEXT        NOT NULL,
    status                 TEXT        NOT NULL,
    reserved_amount        BIGINT      NOT NULL DEFAULT 0 CHECK (reserved_amount >= 0),
    provider_refund_id     TEXT,
    provider_status        TEXT,
    failure_reason         TEXT,
    decision               JSONB,
    submission_started_at  TIMESTAMPTZ,
    created_at             TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at             TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX refund_cases_charge ON refund_cases (provider, charge_id);
CREATE UNIQUE INDEX refund_cases_provider_refund ON refund_cases (provider, provider_refund_id)
    WHERE provider_refund_id IS NOT NULL;

-- Double-entry journal: every entry balances (checked at commit), postings idempotent by key.
CREATE TABLE ledger_entries (
    id                 BIGSERIAL PRIMARY KEY,
    posting_key        TEXT NOT NULL UNIQUE,
    refund_request_id  TEXT NOT NULL,
    template           TEXT NOT NULL,
    posted_at          TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE ledger_lines (
    id        BIGSERIAL PRIMARY KEY,
    entry_id  BIGINT NOT NULL REFERENCES ledger_entries (id),
    account   TEXT   NOT NULL,
    debit     BIGINT NOT NULL DEFAULT 0 CHECK (debit >= 0),
    credit    BIGINT NOT NULL DEFAULT 0 CHECK (credit >= 0),
    currency  TEXT   NOT NULL,
    CHECK ((debit = 0) <> (credit = 0))
);
CREATE INDEX ledger_lines_entry ON ledger_lines (entry_id);

CREATE FUNCTION ledger_entry_balances() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (
        SELECT 1 FROM ledger_lines WHERE entry_id = NEW.entry_id
        GROUP BY currency HAVING sum(debit) <> sum(credit)
    ) THEN
        RAISE EXCEPTION 'ledger entry % does not balance', NEW.entry_id;
    END IF;
    RETURN NULL;
END $$;

CREATE CONSTRAINT TRIGGER ledger_lines_balance
    AFTER INSERT OR UPDATE ON ledger_lines
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION ledger_entry_balances();

-- Audit trail: append-only (enforced by the database, not by discipline) and
-- hash-chained: one chain per case (chain '' for events of no case); each row carries
-- the previous row's hash, and the chain's head is kept in audit_heads.
CREATE TABLE audit_events (
    id                 BIGSERIAL PRIMARY KEY,
    chain              TEXT NOT NULL,
    seq                BIGINT NOT NULL,
    refund_request_id  TEXT,
    occurred_at        TIMESTAMPTZ NOT NULL,
    actor              TEXT NOT NULL,
    action             TEXT NOT NULL,
    detail             JSONB NOT NULL DEFAULT '{}'::jsonb,
    prev_hash          TEXT NOT NULL,
    hash               TEXT NOT NULL,
    UNIQUE (chain, seq)
);
CREATE INDEX audit_events_case ON audit_events (refund_request_id, id);

CREATE TABLE audit_heads (
    chain  TEXT PRIMARY KEY,
    seq    BIGINT NOT NULL,
    hash   TEXT NOT NULL
);

CREATE FUNCTION audit_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_events is append-only';
END $$;

CREATE TRIGGER audit_events_no_update BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_append_only();
CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only();

CREATE TABLE api_tokens (
    id          BIGSERIAL PRIMARY KEY,
    user_name   TEXT   NOT NULL,
    roles       TEXT[] NOT NULL,
    token_hash  TEXT   NOT NULL UNIQUE,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    revoked_at  TIMESTAMPTZ
);
