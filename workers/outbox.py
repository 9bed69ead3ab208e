"""The outbox sweeper: refund workflows deliver their own notices (a courier beside the
case); payout cases and reconciliation breaks only queue theirs. The sweeper delivers
every notice still undelivered after a grace period, once, through the same delivery
code, so per-channel dedup (`notice_deliveries`) still holds."""

import asyncio
import contextlib
import logging

from activities.integrations import IntegrationActivities
from adapters.db.outbox import OutboxRepository

log = logging.getLogger(__name__)


async def sweep_once(outbox: OutboxRepository, delivery: IntegrationActivities, *,
                     older_than_seconds: float, limit: int = 100) -> int:
    """Delivers one batch of unswept notices; returns how many it took."""
    keys = await outbox.claim_unswept(older_than_seconds, limit)
    for key in keys:
        try:
            await delivery.deliver(key)
        except Exception as exc:  # a failing channel is recorded per channel; go on
            log.warning("outbox sweep: notice %s not delivered everywhere: %s", key, exc)
    return len(keys)


async def sweep_outbox(outbox: OutboxRepository, delivery: IntegrationActivities,
                       stop: asyncio.Event, *, every_seconds: float, older_than_seconds: float) -> None:
    """Sweeps until `stop` is set."""
    while not stop.is_set():
        try:
            await sweep_once(outbox, delivery, older_than_seconds=older_than_seconds)
        except Exception:  # the database may be restarting; the next round tries again
            log.exception("outbox sweep failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=every_seconds)
