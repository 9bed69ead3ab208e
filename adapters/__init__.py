"""I/O clients: PostgreSQL store, providers, settings. Imports only `domain` of ours."""
