"""The audit checkpointer: every few minutes, the chain heads that moved since the last
round go to the checkpoint folder outside PostgreSQL (see adapters.audit_checkpoints)."""

import asyncio
import contextlib
import logging
from datetime import UTC, datetime

from adapters import metrics
from adapters.audit_checkpoints import CheckpointBook, Heads
from adapters.db import Store

log = logging.getLogger(__name__)


async def checkpoint_once(store: Store, book: CheckpointBook, previous: Heads) -> dict[str, tuple[int, str]]:
    """Writes the heads that differ from `previous` (all of them the first time); returns
    the heads now known, for the next round."""
    heads = await store.audit.heads()
    changed = {chain: head for chain, head in heads.items() if previous.get(chain) != head}
    if changed:
        path = book.write(changed, datetime.now(UTC))
        log.info("audit checkpoint %s: %d chain heads", path.name, len(changed))
    return heads


async def checkpoint_audit_heads(store: Store, book: CheckpointBook, stop: asyncio.Event, *,
                                 every_seconds: float) -> None:
    """Checkpoints until `stop` is set, and once more on the way out."""
    known: Heads = {}
    while True:
        try:
            known = await checkpoint_once(store, book, known)
        except Exception:  # the database or the folder may be briefly away; try next round
            log.exception("audit checkpoint failed")
            metrics.CHECKPOINT_ROUNDS.labels("failed").inc()
        else:
            metrics.CHECKPOINT_ROUNDS.labels("ok").inc()
            metrics.CHECKPOINT_LAST_OK.set_to_current_time()
        if stop.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=every_seconds)
