-- The receipts list reads a provider's receipts a page at a time, in id order after a given
-- id: an index on (provider, id) serves each page without reading the provider's whole list.
CREATE INDEX webhook_receipts_by_provider ON webhook_receipts (provider, id);
