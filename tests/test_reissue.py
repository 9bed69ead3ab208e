"""A failed refund is reissued as a new linked request through the same gates."""

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from temporalio import client as temporal
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from adapters.db import Store
from domain.incidents import DuplicateRefundInput
from domain.models import CaseStatus, ProviderRefund, ProviderRefundStatus
from starters.dev.stack import TemporalDevServer
from tests.fakes import eventually
from tests.harness import Stack, intercepted, stack_with
from tests.reconciliation_kit import (
    backfill,
    history,
    move_at_provider,
    seed_case,
    seed_provider,
    success_shown_failed,
    wait_for_breaks,
)
from tests.test_reconciliation import decide


async def failed_case(stack: Stack, amount: int = 2_500, requester: str = "alice",
                      **internal: object) -> tuple[str, str]:
    charge = await stack.charge(10_000)
    async with stack.sandbox() as sb:
        await sb.post("/_sandbox/config", json={"refund_initial_status": "pending"})
    case_id = await stack.open_case(requester, charge, amount, **internal)
    row = await stack.wait_for_status(case_id, "pending")
    await stack.set_provider_status(row["provider_refund_id"], "failed",
                                    failure_reason="card_account_closed")
    await stack.wait_for_status(case_id, "refund_failed")
    async with stack.sandbox() as sb:
        await sb.post("/_sandbox/config", json={"refund_initial_status": "succeeded"})
    return case_id, charge


async def reissue(stack: Stack, user: str, case_id: str, method: str = "provider") -> tuple[int, dict]:  # type: ignore[type-arg]
    async with stack.api(user) as api:
        response = await api.post(f"/v1/refund-requests/{case_id}/reissue",
                                  json={"method": method, "reason": "customer has a new card"})
    return response.status_code, response.json()


async def test_reissue_through_the_provider_is_linked_and_succeeds_once(stack: Stack) -> None:
    case_id, charge = await failed_case(stack)
    assert (await reissue(stack, "alice", case_id))[0] == 403  # requesters cannot reissue
    status, child = await reissue(stack, "olga", case_id)
    assert status == 202
    assert child["parent_refund_request_id"] == case_id and child["amount"] == 2_500
    again_status, again = await reissue(stack, "olga", case_id)  # a double click
    assert again_status == 200 and again["refund_request_id"] == child["refund_request_id"]
    await stack.wait_for_status(child["refund_request_id"], "succeeded")
    statuses = sorted(r["status"] for r in await stack.provider_refunds(charge))
    assert statuses == ["failed", "succeeded"]
    assert "reissue_requested" in await stack.actions(case_id)


async def test_reissue_cannot_exceed_what_is_left_on_the_charge(stack: Stack) -> None:
    case_id, charge = await failed_case(stack, amount=4_000)
    settled = await stack.request_refund("alice", charge, 5_000)
    await stack.wait_for_status(settled, "succeeded")
    held = await stack.request_refund("alice", charge, 1_500)  # a prior refund: needs a person
    await stack.wait_for_status(held, "awaiting_approval")
    status, child = await reissue(stack, "olga", case_id)  # 40.00 does not fit in 35.00 left
    assert status == 202
    row = await stack.wait_for_status(child["refund_request_id"], "rejected")
    assert row["reserved_amount"] == 0
    assert sum(r["amount"] for r in await stack.provider_refunds(charge)
               if r["status"] != "failed") == 5_000
    # a reissue that ended (rejected, denied, expired) is not open: the parent is not
    # blocked behind it for good, and the next one goes through the same gates
    status, second = await reissue(stack, "olga", case_id)
    assert status == 202 and second["refund_request_id"] == f"{case_id}-r2", second
    await stack.wait_for_status(second["refund_request_id"], "rejected")


async def test_a_reissue_its_own_rules_refuse_is_refused_before_anything_is_written(stack: Stack) -> None:
    """The child's id is its parent's with `-r<n>`: a parent id near the length limit would
    make a child no worker can read (its workflow input fails validation on every try, the
    case stuck `requested` and every later reissue of the parent pointed at it). The same
    for a parent at the evidence limit (the child adds its reason)."""
    case_id, _ = await failed_case(stack, refund_request_id=f"rr-{uuid.uuid4().hex}".ljust(127, "x"))
    status, refused = await reissue(stack, "olga", case_id)
    assert status == 422 and "refund_request_id" in refused["detail"], refused
    assert await stack.store.cases.children(case_id) == []
    assert "reissue_requested" not in await stack.actions(case_id)


async def test_reissue_by_bank_transfer_waits_for_ops_to_confirm(stack: Stack) -> None:
    case_id, charge = await failed_case(stack)
    status, child = await reissue(stack, "olga", case_id, method="bank_transfer")
    assert status == 202 and child["method"] == "bank_transfer"
    child_id = child["refund_request_id"]
    await stack.wait_for_status(child_id, "awaiting_approval")  # a reissue needs a person
    async with stack.api("bob") as api:
        assert (await api.post(f"/v1/refund-requests/{child_id}/approvals",
                               json={"decision": "approve"})).status_code == 202
    await stack.wait_for_status(child_id, "pending")
    async with stack.api("olga") as api:  # olga requested the reissue: she cannot confirm it
        refused = await api.post(f"/v1/manual-refunds/{child_id}/confirmation", json={"paid": True})
        assert refused.status_code == 403
    async with stack.api("admin") as api:
        confirmed = await api.post(f"/v1/manual-refunds/{child_id}/confirmation",
                                   json={"paid": True, "reason": "SEPA ref 123"})
        assert confirmed.status_code == 200, confirmed.text
    await stack.wait_for_status(child_id, "succeeded")
    assert len(await stack.provider_refunds(charge)) == 1  # the provider was not asked again
    # paid from our bank, not from the provider's balance: provider clearing stays what the
    # provider's statement shows
    assert {(e["posting_key"], e["account"], e["debit"], e["credit"])
            for e in await stack.store.ledger.entries(child_id)} == {
        (f"{child_id}:refund_settled", "refunds_contra_revenue", 2_500, 0),
        (f"{child_id}:refund_settled", "bank_clearing", 0, 2_500)}


async def test_a_bank_transfer_is_checked_against_the_charge_again_before_it_is_paid(stack: Stack) -> None:
    """A bank-transfer reissue waited for approval; meanwhile the whole charge was refunded in
    the provider's dashboard (the provider cannot see our hold, and nobody but us guards a
    bank transfer). Approved, its instruction was made and ops paid the money a second time
    (reproduced). Before its instruction the charge is read again: the transfer no longer
    fits, so the case goes to ops review with its reason and no instruction is made."""
    case_id, charge = await failed_case(stack)
    status, child = await reissue(stack, "olga", case_id, method="bank_transfer")
    assert status == 202, child
    child_id = child["refund_request_id"]
    await stack.wait_for_status(child_id, "awaiting_approval")
    async with stack.sandbox() as sb:  # the dashboard's refund of everything the charge captured
        assert (await sb.post("/v1/refunds", json={"charge": charge, "amount": 10_000})).status_code == 200
    async with stack.api("bob") as api:
        assert (await api.post(f"/v1/refund-requests/{child_id}/approvals",
                               json={"decision": "approve"})).status_code == 202
    row = await stack.wait_for_status(child_id, "ops_review", "pending")
    assert row["status"] == "ops_review" and row["provider_refund_id"] is None, row
    [refused] = [e for e in await stack.store.audit.trail(child_id) if e["action"] == "submission_refused"]
    assert "remaining refundable" in refused["detail"]["reason"], refused


async def test_people_barred_from_the_original_stay_barred_from_its_reissue(stack: Stack) -> None:
    case_id, _ = await failed_case(stack, trigger_identities=["bob"])
    status, child = await reissue(stack, "olga", case_id, method="bank_transfer")
    assert status == 202
    child_id = child["refund_request_id"]
    await stack.wait_for_status(child_id, "awaiting_approval")
    async with stack.api("bob") as api:
        refused = await api.post(f"/v1/refund-requests/{child_id}/approvals", json={"decision": "approve"})
    assert refused.status_code == 403 and "triggering event" in refused.json()["detail"]
    async with stack.api("carol") as api:
        assert (await api.post(f"/v1/refund-requests/{child_id}/approvals",
                               json={"decision": "approve"})).status_code == 202


async def test_a_bank_transfer_confirmation_moves_the_case_at_once(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    """The confirmation is the manual executor's word on the refund the case follows (the
    reissue keeps its parent's provider): taken when it comes, not at the next status poll
    (an hour here, as by default; the wait below only bounds a hang)."""
    async with stack_with(store, client, temporal_server.address, status_poll_interval_seconds=3_600,
                          late_failure_window_seconds=3_600) as patient:
        child_id = await _transfer_awaiting_confirmation(patient)
        async with patient.api("admin") as api:
            confirmed = await api.post(f"/v1/manual-refunds/{child_id}/confirmation",
                                       json={"paid": True, "reason": "SEPA ref 456"})
        assert confirmed.status_code == 200, confirmed.text
        row = await patient.wait_for_status(child_id, "succeeded")
        assert row["reserved_amount"] == 2_500


async def _transfer_awaiting_confirmation(patient: Stack) -> str:
    """A failed refund reissued as a bank transfer and approved: the reissue's id."""
    case_id, _ = await failed_case(patient)
    return await reissued_as_transfer(patient, case_id, "bob")


async def reissued_as_transfer(stack: Stack, case_id: str, approver: str) -> str:
    """The failed refund `case_id` reissued by olga as a bank transfer that `approver`
    approved: the reissue's id, waiting for ops to confirm the payment."""
    status, child = await reissue(stack, "olga", case_id, method="bank_transfer")
    assert status == 202, child
    child_id = str(child["refund_request_id"])
    await stack.wait_for_status(child_id, "awaiting_approval")
    async with stack.api(approver) as api:
        assert (await api.post(f"/v1/refund-requests/{child_id}/approvals",
                               json={"decision": "approve"})).status_code == 202
    await stack.wait_for_status(child_id, "pending")
    return child_id


async def test_one_request_has_one_open_reissue_across_its_whole_family(stack: Stack) -> None:
    """A failed reissue is itself reissuable, and so is its parent again: both are the same
    request's money. Reissuing the child (X-r1-r1) and then the original (X-r2) made two
    live reissues of one refund, each for the full amount: the customer paid twice. Any
    member of the family (original, children, their children) not ended blocks a new
    reissue of any other member, which returns it instead."""
    case_id, charge = await failed_case(stack)
    async with stack.sandbox() as sb:
        await sb.post("/_sandbox/config", json={"refund_initial_status": "pending"})
    status, child = await reissue(stack, "olga", case_id)
    assert status == 202
    row = await stack.wait_for_status(child["refund_request_id"], "pending")
    await stack.set_provider_status(row["provider_refund_id"], "failed", failure_reason="card_account_closed")
    await stack.wait_for_status(child["refund_request_id"], "refund_failed")

    status, grandchild = await reissue(stack, "olga", child["refund_request_id"])
    assert status == 202 and grandchild["refund_request_id"] == f"{case_id}-r1-r1"
    await stack.wait_for_status(grandchild["refund_request_id"], "pending")
    status, again = await reissue(stack, "olga", case_id)  # the original again: its family has one
    assert (status, again["refund_request_id"]) == (200, grandchild["refund_request_id"]), again
    assert (await stack.store.cases.get(f"{case_id}-r2")) is None

    row = await stack.wait_for_status(grandchild["refund_request_id"], "pending")
    await stack.set_provider_status(row["provider_refund_id"], "failed", failure_reason="card_account_closed")
    await stack.wait_for_status(grandchild["refund_request_id"], "refund_failed")
    status, second = await reissue(stack, "olga", case_id)
    assert (status, second["refund_request_id"]) == (202, f"{case_id}-r2")
    status, blocked = await reissue(stack, "olga", grandchild["refund_request_id"])  # and downwards
    assert (status, blocked["refund_request_id"]) == (200, f"{case_id}-r2"), blocked
    assert (await stack.store.cases.get(f"{case_id}-r1-r1-r1")) is None
    await stack.wait_for_status(f"{case_id}-r2", "pending")
    live = [r for r in await stack.provider_refunds(charge) if r["status"] != "failed"]
    assert sum(r["amount"] for r in live) == 2_500


class FirstReissueStartFails(temporal.Interceptor):
    """A relay whose Temporal does not answer the first start of a reissue's workflow (an
    outage, or the relay dying there): the child's row is committed, its workflow is not."""

    def __init__(self, status: RPCStatusCode = RPCStatusCode.UNAVAILABLE) -> None:
        self.status = status
        self.refused: list[str] = []

    def intercept_client(self, next: temporal.OutboundInterceptor) -> temporal.OutboundInterceptor:
        refused, status = self.refused, self.status

        class Failing(temporal.OutboundInterceptor):
            async def start_workflow(self, input: temporal.StartWorkflowInput) -> Any:
                if input.id.endswith("-r1") and not refused:
                    refused.append(input.id)
                    raise RPCError("refused", status, b"")
                return await super().start_workflow(input)

        return Failing(next)


async def test_a_reissue_whose_start_failed_is_started_when_asked_again(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    """Asked again, the open reissue is the answer: one whose workflow never started (its
    row `requested`) is started then, as a repeated refund request starts its case. Before,
    the repeat answered 200 with a child no workflow would ever run (the sweep later handed
    it to ops, and every further reissue pointed at it: the customer never paid back)."""
    refusing = FirstReissueStartFails()
    async with stack_with(store, intercepted(client, refusing), temporal_server.address) as stack:
        case_id, charge = await failed_case(stack)
        status, away = await reissue(stack, "olga", case_id)
        assert (status, refusing.refused) == (503, [f"{case_id}-r1"]), away
        assert "send the same request again" in away["detail"]
        row = await stack.store.cases.get(f"{case_id}-r1")
        assert row is not None and row["status"] == "requested"
        again_status, again = await reissue(stack, "olga", case_id)
        assert again_status == 200 and again["refund_request_id"] == f"{case_id}-r1", again
        await stack.wait_for_status(f"{case_id}-r1", "succeeded")
        statuses = sorted(r["status"] for r in await stack.provider_refunds(charge))
    assert statuses == ["failed", "succeeded"]


class FirstSignalFails(temporal.Interceptor):
    """A relay whose Temporal does not answer the first signal to workflow `to` once it is
    set (an outage)."""

    def __init__(self) -> None:
        self.to: str | None = None
        self.refused: list[str] = []

    def intercept_client(self, next: temporal.OutboundInterceptor) -> temporal.OutboundInterceptor:
        outage = self

        class Failing(temporal.OutboundInterceptor):
            async def signal_workflow(self, input: temporal.SignalWorkflowInput) -> None:
                if input.id == outage.to and not outage.refused:
                    outage.refused.append(input.id)
                    raise RPCError("connection refused", RPCStatusCode.UNAVAILABLE, b"")
                await super().signal_workflow(input)

        return Failing(next)


async def test_a_confirmation_sent_again_after_temporal_was_away_moves_the_case(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    """The confirmation is committed before its signal; when Temporal does not answer, the
    caller hears 503 and sends it again. The repeat, by the same person with the same
    outcome, is the same confirmation: signalled again (the case takes it once). Before, it
    was a 409 ("no pending manual refund") and the case waited for its next status poll (an
    hour by default) with the money already paid. Another outcome, or another person, is
    still a 409."""
    refusing = FirstSignalFails()
    async with stack_with(store, intercepted(client, refusing), temporal_server.address,
                          status_poll_interval_seconds=3_600, late_failure_window_seconds=3_600) as patient:
        child_id = refusing.to = await _transfer_awaiting_confirmation(patient)
        body = {"paid": True, "reason": "SEPA ref 789"}
        async with patient.api("admin") as api:
            away = await api.post(f"/v1/manual-refunds/{child_id}/confirmation", json=body)
            assert (away.status_code, refusing.refused) == (503, [child_id]), away.text
            other = await api.post(f"/v1/manual-refunds/{child_id}/confirmation",
                                   json={"paid": False, "reason": "bounced"})
            again = await api.post(f"/v1/manual-refunds/{child_id}/confirmation", json=body)
        async with patient.api("olga") as api:
            stranger = await api.post(f"/v1/manual-refunds/{child_id}/confirmation", json=body)
        assert other.status_code == 409 and "succeeded" in other.json()["detail"], other.text
        assert again.status_code == 200, again.text
        assert stranger.status_code in (403, 409), stranger.text
        row = await patient.wait_for_status(child_id, "succeeded")
        assert row["reserved_amount"] == 2_500
        confirmed = [e for e in await patient.store.audit.trail(child_id)
                     if e["action"] == "manual_refund_confirmed"]
        assert len(confirmed) == 1


async def test_a_call_temporal_refuses_is_no_outage_to_send_again(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    """Only Temporal not answering is a 503 to send again; a refusal (here an invalid
    argument, as for a payload over its limit) is a 500 that names it: a caller retrying it
    would be refused forever."""
    refusing = FirstReissueStartFails(RPCStatusCode.INVALID_ARGUMENT)
    async with stack_with(store, intercepted(client, refusing), temporal_server.address) as stack:
        case_id, _ = await failed_case(stack)
        status, refused = await reissue(stack, "olga", case_id)
    assert (status, refusing.refused) == (500, [f"{case_id}-r1"]), refused
    assert "INVALID_ARGUMENT" in refused["detail"] and "again" not in refused["detail"]


async def failed_reissue(stack: Stack, case_id: str) -> str:
    """The failed refund `case_id` reissued through the provider by olga, and that reissue
    failed too: its id."""
    async with stack.sandbox() as sb:
        await sb.post("/_sandbox/config", json={"refund_initial_status": "pending"})
    status, child = await reissue(stack, "olga", case_id)
    assert status == 202
    child_id = str(child["refund_request_id"])
    pending = await stack.wait_for_status(child_id, "pending")
    async with stack.sandbox() as sb:
        await sb.post("/_sandbox/config", json={"refund_initial_status": "succeeded"})
    await stack.set_provider_status(pending["provider_refund_id"], "failed",
                                    failure_reason="card_account_closed")
    await stack.wait_for_status(child_id, "refund_failed")
    return child_id


@pytest.mark.parametrize(("raised_on", "asked_of"), [("original", "original"), ("original", "reissue"),
                                                     ("reissue", "original")])
async def test_no_reissue_while_a_duplicate_of_the_request_holds_its_money(stack: Stack, raised_on: str,
                                                                          asked_of: str) -> None:
    """A second refund carrying a reference of the request succeeded (a duplicate, raised to
    ops) and the case's own refund failed: the request's money went back once all the same.
    A reissue of any refund of the request, the original or a reissue, above or below the
    duplicate, would pay it again: 409 (audited), nothing created. Before, a case a stuck
    break had moved to `refund_failed` was reissued and paid."""
    case_id, charge = await failed_case(stack)
    child_id = await failed_reissue(stack, case_id)
    holder = case_id if raised_on == "original" else child_id
    asked = case_id if asked_of == "original" else child_id
    row = await stack.store.cases.get(holder)
    assert row is not None and row["provider_refund_id"] is not None
    duplicate = ProviderRefund(provider="sandbox", refund_id=f"re_{uuid.uuid4().hex[:14]}", charge_id=charge,
                               amount=2_500, currency="USD", status=ProviderRefundStatus.SUCCEEDED,
                               raw_status="succeeded", reference=holder)
    assert await stack.store.reconciliation.open_duplicate_refund_break(DuplicateRefundInput(
        case_id=holder, followed_refund_id=row["provider_refund_id"], duplicate=duplicate, source="test"))
    before = await stack.store.cases.children(asked)
    status, refused = await reissue(stack, "olga", asked)
    assert status == 409 and duplicate.refund_id in refused["detail"], refused
    assert await stack.store.cases.children(asked) == before
    trail = await stack.store.audit.trail(asked)
    assert [e["detail"]["refusal"] for e in trail if e["action"] == "action_refused"] == [refused["detail"]]


async def test_a_duplicate_that_failed_since_leaves_the_request_reissuable(stack: Stack) -> None:
    """A second refund carrying the request's reference, listed while still pending, was
    raised as a duplicate and refused the reissue (it might yet pay). It then failed at the
    provider: it moved no money, and the next run that lists it says so on its break. The
    request's failed refund is reissued; before, the break kept "pending" and refused every
    reissue of the request for good."""
    case_id, charge = await failed_case(stack)
    twice = history(charge, 2_500, days_ago=1, status="pending", reference=case_id)
    async with stack.sandbox() as sb:
        (await sb.post("/_sandbox/import", json={"charges": [], "refunds": [twice]})).raise_for_status()
    await backfill(stack, since_days=30)
    [raised] = await wait_for_breaks(stack, [twice["id"]], "ops_review")
    assert (raised["break_class"], raised["provider_status"]) == ("duplicate_refund", "pending")
    status, refused = await reissue(stack, "olga", case_id)
    assert status == 409 and twice["id"] in refused["detail"], refused
    await move_at_provider(stack, twice["id"], "failed", "card_account_closed")
    await backfill(stack, since_days=30)
    [settled] = await wait_for_breaks(stack, [twice["id"]], "ops_review")
    assert (settled["id"], settled["provider_status"], settled["failure_reason"]) == (
        raised["id"], "failed", "card_account_closed")
    assert settled["ledger_delta"] == 0
    assert settled["evidence"]["provider"]["status"] == "failed"
    status, made = await reissue(stack, "olga", case_id)
    assert status == 202, made
    assert [c["refund_request_id"] for c in await stack.store.cases.children(case_id)] == [
        made["refund_request_id"]]


async def test_no_reissue_while_a_refund_under_the_request_s_reference_is_in_flight(stack: Stack) -> None:
    """The case failed, its workflow closed; another refund carrying its reference (an
    earlier attempt's the case never learned of) is still pending at the provider, and its
    webhook says so. It may yet pay: that word is news for the closed case (a break, for
    ops), and a reissue waits for it (409). Before, it was audited only, the reissue paid,
    and the pending refund's success later paid the customer twice."""
    case_id, charge = await failed_case(stack)
    await stack.client.get_workflow_handle(case_id).result()  # its watch ended with the failure
    hidden = history(charge, 2_500, days_ago=0.01, status="pending", reference=case_id)
    async with stack.sandbox() as sb:
        (await sb.post("/_sandbox/import", json={"charges": [], "refunds": [hidden]})).raise_for_status()
    await stack.set_provider_status(hidden["id"], "pending")
    await wait_for_breaks(stack, [hidden["id"]], "ops_review")
    status, refused = await reissue(stack, "olga", case_id)
    assert status == 409 and hidden["id"] in refused["detail"], refused
    assert await stack.store.cases.children(case_id) == []


async def test_a_pending_delivered_after_the_same_refund_was_heard_failed_opens_nothing(stack: Stack) -> None:
    """The refund under the request's reference was heard failed after the case closed; a
    pending delivery of it arriving after that (providers do not keep their order, ops
    replay deliveries) is older than that word: audited only, no break, and a reissue goes
    ahead. (A pending heard first is news: the test above.)"""
    case_id, charge = await failed_case(stack)
    await stack.client.get_workflow_handle(case_id).result()
    hidden = history(charge, 2_500, days_ago=0.01, status="pending", reference=case_id)
    async with stack.sandbox() as sb:
        (await sb.post("/_sandbox/import", json={"charges": [], "refunds": [hidden]})).raise_for_status()
    failed_at = datetime.now(UTC)
    await stack.set_provider_status(hidden["id"], "failed", failure_reason="card_account_closed")
    await stack.wait_for_audit(case_id, "event_after_close")
    await stack.set_provider_status(hidden["id"], "pending")
    await stack.wait_for_audit(case_id, "event_after_close", count=2)

    async def all_done() -> bool:  # every delivery since the failure's has been acted on
        waiting = await stack.store.database.fetch_one(
            "SELECT count(*) AS n FROM webhook_receipts WHERE verdict = 'accepted'"
            " AND processed_at IS NULL AND received_at >= %s", (failed_at,))
        return waiting is not None and waiting["n"] == 0
    await eventually(all_done)
    assert await stack.store.database.fetch_all(
        "SELECT id FROM reconciliation_breaks WHERE object_id = %s", (hidden["id"],)) == []
    status, made = await reissue(stack, "olga", case_id)
    assert status == 202, made


@pytest.mark.parametrize("denied", [False, True])
async def test_no_reissue_while_the_provider_shows_the_failed_refund_succeeded(stack: Stack,
                                                                             denied: bool) -> None:
    """A closed case shows its refund failed; a reconciliation run finds it succeeded at the
    provider (a bank's correction, its webhook lost) and raises a break for approval, the case
    still `refund_failed`. A reissue now would pay the request twice once the break is
    approved: 409 (audited) while the break is unsettled, and after one person denied it
    (the provider still says the money went back; before, a denial let the reissue pay)."""
    case_id, refund, found = await success_shown_failed(stack)
    if denied:
        assert (await decide(stack, "bob", int(found["id"]), "deny")).status_code == 202
        await wait_for_breaks(stack, [refund["id"]], "dismissed")
    status, refused = await reissue(stack, "olga", case_id)
    assert status == 409 and refund["id"] in refused["detail"], refused
    assert await stack.store.cases.children(case_id) == []


@pytest.mark.parametrize(("method", "break_approved"), [
    ("bank_transfer", False), ("provider", False), ("provider", True)])
async def test_a_reissue_whose_original_shows_paid_while_approvers_decide_is_never_paid(
        stack: Stack, method: str, break_approved: bool) -> None:
    """The reissue's family is read when it opens; news that the original paid after all
    (a bank's correction found by reconciliation) can come while approvers decide. The
    approved reissue went ahead (the bank transfer's instruction made for ops to pay, the
    provider refund made): the customer paid twice (reproduced). At the money's gate the
    family is read again: refused, nothing made, the case with ops, ops told; so when the
    break was approved meanwhile (the original corrected to succeeded, holding the money)."""
    refund = history(f"ch_{uuid.uuid4().hex[:8]}", 6_000, days_ago=3, status="failed",
                     failure_reason="card_account_closed")  # above the threshold: approvers decide
    await seed_provider(stack, [refund])
    case_id = await seed_case(stack, refund, status=CaseStatus.REFUND_FAILED,
                              held=ProviderRefundStatus.FAILED, settled=0)
    status, child = await reissue(stack, "olga", case_id, method=method)
    assert status == 202, child
    child_id = str(child["refund_request_id"])
    await stack.wait_for_status(child_id, "awaiting_approval")
    await move_at_provider(stack, refund["id"], "succeeded")  # a bank's correction, its webhook lost
    await backfill(stack, since_days=30)
    await wait_for_breaks(stack, [refund["id"]], "awaiting_approval")
    if break_approved:
        [found] = await wait_for_breaks(stack, [refund["id"]], "awaiting_approval")
        assert (await decide(stack, "carol", int(found["id"]))).status_code == 202
        await wait_for_breaks(stack, [refund["id"]], "resolved")
        await stack.wait_for_status(case_id, "succeeded")

    async with stack.api("bob") as api:
        assert (await api.post(f"/v1/refund-requests/{child_id}/approvals",
                               json={"decision": "approve"})).status_code == 202
    row = await stack.wait_for_status(child_id, "ops_review", "pending", "succeeded")
    assert row["status"] == "ops_review" and row["provider_refund_id"] is None
    [refused] = [e for e in await stack.store.audit.trail(child_id) if e["action"] == "submission_refused"]
    assert (case_id if break_approved else refund["id"]) in refused["detail"]["reason"]
    assert await stack.store.manual_refunds.get(child_id) is None
    assert [r["status"] for r in await stack.provider_refunds(refund["charge"])] == ["succeeded"]

    async def ops_told() -> bool:  # queued by the workflow after the refusal it read
        kinds = {n["kind"] for n in await stack.store.outbox.notices(child_id)}
        return "submit_refused_case_moved_on" in kinds
    await eventually(ops_told)


async def test_a_denied_break_whose_refund_failed_since_leaves_the_request_reissuable(stack: Stack) -> None:
    """The break of a case shown failed that the provider showed succeeded was denied: the
    reissue stays refused while the provider's word stands. The provider then failed that
    refund (the bank's correction undone): the next run says so on the dismissed break, and
    the reissue goes ahead. Nothing else raises a denied break again, so it refused every
    reissue of the request for good."""
    case_id, refund, found = await success_shown_failed(stack)
    assert (await decide(stack, "bob", int(found["id"]), "deny")).status_code == 202
    await wait_for_breaks(stack, [refund["id"]], "dismissed")
    assert (await reissue(stack, "olga", case_id))[0] == 409
    await move_at_provider(stack, refund["id"], "failed", "card_account_closed")
    await backfill(stack, since_days=30)
    [dismissed] = await wait_for_breaks(stack, [refund["id"]], "dismissed")
    assert (dismissed["id"], dismissed["provider_status"]) == (found["id"], "failed")
    status, made = await reissue(stack, "olga", case_id)
    assert status == 202, made


@pytest.mark.parametrize("running", ["itself", "its_reissue"])
async def test_no_reissue_while_a_failed_case_s_workflow_still_runs(stack: Stack, running: str) -> None:
    """A case row shows `refund_failed` while its run still goes on (it finishes: a
    notification about its refund that came meanwhile is still taken and followed). A
    reissue then, of it or of another refund of the same request, could pay beside the refund
    the run books: 409 (audited) once the answer time passed with the run still going."""
    charge = await stack.charge(10_000)
    if running == "itself":
        asked = running_id = await stack.request_refund("alice", charge, 6_000)  # an approver: it waits
        await stack.wait_for_status(running_id, "awaiting_approval")
    else:
        asked, _ = await failed_case(stack)
        status, child = await reissue(stack, "olga", asked, method="bank_transfer")  # waits for approval
        assert status == 202
        running_id = child["refund_request_id"]
        await stack.wait_for_status(running_id, "awaiting_approval")
    await stack.store.database.execute(
        "UPDATE refund_cases SET status = 'refund_failed' WHERE refund_request_id = %s", (running_id,))
    before = await stack.store.cases.children(asked)
    status, refused = await reissue(stack, "olga", asked)
    assert status == 409 and f"case {running_id}'s workflow is still running" in refused["detail"], refused
    assert await stack.store.cases.children(asked) == before


async def test_a_request_with_many_people_behind_it_can_still_be_reissued(stack: Stack) -> None:
    """Each reissue adds its parent's requester, and whoever said what the money did, to the
    people who cannot approve it: a ticket naming ten (its opener, watchers) was refused a
    reissue at once (422: more than ten trigger identities), and any family grew past ten in
    a few rounds. Every one of them stays barred from approving it."""
    behind = [f"watcher-{i}" for i in range(10)]
    case_id, _ = await failed_case(stack, trigger_identities=behind)
    status, child = await reissue(stack, "olga", case_id)
    assert status == 202, child
    row = await stack.store.cases.get(child["refund_request_id"])
    assert row is not None and set(row["trigger_identities"]) >= {*behind, "alice"}
