"""The notice outbox's two deliverers, both through the same delivery code, so per-channel
dedup (`notice_deliveries`) holds whoever sends.

The dispatcher delivers the notices queued for its task queue (refund cases since
`notices-dispatched-1`: the case only queues, in its steps' transactions), promptly, in
order within a case, retrying a certain failure on the courier activity's old schedule
(`retry.DELIVER`) and handing it to the sweeper once those tries are spent. The sweeper
delivers every other notice still undelivered after a grace period (payout cases' and
reconciliation breaks', and what an older refund execution's courier left), sweeping one
again while a channel fails, up to `OutboxRepository.SWEEP_ATTEMPTS` sweeps."""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from temporalio.exceptions import ApplicationError

from activities.integrations import IntegrationActivities
from adapters.config import Settings
from adapters.db.outbox import OutboxRepository
from adapters.db.store import Store
from domain import errors
from workflows.retry import DELIVER

log = logging.getLogger(__name__)


class Deliverer(Protocol):
    async def deliver(self, dedup_key: str) -> None:
        """Sends a queued notice to every channel that carries it (`IntegrationActivities`)."""


SCHEDULE = DELIVER["retry_policy"]
# longer than a delivery can take (every channel's send is bounded well inside it)
DISPATCH_LEASE_SECONDS = 2 * DELIVER["start_to_close_timeout"].total_seconds()


SWEEP_RETRY_SECONDS = 300.0
"""How long a notice the sweeper could not deliver everywhere waits for its next sweep:
the claim is the sweep's lease on it, longer than one delivery can take (each notice is
claimed just before it is delivered, so another worker never takes one mid-delivery)."""


async def sweep_once(outbox: OutboxRepository, delivery: Deliverer, *, older_than_seconds: float,
                     retry_after_seconds: float = SWEEP_RETRY_SECONDS, limit: int = 100,
                     stop: asyncio.Event | None = None) -> int:
    """Delivers up to `limit` notices due a sweep, claiming each as it goes, until `stop` is
    set (a worker shutting down sends nothing it could be killed in the middle of); returns
    how many it took."""
    taken = 0
    while taken < limit and not (stop and stop.is_set()) and (keys := await outbox.claim_unswept(
            older_than_seconds, 1, retry_after_seconds=retry_after_seconds)):
        taken += 1
        try:
            await delivery.deliver(keys[0])
        except Exception as exc:  # a failing channel is recorded per channel; go on
            log.warning("outbox sweep: notice %s not delivered everywhere: %s", keys[0], exc)
    return taken


async def sweep_outbox(outbox: OutboxRepository, delivery: Deliverer,
                       stop: asyncio.Event, *, every_seconds: float, older_than_seconds: float) -> None:
    """Sweeps until `stop` is set."""
    while not stop.is_set():
        try:
            await sweep_once(outbox, delivery, older_than_seconds=older_than_seconds, stop=stop)
        except Exception:  # the database may be restarting; the next round tries again
            log.exception("outbox sweep failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=every_seconds)


def retry_delay(attempt: int) -> float:
    """Seconds before the next try after `attempt` failed: the courier activity's backoff."""
    first = SCHEDULE.initial_interval.total_seconds()
    cap = SCHEDULE.maximum_interval.total_seconds() if SCHEDULE.maximum_interval else first
    return float(min(first * SCHEDULE.backoff_coefficient ** (attempt - 1), cap))


async def dispatch_once(outbox: OutboxRepository, delivery: Deliverer, queue: str, *,
                        limit: int = 100, stop: asyncio.Event | None = None) -> int:
    """Delivers the due notices of `queue` (each case's first pending one); returns how many
    it took. A notice is done once delivered, when no channel carries it, or when its
    failure is for good; a certain failure is due again later, and once its attempts are
    spent the sweeper takes it (the case's next notice goes out meanwhile). Once `stop` is
    set, the rest of the batch is handed back untried: a worker shutting down finishes the
    send it is in and starts none it could be killed in the middle of (never sent again)."""
    claimed = await outbox.claim_dispatch(queue, limit, DISPATCH_LEASE_SECONDS)
    loop = asyncio.get_running_loop()
    since = loop.time()
    for notice_id, key, attempt, until in claimed:
        if stop is not None and stop.is_set():
            await outbox.unclaim(notice_id, until)
            continue
        # a slow channel can outlast the batch's lease: past a quarter of it, each notice is
        # claimed again before its delivery, and one another dispatcher took is left to it
        if loop.time() - since > DISPATCH_LEASE_SECONDS / 4 and await outbox.claim_again(
                notice_id, until, DISPATCH_LEASE_SECONDS) is None:
            continue
        try:
            await delivery.deliver(key)
        except Exception as exc:  # a channel (recorded per channel) or the database; go on
            for_good = isinstance(exc, ApplicationError) and exc.non_retryable
            # tries spent, or refused where minutes will not change it: the case's next goes now
            spent = (0 < SCHEDULE.maximum_attempts <= attempt
                     or (isinstance(exc, ApplicationError) and exc.type == errors.NOTICE_CHANNEL_REFUSED))
            log.warning("notice %s not delivered everywhere (attempt %d%s): %s", key, attempt,
                        ", giving up" if for_good else ", left to the sweeper" if spent else "", exc)
            if for_good:
                await outbox.dispatched(notice_id)
            elif spent:
                await outbox.hand_to_sweeper(notice_id)
            else:
                await outbox.dispatch_later(notice_id, retry_delay(attempt))
            continue
        await outbox.dispatched(notice_id)
    return len(claimed)


async def dispatch_notices(outbox: OutboxRepository, delivery: Deliverer, queue: str,
                           stop: asyncio.Event, *, every_seconds: float) -> None:
    """Dispatches until `stop` is set; looks again at once while there was work."""
    while not stop.is_set():
        try:
            if await dispatch_once(outbox, delivery, queue, stop=stop):
                continue
        except Exception:  # the database may be restarting; the next round tries again
            log.exception("notice dispatch failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=every_seconds)


@contextlib.asynccontextmanager
async def notice_dispatcher(outbox: OutboxRepository, delivery: Deliverer, queue: str, *,
                            every_seconds: float,
                            stopping: asyncio.Event | None = None) -> AsyncIterator[None]:
    """The dispatcher for `queue` while the block runs (off when `every_seconds` is 0: another
    pool of the same queue delivers). Stopped and awaited on the way out, and it claims
    nothing more once `stopping` (the worker's stop, which is its own stop then, and set on
    the way out too) is set: a send begun in a shutdown may be cut off by the deployment's
    grace period, and a claim so cut reads as `uncertain`."""
    if every_seconds <= 0:
        yield
        return
    stop = stopping or asyncio.Event()
    task = asyncio.create_task(dispatch_notices(outbox, delivery, queue, stop, every_seconds=every_seconds))
    try:
        yield
    finally:
        stop.set()
        await task


def pool_dispatcher(store: Store, settings: Settings, *, delivery: Deliverer | None = None,
                    every_seconds: float | None = None,
                    stopping: asyncio.Event | None = None) -> AbstractAsyncContextManager[None]:
    """The dispatcher a worker pool runs beside its worker, for the pool's task queue: one
    wiring for `refunds worker`, `refunds dev`, the tests' stacks and the benchmarks' workers.
    `every_seconds` overrides the setting (the dev stack keeps it on); `stopping`: the
    worker's stop (`notice_dispatcher`)."""
    return notice_dispatcher(store.outbox, delivery or IntegrationActivities(store, settings),
                             settings.task_queue,
                             every_seconds=settings.notice_dispatch_seconds if every_seconds is None
                             else every_seconds, stopping=stopping)
