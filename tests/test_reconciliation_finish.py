"""Reconciliation, finished: payouts paid here but failed at the provider go to the payout's
exception case (once, joining a case the webhook already opened); a status no adapter maps
is a break for ops and the run reads on; dismissed breaks reopen through the same case;
break approvals remind and escalate like every other approval."""

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from temporalio import activity
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import ActivityInboundInterceptor, ExecuteActivityInput, Interceptor, Worker

from adapters.approval_seal import approval_keys, sealing_client
from adapters.db import Principal, Store
from adapters.policy_file import load_policy
from adapters.providers.base import ProviderConfigurationRefused
from domain import contracts
from domain.ledger import REFUNDED_ACCOUNT
from domain.models import (
    CaseEventInput,
    CaseStatus,
    Decision,
    LedgerInput,
    LedgerKind,
    ProviderRefund,
    ProviderRefundStatus,
)
from domain.payouts import (
    PayoutEvent,
    PayoutSnapshot,
    PayoutStatus,
    ProviderPayout,
    ProviderPayoutStatus,
    payout_case_id,
)
from domain.reconciliation import BreakOutcome, BreakSettlement, BreakState, break_workflow_id
from starters.actions.approving import Refused
from starters.actions.cases import CaseActions
from starters.actions.reconciliation import (
    BreakDecisionBody,
    BreakReopenBody,
    decide_on_break,
    reopen_break,
)
from starters.dev.stack import TemporalDevServer
from starters.relay.webhook_desk import WebhookDesk
from tests.harness import Stack, open_stack, pending_verdict_stack, stack_with
from tests.payouts_kit import (
    add_payout_approvers,
    move_payout,
    paid_payout,
    remediated,
    wait_for_actions,
    wait_for_case,
)
from tests.payouts_kit import decide as decide_payout
from tests.reconciliation_kit import (
    ago,
    another_approver,
    backfill,
    break_awaiting_approval,
    failed_break_with_a_trigger,
    history,
    move_at_provider,
    reopen,
    seed_case,
    seed_provider,
    success_shown_failed,
    wait_for_breaks,
)
from tests.test_approval_races import hold_writes_of
from tests.test_reconciliation import decide
from tests.test_tracking import Dashboard
from workers.main import build_worker


def provider_payout(amount: int, days_ago: float, status: str, **extra: Any) -> dict[str, Any]:
    """A payout at the provider that happened `days_ago` (Stripe-shaped, as the sandbox lists it)."""
    return {"id": f"po_{uuid.uuid4().hex[:14]}", "amount": amount, "currency": "usd", "status": status,
            "created": int(ago(days_ago).timestamp()), **extra}


async def seed_payouts(stack: Stack, payouts: list[dict[str, Any]], booked: dict[str, PayoutStatus]) -> None:
    """Payouts at the provider (no webhooks) and, for those in `booked`, in our books."""
    async with stack.sandbox() as sb:
        (await sb.post("/_sandbox/import", json={"payouts": payouts})).raise_for_status()
    for payout in payouts:
        if payout["id"] in booked:
            assert await stack.store.payouts.record_payout(PayoutSnapshot(
                id=f"P-{uuid.uuid4().hex[:10]}", provider="sandbox", provider_payout_id=payout["id"],
                beneficiary_id=f"ben-{uuid.uuid4().hex[:8]}", amount=payout["amount"], currency="USD",
                status=booked[payout["id"]]))


async def test_a_payout_failed_at_the_provider_opens_its_exception_case_once(stack: Stack) -> None:
    await add_payout_approvers(stack)
    failed = provider_payout(40_000, 3, "failed", failure_code="account_closed")
    agreeing = provider_payout(10_000, 3, "paid")
    handled = provider_payout(7_000, 3, "reversed")  # our books already show it reversed
    unbooked = provider_payout(5_000, 3, "failed")  # not ours: nothing to reconcile it with
    await seed_payouts(stack, [failed, agreeing, handled, unbooked], {
        failed["id"]: PayoutStatus.PAID, agreeing["id"]: PayoutStatus.PAID,
        handled["id"]: PayoutStatus.REVERSED})

    report = await backfill(stack, since_days=30)
    assert (report["objects_seen"], report["new_breaks"]) == (4, 1)
    assert report["classes"] == {"payout_failed_shown_paid": {
        "new": 1, "seen": 1, "amounts": {"USD": 40_000}, "ledger_delta": {}}}
    [found] = report["breaks"]
    case_id = payout_case_id("sandbox", failed["id"])
    assert (found["object_id"], found["object_kind"], found["case_id"], found["failure_reason"]) == (
        failed["id"], "payout", case_id, "account_closed")
    assert found["links"]["case"] == f"/v1/payout-exceptions/{case_id}"
    [handed] = await wait_for_breaks(stack, [failed["id"]], "handed_to_case")
    await wait_for_case(stack, case_id, "awaiting_approval")  # the payout's own governed path
    trail = await stack.store.audit.trail(case_id)
    [opened] = [e for e in trail if e["action"] == "payout_exception_opened"]
    assert opened["detail"]["event_id"] == f"reconciliation:{handed['id']}"
    assert "reconciliation_break_found" in [e["action"] for e in trail]

    again = await backfill(stack, since_days=30)  # still paid in our books while people decide
    assert (again["new_breaks"], again["known_breaks"]) == (0, 1)
    assert [e["action"] for e in await stack.store.audit.trail(case_id)].count("payout_exception_opened") == 1


@pytest.fixture
async def payout_stack(store: Store, client: Client, temporal_server: TemporalDevServer
                       ) -> AsyncIterator[Stack]:
    """A stack whose reconciliation reads objects at once (no grace), with payout approvers."""
    stack = await open_stack(store, client, temporal_server.address, reconciliation_grace_seconds=0)
    try:
        await add_payout_approvers(stack)
        yield stack
    finally:
        await stack.close()


async def test_a_break_found_after_the_webhook_joins_the_open_payout_case(
        payout_stack: Stack, store: Store) -> None:
    stack = payout_stack
    payout = await paid_payout(stack, 25_000)
    event_id = await move_payout(stack, payout.provider_payout_id, "failed",
                                 failure_code="bank_rejection")
    case_id = payout_case_id("sandbox", payout.provider_payout_id)
    await wait_for_case(stack, case_id, "awaiting_approval")

    report = await backfill(stack, since_days=1)
    [found] = report["breaks"]
    assert (found["break_class"], found["case_id"]) == ("payout_failed_shown_paid", case_id)
    # what an approval of it books, as the console shows it (it showed "no ledger entry")
    assert (found["entry"]["template"], found["entry"]["amount"]) == ("payout_reversed", 25_000)
    await wait_for_breaks(stack, [payout.provider_payout_id], "handed_to_case")
    assert (await decide_payout(stack, "lena", case_id)).status_code == 202
    await wait_for_case(stack, case_id, "remediated")
    # the case takes later events onto its timeline once decided: the break joined it
    trail = await wait_for_actions(stack, case_id, "payout_event_joined")
    [joined] = [e for e in trail if e["action"] == "payout_event_joined"]
    assert joined["detail"]["event_id"] == f"reconciliation:{found['break_id']}"
    [opened] = [e for e in trail if e["action"] == "payout_exception_opened"]
    assert opened["detail"]["event_id"] == event_id  # the webhook's case, not a second one
    reversals = {e["posting_key"] for e in await store.ledger.entries(case_id)
                 if e["template"] == "payout_reversed"}
    assert reversals == {f"{case_id}:payout_reversed"}  # the case's own entry, once
    again = await backfill(stack, since_days=1)  # on hold now: no longer shown paid
    assert (again["new_breaks"], again["known_breaks"]) == (0, 0)


async def break_of_a_denied_case(stack: Stack, client: Client) -> tuple[PayoutSnapshot, str, dict[str, Any]]:
    """A paid payout the provider failed, its case denied and ended; the run after finds the
    break, which the case can no longer take: (payout, case id, the break awaiting approval)."""
    payout = await paid_payout(stack, 30_000)
    await move_payout(stack, payout.provider_payout_id, "failed")
    case_id = payout_case_id("sandbox", payout.provider_payout_id)
    await wait_for_case(stack, case_id, "awaiting_approval")
    assert (await decide_payout(stack, "lena", case_id, "deny")).status_code == 202
    await wait_for_case(stack, case_id, "denied")
    await client.get_workflow_handle(case_id).result()
    await backfill(stack, since_days=1)  # the payout case cannot take it: people decide
    [found] = await wait_for_breaks(stack, [payout.provider_payout_id], "awaiting_approval")
    return payout, case_id, found


async def test_a_payout_whose_case_already_ended_is_compensated_only_when_approved(
        payout_stack: Stack, store: Store, client: Client) -> None:
    stack = payout_stack
    payout, case_id, found = await break_of_a_denied_case(stack, client)
    assert (await decide(stack, "carol", found["id"])).status_code == 403  # not a payout approver
    assert (await decide(stack, "lena", found["id"])).status_code == 202
    [resolved] = await wait_for_breaks(stack, [payout.provider_payout_id], "resolved")
    key = f"{case_id}:payout_reversed:reconciliation-{found['id']}"
    assert resolved["resolution"]["outcome"]["posting_key"] == key
    assert [e["posting_key"] for e in await store.ledger.entries(case_id)] == [key, key]  # two lines
    assert (await store.payouts.payout(payout.id) or payout).status is PayoutStatus.FAILED
    again = await backfill(stack, since_days=1)
    assert (again["new_breaks"], again["known_breaks"]) == (0, 0)


async def test_a_break_handed_to_a_case_that_found_the_payout_paid_is_raised_again_once_it_fails(
        payout_stack: Stack, store: Store, client: Client) -> None:
    """Found while the payout's case awaited approval, the break is handed to that case. The
    bank then corrects the payout to paid, so the approved case holds and books nothing (ops
    review), and later fails it after all: the case ended with the payout paid in our books,
    and the failure raises the break again for its own approval. Before, a handed break
    came back only from denied, expired or rolled-back cases: books paid, provider failed."""
    stack = payout_stack
    payout = await paid_payout(stack, 35_000)
    provider_id = payout.provider_payout_id
    await move_payout(stack, provider_id, "failed", failure_code="account_closed")
    case_id = payout_case_id("sandbox", provider_id)
    await wait_for_case(stack, case_id, "awaiting_approval")
    await backfill(stack, since_days=1)
    [handed] = await wait_for_breaks(stack, [provider_id], "handed_to_case")
    await move_payout(stack, provider_id, "paid")
    assert (await decide_payout(stack, "lena", case_id)).status_code == 202
    await wait_for_case(stack, case_id, "ops_review")
    await client.get_workflow_handle(case_id).result()
    await move_payout(stack, provider_id, "failed", failure_code="account_closed")
    # the relay hears the failure after the case ended: raised again at once, not at a run
    [waiting] = await wait_for_breaks(stack, [provider_id], "awaiting_approval")
    assert (waiting["id"], waiting["reopened"]) == (handed["id"], 1)
    assert (await backfill(stack, since_days=1))["new_breaks"] == 0  # the run knows it
    assert (await decide(stack, "lena", waiting["id"])).status_code == 202
    await wait_for_breaks(stack, [provider_id], "resolved")
    assert (await store.payouts.payout(payout.id) or payout).status is PayoutStatus.FAILED
    assert [e["template"] for e in await store.ledger.entries(case_id)].count("payout_reversed") == 2


async def test_a_break_handed_to_a_case_that_ended_without_reversing_is_raised_again(
        payout_stack: Stack, store: Store, client: Client) -> None:
    """Found while the payout's case awaited approval, the break is handed to that case;
    the case is then denied (it ends, the payout still paid in our books). The next run
    finds the same drift: raised again for the break's own approval, as a break found after
    the case ended is. Before, the handed break was never raised again: books paid, the
    provider failed, and reconciliation said nothing for ever."""
    stack = payout_stack
    payout = await paid_payout(stack, 35_000)
    await move_payout(stack, payout.provider_payout_id, "failed", failure_code="account_closed")
    case_id = payout_case_id("sandbox", payout.provider_payout_id)
    await wait_for_case(stack, case_id, "awaiting_approval")
    await backfill(stack, since_days=1)
    [handed] = await wait_for_breaks(stack, [payout.provider_payout_id], "handed_to_case")
    again = await backfill(stack, since_days=1)  # the case still decides: it stays handed
    assert (again["new_breaks"], again["known_breaks"]) == (0, 1)
    assert (await wait_for_breaks(stack, [payout.provider_payout_id], "handed_to_case"))[0]["reopened"] == 0
    await stack.store.database.execute(  # as if omar (ops and an approver) had reopened it before
        "UPDATE reconciliation_breaks SET evidence = jsonb_set(evidence, '{reopened_by}', '[\"omar\"]')"
        " WHERE id = %s", (handed["id"],))

    assert (await decide_payout(stack, "lena", case_id, "deny")).status_code == 202
    await wait_for_case(stack, case_id, "denied")
    await client.get_workflow_handle(case_id).result()
    raised = await backfill(stack, since_days=1)
    assert raised["new_breaks"] == 1
    [waiting] = await wait_for_breaks(stack, [payout.provider_payout_id], "awaiting_approval")
    assert (waiting["id"], waiting["reopened"]) == (handed["id"], 1)
    # who reopened it stays barred from approving it, in every round (as for a refund's break)
    assert waiting["evidence"]["reopened_by"] == ["omar"]
    refused = await decide(stack, "omar", waiting["id"])
    assert refused.status_code == 403 and "cannot approve" in refused.text, refused.text
    assert (await decide(stack, "lena", waiting["id"])).status_code == 202
    await wait_for_breaks(stack, [payout.provider_payout_id], "resolved")
    assert (await store.payouts.payout(payout.id) or payout).status is PayoutStatus.FAILED
    lines = [e["template"] for e in await store.ledger.entries(case_id)]
    assert lines.count("payout_reversed") == 2  # one entry: two lines
    settled = await backfill(stack, since_days=1)
    assert (settled["new_breaks"], settled["known_breaks"]) == (0, 0)


async def test_a_payout_the_provider_paid_after_all_is_a_break_for_ops(
        payout_stack: Stack, store: Store) -> None:
    """Our books reversed a failed payout; the bank then corrects it to paid. The money left
    after all while the books say it came back, and after a reissue the beneficiary is paid
    twice: its webhook tells ops, and reconciliation raises it for ops
    (`payout_paid_shown_failed`, no money moved by either), where before the webhook was
    only audited (the case past its failure) and reconciliation had no class for it."""
    stack = payout_stack
    made, case_id = await remediated(stack, 30_000)
    desk = WebhookDesk(stack.store, stack.client, stack.providers, stack.settings)
    await desk.route(PayoutEvent(  # the payout's own paid, from before its failure, arriving late
        provider="sandbox", event_id=f"evt_{uuid.uuid4().hex[:12]}", event_type="payout.paid",
        body_sha256="0" * 64, occurred_at=datetime.now(UTC) - timedelta(days=2),
        payout=ProviderPayout(provider="sandbox", payout_id=made.provider_payout_id, amount=30_000,
                              currency="USD", status=ProviderPayoutStatus.PAID, raw_status="paid")))
    assert "payout_paid_after_reversal" not in [e["action"] for e in await store.audit.trail(case_id)]
    await move_payout(stack, made.provider_payout_id, "paid", copies=2)
    # its webhook tells ops at once (once, however often it comes), the run raises the break
    await wait_for_actions(stack, case_id, "payout_paid_after_reversal")
    assert [(n["kind"], n["audience"]) for n in await store.outbox.notices(case_id)].count(
        ("payout_paid_after_reversal", "ops")) == 1
    before = await store.ledger.entries(case_id)
    await backfill(stack, since_days=1)
    [found] = await wait_for_breaks(stack, [made.provider_payout_id], "ops_review")
    assert (found["break_class"], found["chain"], found["amount"]) == (
        "payout_paid_shown_failed", case_id, 30_000)
    assert ("reconciliation_break", "ops") in [(n["kind"], n["audience"])
                                              for n in await store.outbox.notices(case_id)]
    assert await store.ledger.entries(case_id) == before
    again = await backfill(stack, since_days=1)
    assert (again["new_breaks"], again["known_breaks"]) == (0, 1)


async def test_a_payout_paid_after_its_failure_but_heard_after_its_reversal_tells_ops(
        payout_stack: Stack, store: Store) -> None:
    """The bank corrected a failed payout to paid while approvers decided; its paid report
    reached us only after the reversal was booked (the provider retried a delivery). The
    money left after the failure: ops are told. Before, the report was measured against the
    time we booked the reversal, read as the payout's own paid arriving late, and nobody
    heard (a provider the case cannot read, Adyen, left the books reversed for good)."""
    stack = payout_stack
    made = await paid_payout(stack, 30_000)
    await move_payout(stack, made.provider_payout_id, "failed", failure_code="account_closed")
    case_id = payout_case_id("sandbox", made.provider_payout_id)
    await wait_for_case(stack, case_id, "awaiting_approval")
    await asyncio.sleep(1.1)  # the reversal is booked in a later second than the failure
    assert (await decide_payout(stack, "lena", case_id)).status_code == 202
    await wait_for_case(stack, case_id, "remediated")
    failed_at = await store.payouts.opened_at_provider(case_id)
    reversed_at = await store.ledger.first_posted(case_id, LedgerKind.PAYOUT_REVERSED)
    assert failed_at is not None and reversed_at is not None
    paid_at = reversed_at.replace(microsecond=0) - timedelta(milliseconds=1)
    assert paid_at > failed_at, (failed_at, reversed_at)
    desk = WebhookDesk(stack.store, stack.client, stack.providers, stack.settings)
    await desk.route(PayoutEvent(
        provider="sandbox", event_id=f"evt_{uuid.uuid4().hex[:12]}", event_type="payout.paid",
        body_sha256="0" * 64, occurred_at=paid_at,
        payout=ProviderPayout(provider="sandbox", payout_id=made.provider_payout_id, amount=30_000,
                              currency="USD", status=ProviderPayoutStatus.PAID, raw_status="paid")))
    assert [(n["kind"], n["audience"]) for n in await store.outbox.notices(case_id)].count(
        ("payout_paid_after_reversal", "ops")) == 1


@pytest.mark.parametrize("meanwhile", ["paid", "lookup_refused"])
async def test_an_approved_payout_break_reverses_nothing_once_the_provider_shows_it_paid(
        payout_stack: Stack, store: Store, client: Client, monkeypatch: pytest.MonkeyPatch,
        meanwhile: str) -> None:
    """The break waits for approval while the bank corrects the payout to paid at the
    provider (the closed case drops that report as stale). Approved days later, it would
    have reversed a payout the beneficiary has: the settlement reads the provider again,
    and a payout no longer failed there posts nothing and goes to ops with a notice. A read
    the provider refuses for good (our key lost its payout scope) goes to ops the same way,
    never retried for ever with the break left waiting and nobody told."""
    stack = payout_stack
    payout, case_id, found = await break_of_a_denied_case(stack, client)

    if meanwhile == "paid":
        await move_payout(stack, payout.provider_payout_id, "paid")  # the bank's late correction
    else:
        async def refused(payout_id: str) -> None:
            raise ProviderConfigurationRefused("HTTP 403: the key may not read payouts")
        monkeypatch.setattr(stack.providers["sandbox"], "get_payout", refused)
    assert (await decide(stack, "lena", found["id"])).status_code == 202
    [settled] = await wait_for_breaks(stack, [payout.provider_payout_id], "ops_review")
    shown = settled["resolution"]["provider_moved"]["provider_status"]
    assert shown == "paid" if meanwhile == "paid" else "ProviderConfigurationRefused" in shown, shown
    assert [e for e in await store.ledger.entries(case_id) if e["template"] == "payout_reversed"] == []
    assert (await store.payouts.payout(payout.id) or payout).status is PayoutStatus.PAID
    kinds = await notices_until(store, case_id, "reconciliation_break_provider_moved")
    assert ("reconciliation_break_provider_moved", "ops") in kinds


class WithoutPayoutLookup:
    """A provider that cannot read a payout by id (Adyen): every other call is the sandbox's."""

    def __init__(self, provider: Any) -> None:
        self.name = provider.name
        self._provider = provider

    def __getattr__(self, name: str) -> Any:
        if name == "get_payout":
            raise AttributeError(name)
        return getattr(self._provider, name)


async def test_a_payout_break_without_a_lookup_reads_the_paid_report_after_the_failure(
        payout_stack: Stack, store: Store, client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """A provider with no payout lookup (Adyen): the settlement of an approved break read
    nothing but the failure it was raised for. The bank's correction to paid came after the
    case was denied, so the relay kept it only as an event for an ended case, and the
    approval reversed a payout the beneficiary has (reproduced). A paid report after the
    failure is recorded for any case whose reversal is not booked (ops told), and the
    settlement takes it as the provider's word: nothing posted, the break to ops."""
    stack = payout_stack
    payout, case_id, found = await break_of_a_denied_case(stack, client)
    await move_payout(stack, payout.provider_payout_id, "paid")  # the bank's late correction
    await wait_for_actions(stack, case_id, "payout_paid_after_failure")
    monkeypatch.setitem(stack.providers, "sandbox", WithoutPayoutLookup(stack.providers["sandbox"]))
    assert (await decide(stack, "lena", found["id"])).status_code == 202
    [settled] = await wait_for_breaks(stack, [payout.provider_payout_id], "ops_review")
    assert settled["resolution"]["provider_moved"]["provider_status"] == "paid", settled["resolution"]
    assert [e for e in await store.ledger.entries(case_id) if e["template"] == "payout_reversed"] == []


async def test_a_payout_paid_then_returned_again_is_compensated_by_its_break_without_a_lookup(
        payout_stack: Stack, store: Store, client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bank corrected the failed payout to paid (reported, the case denied), then the
    money came back again: the second failure raises a break. Its settlement read the older
    paid report as the provider's word and booked nothing, the payout left paid in our books
    for good (found by review). A paid report counts only from the failure the break was
    raised for: this one reverses the payout once approved."""
    stack = payout_stack
    payout = await paid_payout(stack, 30_000)
    case_id = payout_case_id("sandbox", payout.provider_payout_id)
    await move_payout(stack, payout.provider_payout_id, "failed")
    await wait_for_case(stack, case_id, "awaiting_approval")
    assert (await decide_payout(stack, "lena", case_id, "deny")).status_code == 202
    await wait_for_case(stack, case_id, "denied")
    await client.get_workflow_handle(case_id).result()
    await move_payout(stack, payout.provider_payout_id, "paid")  # the bank's correction
    await wait_for_actions(stack, case_id, "payout_paid_after_failure")
    await asyncio.sleep(1.1)  # the provider stamps to the second: the return comes a second later
    await move_payout(stack, payout.provider_payout_id, "failed")  # and the money comes back
    [found] = await wait_for_breaks(stack, [payout.provider_payout_id], "awaiting_approval")
    monkeypatch.setitem(stack.providers, "sandbox", WithoutPayoutLookup(stack.providers["sandbox"]))
    assert (await decide(stack, "lena", found["id"])).status_code == 202
    [resolved] = await wait_for_breaks(stack, [payout.provider_payout_id], "resolved")
    assert [e["template"] for e in await store.ledger.entries(case_id)] == ["payout_reversed"] * 2, resolved


async def test_an_unmapped_status_is_a_break_for_ops_and_the_run_goes_on(
        stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    strange = history("ch_odd", 1_100, days_ago=1, status="partially_reversed_v2")  # newest: read first
    diverged = history("ch_div", 1_300, days_ago=2)
    odd_payout = provider_payout(9_000, 2, "in_transit_to_mars")
    await seed_provider(stack, [strange, diverged])
    await seed_payouts(stack, [odd_payout], {})
    await seed_case(stack, strange)
    case_id = await seed_case(stack, diverged)
    await move_at_provider(stack, diverged["id"], "failed", "card_account_closed")

    report = await backfill(stack, since_days=30)
    assert (report["state"], report["objects_seen"], report["new_breaks"]) == ("completed", 3, 3)
    assert {c: e["new"] for c, e in report["classes"].items()} == {
        "unmapped_status": 2, "provider_failed_shown_refunded": 1}
    unmapped = {b["object_id"]: b for b in report["breaks"] if b["break_class"] == "unmapped_status"}
    assert {o: (b["state"], b["evidence"]["provider"]["raw_status"]) for o, b in unmapped.items()} == {
        strange["id"]: ("ops_review", "partially_reversed_v2"),
        odd_payout["id"]: ("ops_review", "in_transit_to_mars")}
    assert "unexpected refund status 'partially_reversed_v2'" in unmapped[strange["id"]]["failure_reason"]
    assert sum("UNMAPPED STATUS" in r.getMessage() for r in caplog.records) >= 2
    await wait_for_breaks(stack, [diverged["id"]], "awaiting_approval")  # the run went on past it
    assert "reconciliation_break_found" in await stack.actions(case_id)
    odd_workflow = break_workflow_id(unmapped[strange["id"]]["break_id"])
    with pytest.raises(RPCError):  # no exception workflow: ops look first
        await stack.client.get_workflow_handle(odd_workflow).describe()
    again = await backfill(stack, since_days=30)
    assert (again["new_breaks"], again["known_breaks"]) == (0, 3)


async def test_a_dismissed_break_reopens_into_the_same_case(stack: Stack) -> None:
    refund = history("ch_reopen", 2_000, days_ago=3)
    await seed_provider(stack, [refund])
    case_id = await seed_case(stack, refund, requester="bob")
    await move_at_provider(stack, refund["id"], "failed")
    await backfill(stack, since_days=30)
    [found] = await wait_for_breaks(stack, [refund["id"]], "awaiting_approval")
    break_id = found["id"]

    async def ask_reopen(user: str, reason: str = "the customer's bank confirmed the failure",
                         seen: int | None = 0) -> Any:
        body: dict[str, Any] = {"reason": reason} if seen is None else {"reason": reason, "reopened": seen}
        async with stack.api(user) as api:
            return await api.post(f"/v1/reconciliation/breaks/{break_id}/reopen", json=body)

    assert (await ask_reopen("olga")).status_code == 409  # still awaiting a decision
    assert (await decide(stack, "carol", break_id, "deny")).status_code == 202
    await wait_for_breaks(stack, [refund["id"]], "dismissed")
    assert (await ask_reopen("carol")).status_code == 403  # approvers decide; ops reopen
    assert (await ask_reopen("olga", "")).status_code == 422  # a reason is required
    assert (await ask_reopen("olga", seen=None)).status_code == 422  # and the round it undoes
    reopened = await ask_reopen("olga")
    assert reopened.status_code == 202, reopened.text
    assert (reopened.json()["reopened"], reopened.json()["break_id"]) == (1, break_id)
    [waiting] = await wait_for_breaks(stack, [refund["id"]], "awaiting_approval")
    assert (waiting["id"], waiting["reopened"], waiting["resolution"]) == (break_id, 1, None)
    assert (await ask_reopen("olga")).status_code == 409  # one reopened case, not two
    assert (await ask_reopen("olga", seen=1)).status_code == 409

    assert (await decide(stack, "carol", break_id)).status_code == 202
    [resolved] = await wait_for_breaks(stack, [refund["id"]], "resolved")
    assert resolved["resolution"]["approvers"] == ["carol"]
    assert {e["posting_key"] for e in await stack.store.ledger.entries(case_id)} == {
        f"{case_id}:refund_settled", f"{case_id}:refund_reversed"}  # the case's first reversal
    trail = await stack.store.audit.trail(case_id)
    [undo] = [e for e in trail if e["action"] == "reconciliation_break_reopened"]
    assert (undo["actor"], undo["detail"]["previous_state"]) == ("olga", "dismissed")
    assert undo["detail"]["previous_resolution"]["approvers"] == ["carol"]
    assert [(n["kind"], n["audience"]) for n in await stack.store.outbox.notices(case_id)].count(
        ("reconciliation_approval_needed", "approvers")) == 2  # each round told its approvers
    again = await backfill(stack, since_days=30)
    assert (again["new_breaks"], again["known_breaks"]) == (0, 0)


async def test_a_reopen_names_the_round_it_undoes(stack: Stack) -> None:
    """A reopen read from a page loaded before the break was reopened and decided again
    does not undo that later decision: it names the round it saw (`reopened`), and the
    break's round has moved on (409, audited; the break stays dismissed). Before, such a
    stale form reopened the second round's dismissal (202, `reopened` 2)."""
    case_id, found = await failed_break_with_a_trigger(stack)
    stale = int(found["reopened"])  # what olga's page showed
    await another_approver(stack)
    assert (await decide(stack, "erin", found["id"], "deny")).status_code == 202
    await wait_for_breaks(stack, [found["object_id"]], "dismissed")
    await reopen(stack, "olga", found, "the bank may have failed it")  # in another tab
    assert (await decide(stack, "erin", found["id"], "deny")).status_code == 202
    await wait_for_breaks(stack, [found["object_id"]], "dismissed")
    async with stack.api("olga") as api:
        late = await api.post(f"/v1/reconciliation/breaks/{found['id']}/reopen",
                              json={"reason": "the bank failed it", "reopened": stale})
    assert late.status_code == 409 and "round" in late.json()["detail"], late.text
    [kept] = await wait_for_breaks(stack, [found["object_id"]], "dismissed")
    assert (kept["reopened"], kept["resolution"]["state"]) == (1, "dismissed")
    refused = [e for e in await stack.store.audit.trail(case_id) if e["action"] == "action_refused"]
    assert refused and refused[-1]["actor"] == "olga", refused


async def test_a_reopened_break_excludes_whoever_is_behind_the_case_now(stack: Stack) -> None:
    """Reopening reads the case's trigger identities again: a break whose evidence names the
    requester alone (found before the identities were kept) still bars them once reopened."""
    case_id, found = await failed_break_with_a_trigger(stack)
    await another_approver(stack)
    assert (await decide(stack, "erin", found["id"], "deny")).status_code == 202
    await wait_for_breaks(stack, [found["object_id"]], "dismissed")
    await stack.store.database.execute(  # as a break found before 330f124 holds it
        "UPDATE reconciliation_breaks SET evidence = evidence #- '{case,trigger_identities}' WHERE id = %s",
        (found["id"],))
    await reopen(stack, "olga", found, "the bank confirmed the failure")
    refused = await decide(stack, "carol", found["id"])
    assert refused.status_code == 403 and "cannot approve" in refused.json()["detail"], refused.text
    assert [e["template"] for e in await stack.store.ledger.entries(case_id)] == ["refund_settled"] * 2


async def test_whoever_reopened_a_break_cannot_approve_it(stack: Stack) -> None:
    """Reopening undoes a colleague's denial: the one who asks for the money to move again
    does not also approve it (someone holding ops and approver roles would otherwise
    override a denial alone, in a one-approver tier)."""
    refund = history(f"ch_{uuid.uuid4().hex[:8]}", 2_000, days_ago=3)
    await seed_provider(stack, [refund])
    case_id = await seed_case(stack, refund, requester="bob")
    await move_at_provider(stack, refund["id"], "failed")
    await backfill(stack, since_days=30)
    [found] = await wait_for_breaks(stack, [refund["id"]], "awaiting_approval")
    await another_approver(stack, "dana", also=("ops",))
    assert (await decide(stack, "carol", found["id"], "deny")).status_code == 202
    await wait_for_breaks(stack, [refund["id"]], "dismissed")
    await reopen(stack, "dana", found, "I think the bank failed it")
    refused = await decide(stack, "dana", found["id"])
    assert refused.status_code == 403 and "cannot approve" in refused.json()["detail"], refused.text
    assert [e["template"] for e in await stack.store.ledger.entries(case_id)] == ["refund_settled"] * 2
    assert (await decide(stack, "carol", found["id"])).status_code == 202
    await wait_for_breaks(stack, [refund["id"]], "resolved")


class StartRefused:
    """A Temporal client whose every workflow start fails (Temporal away); the rest passes."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def start_workflow(self, *_: Any, **__: Any) -> Any:
        raise RPCError("connection refused", RPCStatusCode.UNAVAILABLE, b"")


async def test_a_reopen_whose_case_cannot_start_reopens_nothing(stack: Stack) -> None:
    """The reopen and the start of its exception case hold together: a start that fails
    (Temporal away) leaves the break dismissed, so the reopen can be asked again. Before,
    the break was `new` with no workflow, and every later reopen was refused 409."""
    refund = history(f"ch_{uuid.uuid4().hex[:8]}", 2_000, days_ago=3)
    await seed_provider(stack, [refund])
    await seed_case(stack, refund, requester="bob")
    await move_at_provider(stack, refund["id"], "failed")
    await backfill(stack, since_days=30)
    [found] = await wait_for_breaks(stack, [refund["id"]], "awaiting_approval")
    assert (await decide(stack, "carol", found["id"], "deny")).status_code == 202
    await wait_for_breaks(stack, [refund["id"]], "dismissed")
    away = CaseActions(stack.store, cast(Client, StartRefused(stack.client)), stack.settings)
    olga = Principal("olga", frozenset({"ops"}))
    with pytest.raises(RPCError):
        await reopen_break(away, olga, int(found["id"]),
                           BreakReopenBody(reason="the bank failed it", reopened=0), via="api")
    [kept] = await wait_for_breaks(stack, [refund["id"]], "dismissed")
    assert (kept["reopened"], kept["resolution"]["state"]) == (0, "dismissed")
    async with stack.api("olga") as api:
        again = await api.post(f"/v1/reconciliation/breaks/{found['id']}/reopen",
                               json={"reason": "the bank failed it", "reopened": 0})
    assert again.status_code == 202, again.text
    await wait_for_breaks(stack, [refund["id"]], "awaiting_approval")


async def notices_until(store: Store, case_id: str, kind: str, timeout: float = 60) -> list[tuple[str, str]]:
    """The case's notices (kind, audience) once one of `kind` is queued."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        kinds = [(n["kind"], n["audience"]) for n in await store.outbox.notices(case_id)]
        if any(k == kind for k, _ in kinds) or asyncio.get_running_loop().time() > deadline:
            return kinds
        await asyncio.sleep(0.1)


async def test_a_waiting_break_is_reminded_and_escalated(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    stack = await open_stack(store, client, temporal_server.address, approval_reminder_seconds=1,
                             approval_escalation_seconds=2)
    try:
        refund = history("ch_nudge", 1_000, days_ago=2)
        await seed_provider(stack, [refund])
        case_id = await seed_case(stack, refund, settled=0)
        await backfill(stack, since_days=30)
        [found] = await wait_for_breaks(stack, [refund["id"]], "awaiting_approval")
        actions = await stack.wait_for_audit(case_id, "reconciliation_approval_escalated")
        assert (actions.index("reconciliation_exception_opened")
                < actions.index("reconciliation_approval_reminder")
                < actions.index("reconciliation_approval_escalated"))
        kinds = await notices_until(store, case_id, "reconciliation_approval_escalated")
        assert kinds == [("reconciliation_break", "ops"), ("reconciliation_approval_needed", "approvers"),
                         ("reconciliation_approval_reminder", "approvers"),
                         ("reconciliation_approval_escalated", "escalation")]
        assert (await decide(stack, "carol", found["id"])).status_code == 202  # still decidable
        await wait_for_breaks(stack, [refund["id"]], "resolved")
        assert [e["template"] for e in await store.ledger.entries(case_id)] == ["refund_settled"] * 2
    finally:
        await stack.close()


@pytest.mark.parametrize("temporal_restarts", [False, True], ids=["worker-down", "temporal-restarts-too"])
async def test_a_break_verdict_no_worker_takes_in_time_is_answered_pending_and_counts_later(
        store: Store, client: Client, temporal_server: TemporalDevServer, tmp_path: Path,
        temporal_restarts: bool) -> None:
    """As for case verdicts: the approver hears 202 `verdict_pending` instead of a call that
    never returns, the wait is audited on the break's chain, and the verdict counts once a
    worker takes the break again, also when Temporal restarted meanwhile (it keeps an update
    no worker accepted only in memory)."""
    async with AsyncExitStack() as scope:
        stack, server = await pending_verdict_stack(scope, store, client, temporal_server, tmp_path,
                                                    own_temporal_server=temporal_restarts)
        case_id, found = await break_awaiting_approval(stack, moved_to="failed", requester="bob")
        assert stack.worker is not None
        await stack.worker.shutdown()
        answer = await asyncio.wait_for(decide(stack, "carol", found["id"]), 90)
        assert answer.status_code == 202, answer.text
        assert answer.json()["status"] == "verdict_pending"
        waited = [e for e in await stack.store.audit.trail(case_id)
                  if e["action"] == "reconciliation_approval_unanswered"]
        assert [(e["actor"], e["detail"]["break_id"]) for e in waited] == [("carol", found["id"])]
        if temporal_restarts:
            server.kill()
            await server.start()
        await stack.start_worker()
        [resolved] = await wait_for_breaks(stack, [found["object_id"]], "resolved")
        assert resolved["resolution"]["approvers"] == ["carol"]
        actions = [e["action"] for e in await stack.store.audit.trail(case_id)]
        assert [a for a in actions if a.startswith("reconciliation_approval_")
                and a.endswith(("granted", "refused"))] == ["reconciliation_approval_granted"]


LAG = 3.0
"""How long the break's workflow hears of its own exception after the row says so."""


class _SlowToLearn(Interceptor):
    """Holds the answer of opening a break's exception after the activity committed it: the
    break's row says `awaiting_approval` while its workflow still thinks it is new (a loaded
    worker does this; CI at 3309dc6 answered an approver 409 in that window)."""

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _SlowToLearnInbound(next)


class _SlowToLearnInbound(ActivityInboundInterceptor):
    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        result = await super().execute_activity(input)
        if activity.info().activity_type == contracts.OPEN_BREAK_EXCEPTION.name:
            await asyncio.sleep(LAG)
        return result


async def test_a_verdict_on_a_break_whose_workflow_lags_its_row_waits_for_the_workflow(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    """The relay reads the break's row (awaiting approval) and asks its workflow: a workflow
    that has not caught up with the row is waited for (within the answer time), not taken
    for a break that is no longer awaiting approval."""
    stack = await open_stack(store, client, temporal_server.address, worker=False)
    template = build_worker(stack.client, f"{stack.settings.task_queue}-template", stack.store,
                            stack.providers, load_policy(stack.settings.policy_file), settings=stack.settings)
    config = template.config()  # the product's worker, never run; this one adds the lag
    config["task_queue"] = stack.settings.task_queue
    config["interceptors"] = [*config["interceptors"], _SlowToLearn()]
    worker = Worker(**config)
    running = asyncio.create_task(worker.run())
    try:
        _, found = await break_awaiting_approval(stack, moved_to="failed", requester="bob")
        answer = await decide(stack, "carol", found["id"])
        assert answer.status_code == 202, answer.text
        assert answer.json()["missing_roles"] == []
        [resolved] = await wait_for_breaks(stack, [found["object_id"]], "resolved")
        assert resolved["resolution"]["approvers"] == ["carol"]
    finally:
        await worker.shutdown()
        await running
        await stack.close()


async def reversed_by_mistake(stack: Stack, case_id: str, refund_id: str) -> None:
    """A 500 reversal someone posted on the case by mistake: the ledger moved after a break
    about it was found, so that break's approval cannot cover all of what is missing."""
    await stack.store.ledger.post(LedgerInput(refund_request_id=case_id, kind=LedgerKind.REFUND_REVERSED,
                                              amount=500, currency="USD", reference="a-mistake",
                                              provider_refund_id=refund_id))


async def test_what_an_approval_could_not_cover_is_the_next_run_s_break(stack: Stack) -> None:
    """A ledger break's approval covers the move it was found with; the ledger moved since
    (a reversal posted meanwhile), so the compensation is capped and the rest is left to the
    next run, as the settlement says. That run must raise it again (its own approval, for
    what is left), not count the resolved break as known and leave the books short."""
    refund = history(f"ch_{uuid.uuid4().hex[:8]}", 2_000, days_ago=3)
    await seed_provider(stack, [refund])
    case_id = await seed_case(stack, refund, settled=0)  # shown refunded, nothing booked
    await backfill(stack, since_days=30)
    [found] = await wait_for_breaks(stack, [refund["id"]], "awaiting_approval")
    assert (found["break_class"], found["ledger_delta"]) == ("ledger_missing", 2_000)
    await reversed_by_mistake(stack, case_id, refund["id"])
    assert (await decide(stack, "carol", found["id"])).status_code == 202
    [capped] = await wait_for_breaks(stack, [refund["id"]], "resolved")
    assert (capped["resolution"]["outcome"]["state"], capped["id"]) == ("resolved", found["id"])
    net = sum(line["debit"] - line["credit"] for line in await stack.store.ledger.entries(case_id)
              if line["account"] == REFUNDED_ACCOUNT)
    assert net == 1_500  # -500 + the approved 2,000: 500 short of the provider's 2,000

    await backfill(stack, since_days=30)
    [again] = await wait_for_breaks(stack, [refund["id"]], "awaiting_approval")
    assert (again["break_class"], again["ledger_delta"], again["reopened"]) == ("ledger_missing", 500, 1)
    assert [(n["kind"], n["audience"]) for n in await stack.store.outbox.notices(case_id)].count(
        ("reconciliation_break", "ops")) == 2  # ops hear of it again, not only its approvers
    # a verdict must name the round its approver saw: one naming none, or the first round's
    # (2,000 was approved there; 500 is asked now), decides nothing
    async with stack.api("carol") as api:
        unnamed = await api.post(f"/v1/reconciliation/breaks/{again['id']}/approvals",
                                 json={"decision": "approve", "reason": "seen at 2,000"})
        stale = await api.post(f"/v1/reconciliation/breaks/{again['id']}/approvals",
                               json={"decision": "approve", "reason": "seen at 2,000", "reopened": 0})
    assert (unnamed.status_code, stale.status_code) == (422, 409), (unnamed.text, stale.text)
    still = await stack.store.reconciliation.get_break(again["id"])
    assert still is not None and still["state"] == "awaiting_approval"
    assert (await decide(stack, "carol", again["id"])).status_code == 202
    await wait_for_breaks(stack, [refund["id"]], "resolved")
    net = sum(line["debit"] - line["credit"] for line in await stack.store.ledger.entries(case_id)
              if line["account"] == REFUNDED_ACCOUNT)
    assert net == 2_000
    quiet = await backfill(stack, since_days=30)  # the books agree: nothing raised again
    assert refund["id"] not in {b["object_id"] for b in quiet["breaks"] if b.get("new_in_run")}


async def test_a_settlement_retried_after_its_break_was_raised_again_moves_nothing(stack: Stack) -> None:
    """A settlement's attempt that committed but never reported (its worker died) is
    retried; meanwhile the next run raised the break again for what the approval could
    not cover. The retry found no resolution (the new round cleared it) and posted the
    rest under the first round's approvers: the new round's own approval stepped around.
    A settlement acts only on the round it was approved for."""
    refund = history(f"ch_{uuid.uuid4().hex[:8]}", 2_000, days_ago=3)
    await seed_provider(stack, [refund])
    case_id = await seed_case(stack, refund, settled=0)
    await backfill(stack, since_days=30)
    [found] = await wait_for_breaks(stack, [refund["id"]], "awaiting_approval")
    await reversed_by_mistake(stack, case_id, refund["id"])
    assert (await decide(stack, "carol", found["id"])).status_code == 202
    await wait_for_breaks(stack, [refund["id"]], "resolved")
    await backfill(stack, since_days=30)
    [again] = await wait_for_breaks(stack, [refund["id"]], "awaiting_approval")
    assert again["reopened"] == 1

    retried = await stack.store.reconciliation.settle(BreakSettlement(
        break_id=found["id"], state=BreakState.RESOLVED, approvers=("carol",), round=0))
    assert retried.posting_key is None
    net = sum(line["debit"] - line["credit"] for line in await stack.store.ledger.entries(case_id)
              if line["account"] == REFUNDED_ACCOUNT)
    assert net == 1_500  # the rest waits for its own approval
    [still] = await wait_for_breaks(stack, [refund["id"]], "awaiting_approval")
    assert still["resolution"] is None
    assert (await decide(stack, "carol", again["id"])).status_code == 202
    await wait_for_breaks(stack, [refund["id"]], "resolved")


async def test_a_settlement_retried_after_it_ended_in_ops_review_adopts_nothing(stack: Stack) -> None:
    """An approved break of a refund unknown to us: the settlement read the refund failed at
    the provider (moved since the approval) and ended in ops review, adopting nothing; its
    attempt committed but never reported (the worker died). The retry reads nothing (the
    break has its resolution) and adopted the refund as a tracking case before it found
    that resolution: a case nobody approved, holding the amount against the charge."""
    refund = history(f"ch_{uuid.uuid4().hex[:8]}", 2_000, days_ago=3)
    await seed_provider(stack, [refund])
    await backfill(stack, since_days=30)
    [found] = await wait_for_breaks(stack, [refund["id"]], "awaiting_approval")
    assert found["break_class"] == "unknown_to_us"
    settlement = BreakSettlement(break_id=found["id"], state=BreakState.RESOLVED, approvers=("carol",),
                                 round=0)
    first = await stack.store.reconciliation.settle(settlement, "failed")
    assert first.state is BreakState.OPS_REVIEW
    assert await stack.store.cases.get(found["chain"]) is None
    retried = await stack.store.reconciliation.settle(settlement)
    assert retried.state is BreakState.OPS_REVIEW
    assert await stack.store.cases.get(found["chain"]) is None


async def test_a_break_raised_again_while_its_last_round_was_ending_gets_its_own_round(stack: Stack) -> None:
    """The run raised the break again while its approved round's case was still ending (its
    settlement retried): the dispatch attached to that case and marked the break
    dispatched, so the new round never had an exception case and stayed `new` for good.
    The earlier round's settlement hands it back to the next run's dispatch, even a run
    whose window no longer lists the refund (a scheduled run reads the last 14 days)."""
    refund = history(f"ch_{uuid.uuid4().hex[:8]}", 2_000, days_ago=3)
    await seed_provider(stack, [refund])
    case_id = await seed_case(stack, refund, settled=0)
    await backfill(stack, since_days=30)
    [found] = await wait_for_breaks(stack, [refund["id"]], "awaiting_approval")
    assert (await decide(stack, "carol", found["id"])).status_code == 202
    await wait_for_breaks(stack, [refund["id"]], "resolved")
    await stack.store.database.execute(  # raised again, its dispatch attached to the ending case
        "UPDATE reconciliation_breaks SET state = 'new', reopened = 1, resolution = NULL,"
        " dispatched_at = now() WHERE id = %s", (found["id"],))
    await stack.store.reconciliation.settle(BreakSettlement(
        break_id=found["id"], state=BreakState.RESOLVED, approvers=("carol",), round=0))
    assert "reconciliation_settlement_of_an_earlier_round" in await stack.actions(case_id)
    await backfill(stack, since_days=1)  # the refund is 3 days old: this run does not list it
    [again] = await wait_for_breaks(stack, [refund["id"]], "awaiting_approval", timeout=30)
    assert again["reopened"] == 1


async def test_a_round_whose_dispatch_found_the_last_round_still_running_is_started_later(
        stack: Stack) -> None:
    """The run raised the break again while its last round's case had not ended yet (its
    settlement committed, the workflow not closed): the dispatch attached to that case and
    marked the new round dispatched, so it never had a case of its own. The attach is seen
    (the case's round, in its memo) and the round is started by a later run's dispatch once
    the last round's case has ended."""
    refund = history(f"ch_{uuid.uuid4().hex[:8]}", 2_000, days_ago=3)
    await seed_provider(stack, [refund])
    await seed_case(stack, refund, settled=0)
    await backfill(stack, since_days=30)
    [found] = await wait_for_breaks(stack, [refund["id"]], "awaiting_approval")
    await stack.store.database.execute(  # raised again while round 0's case still runs
        "UPDATE reconciliation_breaks SET state = 'new', reopened = 1, dispatched_at = NULL WHERE id = %s",
        (found["id"],))
    await backfill(stack, since_days=1)
    [attached] = await wait_for_breaks(stack, [refund["id"]], "new")
    assert attached["dispatched_at"] is None
    await stack.client.get_workflow_handle(break_workflow_id(found["id"])).terminate("round 0 ends")
    await backfill(stack, since_days=1)
    [started] = await wait_for_breaks(stack, [refund["id"]], "awaiting_approval", timeout=30)
    assert started["reopened"] == 1 and started["dispatched_at"] is not None


async def test_a_settled_break_is_never_dispatched_again(stack: Stack) -> None:
    """A break whose exception case ended must not get another one, whatever its dispatch
    mark says (a stray earlier-round settlement handed a new round back to dispatch just
    before that round's own case opened it): a second case for a resolved break would
    ask approvers again for what was decided."""
    refund = history(f"ch_{uuid.uuid4().hex[:8]}", 2_000, days_ago=3)
    await seed_provider(stack, [refund])
    await seed_case(stack, refund, amount=2_500)  # seen again by every run: people fix its cause
    await backfill(stack, since_days=30)
    [found] = await wait_for_breaks(stack, [refund["id"]], "awaiting_approval")
    assert found["break_class"] == "amount_mismatch"
    assert (await decide(stack, "carol", found["id"])).status_code == 202
    await wait_for_breaks(stack, [refund["id"]], "resolved")
    handle = stack.client.get_workflow_handle(break_workflow_id(found["id"]))
    await handle.result()
    ended = (await handle.describe()).run_id
    await stack.store.database.execute(  # as a raised-again round left it, its mark cleared
        "UPDATE reconciliation_breaks SET dispatched_at = NULL, reopened = 1 WHERE id = %s", (found["id"],))
    await backfill(stack, since_days=30)
    assert (await handle.describe()).run_id == ended


async def test_whoever_reopened_a_break_cannot_approve_it_when_it_is_raised_again(stack: Stack) -> None:
    """The reopened break's approval could not cover all of it (the ledger moved meanwhile),
    so the next run raises it again for the rest: still the break dana reopened, so dana
    still may not approve it. Before, the raised-again break's evidence dropped who reopened
    it, and dana approved the rest alone."""
    refund = history(f"ch_{uuid.uuid4().hex[:8]}", 2_000, days_ago=3)
    await seed_provider(stack, [refund])
    case_id = await seed_case(stack, refund, settled=0, requester="bob")  # shown refunded, nothing booked
    await backfill(stack, since_days=30)
    [found] = await wait_for_breaks(stack, [refund["id"]], "awaiting_approval")
    await another_approver(stack, "dana", also=("ops",))
    assert (await decide(stack, "carol", found["id"], "deny")).status_code == 202
    await wait_for_breaks(stack, [refund["id"]], "dismissed")
    await reopen(stack, "dana", found, "the provider did refund it")
    await reversed_by_mistake(stack, case_id, refund["id"])
    assert (await decide(stack, "carol", found["id"])).status_code == 202
    await wait_for_breaks(stack, [refund["id"]], "resolved")
    await backfill(stack, since_days=30)
    [again] = await wait_for_breaks(stack, [refund["id"]], "awaiting_approval")
    assert (again["id"], again["ledger_delta"]) == (found["id"], 500)
    refused = await decide(stack, "dana", again["id"])
    assert refused.status_code == 403 and "cannot approve" in refused.json()["detail"], refused.text
    assert (await decide(stack, "carol", again["id"])).status_code == 202
    await wait_for_breaks(stack, [refund["id"]], "resolved")


async def test_an_approved_break_moves_nothing_once_its_case_moved_on_by_itself(stack: Stack) -> None:
    """A refund pending at the provider for days is a stuck break for approvers (its case's
    workflow still follows it). Meanwhile the provider succeeds and the case applies that
    itself: status, refund and ledger. The approval was given for a pending refund; settled
    against the case as it is now it would reverse the refund the provider made and show it
    pending. It goes to ops review with nothing posted."""
    refund = history(f"ch_{uuid.uuid4().hex[:8]}", 2_000, days_ago=5, status="pending")
    await seed_provider(stack, [refund])
    case_id = await seed_case(stack, refund, status=CaseStatus.PENDING, held=ProviderRefundStatus.PENDING,
                              settled=0)
    await backfill(stack, since_days=30)
    [found] = await wait_for_breaks(stack, [refund["id"]], "awaiting_approval")
    assert found["break_class"] == "stuck_non_terminal"
    succeeded = ProviderRefund(provider="sandbox", refund_id=refund["id"], charge_id=refund["charge"],
                               amount=2_000, currency="USD", status=ProviderRefundStatus.SUCCEEDED,
                               raw_status="succeeded", reference=case_id)
    await stack.store.cases.record_provider_refund(case_id, succeeded, "refund_status_changed")
    await stack.store.ledger.post(LedgerInput(refund_request_id=case_id, kind=LedgerKind.REFUND_SETTLED,
                                              amount=2_000, currency="USD", provider_refund_id=refund["id"]))
    await stack.store.cases.record_event(CaseEventInput(refund_request_id=case_id, action="refund_succeeded",
                                                        actor="workflow", status=CaseStatus.SUCCEEDED))
    assert (await decide(stack, "carol", found["id"])).status_code == 202
    [settled] = await wait_for_breaks(stack, [refund["id"]], "ops_review", "resolved")
    assert [e["template"] for e in await stack.store.ledger.entries(case_id)] == ["refund_settled"] * 2
    case = await stack.store.cases.get(case_id)
    assert case is not None and (case["status"], case["provider_status"]) == ("succeeded", "succeeded")
    assert settled["state"] == "ops_review"
    assert settled["resolution"]["case_moved"]["provider_status"] == "succeeded"
    assert ("reconciliation_break_case_moved", "ops") in [
        (n["kind"], n["audience"]) for n in await stack.store.outbox.notices(case_id)]  # ops hear


async def test_a_payout_failed_for_another_amount_than_booked_is_for_ops_never_a_reversal(
        payout_stack: Stack, store: Store, client: Client) -> None:
    """The provider fails a payout for 10.00 that our books hold paid for 6,000.00: the case
    goes to ops review (no reversal of a mismatch). Reconciliation must not turn it into a
    reversal of the booked 6,000.00 approved at the 10.00 tier (the ops lead alone): a
    mismatched payout is an `amount_mismatch` break in ops review, nothing moves."""
    stack = payout_stack
    listed = provider_payout(1_000, 0.5, "paid")
    await seed_payouts(stack, [listed], {listed["id"]: PayoutStatus.PAID})
    await stack.store.database.execute("UPDATE payouts SET amount = 600000 WHERE provider_payout_id = %s",
                                       (listed["id"],))
    await move_payout(stack, listed["id"], "failed", failure_code="account_closed")
    case_id = payout_case_id("sandbox", listed["id"])
    await wait_for_case(stack, case_id, "ops_review")
    await client.get_workflow_handle(case_id).result()

    report = await backfill(stack, since_days=1)
    assert report["breaks"] == []  # the admission's mismatch break is the one, not a second
    [found] = await store.database.fetch_all(
        "SELECT id, break_class, state FROM reconciliation_breaks WHERE chain = %s", (case_id,))
    assert (found["break_class"], found["state"]) == ("amount_mismatch", "ops_review")
    assert (await decide(stack, "lena", found["id"])).status_code == 409  # nothing to approve
    assert await store.ledger.entries(case_id) == []
    row = await store.database.fetch_one("SELECT status FROM payouts WHERE provider_payout_id = %s",
                                         (listed["id"],))
    assert row == {"status": "paid"}


async def test_a_payout_mismatch_found_by_reconciliation_alone_is_for_ops(payout_stack: Stack) -> None:
    """No webhook came: the provider lists the payout failed for another amount than we
    booked. An `amount_mismatch` break in ops review, never dispatched, nothing reversed."""
    stack = payout_stack
    listed = provider_payout(1_000, 0.5, "failed", failure_code="account_closed")
    await seed_payouts(stack, [listed], {listed["id"]: PayoutStatus.PAID})
    await stack.store.database.execute("UPDATE payouts SET amount = 600000 WHERE provider_payout_id = %s",
                                       (listed["id"],))
    report = await backfill(stack, since_days=1)
    assert [(b["break_class"], b["state"]) for b in report["breaks"]] == [("amount_mismatch", "ops_review")]
    [found] = await wait_for_breaks(stack, [listed["id"]], "ops_review")
    with pytest.raises(RPCError):  # no exception workflow: ops look first
        await stack.client.get_workflow_handle(break_workflow_id(found["id"])).describe()
    row = await stack.store.database.fetch_one("SELECT status FROM payouts WHERE provider_payout_id = %s",
                                               (listed["id"],))
    assert row == {"status": "paid"}

    # its webhook comes after all: the case goes to ops review, beside the run's break, not
    # with a second break of its own for the same payout
    await move_payout(stack, listed["id"], "failed", failure_code="account_closed")
    case_id = payout_case_id("sandbox", listed["id"])
    await wait_for_case(stack, case_id, "ops_review")
    breaks = await stack.store.database.fetch_all(
        "SELECT id, break_class FROM reconciliation_breaks WHERE chain = %s", (case_id,))
    assert breaks == [{"id": found["id"], "break_class": "amount_mismatch"}]
    [notice] = [n for n in await stack.store.outbox.notices(case_id) if n["kind"] == "payout_amount_mismatch"]
    assert notice["detail"]["break_id"] == found["id"]


async def test_a_mismatch_ops_closed_is_raised_again_when_its_webhook_comes(payout_stack: Stack) -> None:
    """The run's mismatch break was closed by ops before the webhook came: the case's
    admission opens its own break (the notice names an open one, never a closed one)."""
    stack = payout_stack
    listed = provider_payout(1_000, 0.5, "failed", failure_code="account_closed")
    await seed_payouts(stack, [listed], {listed["id"]: PayoutStatus.PAID})
    await stack.store.database.execute("UPDATE payouts SET amount = 600000 WHERE provider_payout_id = %s",
                                       (listed["id"],))
    await backfill(stack, since_days=1)
    [found] = await wait_for_breaks(stack, [listed["id"]], "ops_review")
    await stack.store.database.execute("UPDATE reconciliation_breaks SET state = 'dismissed' WHERE id = %s",
                                       (found["id"],))
    await move_payout(stack, listed["id"], "failed", failure_code="account_closed")
    case_id = payout_case_id("sandbox", listed["id"])
    await wait_for_case(stack, case_id, "ops_review")
    [notice] = [n for n in await stack.store.outbox.notices(case_id) if n["kind"] == "payout_amount_mismatch"]
    opened = await stack.store.database.fetch_one("SELECT state FROM reconciliation_breaks WHERE id = %s",
                                                  (notice["detail"]["break_id"],))
    assert notice["detail"]["break_id"] != found["id"] and opened == {"state": "ops_review"}


async def test_an_approved_amount_break_leaves_a_running_case_to_book_the_refund_once(
        store: Store, client: Client, temporal_server: TemporalDevServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The provider refunded another amount than asked and its webhook was lost; the run
    hands the status to the running case and raises the amount break for approvers. The
    case takes the status (its mismatch check, then its own entry for the provider's
    amount) while the break is approved. Before, the approved settlement posted the
    provider's amount beside the case's own entry: refunded once, booked twice."""
    stack = await open_stack(store, client, temporal_server.address, status_poll_interval_seconds=300,
                             reconciliation_grace_seconds=0)
    try:
        async with stack.sandbox() as sb:
            await sb.post("/_sandbox/config", json={"refund_initial_status": "pending"})
        charge = await stack.charge(10_000)
        case_id = await stack.request_refund("alice", charge, 1_800)
        refund_id = (await stack.wait_for_status(case_id, "pending"))["provider_refund_id"]
        moved = {**history(charge, 1_500, days_ago=0.01, reference=case_id), "id": refund_id}
        async with stack.sandbox() as sb:  # the provider refunded 15.00, its webhook lost
            (await sb.post("/_sandbox/import", json={"charges": [], "refunds": [moved]})).raise_for_status()
        release, held = hold_writes_of(stack, monkeypatch, "provider_refund_mismatch", "workflow")
        await backfill(stack, since_days=1)
        await asyncio.wait_for(held.wait(), 60)  # the case is taking the provider's word
        breaks = await wait_for_breaks(stack, [refund_id], "awaiting_approval", "handed_to_case")
        [amount_break] = [b for b in breaks if b["break_class"] == "amount_mismatch"]
        assert (await decide(stack, "carol", amount_break["id"])).status_code == 202
        settled_states = ("resolved", "handed_to_case", "ops_review")
        [settled] = [b for b in await wait_for_breaks(stack, [refund_id], *settled_states)
                     if b["id"] == amount_break["id"]]
        release.set()
        await stack.wait_for_audit(case_id, "refund_succeeded")
        net = sum(line["debit"] - line["credit"] for line in await store.ledger.entries(case_id)
                  if line["account"] == REFUNDED_ACCOUNT)
        assert net == 1_500, (net, settled["state"], settled["resolution"])
        case = await store.cases.get(case_id)
        assert case is not None and case["status"] == "ops_review"
        assert (settled["state"], settled["resolution"]["approvers"]) == ("handed_to_case", ["carol"])
    finally:
        await stack.close()


async def test_an_approved_refund_break_moves_nothing_once_the_provider_changed_its_word(
        stack: Stack) -> None:
    """A case shows the refund failed; the provider shows it succeeded: a break for
    approvers. While it waits, the provider fails the refund after all (its webhook agrees
    with the case, so no newer break). The approval was given for a success; settled on
    the stored word it posted a refund the provider never made and showed the case
    refunded. It goes to ops review with nothing posted."""
    case_id, refund, found = await success_shown_failed(stack)
    await move_at_provider(stack, refund["id"], "failed", "card_account_closed")
    assert (await decide(stack, "carol", found["id"])).status_code == 202
    [settled] = await wait_for_breaks(stack, [refund["id"]], "ops_review", "resolved")
    assert await stack.store.ledger.entries(case_id) == []
    case = await stack.store.cases.get(case_id)
    assert case is not None and (case["status"], case["reserved_amount"]) == ("refund_failed", 0)
    assert (settled["state"], settled["resolution"]["provider_moved"]) == (
        "ops_review", {"provider_status": "failed", "found_provider_status": "succeeded"})
    assert ("reconciliation_break_provider_moved", "ops") in [
        (n["kind"], n["audience"]) for n in await stack.store.outbox.notices(case_id)]


async def pending_refund_unknown_to_us(stack: Stack, amount: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """A refund made outside us, pending at the provider, its webhook missed: backfilled into
    an unknown_to_us break waiting for approval. (the refund, the break's row)"""
    charge = await stack.charge(10_000)
    refund = history(charge, amount, days_ago=0.5, status="pending")
    await seed_provider(stack, [refund])
    await backfill(stack, since_days=1)
    [found] = await wait_for_breaks(stack, [refund["id"]], "awaiting_approval")
    assert found["break_class"] == "unknown_to_us"
    return refund, found


async def test_an_approved_unknown_refund_reverses_nothing_its_tracking_case_booked(stack: Stack) -> None:
    """A refund made outside us, pending at the provider: an unknown_to_us break for
    approvers, nothing to book yet. It then succeeds and its webhook opens its tracking
    case, which books it. The approval, settled on the stored 'pending', reversed that
    entry: the books showed nothing for a refund the provider paid."""
    refund, found = await pending_refund_unknown_to_us(stack, 1_200)
    await stack.set_provider_status(refund["id"], "succeeded")  # its webhook arrives
    tracking = found["chain"]
    await stack.wait_for_audit(tracking, "ledger_posted")
    assert (await decide(stack, "carol", found["id"])).status_code == 202
    [settled] = await wait_for_breaks(stack, [refund["id"]], "ops_review", "resolved")
    assert [e["template"] for e in await stack.store.ledger.entries(tracking)] == ["refund_settled"] * 2
    assert settled["state"] == "ops_review"


async def test_an_approved_unknown_refund_leaves_its_tracking_case_opened_since_to_book_it_once(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    """A run lists a refund made outside us, succeeded, before any webhook: an unknown_to_us
    break for approvers. Its delayed webhooks then arrive, `pending` first: a tracking case
    opens and its workflow follows the refund. The approval hands the provider's word to
    that workflow, which books the refund once. Before, the approval compensated beside it
    (the break named no case) and the workflow then booked the success again: twice."""
    stack = await open_stack(store, client, temporal_server.address, late_failure_window_seconds=120)
    try:
        charge = await stack.charge(10_000)
        refund = history(charge, 1_200, days_ago=0.5)
        await seed_provider(stack, [refund])
        await backfill(stack, since_days=1)
        [found] = await wait_for_breaks(stack, [refund["id"]], "awaiting_approval")
        assert found["break_class"] == "unknown_to_us"
        delayed = Dashboard(stack, refund["id"], charge)
        await delayed.reports("pending", amount=1_200)
        await stack.wait_for_status(found["chain"], "pending")
        assert (await decide(stack, "carol", found["id"])).status_code == 202
        [settled] = await wait_for_breaks(stack, [refund["id"]], "handed_to_case", "resolved", "ops_review")
        await delayed.reports("succeeded", amount=1_200)
        await stack.wait_for_status(found["chain"], "succeeded")
        await stack.wait_for_audit(found["chain"], "refund_succeeded")
        net = sum(line["debit"] - line["credit"] for line in await store.ledger.entries(found["chain"])
                  if line["account"] == REFUNDED_ACCOUNT)
        assert (net, settled["state"]) == (1_200, "handed_to_case")
    finally:
        await stack.close()


async def test_an_unknown_refund_whose_webhook_comes_while_its_approval_settles_is_booked_once(
        stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """An approved unknown_to_us break finds no case to hand the provider's word to; its
    delayed `pending` webhook then opens the tracking case (its workflow follows the refund)
    before the settlement adopts it and books the success. The `succeeded` webhook that
    follows makes the workflow book the same success: it lands on the settlement's entry
    (one per case and template), never beside it (2,600 for a 1,300 refund before)."""
    charge = await stack.charge(10_000)
    refund = history(charge, 1_300, days_ago=0.5)
    await seed_provider(stack, [refund])
    await backfill(stack, since_days=1)
    [found] = await wait_for_breaks(stack, [refund["id"]], "awaiting_approval")
    delayed = Dashboard(stack, refund["id"], charge)
    settle = stack.store.reconciliation.settle

    async def webhook_first(settlement: BreakSettlement, at_provider: str | None = None) -> BreakOutcome:
        if settlement.break_id == found["id"]:  # after the hand-over check, before the settlement
            await delayed.reports("pending", amount=1_300)
            await stack.wait_for_status(found["chain"], "pending")
        return await settle(settlement, at_provider)

    monkeypatch.setattr(stack.store.reconciliation, "settle", webhook_first)
    assert (await decide(stack, "carol", found["id"])).status_code == 202
    [settled] = await wait_for_breaks(stack, [refund["id"]], "resolved", "ops_review")
    monkeypatch.undo()
    await delayed.reports("succeeded", amount=1_300)
    await stack.wait_for_audit(found["chain"], "refund_succeeded")
    net = sum(line["debit"] - line["credit"] for line in await stack.store.ledger.entries(found["chain"])
              if line["account"] == REFUNDED_ACCOUNT)
    assert (net, settled["state"]) == (1_300, "resolved")


async def test_a_doubled_ledger_s_reversal_leaves_the_case_s_own_late_failure_reversal_its_key(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    """A succeeded refund (its workflow watching for a late failure) booked twice: the
    approved `ledger_doubled` break reverses the extra booking. The provider then fails the
    refund: the workflow reverses the booking it made, under its own key. The compensation
    took that key (it was the case's first reversal), and the workflow's reversal was read
    as already posted: the case failed, the ledger still said refunded."""
    async with stack_with(store, client, temporal_server.address, reconciliation_grace_seconds=0) as stack:
        charge = await stack.charge(10_000)
        case_id = await stack.request_refund("alice", charge, 1_300)
        row = await stack.wait_for_status(case_id, "succeeded")
        await stack.store.ledger.post(LedgerInput(
            refund_request_id=case_id, kind=LedgerKind.REFUND_SETTLED, amount=1_300, currency="USD",
            provider_refund_id=row["provider_refund_id"], reference="stray"))
        await backfill(stack, since_days=1)
        [found] = await wait_for_breaks(stack, [row["provider_refund_id"]], "awaiting_approval")
        assert found["break_class"] == "ledger_doubled"
        assert (await decide(stack, "carol", found["id"])).status_code == 202
        await wait_for_breaks(stack, [row["provider_refund_id"]], "resolved")
        await stack.set_provider_status(row["provider_refund_id"], "failed",
                                        failure_reason="card_account_closed")
        await stack.wait_for_status(case_id, "refund_failed")
        net = sum(line["debit"] - line["credit"] for line in await stack.store.ledger.entries(case_id)
                  if line["account"] == REFUNDED_ACCOUNT)
        assert net == 0


async def test_an_approved_unknown_refund_the_provider_failed_since_opens_no_tracking_case(
        stack: Stack) -> None:
    """An unknown refund found succeeded; the provider failed it while the break waited (its
    webhook lost). The approval goes to ops with nothing posted, and adopts nothing either:
    a tracking case opened for it held the refund's amount against the charge for good."""
    charge = await stack.charge(10_000)
    refund = history(charge, 1_200, days_ago=0.5)
    await seed_provider(stack, [refund])
    await backfill(stack, since_days=1)
    [found] = await wait_for_breaks(stack, [refund["id"]], "awaiting_approval")
    await move_at_provider(stack, refund["id"], "failed", "card_account_closed")
    assert (await decide(stack, "carol", found["id"])).status_code == 202
    [settled] = await wait_for_breaks(stack, [refund["id"]], "ops_review", "resolved")
    assert settled["state"] == "ops_review"
    assert await stack.store.cases.get(found["chain"]) is None


async def test_an_approved_break_on_a_refund_in_another_currency_moves_nothing(stack: Stack) -> None:
    """The provider succeeded a refund in USD that our case holds pending in EUR: the run
    raises the status break and the currency break. The ledger cannot follow a refund in
    another currency, so neither approval changes anything: both end in ops review, the case
    stays as it was. Before, the status break's approval marked the case succeeded with its
    amount held, posting nothing (the ledger classes are off while a currency break is open:
    no break was left for the unbooked money), and the currency break's ended `resolved` though
    nothing moved."""
    refund = history(f"ch_{uuid.uuid4().hex[:8]}", 1_000, days_ago=2)
    await seed_provider(stack, [refund])
    case_id = await seed_case(stack, refund, status=CaseStatus.PENDING, held=ProviderRefundStatus.PENDING,
                              settled=0, currency="EUR")
    await backfill(stack, since_days=30)
    found = {b["break_class"]: b for b in await wait_for_breaks(stack, [refund["id"]], "awaiting_approval")}
    assert set(found) == {"provider_succeeded_shown_pending", "currency_mismatch"}, found
    for row in found.values():
        assert (await decide(stack, "carol", row["id"])).status_code == 202
    ended = await wait_for_breaks(stack, [refund["id"]], "ops_review", "resolved")
    assert {(b["break_class"], b["state"]) for b in ended} == {(c, "ops_review") for c in found}, ended
    case = await stack.store.cases.get(case_id)
    assert case is not None and (case["status"], case["provider_status"]) == ("pending", "pending")
    assert await stack.store.ledger.entries(case_id) == []
    told = [n for n in await stack.store.outbox.notices(case_id)
            if n["kind"] == "reconciliation_break_currency_differs"]
    assert [(n["audience"], n["detail"]["provider_currency"]) for n in told] == [("ops", "USD")] * 2, told


class RoundEndsFirst:
    """A Temporal client whose first verdict update to a break waits for `meanwhile` (the
    round it was given for denied and the break reopened) before it goes out."""

    def __init__(self, client: Client, meanwhile: Callable[[], Awaitable[None]]) -> None:
        self._client, self._meanwhile = client, meanwhile

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def get_workflow_handle(self, *args: Any, **kwargs: Any) -> Any:
        return _LateUpdates(self._client.get_workflow_handle(*args, **kwargs), self)


class _LateUpdates:
    def __init__(self, handle: Any, client: RoundEndsFirst) -> None:
        self._handle, self._client = handle, client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)

    async def execute_update(self, *args: Any, **kwargs: Any) -> Any:
        meanwhile, self._client._meanwhile = self._client._meanwhile, _nothing
        await meanwhile()
        return await self._handle.execute_update(*args, **kwargs)


async def _nothing() -> None:
    return None


async def test_a_verdict_checked_for_one_round_never_counts_in_the_next(stack: Stack) -> None:
    """A verdict is checked against the round its approver saw, then sent to the break's
    case. If that round ends (denied) and ops reopen the break in between, the verdict went
    to the new round's case, the latest run under the same workflow id, and counted there:
    an approval given for a round that was dismissed approved the round opened after it
    (reproduced: accepted, no refusal). It goes to the run of the round it was checked
    against, so it finds that round ended: 409, nothing counted."""
    case_id, found = await failed_break_with_a_trigger(stack)  # bob requested, carol triggered
    await another_approver(stack)
    await another_approver(stack, "dana")

    async def denied_and_reopened() -> None:
        assert (await decide(stack, "erin", found["id"], "deny")).status_code == 202
        await wait_for_breaks(stack, [found["object_id"]], "dismissed")
        await reopen(stack, "olga", found, "the bank may have failed it after all")

    relays = sealing_client(stack.client, approval_keys(stack.settings))  # as the relay's client seals
    late = CaseActions(stack.store, cast(Client, RoundEndsFirst(relays, denied_and_reopened)), stack.settings)
    dana = Principal("dana", frozenset({"approver"}))
    with pytest.raises(Refused) as refused:
        await decide_on_break(late, dana, int(found["id"]),
                              BreakDecisionBody(decision=Decision.APPROVE, reason="checked", reopened=0),
                              via="api")
    assert refused.value.status == 409, refused.value.detail
    [waiting] = await wait_for_breaks(stack, [found["object_id"]], "awaiting_approval", "resolved")
    assert (waiting["state"], waiting["reopened"]) == ("awaiting_approval", 1)
    assert [e["template"] for e in await stack.store.ledger.entries(case_id)] == ["refund_settled"] * 2
    assert "reconciliation_approval_approve" not in [
        e["action"] for e in await stack.store.audit.trail(waiting["chain"]) if e["actor"] == "dana"]


async def test_a_break_people_must_look_at_again_is_raised_again_by_the_next_run(stack: Stack) -> None:
    """A refund made outside us, pending, webhook missed: an unknown_to_us break for
    approvers. It succeeds at the provider before they approve, so the settlement sends it
    to ops review (approved for "pending", nothing booked). Every later run only linked it
    there, and no action acts on a break in ops review: money moved with no case holding it
    and no ledger entry, for good (reproduced). The next run finding it raises it again for
    its own approval, and that one books it."""
    refund, found = await pending_refund_unknown_to_us(stack, 1_300)
    await move_at_provider(stack, refund["id"], "succeeded")
    assert (await decide(stack, "carol", found["id"])).status_code == 202
    [settled] = await wait_for_breaks(stack, [refund["id"]], "ops_review", "resolved")
    assert settled["state"] == "ops_review" and "provider_moved" in settled["resolution"]
    await backfill(stack, since_days=1)
    [again] = await wait_for_breaks(stack, [refund["id"]], "awaiting_approval")
    assert (again["id"], again["reopened"], again["provider_status"]) == (found["id"], 1, "succeeded")
    assert (await decide(stack, "carol", again["id"])).status_code == 202
    [booked] = await wait_for_breaks(stack, [refund["id"]], "resolved")
    lines = await stack.store.ledger.entries(booked["chain"])
    assert [e["template"] for e in lines] == ["refund_settled"] * 2
