-- Deliveries that failed or may have sent, for the relay's gauge of notices no one will send
-- again (`OutboxRepository.unsent`, read on every scrape): a delivered row leaves the index.
CREATE INDEX notice_deliveries_unsent ON notice_deliveries (notice_id) WHERE status IN ('failed', 'uncertain');
