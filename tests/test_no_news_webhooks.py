"""A provider webhook that tells a case's workflow nothing new is not signalled (issue 21):
the status it reports is the one the workflow already applied (its own step wrote it) and
settled. Anything else still reaches the workflow: a late failure, a status the workflow's
own step has not applied yet (only reconciliation wrote it), a pending status (a wait that
any event ends), another refund carrying our reference, every event of a tracking case (its
workflow records repeats). The sandbox holds its webhooks until
the case shows what the test needs; the late-failure window keeps the workflow open."""

import uuid

import httpx
import pytest
from prometheus_client import REGISTRY
from temporalio.api.enums.v1 import EventType

from domain.events import tells_nothing_new, tracking_case_id
from domain.models import ProviderRefund, ProviderRefundStatus
from tests.harness import Stack
from tests.test_bad_input import event_body, signed
from tests.test_event_order import sandbox

SIGNALLED = EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED


def without_news() -> float:
    return REGISTRY.get_sample_value("refunds_webhook_events_without_news_total",
                                     {"provider": "sandbox"}) or 0.0


async def signals(stack: Stack, case_id: str) -> int:
    history = await stack.client.get_workflow_handle(case_id).fetch_history()
    return sum(e.event_type == SIGNALLED for e in history.events)


async def release_webhooks(stack: Stack) -> int:
    """Delivers the held webhooks, each answered by the relay before this returns; later
    ones go out at once."""
    released = await sandbox(stack, "POST", "/_sandbox/release-webhooks")
    await sandbox(stack, "POST", "/_sandbox/config", {"hold_webhooks": False})
    return int(released["released"])


async def succeeded_with_webhook_held(stack: Stack, amount: int) -> tuple[str, str, str]:
    """An auto-approved refund the workflow settled while the provider's `refund.created`
    (succeeded) waits at the sandbox: case, charge, provider refund id."""
    await sandbox(stack, "POST", "/_sandbox/config", {"hold_webhooks": True})
    charge = await stack.charge(10_000)
    case_id = await stack.request_refund("alice", charge, amount)
    row = await stack.wait_for_status(case_id, "succeeded")
    assert row["provider_refund_id"] is not None
    return case_id, charge, row["provider_refund_id"]


async def test_the_status_the_workflow_applied_is_not_signalled_a_late_failure_is(
        patient: Stack) -> None:
    case_id, _, refund_id = await succeeded_with_webhook_held(patient, 2_000)
    counted = without_news()
    assert await release_webhooks(patient) == 1
    assert without_news() == counted + 1
    [receipt] = [r for r in await patient.store.receipts.find("sandbox")
                 if r["workflow_id"] == case_id]
    assert receipt["verdict"] == "accepted" and receipt["processed_at"] is not None
    assert await signals(patient, case_id) == 0
    await patient.set_provider_status(refund_id, "failed", failure_reason="expired_or_canceled_card")
    row = await patient.wait_for_status(case_id, "refund_failed")
    assert await signals(patient, case_id) == 1
    assert row["reserved_amount"] == 0
    assert {e["posting_key"] for e in await patient.store.ledger.entries(case_id)} == {
        f"{case_id}:refund_settled", f"{case_id}:refund_reversed"}


async def test_a_status_only_reconciliation_wrote_still_reaches_the_workflow(patient: Stack) -> None:
    """Reconciliation's break settlement writes the case's provider status without the
    workflow knowing: a webhook reporting that status is news to the workflow."""
    case_id, _, refund_id = await succeeded_with_webhook_held(patient, 2_100)
    await release_webhooks(patient)
    await patient.store.database.execute(
        "UPDATE refund_cases SET provider_status = 'failed' WHERE refund_request_id = %s", (case_id,))
    await patient.set_provider_status(refund_id, "failed", failure_reason="lost_or_stolen_card")
    await patient.wait_for_audit(case_id, "refund_failed_after_success")
    assert await signals(patient, case_id) == 1


async def test_a_pending_status_is_signalled_even_when_applied(patient: Stack) -> None:
    """A pending refund's wait ends with any event about it (a provider without a status
    lookup answers only by event), so an unsettled status always goes through."""
    await sandbox(patient, "POST", "/_sandbox/config",
                  {"hold_webhooks": True, "refund_initial_status": "pending"})
    charge = await patient.charge(10_000)
    case_id = await patient.request_refund("alice", charge, 2_200)
    row = await patient.wait_for_status(case_id, "pending")
    assert await release_webhooks(patient) == 1
    assert await signals(patient, case_id) == 1
    await patient.set_provider_status(row["provider_refund_id"], "succeeded")
    await patient.wait_for_status(case_id, "succeeded")
    assert await signals(patient, case_id) == 2


async def test_a_tracking_case_gets_every_event(patient: Stack) -> None:
    """A refund the provider made without us is followed by a tracking workflow, whose steps
    do not write `applied_*`: a repeat still reaches it (and is recorded there)."""
    charge = await patient.charge(10_000)
    refund_id = f"re_{uuid.uuid4().hex[:12]}"
    refund = {"id": refund_id, "object": "refund", "charge": charge, "amount": 1_000,
              "currency": "usd", "status": "succeeded", "metadata": {}}
    secret = patient.settings.sandbox_webhook_secret
    assert secret is not None
    case_id = tracking_case_id("sandbox", refund_id)
    async with httpx.AsyncClient(base_url=patient.relay_url, timeout=30) as http:
        for _ in range(2):
            body = event_body("refund.updated", refund)
            response = await http.post("/webhooks/sandbox", content=body,
                                       headers=signed(secret.get_secret_value(), body))
            assert response.status_code == 200 and response.json()["workflow_id"] == case_id
            await patient.wait_for_audit(case_id, "refund_succeeded")
    await patient.wait_for_audit(case_id, "provider_status_same_ignored")
    assert await signals(patient, case_id) == 2


def _refund(refund_id: str, status: ProviderRefundStatus) -> ProviderRefund:
    return ProviderRefund(provider="sandbox", refund_id=refund_id, charge_id="ch_1", amount=100,
                          currency="USD", status=status, raw_status=status.value)


@pytest.mark.parametrize(("applied_id", "applied", "reported_id", "reported", "no_news"), [
    ("re_1", "succeeded", "re_1", ProviderRefundStatus.SUCCEEDED, True),
    ("re_1", "failed", "re_1", ProviderRefundStatus.FAILED, True),
    ("re_1", "canceled", "re_1", ProviderRefundStatus.CANCELED, True),
    ("re_1", "succeeded", "re_2", ProviderRefundStatus.SUCCEEDED, False),  # a second refund: an incident
    ("re_1", "succeeded", "re_1", ProviderRefundStatus.FAILED, False),  # a late failure
    ("re_1", "succeeded", "re_1", ProviderRefundStatus.PENDING, False),  # stale: the trail records it
    ("re_1", "pending", "re_1", ProviderRefundStatus.PENDING, False),  # ends a wait
    (None, None, "re_1", ProviderRefundStatus.SUCCEEDED, False),  # nothing applied yet
])
def test_what_counts_as_nothing_new(applied_id: str | None, applied: str | None, reported_id: str,
                                    reported: ProviderRefundStatus, no_news: bool) -> None:
    assert tells_nothing_new(applied_id, applied, _refund(reported_id, reported), (100, "USD")) is no_news


@pytest.mark.parametrize("booked", [(120, "USD"), (100, "EUR")])
def test_the_applied_refund_for_other_money_than_the_case_booked_is_news(booked: tuple[int, str]) -> None:
    """Ops' reading of a wait booked the case's money; the provider's own word for the same
    refund in the same status names other money: the case must hear it."""
    assert not tells_nothing_new("re_1", "succeeded", _refund("re_1", ProviderRefundStatus.SUCCEEDED), booked)
    # a case in ops review (a mismatch took it there): its repeats are not signalled again
    assert tells_nothing_new("re_1", "succeeded", _refund("re_1", ProviderRefundStatus.SUCCEEDED), None)
