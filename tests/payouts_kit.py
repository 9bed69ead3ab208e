"""Helpers for payout reversal tests and recorded histories: payouts made at the sandbox
provider and booked as paid in our books, their status moved at the provider (signed
webhooks), the payout tiers' approvers, and waits on the case row."""

import asyncio
import uuid
from typing import Any

import httpx

from adapters.db.rows import PayoutCaseRow
from domain.payouts import PayoutSnapshot, PayoutStatus, payout_case_id
from tests.harness import Stack

PAYOUT_APPROVERS = {"lena": ["payments_ops_lead"], "fiona": ["finance_manager"], "cora": ["compliance"],
                    "tess": ["treasury"], "omar": ["ops", "payments_ops_lead"]}


async def add_payout_approvers(stack: Stack) -> None:
    """Tokens for the roles the payout tiers name (the harness has the refund roles)."""
    for user, roles in PAYOUT_APPROVERS.items():
        stack.tokens[user] = await stack.store.access.create_token(user, roles, by="test",
                                                                   token=f"t-{user}-{uuid.uuid4().hex}")


async def paid_payout(stack: Stack, amount: int, *, payout_id: str | None = None,
                      beneficiary: str | None = None, currency: str = "USD") -> PayoutSnapshot:
    """A payout made at the provider and booked as paid, as the payments system does."""
    async with stack.sandbox() as sb:
        response = await sb.post("/v1/payouts", json={"amount": amount, "currency": currency,
                                                      "id": payout_id})
    response.raise_for_status()
    provider_id = str(response.json()["id"])
    payout = PayoutSnapshot(id=payout_id or f"P-{uuid.uuid4().hex[:10]}", provider="sandbox",
                            provider_payout_id=provider_id,
                            beneficiary_id=beneficiary or f"ben-{uuid.uuid4().hex[:8]}", amount=amount,
                            currency=currency, status=PayoutStatus.PAID)
    assert await stack.store.payouts.record_payout(payout)
    return payout


async def move_payout(stack: Stack, provider_payout_id: str, status: str, *,
                      failure_code: str | None = None, copies: int = 1) -> str:
    """Moves the payout at the provider, which sends signed webhooks; returns the event id."""
    async with stack.sandbox() as sb:
        response = await sb.post(f"/_sandbox/payouts/{provider_payout_id}/status",
                                 json={"status": status, "failure_code": failure_code, "copies": copies})
    response.raise_for_status()
    return str(response.json()["event_id"])


async def decide(stack: Stack, user: str, case_id: str, decision: str = "approve") -> httpx.Response:
    """A verdict on the round the case shows now, as an approver who just read it gives it."""
    async with stack.api(user) as api:
        shown = (await api.get(f"/v1/payout-exceptions/{case_id}")).json()
        return await api.post(f"/v1/payout-exceptions/{case_id}/approvals", json={
            "decision": decision, "reason": f"{user} checked the payout",
            "awaiting": shown.get("status", "awaiting_approval")})


async def ask_reissue(stack: Stack, user: str, case_id: str) -> httpx.Response:
    async with stack.api(user) as api:
        return await api.post(f"/v1/payout-exceptions/{case_id}/reissue",
                              json={"reason": "beneficiary confirmed their bank details"})


async def remediated(stack: Stack, amount: int, failure_code: str = "account_closed",
                     **payout: Any) -> tuple[PayoutSnapshot, str]:
    """A paid payout the provider failed, its reversal approved (by lena) and done: the
    payout and its case id."""
    made = await paid_payout(stack, amount, **payout)
    return made, await remediate(stack, made.provider_payout_id, failure_code)


async def remediate(stack: Stack, provider_payout_id: str, failure_code: str = "account_closed") -> str:
    """The provider fails the payout; its reversal is approved (by lena) and done: its case id."""
    await move_payout(stack, provider_payout_id, "failed", failure_code=failure_code)
    case_id = payout_case_id("sandbox", provider_payout_id)
    await wait_for_case(stack, case_id, "awaiting_approval")
    assert (await decide(stack, "lena", case_id)).status_code == 202
    await wait_for_case(stack, case_id, "remediated")
    return case_id


async def reissues_at_provider(stack: Stack, reference: str) -> list[dict[str, Any]]:
    """The payouts the sandbox holds under a reissue's reference (`PayoutSnapshot.reissue_id`)."""
    async with stack.sandbox() as sb:
        response = await sb.get("/v1/payouts", params={"reference": reference})
    return list(response.json()["data"])


async def view(stack: Stack, case_id: str, user: str = "dave") -> dict[str, Any]:
    async with stack.api(user) as api:
        response = await api.get(f"/v1/payout-exceptions/{case_id}")
    assert response.status_code == 200, response.text
    return dict(response.json())


async def wait_for_case(stack: Stack, case_id: str, *statuses: str, timeout: float = 60) -> PayoutCaseRow:
    """Polls the case row (what the API reads) until it reaches one of `statuses`."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        row = await stack.store.payouts.case(case_id)
        if row is not None and row["status"] in statuses:
            return row
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{case_id} stuck in {row['status'] if row else None}, wanted {statuses}")
        await asyncio.sleep(0.1)


async def wait_for_actions(stack: Stack, case_id: str, action: str, count: int = 1,
                           timeout: float = 60) -> list[dict[str, Any]]:
    """Polls the case's timeline until `action` appears `count` times; returns the trail."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        trail = await stack.store.audit.trail(case_id)
        if [e["action"] for e in trail].count(action) >= count:
            return trail
        if asyncio.get_running_loop().time() > deadline:
            actions = [e["action"] for e in trail]
            raise AssertionError(f"{case_id} never recorded {action} x{count}: {actions}")
        await asyncio.sleep(0.1)


def notice_kinds(trail: list[dict[str, Any]]) -> list[str]:
    return [e["detail"]["kind"] for e in trail if e["action"] == "notice_queued"]
