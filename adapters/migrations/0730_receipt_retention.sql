-- Unauthenticated traffic cannot grow storage without bound: refused receipts that prove
-- nothing about their sender are pruned after a retention (the worker's loop), and
-- re-drive counts its tries on a receipt and stops at a bound.

-- A replay keeps its own row when the refused original it re-fed is pruned.
ALTER TABLE webhook_receipts DROP CONSTRAINT webhook_receipts_replay_of_fkey;
ALTER TABLE webhook_receipts ADD CONSTRAINT webhook_receipts_replay_of_fkey
    FOREIGN KEY (replay_of) REFERENCES webhook_receipts (id) ON DELETE SET NULL;

-- The predicate is the one the pruning query states (ReceiptRepository.prune_refused).
CREATE INDEX webhook_receipts_prunable ON webhook_receipts (received_at)
    WHERE verdict IN ('bad_signature', 'stale', 'malformed', 'too_large', 'unknown_provider',
                      'forbidden_source');

ALTER TABLE webhook_receipts ADD COLUMN redrive_attempts INTEGER NOT NULL DEFAULT 0;
