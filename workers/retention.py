"""The refused-receipt pruner: webhook receipts refused before their sender was known
(anyone can send those, up to the body limit each) are kept for a retention, then
deleted in batches, so forged traffic cannot grow the database without bound."""

import asyncio
import contextlib
import logging
from datetime import timedelta

from prometheus_client import Counter

from adapters.db import Store

log = logging.getLogger(__name__)

PRUNED = Counter("refunds_webhook_receipts_pruned", "Refused webhook receipts deleted after their retention")
BATCH = 1000
"""Rows per DELETE: short statements, so the relay's inserts never wait long behind one."""


async def prune_once(store: Store, retention: timedelta) -> int:
    """Deletes every refused receipt past the retention, a batch at a time; returns how many."""
    total = 0
    while True:
        deleted = await store.receipts.prune_refused(retention, BATCH)
        total += deleted
        if deleted < BATCH:
            break
    PRUNED.inc(total)
    if total:
        log.info("pruned %d refused webhook receipts older than %s", total, retention)
    return total


async def prune_receipts(store: Store, stop: asyncio.Event, *, every_seconds: float,
                         retention: timedelta) -> None:
    """Prunes until `stop` is set; a failing round (the database away) is logged and the
    next one tries again."""
    while not stop.is_set():
        try:
            await prune_once(store, retention)
        except Exception:
            log.exception("pruning refused webhook receipts failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=every_seconds)
