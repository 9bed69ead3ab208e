"""Webhooks arrive late, twice and out of order: a terminal state delivered before
`created`, and a stale `pending` after `succeeded`, both end in the right final state.
The sandbox holds its signed webhooks and releases them reversed; the status poll is set
long, so the webhooks (not verify-state) are what moves the case."""

from typing import Any

import pytest

from tests.harness import Stack


async def sandbox(stack: Stack, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    async with stack.sandbox() as sb:
        response = await sb.request(method, path, json=body)
    response.raise_for_status()
    return response.json()


async def request(stack: Stack, amount: int) -> tuple[str, str]:
    charge = await stack.charge(10_000)
    body = stack.refund_body(charge, amount)
    async with stack.api("alice") as api:
        assert (await api.post("/v1/refund-requests", json=body)).status_code == 202
    return body["refund_request_id"], charge


@pytest.mark.parametrize(("terminal", "case_status"),
                         [("succeeded", "succeeded"), ("failed", "refund_failed")])
async def test_terminal_state_delivered_before_created(patient: Stack, terminal: str,
                                                       case_status: str) -> None:
    await sandbox(patient, "POST", "/_sandbox/config",
                  {"hold_webhooks": True, "refund_initial_status": "pending"})
    case_id, charge = await request(patient, 3_000)
    row = await patient.wait_for_status(case_id, "pending")
    assert (await sandbox(patient, "GET", "/_sandbox/held-webhooks"))["held"] == 1  # refund.created
    await sandbox(patient, "POST", f"/_sandbox/refunds/{row['provider_refund_id']}/status",
                  {"status": terminal,
                   "failure_reason": "lost_or_stolen_card" if terminal == "failed" else None})
    released = await sandbox(patient, "POST", "/_sandbox/release-webhooks?reverse=1")
    assert released == {"released": 2}
    final = await patient.wait_for_status(case_id, case_status)
    actions = await patient.wait_for_audit(
        case_id, "provider_status_stale_ignored" if terminal == "succeeded" else "refund_failed")
    assert actions.count("provider_submit_started") == 1
    templates = [x["template"] for x in await patient.store.ledger.entries(case_id)]
    if terminal == "succeeded":
        assert templates == ["refund_settled", "refund_settled"] and final["reserved_amount"] == 3_000
    else:
        assert templates == [] and final["reserved_amount"] == 0
        assert final["failure_reason"] == "lost_or_stolen_card"
    assert [r["status"] for r in await patient.provider_refunds(charge)] == [terminal]


async def test_stale_pending_after_succeeded_changes_nothing(patient: Stack) -> None:
    case_id, charge = await request(patient, 2_000)
    row = await patient.wait_for_status(case_id, "succeeded")
    [refund] = await patient.provider_refunds(charge)
    await sandbox(patient, "POST", "/_sandbox/events",
                  {"type": "refund.updated", "object": {**refund, "status": "pending"}})
    await patient.wait_for_audit(case_id, "provider_status_stale_ignored")
    after = await patient.store.cases.get(case_id)
    assert after is not None
    assert (after["status"], after["provider_status"]) == ("succeeded", "succeeded")
    assert after["reserved_amount"] == 2_000
    assert after["provider_refund_id"] == row["provider_refund_id"]
    assert len(await patient.store.ledger.entries(case_id)) == 2
