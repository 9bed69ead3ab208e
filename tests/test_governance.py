"""Approvals by tier, segregation of duties, reminders, and the audit trail's integrity."""

import asyncio
from typing import Any

from temporalio.client import Client

from adapters.db import Store
from starters.dev.stack import TemporalDevServer
from tests.harness import Stack, open_stack


async def approve(stack: Stack, user: str, case_id: str, decision: str = "approve") -> Any:
    async with stack.api(user) as api:
        return await api.post(f"/v1/refund-requests/{case_id}/approvals",
                              json={"decision": decision, "reason": f"{user} looked"})


async def test_large_tier_needs_an_approver_and_a_finance_manager(stack: Stack) -> None:
    charge = await stack.charge(100_000)
    case_id = await stack.request_refund("alice", charge, 60_000)
    await stack.wait_for_status(case_id, "awaiting_approval")
    first = await approve(stack, "bob", case_id)
    assert first.status_code == 202 and first.json()["missing_roles"] == ["finance_manager"]
    second = await approve(stack, "carol", case_id)  # another approver fills nothing
    assert second.status_code == 403 and "already filled" in second.json()["detail"]
    again = await approve(stack, "bob", case_id)
    assert again.status_code == 403 and "already approved" in again.json()["detail"]
    assert (await stack.store.cases.get(case_id))["status"] == "awaiting_approval"  # type: ignore[index]
    assert not await stack.provider_refunds(charge)
    final = await approve(stack, "frank", case_id)
    assert final.status_code == 202 and final.json()["missing_roles"] == []
    await stack.wait_for_status(case_id, "succeeded")
    assert [r["amount"] for r in await stack.provider_refunds(charge)] == [60_000]
    actions = await stack.actions(case_id)
    assert actions.count("approval_granted") == 2 and actions.count("approval_refused") == 2


async def test_identity_behind_the_trigger_cannot_approve(stack: Stack) -> None:
    charge = await stack.charge(20_000)
    case_id = await stack.open_case("alice", charge, 9_000, trigger_identities=["bob"])
    await stack.wait_for_status(case_id, "awaiting_approval")
    refused = await approve(stack, "bob", case_id)
    assert refused.status_code == 403
    assert "triggering event" in refused.json()["detail"]
    trail = await stack.store.audit.trail(case_id)
    assert [e["actor"] for e in trail if e["action"] == "approval_refused"] == ["bob"]
    assert (await approve(stack, "carol", case_id)).status_code == 202
    await stack.wait_for_status(case_id, "succeeded")


async def test_unanswered_approval_reminds_escalates_then_expires(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    stack = await open_stack(store, client, temporal_server.address, approval_timeout_seconds=3,
                             approval_reminder_seconds=1, approval_escalation_seconds=2)
    try:
        charge = await stack.charge(20_000)
        case_id = await stack.request_refund("alice", charge, 9_000)
        row = await stack.wait_for_status(case_id, "expired")
        assert row["reserved_amount"] == 0
        actions = await stack.actions(case_id)
        assert actions.index("approval_reminder") < actions.index("approval_escalated") \
            < actions.index("approval_expired")
        await stack.client.get_workflow_handle(case_id).result()  # its last notice is written
        kinds = [(n["kind"], n["audience"]) for n in await store.outbox.notices(case_id)]
        assert kinds == [("approval_needed", "approvers"), ("approval_reminder", "approvers"),
                         ("approval_escalated", "escalation"), ("approval_expired", "requester")]
        assert not await stack.provider_refunds(charge)
    finally:
        await stack.close()


async def test_audit_trail_is_hash_chained_and_tampering_is_detected(stack: Stack) -> None:
    charge = await stack.charge(10_000)
    case_id = await stack.request_refund("alice", charge, 1_000)
    await stack.wait_for_status(case_id, "succeeded")
    trail = await stack.store.audit.trail(case_id)
    assert [e["seq"] for e in trail] == list(range(1, len(trail) + 1))

    def mine(problems: list[str]) -> list[str]:
        return [p for p in problems if f"chain {case_id} " in p]

    assert mine((await stack.store.audit.verify())[1]) == []
    async with stack.store.database.transaction() as conn:  # what only a superuser could do
        await conn.execute("ALTER TABLE audit_events DISABLE TRIGGER audit_events_no_update")
        await conn.execute("UPDATE audit_events SET detail = detail || '{\"amount\": 1}'::jsonb"
                           " WHERE chain = %s AND seq = 1", (case_id,))
        await conn.execute("DELETE FROM audit_events WHERE chain = %s AND seq = 3", (case_id,))
        await conn.execute("ALTER TABLE audit_events ENABLE TRIGGER audit_events_no_update")
    problems = mine((await stack.store.audit.verify())[1])
    assert any("seq 1" in p and "edited" in p for p in problems)
    assert any("seq 4" in p and "missing" in p for p in problems)
    async with stack.store.database.transaction() as conn:
        try:
            await conn.execute("DELETE FROM audit_events WHERE chain = %s", (case_id,))
            raise AssertionError("the audit trail accepted a delete")
        except Exception as exc:  # the trigger refuses, the database says why
            assert "append-only" in str(exc)


async def test_concurrent_requests_from_every_entry_point_never_exceed_the_capture(
        stack: Stack) -> None:
    charge = await stack.charge(10_000)
    secret = stack.settings.sandbox_webhook_secret
    assert secret is not None

    async def by_api(i: int) -> None:
        async with stack.api("alice") as api:
            await api.post("/v1/refund-requests", json=stack.refund_body(charge, 1_500))

    async def by_webhook(i: int) -> None:
        async with stack.sandbox() as sb:
            await sb.post("/_sandbox/events", json={"type": "refund.requested", "object": {
                "id": f"rrq_{stack.new_id()}", "object": "refund_request", "charge": charge,
                "amount": 1_500, "currency": "usd", "merchant_account": "acct_1",
                "reason": "duplicate", "evidence": {"order_id": "o"}}})

    await asyncio.gather(*(by_api(i) if i % 2 else by_webhook(i) for i in range(12)))
    async with stack.store.database.transaction() as conn:
        cur = await conn.execute("SELECT refund_request_id FROM refund_cases WHERE charge_id = %s",
                                 (charge,))
        cases = [r["refund_request_id"] for r in await cur.fetchall()]
    for _ in range(600):
        rows = [await stack.store.cases.get(c) for c in cases]
        if len(cases) == 12 and all(r and r["status"] not in (
                "requested", "validating", "executing", "verifying", "pending") for r in rows):
            break
        await asyncio.sleep(0.1)
        async with stack.store.database.transaction() as conn:
            cur = await conn.execute("SELECT refund_request_id FROM refund_cases WHERE charge_id = %s",
                                     (charge,))
            cases = [r["refund_request_id"] for r in await cur.fetchall()]
    refunded = sum(r["amount"] for r in await stack.provider_refunds(charge))
    assert refunded <= 10_000
    statuses = [(await stack.store.cases.get(c))["status"] for c in cases]  # type: ignore[index]
    assert len(cases) == 12
    assert statuses.count("rejected") >= 12 - 6  # at most six 15.00 refunds fit in 100.00
    held = sum(r["reserved_amount"] for r in [await stack.store.cases.get(c) for c in cases] if r)
    assert held <= 10_000
