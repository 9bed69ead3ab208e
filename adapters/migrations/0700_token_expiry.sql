-- A token may carry an expiry: past it, the API and every console session made from it
-- refuse it, as if it were revoked (NULL: no expiry, as before). Every token lookup reads
-- the view, so "live" is defined once.
ALTER TABLE api_tokens ADD COLUMN expires_at TIMESTAMPTZ;
CREATE VIEW live_api_tokens AS
    SELECT * FROM api_tokens WHERE revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now());
