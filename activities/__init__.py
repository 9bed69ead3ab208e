"""Thin Temporal activities over the adapters; retry policies live in workflows/retry.py."""
