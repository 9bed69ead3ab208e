"""Deterministic orchestration only: standard library, temporalio and `domain`."""
