-- A signed refund request our rules refuse (an unknown currency, an amount past the provider's
-- maximum, an id the provider's rules refuse): the provider's own request, kept like every
-- signed receipt; it was `malformed`, pruned after the refused retention with unsigned traffic.
ALTER TABLE webhook_receipts DROP CONSTRAINT webhook_receipts_verdict_check;
ALTER TABLE webhook_receipts ADD CONSTRAINT webhook_receipts_verdict_check CHECK (verdict IN (
    'accepted', 'duplicate', 'bad_signature', 'stale', 'malformed', 'unknown_type', 'too_large',
    'unknown_provider', 'unexpected_status', 'forbidden_source', 'foreign_account', 'unreadable',
    'invalid_request'));
