-- The worker's outbox sweeper delivers notices no workflow delivers itself (payout cases,
-- reconciliation breaks) and ones a courier left undelivered; each is swept once.
ALTER TABLE notices ADD COLUMN swept_at TIMESTAMPTZ;
CREATE INDEX notices_unswept ON notices (id) WHERE delivered_at IS NULL AND swept_at IS NULL;
