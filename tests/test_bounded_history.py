"""Open-ended waits continue as new and resubmits end with ops (issue 18, item 5): a pending
refund's follow loop takes 1,000 provider events, every run's history stays under the
threshold plus one batch, and the case, its approvals and its audit come through whole; a
refund whose creates keep failing goes to ops after `max_submit_attempts`, reservation kept."""

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime

import pytest
from temporalio.client import Client

from adapters.db import Store
from domain.events import tracking_case_id
from domain.models import EventKind, ProviderEvent, ProviderRefundStatus
from starters.dev.stack import TemporalDevServer
from tests.harness import Stack, open_stack
from workflows.refund import RefundWorkflow
from workflows.tracking import RefundTrackingWorkflow

THRESHOLD = 200
TURNS = 1_000
BATCH = 50
TRACKING_TURNS = 250
"""Each tracking turn records its observation (an activity): as many as run in ~15 s."""


@pytest.fixture
async def tiny(store: Store, client: Client, temporal_server: TemporalDevServer) -> AsyncIterator[Stack]:
    opened = await open_stack(store, client, temporal_server.address, status_poll_interval_seconds=0.01,
                              late_failure_window_seconds=0.5, continue_as_new_after_events=THRESHOLD,
                              max_submit_attempts=3, submit_timeout_seconds=3)
    yield opened
    await opened.close()


async def _runs(stack: Stack, case_id: str, first_run: str) -> list[tuple[str, int, bool]]:
    """Each run of the case's workflow, followed from the first: run id, history length,
    whether it continued as new."""
    runs: list[tuple[str, int, bool]] = []
    run_id: str | None = first_run
    while run_id is not None:
        events = (await stack.client.get_workflow_handle(case_id, run_id=run_id).fetch_history()).events
        last = events[-1]
        continued = last.HasField("workflow_execution_continued_as_new_event_attributes")
        runs.append((run_id, len(events), continued))
        run_id = (last.workflow_execution_continued_as_new_event_attributes.new_execution_run_id
                  if continued else None)
    return runs


async def _still_pending(stack: Stack, case_id: str, refund_id: str, charge: str, amount: int,
                         turns: int = TURNS) -> None:
    """Provider events that change nothing, each a turn of the case's watch, in batches."""
    handle = stack.client.get_workflow_handle(case_id)

    async def event(n: int) -> None:
        await handle.signal(RefundWorkflow.provider_event, ProviderEvent(
            provider="sandbox", event_id=f"evt-pending-{n}", event_type="refund.updated",
            kind=EventKind.REFUND_STATUS, body_sha256="0" * 64, occurred_at=datetime.now(UTC),
            refund_id=refund_id, charge_id=charge, refund_request_id=case_id, amount=amount,
            currency="USD", status=ProviderRefundStatus.PENDING, raw_status="pending"))

    async def seen() -> int:
        return (await handle.query(RefundWorkflow.state)).events_seen

    await in_batches(event, seen, turns)


async def in_batches(send: Callable[[int], Awaitable[None]], seen: Callable[[], Awaitable[int]],
                     turns: int) -> None:
    """Sends `turns` events (at most 8 in flight), a batch at a time; each batch is counted
    by `seen` (the workflow's count, where its turns keep pace with its signals; else what
    its turns wrote) before the next is sent, so the history grows by known steps."""
    gate = asyncio.Semaphore(8)

    async def gated(n: int) -> None:
        async with gate:
            await send(n)

    for batch in range(0, turns, BATCH):
        await asyncio.gather(*(gated(n) for n in range(batch, batch + BATCH)))
        while await seen() < batch + BATCH:
            await asyncio.sleep(0.05)


def _bounded(runs: list[tuple[str, int, bool]]) -> None:
    """Several runs, each continued as new but the last, each at most one batch (and its
    activations) past the threshold: a run continues as new at its first turn past it."""
    assert len(runs) >= 5, runs
    assert all(length < THRESHOLD + 2 * BATCH for _, length, _ in runs), runs
    assert [continued for *_, continued in runs] == [True] * (len(runs) - 1) + [False]


async def test_the_follow_loop_continues_as_new_with_the_case_intact(tiny: Stack) -> None:
    async with tiny.sandbox() as sb:
        (await sb.post("/_sandbox/config", json={"refund_initial_status": "pending"})).raise_for_status()
    charge = await tiny.charge(20_000)
    case_id = await tiny.request_refund("alice", charge, 9_000)
    await tiny.wait_for_status(case_id, "awaiting_approval")
    handle = tiny.client.get_workflow_handle_for(RefundWorkflow.run, case_id)
    first_run = (await handle.describe()).run_id
    async with tiny.api("bob") as api:
        assert (await api.post(f"/v1/refund-requests/{case_id}/approvals",
                               json={"decision": "approve", "reason": "ok"})).status_code == 202
    await tiny.wait_for_status(case_id, "pending")
    refunds = await tiny.provider_refunds(charge)
    assert len(refunds) == 1
    await _still_pending(tiny, case_id, refunds[0]["id"], charge, 9_000)
    await tiny.set_provider_status(refunds[0]["id"], "succeeded")
    outcome = await asyncio.wait_for(handle.result(), 60)

    trail = await tiny.store.audit.trail(case_id)
    _bounded(await _runs(tiny, case_id, first_run))
    state = outcome.state
    assert state.status == "succeeded" and state.provider_refund_id == refunds[0]["id"]
    assert [a.approver for a in state.approvals] == ["bob"]
    assert state.decision is not None and state.decision.tier is not None
    assert len(state.ledger_postings) == 1
    assert {e["template"] for e in await tiny.store.ledger.entries(case_id)} == {"refund_settled"}
    assert state.events_seen >= TURNS + 1
    actions = [e["action"] for e in trail]
    assert actions.count("approval_granted") == 1 and actions.count("refund_succeeded") == 1
    assert len(await tiny.provider_refunds(charge)) == 1
    assert (await handle.query(RefundWorkflow.state)).status == "succeeded"


async def test_resubmits_end_with_ops_and_keep_the_reservation(tiny: Stack) -> None:
    async with tiny.sandbox() as sb:  # every create fails before a refund exists
        (await sb.post("/_sandbox/faults", json={"mode": "error_before", "times": 1000})).raise_for_status()
    charge = await tiny.charge(20_000)
    case_id = await tiny.request_refund("alice", charge, 1_000)
    row = await tiny.wait_for_status(case_id, "ops_review")
    assert row["reserved_amount"] == 1_000
    trail = await tiny.wait_for_audit(case_id, "resubmits_exhausted")
    assert trail.count("provider_submit_started") == 3
    await asyncio.sleep(2)  # still looking, never submitting again
    actions = await tiny.actions(case_id)
    assert actions.count("provider_submit_started") == 3 and actions.count("verify_state") > 3
    assert await tiny.provider_refunds(charge) == []
    await tiny.client.get_workflow_handle(case_id).cancel()
    await tiny.wait_for_status(case_id, "canceled_by_ops")


async def test_the_tracking_watch_continues_as_new_with_the_case_intact(tiny: Stack) -> None:
    charge = await tiny.charge(20_000)
    async with tiny.sandbox() as sb:  # a refund made in the provider's dashboard, pending
        (await sb.post("/_sandbox/config", json={"refund_initial_status": "pending"})).raise_for_status()
        made = await sb.post("/v1/refunds", json={"charge": charge, "amount": 700, "currency": "usd"})
        made.raise_for_status()
    refund_id = made.json()["id"]
    case_id = tracking_case_id("sandbox", refund_id)
    await tiny.wait_for_status(case_id, "pending")
    handle = tiny.client.get_workflow_handle_for(RefundTrackingWorkflow.run, case_id)
    first_run = (await handle.describe()).run_id
    await _still_pending(tiny, case_id, refund_id, charge, 700, TRACKING_TURNS)
    await tiny.set_provider_status(refund_id, "succeeded")
    outcome = await asyncio.wait_for(handle.result(), 60)

    _bounded(await _runs(tiny, case_id, first_run))
    state = outcome.state
    assert state.status == "succeeded" and state.provider_refund_id == refund_id
    assert state.events_seen >= TRACKING_TURNS + 2 and len(state.ledger_postings) == 1
    assert {e["template"] for e in await tiny.store.ledger.entries(case_id)} == {"refund_settled"}
    assert (await tiny.actions(case_id)).count("refund_succeeded") == 1
