-- Providers and the relay: more receipt verdicts, replay lineage.
-- webhook_events (the dedup gate) is never pruned: dedup must outlive every provider's
-- retry horizon (Stripe 3 days, Adyen 30 days), so no retention job may touch it.

ALTER TABLE webhook_receipts DROP CONSTRAINT webhook_receipts_verdict_check;
ALTER TABLE webhook_receipts ADD CONSTRAINT webhook_receipts_verdict_check CHECK (verdict IN (
    'accepted', 'duplicate', 'bad_signature', 'stale', 'malformed', 'unknown_type', 'too_large',
    'unknown_provider', 'unexpected_status', 'forbidden_source'));

-- A replayed receipt is a new row pointing at the stored one it re-fed.
ALTER TABLE webhook_receipts ADD COLUMN replay_of BIGINT REFERENCES webhook_receipts (id);
CREATE INDEX webhook_receipts_type ON webhook_receipts (provider, event_type);
