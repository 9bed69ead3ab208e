"""Approval paths through the relay: who may approve, what approve, deny and expiry do to
the case, its reservation and the money at the provider."""

import json
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from temporalio.client import Client

from adapters.approval_seal import ApprovalKeys
from adapters.db import Store
from adapters.db.rows import NoticeRow
from domain.models import ApprovalSignal, Decision
from starters.dev.stack import TemporalDevServer
from tests.fakes import eventually
from tests.harness import APPROVAL_KEYS, Stack, open_stack, with_seal
from workflows.refund import RefundWorkflow


async def request_refund(stack: Stack, charge: str, amount: int, **overrides: Any) -> str:
    body = stack.refund_body(charge, amount, **overrides)
    async with stack.api("alice") as api:
        response = await api.post("/v1/refund-requests", json=body)
    assert response.status_code == 202, response.text
    return str(body["refund_request_id"])


async def decide(stack: Stack, user: str, case_id: str, decision: str, reason: str = "",
                 token: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token or stack.tokens[user]}"}
    async with httpx.AsyncClient(base_url=stack.relay_url, timeout=30, headers=headers) as http:
        return await http.post(f"/v1/refund-requests/{case_id}/approvals",
                               json={"decision": decision, "reason": reason})


async def case_view(stack: Stack, case_id: str, user: str = "dave") -> dict[str, Any]:
    async with stack.api(user) as api:
        response = await api.get(f"/v1/refund-requests/{case_id}")
    assert response.status_code == 200, response.text
    return dict(response.json())


async def test_refund_above_threshold_waits_for_an_approver(stack: Stack) -> None:
    charge = await stack.charge(20_000)
    case_id = await request_refund(stack, charge, 9_000)
    row = await stack.wait_for_status(case_id, "awaiting_approval")
    assert row["reserved_amount"] == 9_000
    assert row["decision"]["rules_fired"] == ["amount_above_threshold"]
    assert await stack.provider_refunds(charge) == []

    response = await decide(stack, "bob", case_id, "approve", "customer called")
    assert response.status_code == 202, response.text
    assert response.json()["decision"] == "approve"
    row = await stack.wait_for_status(case_id, "succeeded")
    assert row["reserved_amount"] == 9_000
    refunds = await stack.provider_refunds(charge)
    assert [(r["amount"], r["status"]) for r in refunds] == [(9_000, "succeeded")]
    assert row["provider_refund_id"] == refunds[0]["id"]

    view = await case_view(stack, case_id)
    assert [(a["approver"], a["action"], a["reason"]) for a in view["approvals"]] == [
        ("bob", "approval_granted", "customer called")]

    late = await decide(stack, "carol", case_id, "approve")
    assert late.status_code == 409, late.text
    assert "succeeded" in late.json()["detail"]
    assert len(await stack.provider_refunds(charge)) == 1


async def test_requester_cannot_approve_their_own_refund(stack: Stack) -> None:
    charge = await stack.charge(20_000)
    case_id = await request_refund(stack, charge, 9_000)
    await stack.wait_for_status(case_id, "awaiting_approval")

    # alice's own token has no approver role: refused before any self-approval check.
    response = await decide(stack, "alice", case_id, "approve")
    assert response.status_code == 403, response.text
    # even holding the approver role, alice may not approve what she requested.
    dual = await stack.store.access.create_token("alice", ["requester", "approver"], by="test")
    response = await decide(stack, "alice", case_id, "approve", token=dual)
    assert response.status_code == 403, response.text
    assert "own refund" in response.json()["detail"]

    trail = await stack.store.audit.trail(case_id)
    refusals = [(e["actor"], e["action"]) for e in trail if e["actor"] == "alice"
                and e["action"] in ("access_refused", "approval_refused")]
    assert refusals == [("alice", "access_refused"), ("alice", "approval_refused")]
    state = await stack.client.get_workflow_handle(case_id).query(RefundWorkflow.state)
    assert state.approvals == () and state.status == "awaiting_approval"
    row = await stack.store.cases.get(case_id)
    assert row is not None and row["status"] == "awaiting_approval" and row["reserved_amount"] == 9_000
    assert await stack.provider_refunds(charge) == []
    view = await case_view(stack, case_id, user="bob")
    assert [(a["approver"], a["action"]) for a in view["approvals"]] == [("alice", "approval_refused")]


async def test_an_approval_whose_approver_s_access_was_revoked_before_the_money_moves_does_not_count(
        stack: Stack) -> None:
    """A stolen token approves one half of a two-approver refund; the admin revokes it; hours
    later the second approver approves, and the refund paid on the revoked approval
    (reproduced). At the money's gate an approver whose token was revoked after the case
    asked for approvals counts no more: nothing is submitted, the case goes to ops review
    with the reason recorded, ops told."""
    approver = f"bea-{uuid.uuid4().hex[:6]}"
    token = await stack.store.access.create_token(approver, ["approver"], by="test")
    charge = await stack.charge(100_000)
    case_id = await request_refund(stack, charge, 60_000)
    row = await stack.wait_for_status(case_id, "awaiting_approval")
    assert (await decide(stack, approver, case_id, "approve", "looks fine", token=token)).status_code == 202
    assert await stack.store.access.revoke_tokens(by="admin", user=approver)
    assert (await decide(stack, "frank", case_id, "approve", "finance checked")).status_code == 202
    row = await stack.wait_for_status(case_id, "ops_review")
    assert await stack.provider_refunds(charge) == []
    [refused] = [e["detail"]["reason"] for e in await stack.store.audit.trail(case_id)
                 if e["action"] == "submission_refused"]
    assert approver in refused and "revoked" in refused, refused
    assert row["provider_refund_id"] is None and await stack.store.ledger.entries(case_id) == []

    async def ops_told() -> list[NoticeRow]:  # queued by the workflow after its audit row
        notices = await stack.store.outbox.notices(case_id)
        return [n for n in notices if n["kind"] == "submit_refused_case_moved_on"]
    [told] = await eventually(ops_told)
    assert told["audience"] == "operator" and approver in json.dumps(told["detail"]), told


@pytest.mark.parametrize("deciding", [False, True])
async def test_a_verdict_sealed_before_its_token_was_revoked_and_taken_after_does_not_count(
        stack: Stack, client: Client, deciding: bool) -> None:
    """The relay sealed bea's approval while her token was live, and the worker took it only
    after the admin revoked that token (the relay's durable signal after a worker slow to
    answer, up to the seal's 15 minutes). Recorded after the revocation, the approval was
    never matched by the money gate (it asked for tokens revoked after an approval was
    recorded), nor asked about at all as the deciding one: the refund paid (reproduced). A
    verdict is the token's as of its seal: revoked since, it counts no more."""
    approver = f"bea-{uuid.uuid4().hex[:6]}"
    await stack.store.access.create_token(approver, ["approver"], by="test")
    charge = await stack.charge(100_000)
    case_id = await request_refund(stack, charge, 60_000)
    await stack.wait_for_status(case_id, "awaiting_approval")
    if deciding:
        assert (await decide(stack, "frank", case_id, "approve", "finance checked")).status_code == 202
        await stack.wait_for_audit(case_id, "approval_granted")
    verdict = ApprovalSignal(approver=approver, roles=("approver",), decision=Decision.APPROVE,
                             reason="looks fine")
    chain = (await client.get_workflow_handle(case_id).describe()).run_id
    seal = ApprovalKeys([APPROVAL_KEYS]).seal(case_id, verdict, chain=chain, now=datetime.now(UTC))
    assert await stack.store.access.revoke_tokens(by="admin", user=approver)
    await with_seal(client, seal).get_workflow_handle(case_id).signal(RefundWorkflow.approve, verdict)
    if not deciding:
        await stack.wait_for_audit(case_id, "approval_granted")
        assert (await decide(stack, "frank", case_id, "approve", "finance checked")).status_code == 202
    row = await stack.wait_for_status(case_id, "ops_review")
    assert await stack.provider_refunds(charge) == [] and row["provider_refund_id"] is None
    [refused] = [e["detail"]["reason"] for e in await stack.store.audit.trail(case_id)
                 if e["action"] == "submission_refused"]
    assert approver in refused and "revoked" in refused, refused


async def test_an_approval_given_with_a_token_made_after_the_old_one_was_revoked_counts(
        stack: Stack) -> None:
    """A person replaces their token (the old one revoked) while the case waits, then
    approves with the new one: their approval counts (the refund pays). Only a token live
    when the approval was given and revoked since voids it."""
    approver = f"cy-{uuid.uuid4().hex[:6]}"
    await stack.store.access.create_token(approver, ["approver"], by="test")
    charge = await stack.charge(100_000)
    case_id = await request_refund(stack, charge, 60_000)
    await stack.wait_for_status(case_id, "awaiting_approval")
    assert await stack.store.access.revoke_tokens(by="admin", user=approver)
    replaced = await stack.store.access.create_token(approver, ["approver"], by="test")
    assert (await decide(stack, approver, case_id, "approve", "fine", token=replaced)).status_code == 202
    assert (await decide(stack, "frank", case_id, "approve", "finance checked")).status_code == 202
    await stack.wait_for_status(case_id, "succeeded")
    assert [r["amount"] for r in await stack.provider_refunds(charge)] == [60_000]


async def test_denial_releases_the_reservation_and_moves_no_money(stack: Stack) -> None:
    charge = await stack.charge(20_000)
    case_id = await request_refund(stack, charge, 9_000)
    await stack.wait_for_status(case_id, "awaiting_approval")

    response = await decide(stack, "bob", case_id, "deny", "no proof of return")
    assert response.status_code == 202, response.text
    row = await stack.wait_for_status(case_id, "denied")
    assert row["reserved_amount"] == 0 and row["provider_refund_id"] is None
    assert await stack.provider_refunds(charge) == []
    assert await stack.store.ledger.entries(case_id) == []
    view = await case_view(stack, case_id)
    assert [(a["approver"], a["action"], a["reason"]) for a in view["approvals"]] == [
        ("bob", "approval_denied", "no proof of return")]

    late = await decide(stack, "carol", case_id, "approve")
    assert late.status_code == 409, late.text
    after = await stack.store.cases.get(case_id)
    assert after is not None and after["status"] == "denied"
    assert await stack.provider_refunds(charge) == []


async def test_unanswered_approval_expires_and_releases_the_reservation(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    stack = await open_stack(store, client, temporal_server.address, approval_timeout_seconds=2)
    try:
        charge = await stack.charge(20_000)
        case_id = await request_refund(stack, charge, 9_000)
        row = await stack.wait_for_status(case_id, "expired")
        assert row["reserved_amount"] == 0 and row["provider_refund_id"] is None
        actions = [e["action"] for e in await stack.store.audit.trail(case_id)]
        assert "approval_requested" in actions and "approval_expired" in actions
        assert "provider_submit_started" not in actions
        late = await decide(stack, "bob", case_id, "approve")
        assert late.status_code == 409, late.text
        assert await stack.provider_refunds(charge) == []
        await stack.client.get_workflow_handle(case_id).result()
        notices = {(n["kind"], n["audience"]) for n in await stack.store.outbox.notices(case_id)}
        assert ("approval_expired", "requester") in notices, notices  # as a denial tells them
        # asked again small, it still goes to people (then expires too, here)
        again = await request_refund(stack, charge, 1_000)
        row = await stack.wait_for_status(again, "expired")
        assert row["decision"]["rules_fired"] == ["prior_refusal_on_charge"], row["decision"]
        assert await stack.provider_refunds(charge) == []
    finally:
        await stack.close()


async def test_small_refund_without_order_id_needs_approval(stack: Stack) -> None:
    charge = await stack.charge(20_000)
    case_id = await request_refund(stack, charge, 1_000, evidence={})
    row = await stack.wait_for_status(case_id, "awaiting_approval")
    assert row["decision"]["rules_fired"] == ["missing_evidence:order_id"]
    assert row["decision"]["auto_approve"] is False
    assert await stack.provider_refunds(charge) == []

    assert (await decide(stack, "carol", case_id, "approve")).status_code == 202
    await stack.wait_for_status(case_id, "succeeded")
    refunds = await stack.provider_refunds(charge)
    assert [r["amount"] for r in refunds] == [1_000]
    view = await case_view(stack, case_id, user="alice")
    assert [(a["approver"], a["action"]) for a in view["approvals"]] == [("carol", "approval_granted")]


async def test_a_refused_refund_asked_again_on_its_charge_goes_to_people(stack: Stack) -> None:
    """A denial is people's answer about the money on this charge. Asked again under a new
    id, with the evidence added that made the first need approval (alice's choice), the
    small refund was auto-approved and paid minutes after bob refused it. Every later
    request on the charge now goes to people, the earlier refusal among its rules."""
    charge = await stack.charge(20_000)
    first = await request_refund(stack, charge, 1_000, evidence={})
    await stack.wait_for_status(first, "awaiting_approval")
    assert (await decide(stack, "bob", first, "deny", "the customer kept the goods")).status_code == 202
    await stack.wait_for_status(first, "denied")

    again = await request_refund(stack, charge, 1_000)
    row = await stack.wait_for_status(again, "awaiting_approval")
    assert row["decision"]["rules_fired"] == ["prior_refusal_on_charge"], row["decision"]
    assert row["decision"]["context"]["prior_refusal_count"] == 1
    assert await stack.provider_refunds(charge) == []
    assert (await decide(stack, "carol", again, "approve")).status_code == 202
    await stack.wait_for_status(again, "succeeded")
    assert [r["amount"] for r in await stack.provider_refunds(charge)] == [1_000]

    # another charge's refusal says nothing about this one
    other = await stack.charge(20_000)
    fresh = await request_refund(stack, other, 1_000)
    await stack.wait_for_status(fresh, "succeeded")


async def test_approval_of_unknown_case_is_404(stack: Stack) -> None:
    response = await decide(stack, "bob", stack.new_id(), "approve")
    assert response.status_code == 404, response.text


async def test_approver_identity_cannot_come_from_the_body(stack: Stack) -> None:
    charge = await stack.charge(20_000)
    case_id = await request_refund(stack, charge, 9_000)
    await stack.wait_for_status(case_id, "awaiting_approval")
    async with stack.api("carol") as api:
        response = await api.post(f"/v1/refund-requests/{case_id}/approvals",
                                  json={"decision": "approve", "approver": "bob"})
    assert response.status_code == 422, response.text
    assert any(e["loc"][-1] == "approver" for e in response.json()["detail"])
    state = await stack.client.get_workflow_handle(case_id).query(RefundWorkflow.state)
    assert state.approvals == () and state.status == "awaiting_approval"
    assert await stack.provider_refunds(charge) == []
