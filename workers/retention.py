"""The worker's pruner: rows kept for a retention, then deleted in batches.

- Webhook receipts refused before their sender was known, or stale (a replay of a captured
  delivery): anyone can send those, up to the body limit each, so that traffic cannot grow
  the database without bound.
- Case steps' kept answers (`adapters.db.steps`): needed only while a local activity can run
  again, i.e. while its workflow task is retried."""

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import timedelta

from prometheus_client import Counter

from adapters.db import Store

log = logging.getLogger(__name__)

PRUNED = Counter("refunds_webhook_receipts_pruned", "Refused webhook receipts deleted after their retention")
STEP_RESULTS_PRUNED = Counter("refunds_case_step_results_pruned",
                              "Case steps' kept answers deleted after their retention")
BATCH = 1000
"""Rows per DELETE: short statements, so the relay's inserts never wait long behind one."""


async def _in_batches(delete: Callable[[int], Awaitable[int]]) -> int:
    total = 0
    while True:
        deleted = await delete(BATCH)
        total += deleted
        if deleted < BATCH:
            return total


async def prune_once(store: Store, retention: timedelta, step_result_retention: timedelta) -> int:
    """Deletes every refused receipt and every step answer past its retention, a batch at a
    time; returns how many receipts."""
    receipts = await _in_batches(lambda limit: store.receipts.prune_refused(retention, limit))
    PRUNED.inc(receipts)
    if receipts:
        log.info("pruned %d refused webhook receipts older than %s", receipts, retention)
    STEP_RESULTS_PRUNED.inc(await _in_batches(lambda limit: store.steps.prune(step_result_retention, limit)))
    return receipts


async def prune_expired(store: Store, stop: asyncio.Event, *, every_seconds: float,
                        retention: timedelta, step_result_retention: timedelta) -> None:
    """Prunes until `stop` is set; a failing round (the database away) is logged and the
    next one tries again."""
    while not stop.is_set():
        try:
            await prune_once(store, retention, step_result_retention)
        except Exception:
            log.exception("pruning expired rows failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=every_seconds)
