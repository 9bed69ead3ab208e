"""Provider news moves a case only from the relay or a worker. Someone who can signal
Temporal (its UI or CLI) but holds no key could otherwise report a succeeded refund failed:
the ledger reversed, the case `refund_failed`, its reissue offered, while the customer was
paid; or report a payout paid back. Sealed news (every product client seals what it
sends) is taken as before; unsealed news is refused, recorded, and leaves its event id
free for the provider's own delivery."""

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from temporalio.client import Client

from adapters.db import Store
from domain.models import EventKind, ProviderEvent, ProviderRefundStatus
from domain.payouts import PayoutEvent, PayoutStatus, ProviderPayout, ProviderPayoutStatus, payout_case_id
from starters.actions.starting import open_payout_case
from starters.dev.stack import TemporalDevServer
from tests.harness import Stack, holding_records_of, stack_with, unsealing, window_passed
from tests.payouts_kit import add_payout_approvers, paid_payout, wait_for_actions, wait_for_case
from workflows.news import NewsGate
from workflows.refund import RefundWorkflow


def refund_event(case_id: str, charge: str, refund_id: str, status: ProviderRefundStatus) -> ProviderEvent:
    """A 1,500 refund's event as the relay would signal it (sealing aside)."""
    failed = status is ProviderRefundStatus.FAILED
    return ProviderEvent(
        provider="sandbox", event_id=f"evt_{uuid.uuid4().hex[:12]}", event_type=f"refund.{status.value}",
        kind=EventKind.REFUND_STATUS, body_sha256="0" * 64, occurred_at=datetime.now(UTC),
        refund_id=refund_id, charge_id=charge, refund_request_id=case_id, amount=1_500, currency="USD",
        status=status, raw_status=status.value, failure_reason="card_account_closed" if failed else None)


async def test_a_late_failure_sent_straight_to_temporal_moves_nothing(stack: Stack) -> None:
    charge = await stack.charge(10_000)
    case_id = await stack.request_refund("alice", charge, 1_500)  # auto-approved
    row = await stack.wait_for_status(case_id, "succeeded")
    booked = await stack.store.ledger.entries(case_id)
    failure = refund_event(case_id, charge, row["provider_refund_id"], ProviderRefundStatus.FAILED)
    await unsealing(stack.client).get_workflow_handle(case_id).signal(RefundWorkflow.provider_event, failure)
    await stack.wait_for_audit(case_id, "provider_event_refused")
    [refused] = [e for e in await stack.store.audit.trail(case_id) if e["action"] == "provider_event_refused"]
    assert (refused["actor"], refused["detail"]["event_id"]) == ("temporal", failure.event_id)
    assert "not sealed" in refused["detail"]["refusal"]
    assert (await stack.store.cases.get(case_id))["status"] == "succeeded"  # type: ignore[index]
    assert await stack.store.ledger.entries(case_id) == booked

    # the provider's own delivery of that failure, sealed, is taken: its event id was left free
    await stack.client.get_workflow_handle(case_id).signal(RefundWorkflow.provider_event, failure)
    await stack.wait_for_status(case_id, "refund_failed")
    assert "refund_reversed" in {e["template"] for e in await stack.store.ledger.entries(case_id)}


async def test_a_payout_failure_sent_straight_to_temporal_opens_no_exception(stack: Stack) -> None:
    await add_payout_approvers(stack)
    payout = await paid_payout(stack, 12_000)
    case_id = payout_case_id("sandbox", payout.provider_payout_id)
    failure = PayoutEvent(
        provider="sandbox", event_id=f"evt_{uuid.uuid4().hex[:12]}", event_type="payout.failed",
        body_sha256="0" * 64, occurred_at=datetime.now(UTC),
        payout=ProviderPayout(provider="sandbox", payout_id=payout.provider_payout_id, amount=12_000,
                              currency="USD", status=ProviderPayoutStatus.FAILED,
                              raw_status="failed", failure_code="account_closed"))
    await open_payout_case(unsealing(stack.client), stack.settings, failure)  # signal-with-start
    await wait_for_actions(stack, case_id, "provider_event_refused")
    assert await stack.store.payouts.case(case_id) is None  # no exception opened, nothing held
    held = await stack.store.payouts.payout(payout.id)
    assert held is not None and held.status is PayoutStatus.PAID

    await open_payout_case(stack.client, stack.settings, failure)  # the relay's, sealed
    await wait_for_case(stack, case_id, "awaiting_approval")


async def test_a_case_that_took_unsealed_news_before_the_deploy_refuses_a_forgery_after(
        stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """A case running at the deploy took an unsealed event under the code before it; the
    new worker replays that acceptance as it was, and still refuses a forgery sent after.
    Each unsealed event asks its own marker: one patch id asked once answers every later
    ask of the run the same (the SDK keeps a patch's first answer), so the replayed
    acceptance let every later forgery of the run through."""
    monkeypatch.setattr(NewsGate, "_sealed", lambda self, event, record: True)  # before the deploy
    charge = await stack.charge(10_000)
    case_id = await stack.request_refund("alice", charge, 1_500)
    row = await stack.wait_for_status(case_id, "succeeded")
    handle = stack.client.get_workflow_handle(case_id)
    seen = (await handle.query(RefundWorkflow.state)).events_seen
    again = refund_event(case_id, charge, row["provider_refund_id"], ProviderRefundStatus.SUCCEEDED)
    await unsealing(stack.client).get_workflow_handle(case_id).signal(RefundWorkflow.provider_event, again)
    while (await handle.query(RefundWorkflow.state)).events_seen == seen:
        await asyncio.sleep(0.05)
    assert stack.worker is not None
    await stack.worker.shutdown()
    monkeypatch.undo()  # the deploy: a new worker replays the case's history
    await stack.start_worker()
    booked = await stack.store.ledger.entries(case_id)
    failure = refund_event(case_id, charge, row["provider_refund_id"], ProviderRefundStatus.FAILED)
    await unsealing(stack.client).get_workflow_handle(case_id).signal(RefundWorkflow.provider_event, failure)
    await stack.wait_for_audit(case_id, "provider_event_refused")
    assert (await stack.store.cases.get(case_id))["status"] == "succeeded"  # type: ignore[index]
    assert await stack.store.ledger.entries(case_id) == booked


async def test_a_worker_without_keys_takes_no_news(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    """A worker deployed without REFUNDS_APPROVAL_KEYS cannot tell sealed news from forged:
    it takes none (as it counts no approval), and says why on the case, rather than taking
    whatever anyone signals."""
    async with stack_with(store, client, temporal_server.address, approval_keys=None) as keyless:
        charge = await keyless.charge(10_000)
        case_id = await keyless.request_refund("alice", charge, 1_500)
        await keyless.wait_for_audit(case_id, "provider_event_refused")  # the provider's own webhook
        refused = [e["detail"]["refusal"] for e in await keyless.store.audit.trail(case_id)
                   if e["action"] == "provider_event_refused"]
        assert refused and all("holds no approval keys" in r for r in refused), refused


async def test_a_late_failure_heard_while_the_run_finishes_is_applied(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    """A run past its late-failure window waits, before it ends, for what it still writes
    (here the record of a refused forgery; also a late verdict's, advice). A failure the
    relay signals meanwhile is accepted (the workflow is running: no after-close handling)
    and was never read: the case stayed `succeeded`, nothing reversed, nobody told. It is
    applied as any late failure is."""
    async with stack_with(store, client, temporal_server.address, late_failure_window_seconds=3) as stack:
        charge = await stack.charge(10_000)
        case_id = await stack.request_refund("alice", charge, 1_500)  # auto-approved
        await failure_heard_while_finishing(stack, case_id, charge)
        ended = await stack.store.cases.get(case_id)
        templates = sorted(e["template"] for e in await stack.store.ledger.entries(case_id))
    assert ended is not None and ended["status"] == "refund_failed", ended
    assert templates == ["refund_reversed"] * 2 + ["refund_settled"] * 2


async def failure_heard_while_finishing(stack: Stack, case_id: str, charge: str) -> None:
    """Once the case succeeded, a forgery's refused record is held while the run's watch
    times out (the run waits for it before it ends); the provider fails the refund and the
    relay signals it meanwhile; then the record is let go and the run ends."""
    row = await stack.wait_for_status(case_id, "succeeded")
    refund_id = row["provider_refund_id"]
    async with holding_records_of(stack, "provider_event_refused") as (release, held):
        forged = refund_event(case_id, charge, refund_id, ProviderRefundStatus.SUCCEEDED)
        forger = unsealing(stack.client).get_workflow_handle(case_id)
        await forger.signal(RefundWorkflow.provider_event, forged)
        await asyncio.wait_for(held.wait(), 30)
        await window_passed(stack, case_id)
        before = len(await processed_deliveries(stack, case_id))
        await stack.set_provider_status(refund_id, "failed", failure_reason="card_account_closed")
        while len(await processed_deliveries(stack, case_id)) <= before:  # signalled: it runs
            await asyncio.sleep(0.1)
        release.set()
        await asyncio.wait_for(stack.client.get_workflow_handle(case_id).result(), 60)


async def processed_deliveries(stack: Stack, case_id: str) -> list[dict[str, Any]]:
    """The deliveries the relay routed to the case and finished with (signalled)."""
    return await stack.store.database.fetch_all(
        "SELECT id FROM webhook_receipts WHERE workflow_id = %s AND processed_at IS NOT NULL", (case_id,))
