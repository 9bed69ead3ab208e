"""The closed-workflow sweep: a case whose workflow ended while the case was still open
(terminated, cancelled or failed in Temporal, timed out, or gone) has nobody left to move it
(a case we follow for a refund the provider made without us too). The sweep
finds such cases, asks the provider whether it holds their refund, and hands them to ops:
`ops_review`, a reconciliation break and a notice; the reservation is released only where
the provider certainly holds no refund (a refund it holds, or cannot tell, keeps it). Payout
cases are handed over the same way, their holds kept: only ops release money state."""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from temporalio.client import Client
from temporalio.service import RPCError

from adapters.db import Store, request_from_row
from adapters.providers.base import ProviderAdapter, ProviderError
from adapters.temporal_client import workflow_closed
from domain.events import tracking_case_id
from domain.models import CaseStatus, ProviderRefund, RefundMethod
from domain.payouts import PayoutCaseStatus, left_open

log = logging.getLogger(__name__)


async def provider_holds(store: Store, providers: Mapping[str, ProviderAdapter],
                         row: Mapping[str, Any]) -> tuple[bool | None, ProviderRefund | None]:
    """Whether the provider holds the case's refund (None: it cannot tell), and the refund."""
    if row["provider_refund_id"] is not None:
        return True, None
    if row["submission_started_at"] is None:
        return False, None
    if row["method"] != RefundMethod.PROVIDER.value:
        manual = await store.manual_refunds.get(row["refund_request_id"])
        return manual is not None and manual["status"] != "failed", None
    provider = providers.get(row["provider"])
    if provider is None:
        return None, None
    try:
        found = await provider.find_refund(request_from_row(dict(row)))
    except ProviderError as exc:
        log.warning("case sweep: %s cannot tell about %s: %s", row["provider"], row["refund_request_id"], exc)
        return None, None
    except Exception:  # an answer no adapter names (a bug, an unreadable answer): the workflow
        # is gone either way, so ops get the case, the provider's word unknown, the hold kept
        log.exception("case sweep: %s's lookup of %s failed unexpectedly", row["provider"],
                      row["refund_request_id"])
        return None, None
    return found is not None, found


NEVER_STARTED_GRACE = timedelta(hours=1)
"""How long a case no workflow ever moved (`requested`, none in Temporal) waits for its
caller's retry before it is handed to ops: its start found Temporal away (503, "send the same
request again") or the relay died before it, and only a retry or a re-drive starts it. Past
the sweep's idle time alone, every request of an outage went to ops as Temporal came back,
racing the retries it had asked for."""

LEFT_TO_OPS = frozenset({"COMPLETED", "NOT_FOUND"})
"""How a refund workflow ended that left its case in ops review on purpose (and told ops):
completed, or gone past Temporal's retention since (only a running workflow, or the sweep
itself, puts a case in ops review, and the sweep's cases are not read again)."""

FAILED_DESCRIBES_END_A_PASS = 3
"""Describes failing in a row that end a sweep pass: Temporal is away or limiting us, and
asking about every other idle case would only add to its load (and hold up a shutdown)."""

IdlePage = Callable[[tuple[datetime, str] | None], Awaitable[Sequence[Mapping[str, Any]]]]


async def closed_cases(client: Client, pages: IdlePage, key: str, stop: asyncio.Event
                       ) -> AsyncIterator[tuple[Mapping[str, Any], str]]:
    """Each idle open case (`key`: its id column) whose workflow has ended, with how it
    ended, a page at a time (cases whose workflow still runs never hide the others). A case
    Temporal cannot describe now (a deadline, rate limited) waits for the next pass, and the
    pass goes on; `FAILED_DESCRIBES_END_A_PASS` in a row say Temporal is away: the pass ends
    (one error no longer ends it, so a pass over many cases reaches the payout cases behind).
    None more once `stop` is set."""
    after: tuple[datetime, str] | None = None
    failed_in_a_row = 0
    while rows := await pages(after):
        for row in rows:
            if stop.is_set():
                return
            try:
                ended = await workflow_closed(client, row[key])
            except RPCError as exc:
                failed_in_a_row += 1
                if failed_in_a_row >= FAILED_DESCRIBES_END_A_PASS:
                    raise
                log.warning("case sweep: Temporal cannot describe %s now (%s); left for the next pass",
                            row[key], exc)
                continue
            except Exception:  # an answer the SDK cannot read (a status newer than it): this case's
                log.exception("case sweep: Temporal's answer about %s cannot be read; left for the next "
                              "pass", row[key])
                continue
            failed_in_a_row = 0
            if ended is not None:
                yield row, ended
        after = rows[-1]["updated_at"], rows[-1][key]


async def sweep_cases_once(store: Store, client: Client, providers: Mapping[str, ProviderAdapter], *,
                           idle_seconds: float, page: int = 100,
                           stop: asyncio.Event | None = None) -> list[str]:
    """One pass over every idle open refund and payout case; returns the cases handed to ops.
    Ends early once `stop` (the worker's) is set: a long pass held up the worker's shutdown
    past its grace period."""
    swept: list[str] = []
    stopping = stop or asyncio.Event()
    async for row, ended in closed_cases(
            client, lambda after: store.cases.idle_open(idle_seconds, page, after), "refund_request_id",
            stopping):
        with _alone(row["refund_request_id"]):
            if await _sweep_refund_case(store, providers, row, ended):
                swept.append(row["refund_request_id"])
    async for row, ended in closed_cases(
            client, lambda after: store.payouts.idle_open(idle_seconds, page, after), "case_id", stopping):
        with _alone(row["case_id"]):
            if await _sweep_payout_case(store, row, ended):
                swept.append(row["case_id"])
    return swept


@contextlib.contextmanager
def _alone(case_id: str) -> Iterator[None]:
    """One case's failure (a database error on its row, a row no model reads) is that case's:
    logged, the case read again next pass, and the pass goes on to the cases behind it (else
    the same case would end every pass before they were reached)."""
    try:
        yield
    except Exception:
        log.exception("case sweep: case %s left for the next pass", case_id)


async def _sweep_refund_case(store: Store, providers: Mapping[str, ProviderAdapter],
                             row: Mapping[str, Any], ended: str) -> bool:
    case_id = row["refund_request_id"]
    if (ended == "NOT_FOUND" and row["status"] == CaseStatus.REQUESTED
            and datetime.now(UTC) - row["updated_at"] < NEVER_STARTED_GRACE):
        return False  # never started: its retry may still come
    tracking = row["provider_refund_id"] is not None and case_id == tracking_case_id(
        row["provider"], row["provider_refund_id"])
    if ended in LEFT_TO_OPS and (row["status"] == CaseStatus.OPS_REVIEW or tracking):
        # the workflow handed it to ops itself (a duplicate or mismatched refund), or a
        # tracking watch its run ended (telling ops when no final status came), or one
        # Temporal does not know (never started: the relay's re-drive starts it)
        await store.cases.mark_end_seen(case_id, row["updated_at"])
        return False
    holds, found = await provider_holds(store, providers, row)
    if not await store.cases.sweep_closed(case_id, workflow_status=ended, provider_holds=holds,
                                          found=found, seen_updated_at=row["updated_at"]):
        return False
    log.warning("case %s: workflow %s while %s; handed to ops", case_id, ended, row["status"])
    return True


async def _sweep_payout_case(store: Store, row: Mapping[str, Any], ended: str) -> bool:
    if not left_open(PayoutCaseStatus(row["status"]), ended):  # remediated past its reissue window
        await store.payouts.mark_end_seen(row["case_id"], row["updated_at"])
        return False
    if not await store.payouts.sweep_closed(row["case_id"], workflow_status=ended,
                                            seen_updated_at=row["updated_at"]):
        return False
    log.warning("payout case %s: workflow %s while %s; handed to ops", row["case_id"], ended, row["status"])
    return True


async def sweep_closed_cases(store: Store, client: Client, providers: Mapping[str, ProviderAdapter],
                             stop: asyncio.Event, *, every_seconds: float, idle_seconds: float) -> None:
    """Sweeps until `stop` is set."""
    while not stop.is_set():
        try:
            await sweep_cases_once(store, client, providers, idle_seconds=idle_seconds, stop=stop)
        except Exception:  # Temporal or the database may be restarting; the next pass tries again
            log.exception("case sweep failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=every_seconds)
