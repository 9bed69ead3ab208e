"""Payment provider adapters: API calls with idempotency keys, lookups, webhook parsing."""
