"""Helpers for the reconciliation tests: provider history seeded at the sandbox in bulk,
cases seeded as the refund workflow leaves them, backfills run through the relay, and
waits on exception cases."""

import asyncio
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from domain.models import (
    CaseEventInput,
    CaseStatus,
    LedgerInput,
    LedgerKind,
    ProviderRefund,
    ProviderRefundStatus,
    RefundReason,
    RefundRequest,
)
from starters.cli.progress import follow_run
from tests.harness import Stack


def ago(days: float) -> datetime:
    return datetime.now(UTC) - timedelta(days=days)


def history(charge: str, amount: int, days_ago: float, *, status: str = "succeeded",
            failure_reason: str | None = None, reference: str | None = None,
            currency: str = "usd") -> dict[str, Any]:
    """A provider refund that happened `days_ago`, with its id chosen here."""
    return {"id": f"re_{uuid.uuid4().hex[:14]}", "charge": charge, "amount": amount, "currency": currency,
            "status": status, "failure_reason": failure_reason, "created": int(ago(days_ago).timestamp()),
            "metadata": {"refund_request_id": reference} if reference else {}}


async def seed_provider(stack: Stack, refunds: list[dict[str, Any]]) -> None:
    """Charges and refunds at the sandbox, as history (no webhooks)."""
    charges = [{"id": c, "amount": 1_000_000, "currency": "usd", "merchant_account": "acct_1"}
               for c in {r["charge"] for r in refunds}]
    async with stack.sandbox() as sb:
        (await sb.post("/_sandbox/import", json={"charges": charges, "refunds": refunds})).raise_for_status()


async def seed_case(stack: Stack, refund: dict[str, Any], *, status: CaseStatus = CaseStatus.SUCCEEDED,
                    held: ProviderRefundStatus = ProviderRefundStatus.SUCCEEDED, settled: int = 1,
                    amount: int | None = None, currency: str = "USD", requester: str = "alice") -> str:
    """A case as RefundWorkflow leaves it once the provider reported `held` for `refund`
    (its workflow long closed): the refund recorded, `settled` settlement postings, `status`."""
    case_id = refund["metadata"].get("refund_request_id") or stack.new_id("hist")
    request = RefundRequest(
        refund_request_id=case_id, provider="sandbox", charge_id=refund["charge"],
        amount=amount or refund["amount"], currency=currency, merchant_account="acct_1",
        reason=RefundReason.REQUESTED_BY_CUSTOMER, evidence={"order_id": f"o-{case_id}"})
    store = stack.store
    await store.cases.create(request, requester)
    await store.cases.record_provider_refund(case_id, ProviderRefund(
        provider="sandbox", refund_id=refund["id"], charge_id=refund["charge"], amount=request.amount,
        currency=currency, status=held, raw_status=held.value,
        reference=case_id), "provider_refund_created")
    for copy in range(settled):
        await store.ledger.post(LedgerInput(
            refund_request_id=case_id, kind=LedgerKind.REFUND_SETTLED, amount=request.amount,
            currency=currency, provider_refund_id=refund["id"], reference=f"copy{copy}" if copy else None))
    await store.cases.record_event(CaseEventInput(refund_request_id=case_id, action="seeded", actor="test",
                                                  status=status))
    return case_id


async def move_at_provider(stack: Stack, refund_id: str, status: str, reason: str | None = None) -> None:
    """A terminal update at the provider whose webhook never reaches us."""
    await stack.set_provider_status(refund_id, status, failure_reason=reason, send_webhook=False)


async def backfill(stack: Stack, *, provider: str = "sandbox", since_days: float = 90,
                   user: str = "olga", expect_status: int = 202) -> dict[str, Any]:
    """A backfill through the relay, followed to its report (breaks included)."""
    async with stack.api(user) as api:
        started = await api.post("/v1/reconciliation/runs",
                                 json={"provider": provider, "since": ago(since_days).isoformat()})
        assert started.status_code == expect_status, started.text
        return await follow_run(api, started.json()["run_id"], show_progress=False, poll_seconds=0.1)


async def wait_for_breaks(stack: Stack, object_ids: list[str], *states: str,
                          timeout: float = 60) -> list[dict[str, Any]]:
    """Polls until every break of these objects is in one of `states`."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        async with stack.store.database.transaction() as conn:
            rows = list(await (await conn.execute(
                "SELECT * FROM reconciliation_breaks WHERE object_id = ANY(%s) ORDER BY id",
                (object_ids,))).fetchall())
        if rows and all(r["state"] in states for r in rows):
            return rows
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"breaks not {states}: {[(r['object_id'], r['state']) for r in rows]}")
        await asyncio.sleep(0.1)


async def break_awaiting_approval(stack: Stack, *, moved_to: str, requester: str,
                                  days_ago: float = 3, amount: int = 2_000) -> tuple[str, dict[str, Any]]:
    """A refund our case holds as succeeded that the provider then moved (`moved_to`),
    backfilled into a break waiting for its approval: (case id, the break's row)."""
    refund = history(f"ch_{uuid.uuid4().hex[:8]}", amount, days_ago=days_ago)
    await seed_provider(stack, [refund])
    case_id = await seed_case(stack, refund, requester=requester)
    await move_at_provider(stack, refund["id"], moved_to)
    await backfill(stack, since_days=30)
    [found] = await wait_for_breaks(stack, [refund["id"]], "awaiting_approval")
    return case_id, found


async def success_shown_failed(stack: Stack) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """A closed case showing its refund failed, which the provider shows succeeded (a bank's
    correction, its webhook lost), backfilled into a `provider_succeeded_shown_failed` break
    waiting for approval: (case id, the provider's refund, the break's row)."""
    refund = history(f"ch_{uuid.uuid4().hex[:8]}", 2_000, days_ago=3)
    await seed_provider(stack, [refund])
    case_id = await seed_case(stack, refund, status=CaseStatus.REFUND_FAILED,
                              held=ProviderRefundStatus.FAILED, settled=0)
    await backfill(stack, since_days=30)
    [found] = await wait_for_breaks(stack, [refund["id"]], "awaiting_approval")
    assert found["break_class"] == "provider_succeeded_shown_failed"
    return case_id, refund, found


async def failed_break_with_a_trigger(stack: Stack, *, requester: str = "bob",
                                      trigger: str = "carol") -> tuple[str, dict[str, Any]]:
    """A case shown refunded whose refund the provider failed, with `trigger` among the
    request's trigger identities, backfilled into a break waiting for approval: (case id,
    the break's row)."""
    refund = history(f"ch_{uuid.uuid4().hex[:8]}", 2_000, days_ago=3)
    await seed_provider(stack, [refund])
    case_id = await seed_case(stack, refund, requester=requester)
    await stack.store.database.execute(
        "UPDATE refund_cases SET trigger_identities = %s WHERE refund_request_id = %s", ([trigger], case_id))
    await move_at_provider(stack, refund["id"], "failed")
    await backfill(stack, since_days=30)
    [found] = await wait_for_breaks(stack, [refund["id"]], "awaiting_approval")
    return case_id, found


async def reopen(stack: Stack, user: str, found: Mapping[str, Any], reason: str) -> None:
    """Reopens a dismissed or expired break through the API (naming the round it shows now);
    returns once its new round waits."""
    async with stack.api(user) as api:
        shown = (await api.get(f"/v1/reconciliation/breaks/{found['id']}")).json()
        reopened = await api.post(f"/v1/reconciliation/breaks/{found['id']}/reopen",
                                  json={"reason": reason, "reopened": shown["reopened"]})
    assert reopened.status_code == 202, reopened.text
    await wait_for_breaks(stack, [found["object_id"]], "awaiting_approval")


async def another_approver(stack: Stack, user: str = "erin", *, also: tuple[str, ...] = ()) -> None:
    """A third approver (the harness has bob and carol), holding `also` roles too."""
    stack.tokens[user] = await stack.store.access.create_token(
        user, ["approver", *also], token=f"t-{user}-{uuid.uuid4().hex}", by="test")


async def landed_unknown_to_its_case(stack: Stack, amount: int) -> tuple[str, dict[str, Any]]:
    """A case whose every create failed as far as it knew (it is in ops review, only
    looking), and the refund one of them in fact made, its webhook lost: (case id, refund).
    The stack's `max_submit_attempts` must be 2."""
    charge = await stack.charge(10_000)
    async with stack.sandbox() as sb:
        await sb.post("/_sandbox/faults", json={"mode": "error_before", "times": 2})
    case_id = await stack.request_refund("alice", charge, amount)
    await stack.wait_for_audit(case_id, "resubmits_exhausted")
    landed = history(charge, amount, days_ago=0.01, reference=case_id)
    async with stack.sandbox() as sb:
        (await sb.post("/_sandbox/import", json={"charges": [], "refunds": [landed]})).raise_for_status()
    return case_id, landed
