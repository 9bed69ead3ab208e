"""A refund the provider made without us (a dashboard refund, an auto-refund) is followed by
a tracking case like our own: its failure reaches ops (the incident the product exists for,
a refund shown refunded that never reached the customer), the provider contradicting itself
or reporting other money for the same refund goes to ops, the ledger books each entry in the
currency the provider reports, and no event is dropped as the watch ends."""

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from temporalio.client import Client, WorkflowFailureError

from adapters.db import Store
from adapters.notify.message import render
from domain.events import tracking_case_id
from domain.models import EventKind, ProviderEvent, ProviderRefund, ProviderRefundStatus
from starters.dev.stack import TemporalDevServer
from starters.relay.webhook_desk import WebhookDesk
from tests.harness import Stack, holding_records_of, open_stack, unsealing, window_passed
from workers.case_sweep import sweep_cases_once
from workflows.tracking import RefundTrackingWorkflow


@pytest.fixture(scope="module")
async def watching(store: Store, client: Client, temporal_server: TemporalDevServer) -> AsyncIterator[Stack]:
    """A stack whose late-failure window (the tracking watch) is two minutes."""
    stack = await open_stack(store, client, temporal_server.address, late_failure_window_seconds=120)
    yield stack
    await stack.close()


class Dashboard:
    """One provider refund made in the dashboard, reported to the relay event by event."""

    def __init__(self, stack: Stack, refund_id: str | None = None, charge_id: str = "ch_dashboard") -> None:
        self.stack = stack
        self.refund_id = refund_id or f"re_{uuid.uuid4().hex[:12]}"
        self.charge_id = charge_id
        self.case_id = tracking_case_id("sandbox", self.refund_id)
        self._desk = WebhookDesk(stack.store, stack.client, stack.providers, stack.settings)

    async def reports(self, status: str, amount: int = 700, currency: str = "USD",
                      failure_reason: str | None = None) -> None:
        await self._desk.route(ProviderEvent(
            provider="sandbox", event_id=f"evt_{uuid.uuid4().hex[:12]}", event_type="refund.updated",
            kind=EventKind.REFUND_STATUS, body_sha256="0" * 64, occurred_at=datetime.now(UTC),
            refund_id=self.refund_id, charge_id=self.charge_id, amount=amount, currency=currency,
            status=ProviderRefundStatus(status), raw_status=status, failure_reason=failure_reason))

    async def notices(self) -> list[tuple[str, str]]:
        return [(n["kind"], n["audience"]) for n in await self.stack.store.outbox.notices(self.case_id)]

    async def postings(self) -> list[tuple[str, int, str]]:
        """(template, amount, currency) of each entry, by its debit line."""
        return [(line["template"], line["debit"], line["currency"])
                for line in await self.stack.store.ledger.entries(self.case_id) if line["debit"]]


async def test_a_dashboard_refund_that_fails_is_told_to_ops(watching: Stack) -> None:
    refund = Dashboard(watching)
    await refund.reports("pending")
    await watching.wait_for_status(refund.case_id, "pending")
    await refund.reports("failed", failure_reason="card_account_closed")
    row = await watching.wait_for_status(refund.case_id, "refund_failed")
    assert row["reserved_amount"] == 0
    assert ("refund_failed", "operator") in await refund.notices()
    assert await refund.postings() == []


async def test_a_dashboard_refund_failing_after_success_is_reversed_and_told_to_ops(watching: Stack) -> None:
    refund = Dashboard(watching)
    await refund.reports("succeeded")
    await watching.wait_for_status(refund.case_id, "succeeded")
    await refund.reports("failed", failure_reason="card_account_closed")
    await watching.wait_for_status(refund.case_id, "refund_failed")
    assert await refund.postings() == [("refund_settled", 700, "USD"), ("refund_reversed", 700, "USD")]
    assert ("refund_failed", "operator") in await refund.notices()


@pytest.mark.parametrize(("amount", "currency"), [(400, "USD"), (700, "EUR")], ids=["amount", "currency"])
async def test_other_money_reported_for_the_same_refund_goes_to_ops(watching: Stack, amount: int,
                                                                      currency: str) -> None:
    """The same refund reported for other money than it was followed with: booked as the
    provider reports it (each entry in its own currency), the case with ops from then on."""
    refund = Dashboard(watching)
    await refund.reports("succeeded")
    await watching.wait_for_status(refund.case_id, "succeeded")
    await refund.reports("failed", amount=amount, currency=currency, failure_reason="card_account_closed")
    await watching.wait_for_audit(refund.case_id, "refund_failed_after_success")
    row = await watching.wait_for_status(refund.case_id, "ops_review")
    assert row["provider_status"] == "failed"
    assert await refund.postings() == [("refund_settled", 700, "USD"), ("refund_reversed", amount, currency)]
    notices = await refund.notices()
    assert ("provider_refund_changed", "operator") in notices and ("refund_failed", "operator") in notices


async def test_a_cancel_reported_after_success_goes_to_ops(watching: Stack) -> None:
    refund = Dashboard(watching)
    await refund.reports("succeeded")
    await watching.wait_for_status(refund.case_id, "succeeded")
    await refund.reports("canceled")
    row = await watching.wait_for_status(refund.case_id, "ops_review")
    assert row["provider_status"] == "succeeded"
    assert await refund.postings() == [("refund_settled", 700, "USD")]
    assert ("provider_status_contradicted", "operator") in await refund.notices()
    # the workflow's own word (its query, and what it would carry across continue-as-new) agrees
    shown = await watching.client.get_workflow_handle(refund.case_id).query(RefundTrackingWorkflow.state)
    assert shown.status == "ops_review"


async def heard_while_the_watch_ends(stack: Stack) -> Dashboard:
    """A pending dashboard refund whose watch ends without news; its success is heard while
    that end is recorded."""
    async with holding_records_of(stack, "tracking_ended_without_final_status") as (release, held):
        refund = Dashboard(stack)
        await refund.reports("pending")
        await asyncio.wait_for(held.wait(), 60)
        await refund.reports("succeeded")
        release.set()
        await stack.wait_for_status(refund.case_id, "succeeded")
    return refund


async def test_an_event_heard_while_the_watch_ends_is_applied(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    """The success is taken by the workflow (the signal was accepted: nothing else would
    apply it) and posted."""
    stack = await open_stack(store, client, temporal_server.address, late_failure_window_seconds=3)
    try:
        refund = await heard_while_the_watch_ends(stack)
        assert await refund.postings() == [("refund_settled", 700, "USD")]
    finally:
        await stack.close()


async def failure_heard_while_the_tracking_run_ends(stack: Stack) -> Dashboard:
    """A dashboard refund that succeeded; once its watch is over, the run waits for a
    forgery's refused record (held); the provider's failure is signalled meanwhile."""
    refund = Dashboard(stack)
    await refund.reports("succeeded")
    await stack.wait_for_status(refund.case_id, "succeeded")
    async with holding_records_of(stack, "provider_event_refused") as (release, held):
        forged = ProviderEvent(
            provider="sandbox", event_id=f"evt_{uuid.uuid4().hex[:12]}", event_type="refund.updated",
            kind=EventKind.REFUND_STATUS, body_sha256="0" * 64, occurred_at=datetime.now(UTC),
            refund_id=refund.refund_id, charge_id=refund.charge_id, amount=700, currency="USD",
            status=ProviderRefundStatus.SUCCEEDED, raw_status="succeeded")
        handle = unsealing(stack.client).get_workflow_handle(refund.case_id)
        await handle.signal(RefundTrackingWorkflow.provider_event, forged)
        await asyncio.wait_for(held.wait(), 30)
        await window_passed(stack, refund.case_id)
        await refund.reports("failed", failure_reason="card_account_closed")  # signalled: it runs
        release.set()
        await asyncio.wait_for(stack.client.get_workflow_handle(refund.case_id).result(), 60)
    return refund


async def test_a_failure_heard_while_the_tracking_run_ends_is_applied(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    """As for our own refunds: the run waits for its last writes before it ends, and an
    event signalled meanwhile was accepted and never read (the dashboard refund stayed
    settled in our books while the provider had failed it)."""
    stack = await open_stack(store, client, temporal_server.address, late_failure_window_seconds=3)
    try:
        refund = await failure_heard_while_the_tracking_run_ends(stack)
        row = await stack.store.cases.get(refund.case_id)
        assert row is not None and row["status"] == "refund_failed", row
        assert await refund.postings() == [("refund_settled", 700, "USD"), ("refund_reversed", 700, "USD")]
        assert ("refund_failed", "operator") in await refund.notices()
    finally:
        await stack.close()


async def test_a_watch_that_ends_without_a_final_status_tells_ops(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    """A dashboard refund left pending past the watch keeps its hold on the charge (it may
    still pay) and nothing else follows it (the closed-workflow sweep leaves a watch that
    completed; Cashfree and Adyen cannot be listed by a reconciliation run): ops are told
    once, with what the provider last said."""
    stack = await open_stack(store, client, temporal_server.address, late_failure_window_seconds=2)
    try:
        refund = Dashboard(stack)
        await refund.reports("pending")
        await asyncio.wait_for(stack.client.get_workflow_handle(refund.case_id).result(), 60)
        row = await stack.store.cases.get(refund.case_id)
        assert row is not None and (row["status"], row["reserved_amount"]) == ("pending", 700), row
        assert await refund.notices() == [("tracking_ended_without_final_status", "operator")]
        notice = await stack.store.outbox.notice(
            f"{refund.case_id}:tracking_ended_without_final_status:operator:pending")
        assert notice is not None
        message = render(notice, row, None, case_url=None, email_to=None)
        assert "pending" in message.text and refund.refund_id in message.text, message
        assert message.ticket == "incident"
        # its workflow told ops itself: the closed-workflow sweep has nothing to add
        assert refund.case_id not in await sweep_cases_once(stack.store, stack.client, stack.providers,
                                                            idle_seconds=0)
    finally:
        await stack.close()


async def test_a_tracking_case_whose_workflow_was_cancelled_goes_to_ops(watching: Stack) -> None:
    """A dashboard refund still pending when someone cancels (or terminates) its tracking
    workflow in Temporal: nothing follows it any more (its success would never be booked),
    so the closed-workflow sweep hands it to ops with a break, its hold kept, like our own
    cases. Before, tracking cases were outside the sweep."""
    refund = Dashboard(watching)
    await refund.reports("pending")
    await watching.wait_for_status(refund.case_id, "pending")
    handle = watching.client.get_workflow_handle(refund.case_id)
    await handle.cancel()
    with pytest.raises(WorkflowFailureError):
        await asyncio.wait_for(handle.result(), 60)
    assert refund.case_id in await sweep_cases_once(watching.store, watching.client, watching.providers,
                                                    idle_seconds=0)
    row = await watching.store.cases.get(refund.case_id)
    assert row is not None and (row["status"], row["reserved_amount"]) == ("ops_review", 700), row
    assert "workflow_closed_case_swept" in await watching.actions(refund.case_id)


async def test_a_tracking_case_whose_workflow_never_started_is_left_to_the_redrive(watching: Stack) -> None:
    """A tracking case recorded whose workflow Temporal never started (it was away; the
    relay's re-drive starts it): not handed to ops as if its workflow had ended, which would
    leave the re-drive signalling a case no workflow follows."""
    refund = ProviderRefund(provider="sandbox", refund_id=f"re_{uuid.uuid4().hex[:12]}",
                            charge_id="ch_redrive", amount=700, currency="USD",
                            status=ProviderRefundStatus.PENDING, raw_status="pending")
    case_id = tracking_case_id("sandbox", refund.refund_id)
    assert await watching.store.cases.open_tracking(case_id, refund, None, "refund.updated")
    assert case_id not in await sweep_cases_once(watching.store, watching.client, watching.providers,
                                                 idle_seconds=0)
    row = await watching.store.cases.get(case_id)
    assert row is not None and row["status"] == "tracking", row
