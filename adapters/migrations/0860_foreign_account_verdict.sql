-- A signed notification of a merchant account this deployment does not serve (Adyen's
-- company-level webhook signs every account with one key): stored, acknowledged, acts on
-- nothing; signed, so kept like any signed receipt (not pruned as refused traffic).
ALTER TABLE webhook_receipts DROP CONSTRAINT webhook_receipts_verdict_check;
ALTER TABLE webhook_receipts ADD CONSTRAINT webhook_receipts_verdict_check CHECK (verdict IN (
    'accepted', 'duplicate', 'bad_signature', 'stale', 'malformed', 'unknown_type', 'too_large',
    'unknown_provider', 'unexpected_status', 'forbidden_source', 'foreign_account'));
