-- A signed delivery no rule can read (a field out of range, more decimals than its currency,
-- text PostgreSQL cannot store): the provider's own word, kept like any signed receipt and
-- logged loudly, never pruned with the refused traffic `malformed` now names (unsigned).
ALTER TABLE webhook_receipts DROP CONSTRAINT webhook_receipts_verdict_check;
ALTER TABLE webhook_receipts ADD CONSTRAINT webhook_receipts_verdict_check CHECK (verdict IN (
    'accepted', 'duplicate', 'bad_signature', 'stale', 'malformed', 'unknown_type', 'too_large',
    'unknown_provider', 'unexpected_status', 'forbidden_source', 'foreign_account', 'unreadable'));
