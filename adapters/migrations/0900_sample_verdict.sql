-- A provider's sample notification (Adyen's webhook test: signed with the real key, for a real
-- merchant account, pspReference `test_…`): acknowledged so the test passes, kept like every
-- signed receipt, acting on nothing. It was taken for the provider's word.
ALTER TABLE webhook_receipts DROP CONSTRAINT webhook_receipts_verdict_check;
ALTER TABLE webhook_receipts ADD CONSTRAINT webhook_receipts_verdict_check CHECK (verdict IN (
    'accepted', 'duplicate', 'bad_signature', 'stale', 'malformed', 'unknown_type', 'too_large',
    'unknown_provider', 'unexpected_status', 'forbidden_source', 'foreign_account', 'unreadable',
    'invalid_request', 'sample'));
