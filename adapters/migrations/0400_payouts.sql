-- Payout reversals: internal payouts, one exception case per payout, beneficiary holds.

-- Payouts as our books hold them (the internal payments system writes them; a reissue
-- of ours too). held_from_status is the status a hold returns to on rollback.
CREATE TABLE payouts (
    id                  TEXT PRIMARY KEY,
    provider            TEXT   NOT NULL,
    provider_payout_id  TEXT   NOT NULL,
    beneficiary_id      TEXT   NOT NULL,
    amount              BIGINT NOT NULL CHECK (amount > 0),
    currency            TEXT   NOT NULL,
    status              TEXT   NOT NULL CHECK (status IN ('paid', 'failed', 'reversed', 'on_hold')),
    held_from_status    TEXT   CHECK (held_from_status IN ('paid', 'failed', 'reversed')),
    reissue_of          TEXT   REFERENCES payouts (id),
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (provider, provider_payout_id),
    CHECK ((status = 'on_hold') = (held_from_status IS NOT NULL))
);
CREATE INDEX payouts_beneficiary ON payouts (beneficiary_id);
-- A payout is reissued at most once, whatever retries or requests happen.
CREATE UNIQUE INDEX payouts_one_reissue ON payouts (reissue_of) WHERE reissue_of IS NOT NULL;

-- The exception case of a payout (case_id == workflow id == <provider>-payout-<payout id>).
-- reversal_entry_id is set in the transaction that posts the compensating entry, under
-- this row's lock: a rollback of the hold takes the same lock, so a late posting and a
-- rollback can never both happen.
CREATE TABLE payout_cases (
    case_id            TEXT PRIMARY KEY,
    payout_id          TEXT   NOT NULL UNIQUE REFERENCES payouts (id),
    status             TEXT   NOT NULL,
    reported_status    TEXT   NOT NULL,
    failure_code       TEXT,
    decision           JSONB,
    recommendation     JSONB,
    ticket_ref         TEXT,
    reversal_entry_id  BIGINT REFERENCES ledger_entries (id),
    created_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at         TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- A beneficiary whose payout failed gets no further payouts while a hold is active
-- (released_at IS NULL); the internal payments system reads this before paying out.
CREATE TABLE beneficiary_holds (
    beneficiary_id  TEXT NOT NULL,
    case_id         TEXT NOT NULL REFERENCES payout_cases (case_id),
    placed_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    released_at     TIMESTAMPTZ,
    PRIMARY KEY (beneficiary_id, case_id)
);
CREATE INDEX beneficiary_holds_active ON beneficiary_holds (beneficiary_id) WHERE released_at IS NULL;
