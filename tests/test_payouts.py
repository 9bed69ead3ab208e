"""Payout reversals on the real stack: the two worked examples of the payout-reversal
pattern (a settlement failure after "paid"; a retry storm of one failure), every approval
tier, the rollback branch when the compensating entry cannot be posted, out-of-order and
joining events, and a reissue that needs its own approval and happens once."""

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import httpx
import psycopg
import pytest
from temporalio.client import Client
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError
from temporalio.testing import ActivityEnvironment

from activities.payout import PayoutActivities
from adapters.db import Store
from adapters.db.audit import AuditLog
from adapters.db.ledger import LedgerRepository
from adapters.db.rows import LedgerLineRow
from adapters.instrumented import instrument
from adapters.policy_file import load_policy
from adapters.providers.base import PayoutExecutor, ProviderDeclined
from adapters.providers.stripe import StripeProvider
from domain import errors
from domain.models import ApprovalSignal, Decision, LedgerInput, LedgerKind, LedgerResult
from domain.payouts import (
    PayoutAtProvider,
    PayoutEvent,
    PayoutOrder,
    PayoutRegistration,
    PayoutSnapshot,
    PayoutStatus,
    ProviderPayout,
    ProviderPayoutStatus,
    ReissueInput,
    ReversalInput,
    payout_case_id,
)
from starters.dev.stack import TemporalDevServer
from starters.relay.webhook_desk import WebhookDesk
from tests.harness import Stack, UpdatesAborted, intercepted, open_stack, sealed_signal, stack_with
from tests.payouts_kit import (
    add_payout_approvers,
    ask_reissue,
    decide,
    move_payout,
    notice_kinds,
    paid_payout,
    reissues_at_provider,
    remediate,
    remediated,
    view,
    wait_for_actions,
    wait_for_case,
)
from tests.test_reconciliation_finish import StartRefused


@pytest.fixture
async def payouts(stack: Stack) -> Stack:
    await add_payout_approvers(stack)
    return stack


async def ledger_stuck(store: Store, client: Client, temporal_server: TemporalDevServer,
                       **overrides: Any) -> Stack:
    """A stack whose compensating entry gives up after 2 s (the ledger is locked by the test)."""
    stack = await open_stack(store, client, temporal_server.address, ledger_pending_after_seconds=2,
                             **overrides)
    await add_payout_approvers(stack)
    return stack


def balances(lines: list[LedgerLineRow]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for line in lines:
        totals[line.account] = totals.get(line.account, 0) + line.debit - line.credit
    return totals


async def test_settlement_failed_after_paid_is_approved_then_held_reversed_ticketed_and_noticed(
        payouts: Stack) -> None:
    payout = await paid_payout(payouts, 1_250_000, payout_id="P-10492", beneficiary="ben-10492")
    event_id = await move_payout(payouts, "P-10492", "settlement_failed", failure_code="bank_rejection")
    case_id = payout_case_id("sandbox", "P-10492")
    await wait_for_case(payouts, case_id, "awaiting_approval")

    trail = await payouts.store.audit.trail(case_id)
    [received] = [e["detail"] for e in trail if e["action"] == "payout_event_received"]
    assert (received["signature"], received["verdict"], received["idempotency_key"]) == (
        "verified", "accepted", f"{event_id}:P-10492")
    [opened] = [e["detail"] for e in trail if e["action"] == "payout_exception_opened"]
    assert opened["payout_exists"] and opened["internal_status"] == "paid" and not opened["open_case"]
    assert opened["idempotency_key"] == f"{event_id}:P-10492" and opened["reported"] == "settlement_failed"

    case = await view(payouts, case_id, "fiona")  # a tier approver reads the case
    advice = case["recommendation"]
    assert (advice["root_cause"], advice["next_step"]) == ("bank_rejection", "hold")
    assert "do not reissue until the beneficiary's bank details are verified" in advice["advice"]
    assert "P-10492" in advice["summary"] and "payout.settlement_failed" in advice["summary"]
    assert case["decision"]["decision"]["tier"] == "finance_and_compliance"
    assert sorted(case["missing_roles"]) == ["compliance", "finance_manager"]

    assert (await decide(payouts, "lena", case_id)).status_code == 403  # the ops lead's tier is lower
    first = await decide(payouts, "fiona", case_id)
    assert first.status_code == 202 and first.json()["missing_roles"] == ["compliance"]
    untouched = await payouts.store.payouts.payout(payout.id)
    assert untouched is not None and untouched.status is PayoutStatus.PAID
    assert await payouts.store.ledger.entries(case_id) == []
    second = await decide(payouts, "cora", case_id)
    assert second.status_code == 202 and second.json()["missing_roles"] == []
    row = await wait_for_case(payouts, case_id, "remediated")

    trail = await payouts.store.audit.trail(case_id)
    actions = [e["action"] for e in trail]
    kinds = notice_kinds(trail)
    assert [actions.count(a) for a in ("payout_held", "ledger_posted", "ticket_opened")] == [1, 1, 1]
    assert kinds.count("payout_exception_ticket") == kinds.count("payout_exception_remediated") == 1
    remediated_notice = next(i for i, e in enumerate(trail) if e["action"] == "notice_queued"
                             and e["detail"]["kind"] == "payout_exception_remediated")
    assert actions.index("approval_granted") < actions.index("payout_held") < actions.index("ledger_posted") \
        < actions.index("ticket_opened") < remediated_notice < actions.index("runbook_completed")

    held = await payouts.store.payouts.payout(payout.id)
    assert held is not None and (held.status, held.held_from_status) == ("on_hold", "paid")
    [hold] = await payouts.store.payouts.beneficiary_holds("ben-10492")
    assert hold["case_id"] == case_id and hold["released_at"] is None
    lines = await payouts.store.ledger.entries(case_id)
    assert {line["template"] for line in lines} == {"payout_reversed"}
    assert [(x["account"], x["debit"], x["credit"]) for x in lines] == [
        ("provider_clearing", 1_250_000, 0), ("beneficiary_payable", 0, 1_250_000)]
    assert row["ticket_ref"] == f"pending:{case_id}"
    notices = {n["kind"]: n for n in await payouts.store.outbox.notices(case_id)}
    assert notices["payout_exception_ticket"]["detail"]["priority"] == "normal"
    assert notices["payout_exception_remediated"]["audience"] == "stakeholders"
    assert notices["payout_exception_remediated"]["detail"]["approved_by"] == "fiona, cora"


async def test_a_retry_storm_of_one_failure_is_twelve_receipts_and_one_execution(payouts: Stack) -> None:
    payout = await paid_payout(payouts, 120_000)
    event_id = await move_payout(payouts, payout.provider_payout_id, "failed",
                                 failure_code="insufficient_funds", copies=12)
    case_id = payout_case_id("sandbox", payout.provider_payout_id)
    await wait_for_actions(payouts, case_id, "payout_event_received", 12)
    await wait_for_case(payouts, case_id, "awaiting_approval")
    receipts = await payouts.store.receipts.find("sandbox", event_id)
    assert sorted(r["verdict"] for r in receipts) == ["accepted"] + ["duplicate"] * 11
    assert (await decide(payouts, "lena", case_id)).json()["missing_roles"] == []
    await wait_for_case(payouts, case_id, "remediated")

    trail = await payouts.store.audit.trail(case_id)
    actions = [e["action"] for e in trail]
    keys = {e["detail"]["idempotency_key"] for e in trail if e["action"] == "payout_event_received"}
    assert actions.count("payout_event_received") == 12
    assert keys == {f"{event_id}:{payout.provider_payout_id}"}
    assert [actions.count(a) for a in ("payout_exception_opened", "payout_held", "ledger_posted",
                                        "ticket_opened", "runbook_completed")] == [1, 1, 1, 1, 1]
    assert len(await payouts.store.ledger.entries(case_id)) == 2  # one balanced entry


@pytest.mark.parametrize(("amount", "tier", "refused", "approver"), [
    (499_999, "ops_lead", "fiona", "lena"),
    (5_000_001, "treasury", "fiona", "tess"),
], ids=["below-5k-ops-lead", "above-50k-treasury"])
async def test_each_tier_takes_its_own_role(payouts: Stack, amount: int, tier: str, refused: str,
                                            approver: str) -> None:
    payout = await paid_payout(payouts, amount)
    await move_payout(payouts, payout.provider_payout_id, "reversed")
    case_id = payout_case_id("sandbox", payout.provider_payout_id)
    await wait_for_case(payouts, case_id, "awaiting_approval")
    case = await view(payouts, case_id)
    assert case["decision"]["decision"]["tier"] == tier
    assert case["recommendation"]["next_step"] == "escalate"  # no failure code: no cause to name
    no = await decide(payouts, refused, case_id)
    assert no.status_code == 403 and "needs one of the roles" in no.json()["detail"]
    assert (await decide(payouts, approver, case_id)).status_code == 202
    await wait_for_case(payouts, case_id, "remediated")
    assert (await view(payouts, case_id))["payout"]["status"] == "on_hold"


async def test_a_denied_reversal_changes_nothing(payouts: Stack) -> None:
    payout = await paid_payout(payouts, 90_000)
    await move_payout(payouts, payout.provider_payout_id, "failed", failure_code="compliance_hold")
    case_id = payout_case_id("sandbox", payout.provider_payout_id)
    await wait_for_case(payouts, case_id, "awaiting_approval")
    assert (await decide(payouts, "lena", case_id, "deny")).status_code == 202
    await wait_for_case(payouts, case_id, "denied")
    assert (await view(payouts, case_id))["payout"]["status"] == "paid"
    assert await payouts.store.ledger.entries(case_id) == []
    assert "payout_held" not in [e["action"] for e in await payouts.store.audit.trail(case_id)]


async def test_a_failure_heard_after_its_case_ended_with_the_payout_paid_is_a_break_now(
        payouts: Stack) -> None:
    """A denied reversal leaves the payout paid in our books and its case ended. The bank's
    next failure of it found no case to join: audited only (`payout_event_without_open_case`),
    no break, nobody told, and no run lists a payout made before its window. It is
    reconciled at once, as a refund's event after its case closed: a break for people."""
    payout = await paid_payout(payouts, 91_000)
    provider_id = payout.provider_payout_id
    await move_payout(payouts, provider_id, "failed", failure_code="compliance_hold")
    case_id = payout_case_id("sandbox", provider_id)
    await wait_for_case(payouts, case_id, "awaiting_approval")
    assert (await decide(payouts, "lena", case_id, "deny")).status_code == 202
    await wait_for_case(payouts, case_id, "denied")
    await payouts.client.get_workflow_handle(case_id).result()

    await move_payout(payouts, provider_id, "failed", failure_code="account_closed")
    trail = await wait_for_actions(payouts, case_id, "reconciliation_break_found")
    [found] = [e["detail"] for e in trail if e["action"] == "reconciliation_break_found"]
    assert (found["break_class"], found["object_id"]) == ("payout_failed_shown_paid", provider_id)
    assert "payout_event_without_open_case" in [e["action"] for e in trail]
    assert "reconciliation_break" in [n.kind for n in await payouts.store.outbox.notices(case_id)]
    assert (await view(payouts, case_id))["payout"]["status"] == "paid"  # people decide
    assert await payouts.store.ledger.entries(case_id) == []


async def test_a_verdict_for_a_payout_case_whose_workflow_ended_is_an_audited_409(payouts: Stack) -> None:
    """The case row still reads awaiting_approval but its workflow was terminated: a clear
    409, recorded, as for a refund (it was an unrecorded 500)."""
    payout = await paid_payout(payouts, 95_000)
    await move_payout(payouts, payout.provider_payout_id, "failed", failure_code="compliance_hold")
    case_id = payout_case_id("sandbox", payout.provider_payout_id)
    await wait_for_case(payouts, case_id, "awaiting_approval")
    await payouts.client.get_workflow_handle(case_id).terminate("an operator's mistake")
    refused = await decide(payouts, "lena", case_id)
    assert refused.status_code == 409 and "terminated" in refused.json()["detail"], refused.text
    assert "action_refused" in [e["action"] for e in await payouts.store.audit.trail(case_id)]
    assert await payouts.store.ledger.entries(case_id) == []


async def approve_while_the_ledger_is_locked(stack: Stack, postgres_dsn: str, status: str) -> str:
    """A failed payout's case approved while the test holds the ledger table, so step B
    times out; returns the case id once the case shows `status` (the lock is then freed)."""
    payout = await paid_payout(stack, 300_000)
    await move_payout(stack, payout.provider_payout_id, "failed", failure_code="account_closed")
    case_id = payout_case_id("sandbox", payout.provider_payout_id)
    await wait_for_case(stack, case_id, "awaiting_approval")
    async with await psycopg.AsyncConnection.connect(postgres_dsn) as blocker:
        async with blocker.transaction():
            await blocker.execute("LOCK TABLE ledger_entries IN ACCESS EXCLUSIVE MODE")
            assert (await decide(stack, "lena", case_id)).status_code == 202
            await wait_for_case(stack, case_id, status, timeout=90)
    return case_id


def keep_holds_policy(folder: Path) -> Path:
    """The default policy, but a failed compensating entry keeps the hold (no rollback)."""
    text = (Path(__file__).parents[1] / "adapters/policies/default.toml").read_text()
    strict = folder / "keep-holds.toml"
    strict.write_text(text.replace("rollback_hold_on_ledger_failure = true",
                                   "rollback_hold_on_ledger_failure = false"))
    return strict


@contextlib.asynccontextmanager
async def reversal_answered_late(stack: Stack) -> AsyncIterator[str]:
    """A failed payout's case approved whose step B commits but answers after the case's
    `ledger_pending_after` (2 s), while the block runs: yields the case id once approved."""
    payouts = stack.store.payouts
    post = payouts.post_reversal

    async def answered_late(case_id: str, payout: PayoutSnapshot) -> LedgerResult:
        posted = await post(case_id, payout)
        await asyncio.sleep(4)
        return posted

    payouts.post_reversal = answered_late  # type: ignore[method-assign]
    try:
        payout = await paid_payout(stack, 300_000)
        await move_payout(stack, payout.provider_payout_id, "failed", failure_code="account_closed")
        case_id = payout_case_id("sandbox", payout.provider_payout_id)
        await wait_for_case(stack, case_id, "awaiting_approval")
        assert (await decide(stack, "lena", case_id)).status_code == 202
        yield case_id
    finally:
        payouts.post_reversal = post  # type: ignore[method-assign]


async def test_ledger_failure_after_the_hold_rolls_it_back_and_raises_a_high_priority_ticket(
        store: Store, client: Client, temporal_server: TemporalDevServer, postgres_dsn: str) -> None:
    stack = await ledger_stuck(store, client, temporal_server)
    try:
        case_id = await approve_while_the_ledger_is_locked(stack, postgres_dsn, "rolled_back")
        case = await view(stack, case_id)
        assert (case["payout"]["status"], case["payout"]["held_from_status"]) == ("paid", None)
        assert [h["released_at"] is not None for h in case["beneficiary_holds"]] == [True]
        assert await store.ledger.entries(case_id) == [] and case["reversal_entry_id"] is None
        actions = [e["action"] for e in await store.audit.trail(case_id)]
        assert actions.index("payout_held") < actions.index("payout_hold_rolled_back")
        assert "ledger_posted" not in actions and "runbook_completed" not in actions
        notices = [(n["kind"], n["audience"], n["detail"].get("priority"))
                   for n in await store.outbox.notices(case_id)]
        assert ("payout_ledger_failed", "finance", "high") in notices
        assert ("payout_ledger_failed", "payments_ops", "high") in notices
        assert ("payout_exception_ticket", "ticketing", "high") in notices
        assert "payout_exception_remediated" not in [kind for kind, _, _ in notices]
    finally:
        await stack.close()


async def test_ledger_failure_keeps_the_hold_where_policy_forbids_the_rollback(
        store: Store, client: Client, temporal_server: TemporalDevServer, postgres_dsn: str,
        tmp_path: Path) -> None:
    strict = keep_holds_policy(tmp_path)
    assert not load_policy(strict).payout_reversal.rollback_hold_on_ledger_failure
    stack = await ledger_stuck(store, client, temporal_server, policy_file=strict)
    try:
        case_id = await approve_while_the_ledger_is_locked(stack, postgres_dsn, "ledger_failed")
        case = await view(stack, case_id)
        assert case["payout"]["status"] == "on_hold"
        assert [h["released_at"] for h in case["beneficiary_holds"]] == [None]
        actions = [e["action"] for e in await store.audit.trail(case_id)]
        assert "payout_hold_rolled_back" not in actions and "payout_reversal_given_up" in actions
        assert ("payout_ledger_failed", "payments_ops") in {
            (n["kind"], n["audience"]) for n in await store.outbox.notices(case_id)}
        # the bank corrects the payout to paid: finance, told to post the failed entry by
        # hand, would book back money that left; ops hear at once (before: nobody, as a
        # `ledger_failed` case was neither booked nor still deciding)
        await move_payout(stack, case["payout"]["provider_payout_id"], "paid")
        await wait_for_actions(stack, case_id, "payout_paid_after_failure")
        assert ("payout_paid_after_failure", "ops") in {
            (n["kind"], n["audience"]) for n in await store.outbox.notices(case_id)}
        assert await store.ledger.entries(case_id) == []
    finally:
        await stack.close()


async def test_an_entry_that_landed_as_its_deadline_passed_is_not_reported_failed_where_the_hold_stays(
        store: Store, client: Client, temporal_server: TemporalDevServer, tmp_path: Path) -> None:
    """Step B commits, but its answer reaches the case after `ledger_pending_after` (a slow
    worker, one that died after the commit). Where policy keeps the hold, the case asked
    nothing and reported `ledger_failed`: finance, told the entry failed, would post it by
    hand a second time, and no reissue was ever offered. It finds the entry and goes on."""
    stack = await ledger_stuck(store, client, temporal_server, policy_file=keep_holds_policy(tmp_path))
    try:
        async with reversal_answered_late(stack) as case_id:
            row = await wait_for_case(stack, case_id, "remediated", "ledger_failed", timeout=60)
        assert row["status"] == "remediated"
        assert "payout_reversal_landed_late" in [e["action"] for e in await store.audit.trail(case_id)]
        assert [e.template for e in await store.ledger.entries(case_id) if e.debit] == ["payout_reversed"]
        kinds = [n["kind"] for n in await store.outbox.notices(case_id)]
        assert "payout_ledger_failed" not in kinds and "payout_exception_remediated" in kinds
    finally:
        await stack.close()


async def test_a_payout_a_break_reversed_is_not_reversed_again_by_its_case(payouts: Stack) -> None:
    """A reconciliation break's approved settlement reversed the payout (under the break's
    key) after its case had ended; a case for the same payout opened later (its history gone
    past retention, a redelivered failure starting it afresh) runs the runbook: its step B
    finds the payout reversed and posts nothing. It posted `<case>:payout_reversed` beside
    the break's entry: reversed twice."""
    payout = await paid_payout(payouts, 40_000)
    case_id = payout_case_id("sandbox", payout.provider_payout_id)
    async with payouts.store.database.transaction() as conn:  # as the break's settlement leaves it
        await LedgerRepository.post_in(conn, LedgerInput(
            refund_request_id=case_id, kind=LedgerKind.PAYOUT_REVERSED, amount=40_000, currency="USD",
            provider_refund_id=payout.provider_payout_id, reference="reconciliation-7"))
        await conn.execute("UPDATE payouts SET status = 'failed' WHERE id = %s", (payout.id,))
    book = payouts.store.payouts
    await book.hold(case_id, payout.id, hold_beneficiary=False)
    held = await book.payout(payout.id)
    assert held is not None
    again = await book.post_reversal(case_id, held)
    reversals = [e.posting_key for e in await payouts.store.ledger.entries(case_id) if e.debit]
    assert reversals == [f"{case_id}:payout_reversed:reconciliation-7"] and not again.newly_posted


async def test_paid_after_failed_never_marks_the_payout_paid_and_a_second_failure_joins(
        payouts: Stack) -> None:
    payout = await paid_payout(payouts, 200_000)
    provider_id = payout.provider_payout_id
    case_id = payout_case_id("sandbox", provider_id)
    async with payouts.sandbox() as sb:
        await sb.post("/_sandbox/config", json={"hold_webhooks": True})
        await move_payout(payouts, provider_id, "paid")
        await move_payout(payouts, provider_id, "failed", failure_code="bank_rejection")
        assert (await sb.post("/_sandbox/release-webhooks?reverse=1")).json() == {"released": 2}
        await sb.post("/_sandbox/config", json={"hold_webhooks": False})
    await wait_for_case(payouts, case_id, "awaiting_approval")
    assert (await view(payouts, case_id))["payout"]["status"] == "paid"  # untouched until approved
    assert (await decide(payouts, "lena", case_id)).status_code == 202
    await wait_for_case(payouts, case_id, "remediated")
    # admitted by the remediation at the latest: the held `paid` may land while the case
    # opens or while it awaits approval (CI saw it land that late)
    await wait_for_actions(payouts, case_id, "payout_status_stale_ignored")
    await move_payout(payouts, provider_id, "reversed", failure_code="bank_rejection")
    await move_payout(payouts, provider_id, "paid")
    trail = await wait_for_actions(payouts, case_id, "payout_status_stale_ignored", 2)
    trail = await wait_for_actions(payouts, case_id, "payout_event_joined")
    actions = [e["action"] for e in trail]
    assert actions.count("payout_exception_opened") == 1 and actions.count("payout_held") == 1
    assert actions.count("payout_event_received") == 4
    stale = [e["detail"] for e in trail if e["action"] == "payout_status_stale_ignored"]
    assert [s["reported"] for s in stale] == ["paid", "paid"]
    assert (await view(payouts, case_id))["payout"]["status"] == "on_hold"
    assert len(await payouts.store.ledger.entries(case_id)) == 2


async def test_events_that_land_while_approvers_decide_join_the_case_before_any_decision(
        payouts: Stack) -> None:
    """Both approval rounds, the remediation's and the reissue's: an event that lands while
    a round waits goes through the gate at once, so approvers decide on the case as it
    stands; admitting it neither decides the round nor touches the payout."""
    payout = await paid_payout(payouts, 200_000)
    provider_id = payout.provider_payout_id
    case_id = payout_case_id("sandbox", provider_id)
    await move_payout(payouts, provider_id, "failed", failure_code="insufficient_funds")
    await wait_for_case(payouts, case_id, "awaiting_approval")
    await move_payout(payouts, provider_id, "paid")
    await move_payout(payouts, provider_id, "reversed", failure_code="account_closed")  # failed still
    trail = await wait_for_actions(payouts, case_id, "payout_status_stale_ignored")
    trail = await wait_for_actions(payouts, case_id, "payout_event_joined")
    actions = [e["action"] for e in trail]
    assert "approval_granted" not in actions and "runbook_started" not in actions
    assert (await payouts.store.payouts.case(case_id)).status == "awaiting_approval"  # type: ignore[union-attr]
    assert (await view(payouts, case_id))["payout"]["status"] == "paid"  # untouched until approved
    assert (await decide(payouts, "lena", case_id)).status_code == 202
    await wait_for_case(payouts, case_id, "remediated")
    assert (await ask_reissue(payouts, "omar", case_id)).status_code == 202
    await wait_for_case(payouts, case_id, "awaiting_reissue_approval")
    await move_payout(payouts, provider_id, "failed", failure_code="bank_rejection")
    trail = await wait_for_actions(payouts, case_id, "payout_event_joined", 2)
    assert "reissue_started" not in [e["action"] for e in trail]
    assert (await payouts.store.payouts.case(case_id)).status == "awaiting_reissue_approval"  # type: ignore[union-attr]
    assert (await decide(payouts, "lena", case_id, "deny")).status_code == 202
    await wait_for_case(payouts, case_id, "reissue_denied")
    assert len(await payouts.store.ledger.entries(case_id)) == 2  # the reversal only, once


async def test_the_recommendation_approvers_read_follows_the_failures_that_join_the_case(
        payouts: Stack) -> None:
    """Approvers read the recommendation beside the case: a failure that joins while they
    decide, or in the reissue window before a reissue round, names the latest root cause,
    so the advice they read is made again from the case as it stands."""
    payout = await paid_payout(payouts, 200_000)
    provider_id = payout.provider_payout_id
    case_id = payout_case_id("sandbox", provider_id)
    await move_payout(payouts, provider_id, "failed", failure_code="insufficient_funds")
    await wait_for_case(payouts, case_id, "awaiting_approval")
    advice = (await view(payouts, case_id))["recommendation"]
    assert (advice["root_cause"], advice["next_step"]) == ("insufficient_funds", "reissue")

    await move_payout(payouts, provider_id, "reversed", failure_code="account_closed")
    await wait_for_actions(payouts, case_id, "ai_recommendation_recorded", 2)
    advice = (await view(payouts, case_id))["recommendation"]
    assert (advice["root_cause"], advice["next_step"]) == ("account_closed", "request_new_bank_details")
    assert "payout.reversed" in advice["summary"]
    assert (await payouts.store.payouts.case(case_id)).status == "awaiting_approval"  # type: ignore[union-attr]

    assert (await decide(payouts, "lena", case_id)).status_code == 202
    await wait_for_case(payouts, case_id, "remediated")
    await move_payout(payouts, provider_id, "failed", failure_code="bank_rejection")
    await wait_for_actions(payouts, case_id, "payout_event_joined", 2)
    assert (await ask_reissue(payouts, "omar", case_id)).status_code == 202
    await wait_for_case(payouts, case_id, "awaiting_reissue_approval")
    await wait_for_actions(payouts, case_id, "ai_recommendation_recorded", 3)
    advice = (await view(payouts, case_id))["recommendation"]
    assert (advice["root_cause"], advice["next_step"]) == ("bank_rejection", "hold")
    assert (await decide(payouts, "lena", case_id, "deny")).status_code == 202
    trail = await wait_for_actions(payouts, case_id, "approval_denied")
    assert [e["action"] for e in trail].count("ai_recommendation_recorded") == 3  # one per failure


async def test_an_unknown_payout_acts_on_nothing(payouts: Stack) -> None:
    async with payouts.sandbox() as sb:
        made = (await sb.post("/v1/payouts", json={"amount": 5_000, "currency": "USD"})).json()
    await move_payout(payouts, made["id"], "failed", failure_code="account_closed")
    case_id = payout_case_id("sandbox", made["id"])
    trail = await wait_for_actions(payouts, case_id, "payout_unknown")
    assert [e["action"] for e in trail] == ["payout_event_received", "payout_unknown"]
    assert await payouts.store.payouts.case(case_id) is None


async def test_reissue_needs_its_own_approval_and_happens_once(payouts: Stack) -> None:
    payout = await paid_payout(payouts, 150_000)
    await move_payout(payouts, payout.provider_payout_id, "failed", failure_code="insufficient_funds")
    case_id = payout_case_id("sandbox", payout.provider_payout_id)
    await wait_for_case(payouts, case_id, "awaiting_approval")
    assert (await ask_reissue(payouts, "omar", case_id)).status_code == 409  # not remediated yet
    assert (await decide(payouts, "lena", case_id)).status_code == 202
    await wait_for_case(payouts, case_id, "remediated")

    async def at_provider() -> list[dict[str, Any]]:
        return await reissues_at_provider(payouts, payout.reissue_id())

    assert await at_provider() == []  # never automatic
    assert (await ask_reissue(payouts, "fiona", case_id)).status_code == 403  # not ops
    asked = await ask_reissue(payouts, "omar", case_id)
    assert asked.status_code == 202, asked.text
    assert asked.json() == {"case_id": case_id, "status": "awaiting_reissue_approval",
                            "missing_roles": ["payments_ops_lead"]}
    again = await ask_reissue(payouts, "olga", case_id)
    assert again.status_code == 409 and "already requested" in again.json()["detail"]
    assert await at_provider() == []
    own = await decide(payouts, "omar", case_id)
    assert own.status_code == 403 and "requester cannot approve" in own.json()["detail"]
    assert (await decide(payouts, "lena", case_id)).status_code == 202
    await wait_for_case(payouts, case_id, "reissued")

    [made] = await at_provider()
    case = await view(payouts, case_id)
    assert case["reissue"]["provider_payout_id"] == made["id"] and case["reissue"]["reissue_of"] == payout.id
    assert (case["payout"]["status"], case["payout"]["held_from_status"]) == ("failed", None)
    assert all(h["released_at"] is not None for h in case["beneficiary_holds"])
    assert balances(await payouts.store.ledger.entries(case_id)) == {"provider_clearing": 0,
                                                                     "beneficiary_payable": 0}
    assert (await ask_reissue(payouts, "olga", case_id)).status_code == 409

    # The activity's own contract, as a retry would see it: the reissue exists, nothing more.
    activities = PayoutActivities(payouts.store, payouts.providers, load_policy())
    original = await payouts.store.payouts.payout(payout.id)
    assert original is not None
    retried = await activities.reissue_payout(ReissueInput(case_id=case_id, original=original,
                                                           final_status=PayoutStatus.FAILED))
    assert retried.provider_payout_id == made["id"] and len(await at_provider()) == 1


async def reissue_awaiting(payouts: Stack, amount: int) -> tuple[PayoutSnapshot, str]:
    """A remediated payout (its reversal approved by lena) whose reissue omar asked for:
    the payout and its case, awaiting the reissue's approval (one payments ops lead)."""
    made, case_id = await remediated(payouts, amount)
    assert (await ask_reissue(payouts, "omar", case_id)).status_code == 202
    await wait_for_case(payouts, case_id, "awaiting_reissue_approval")
    return made, case_id


async def test_a_verdict_given_for_the_reversal_never_counts_in_the_reissue_round(
        payouts: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """The relay read the case awaiting the reversal's approval, and its update reached the
    workflow only once the reissue round had opened (a relay stalled between its read and
    its send): the round took it, and the reversal approver's verdict paid the beneficiary
    again (reproduced). A verdict names the round it was given for; the workflow refuses it
    in another (409, audited), and the approver's verdict on the reissue then counts."""
    made, case_id = await reissue_awaiting(payouts, 150_000)
    current = payouts.store.payouts.case
    row = await current(case_id)
    assert row is not None

    async def read_before_the_reissue_round(found: str) -> Any:
        return {**row, "status": "awaiting_approval"} if found == case_id else await current(found)

    monkeypatch.setattr(payouts.store.payouts, "case", read_before_the_reissue_round)
    stale = await decide(payouts, "lena", case_id)
    monkeypatch.undo()
    assert stale.status_code == 409 and "awaiting_approval" in stale.json()["detail"], stale.text
    assert (await payouts.store.payouts.case(case_id)).status == "awaiting_reissue_approval"  # type: ignore[union-attr]
    assert await reissues_at_provider(payouts, made.reissue_id()) == []
    assert (await decide(payouts, "lena", case_id)).status_code == 202
    await wait_for_case(payouts, case_id, "reissued")
    assert len(await reissues_at_provider(payouts, made.reissue_id())) == 1


async def test_a_signalled_verdict_for_the_reversal_is_refused_in_the_reissue_round(payouts: Stack) -> None:
    """The same verdict as a durable signal (the relay stopped waiting for the update): the
    round it names is over, so it is recorded as refused and pays nothing."""
    made, case_id = await reissue_awaiting(payouts, 150_000)
    verdict = ApprovalSignal(approver="lena", roles=("payments_ops_lead",), decision=Decision.APPROVE,
                             reason="read for the reversal", verdict_id=uuid.uuid4().hex,
                             awaiting="awaiting_approval")
    await sealed_signal(payouts.client, case_id, verdict, issued_at=datetime.now(UTC))
    [refused] = [e for e in await wait_for_actions(payouts, case_id, "approval_refused")
                 if e["action"] == "approval_refused"]
    assert refused["actor"] == "lena" and "awaiting_approval" in refused["detail"]["refusal"], refused
    assert (await payouts.store.payouts.case(case_id)).status == "awaiting_reissue_approval"  # type: ignore[union-attr]
    assert await reissues_at_provider(payouts, made.reissue_id()) == []


async def release_beneficiary(stack: Stack, user: str, case_id: str) -> httpx.Response:
    async with stack.api(user) as api:
        return await api.post(f"/v1/payout-exceptions/{case_id}/beneficiary-hold/release",
                              json={"reason": "beneficiary's new account verified by phone"})


class ListsPayoutsOnly:
    """A provider that reads payouts but makes none (Stripe here: a `PayoutLister`)."""

    def __init__(self, provider: Any) -> None:
        self.name = provider.name
        self._provider = provider

    def __getattr__(self, name: str) -> Any:
        if name in ("create_payout", "find_payout"):
            raise AttributeError(name)
        return getattr(self._provider, name)


class LandedThenDeclines:
    """The provider once an earlier attempt's create landed late: its listing has not caught
    up (the lookup before the create misses the payout), and the create, a second payout
    under one reference, is refused."""

    def __init__(self, provider: Any) -> None:
        self.name = provider.name
        self._provider = provider
        self.lookups = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._provider, name)

    async def find_payout(self, reference: str) -> Any:
        self.lookups += 1
        return None if self.lookups == 1 else await self._provider.find_payout(reference)

    async def create_payout(self, order: PayoutOrder, idempotency_key: str) -> Any:
        raise ProviderDeclined(f"a payout with reference {order.reference} exists")


async def test_a_reissue_create_declined_for_one_that_landed_is_that_reissue_booked(payouts: Stack) -> None:
    """As for refunds: a decline may be the provider refusing a second payout because an
    earlier attempt's landed, which the lookup before the create missed. Declined for good,
    the case showed the reissue failed while the beneficiary had been paid (books short, a
    second reissue asked for). It is looked up once more and booked."""
    made, case_id = await remediated(payouts, 44_000)
    sandbox = payouts.providers["sandbox"]
    assert isinstance(sandbox, PayoutExecutor)
    order = PayoutOrder(reference=made.reissue_id(), beneficiary_id=made.beneficiary_id,
                        amount=made.amount, currency=made.currency)
    landed = await sandbox.create_payout(order, made.reissue_key())  # the earlier attempt's
    provider = LandedThenDeclines(sandbox)
    activities = PayoutActivities(payouts.store, {"sandbox": cast(Any, provider)}, load_policy())
    now = ActivityEnvironment()
    now.info = dataclasses.replace(now.info, started_time=datetime.now(UTC),  # the default: 1 s
                                   start_to_close_timeout=timedelta(minutes=5))
    booked = await now.run(activities.reissue_payout, ReissueInput(
        case_id=case_id, original=made, final_status=PayoutStatus.FAILED))
    assert booked.provider_payout_id == landed.payout_id and provider.lookups == 2
    assert [p["id"] for p in await reissues_at_provider(payouts, made.reissue_id())] == [landed.payout_id]
    trail = await payouts.store.audit.trail(case_id)
    assert "reissue_found_after_decline" in [e["action"] for e in trail]

    # a decline with nothing under the reference stands
    other, other_case = await remediated(payouts, 45_000)
    with pytest.raises(ApplicationError) as declined:
        await now.run(activities.reissue_payout, ReissueInput(
            case_id=other_case, original=other, final_status=PayoutStatus.FAILED))
    assert declined.value.type == errors.DECLINED and declined.value.non_retryable

    # one found paying elsewhere is not the reissue, and the decline says where it pays
    third, third_case = await remediated(payouts, 46_000)
    await sandbox.create_payout(PayoutOrder(reference=third.reissue_id(), beneficiary_id="ba_mallory",
                                            amount=third.amount, currency=third.currency), "someone-else")
    activities = PayoutActivities(payouts.store, {"sandbox": cast(Any, LandedThenDeclines(sandbox))},
                                  load_policy())
    with pytest.raises(ApplicationError) as elsewhere:
        await now.run(activities.reissue_payout, ReissueInput(
            case_id=third_case, original=third, final_status=PayoutStatus.FAILED))
    assert elsewhere.value.type == errors.DECLINED and "ba_mallory" in elsewhere.value.message


async def test_a_payout_its_provider_reported_paid_after_the_failure_is_never_reissued(
        payouts: Stack) -> None:
    """The bank corrected the failure: the provider's signed `payout.paid` came after the
    reversal (ops told, the case reads it as stale). The reissue's only guard was a live
    read of the original, and a read that lags (here: the sandbox shows it failed again,
    no webhook) let it pay the beneficiary twice. The provider's word on record declines it."""
    payout, case_id = await remediated(payouts, 52_000)
    await move_payout(payouts, payout.provider_payout_id, "paid")
    await wait_for_actions(payouts, case_id, "payout_paid_after_reversal")
    stale = {"id": payout.provider_payout_id, "amount": payout.amount, "currency": payout.currency.lower(),
             "destination": payout.beneficiary_id, "status": "failed", "failure_code": "account_closed",
             "created": int(time.time()) - 60}
    async with payouts.sandbox() as sb:
        (await sb.post("/_sandbox/import", json={"payouts": [stale]})).raise_for_status()
    assert (await ask_reissue(payouts, "omar", case_id)).status_code == 202
    assert (await decide(payouts, "lena", case_id)).status_code == 202
    await wait_for_case(payouts, case_id, "reissue_failed")
    assert await reissues_at_provider(payouts, payout.reissue_id()) == []
    [failed] = [e for e in await payouts.store.audit.trail(case_id) if e["action"] == "reissue_failed"]
    assert "paid after its failure" in failed["detail"]["error"], failed


async def awaiting_with_a_finance_manager(payouts: Stack) -> tuple[str, PayoutSnapshot, str]:
    """A new finance manager (their token made here) and a 6,000.00 payout failed after it
    was paid, its case awaiting approval: (the manager, the payout, the case id)."""
    finance = f"fin-{uuid.uuid4().hex[:6]}"
    payouts.tokens[finance] = await payouts.store.access.create_token(finance, ["finance_manager"], by="test")
    payout = await paid_payout(payouts, 600_000)
    await move_payout(payouts, payout.provider_payout_id, "failed", failure_code="account_closed")
    case_id = payout_case_id("sandbox", payout.provider_payout_id)
    await wait_for_case(payouts, case_id, "awaiting_approval")
    return finance, payout, case_id


async def test_a_reissue_approved_by_someone_whose_access_was_then_revoked_is_not_made(
        payouts: Stack) -> None:
    """Half of a two-approver reissue comes from a token the admin then revokes (stolen, or
    its person left); the second approval completed the round and the reissue paid the
    beneficiary on it (reproduced). Declined at the payout's gate: nothing made, ops told."""
    finance, payout, case_id = await awaiting_with_a_finance_manager(payouts)
    for approver in ("fiona", "cora"):
        assert (await decide(payouts, approver, case_id)).status_code == 202
    await wait_for_case(payouts, case_id, "remediated")
    assert (await ask_reissue(payouts, "omar", case_id)).status_code == 202
    assert (await decide(payouts, finance, case_id)).status_code == 202
    assert await payouts.store.access.revoke_tokens(by="admin", user=finance)
    assert (await decide(payouts, "cora", case_id)).status_code == 202
    await wait_for_case(payouts, case_id, "reissue_failed")
    assert await reissues_at_provider(payouts, payout.reissue_id()) == []
    [failed] = [e for e in await payouts.store.audit.trail(case_id) if e["action"] == "reissue_failed"]
    assert finance in failed["detail"]["error"] and "revoked" in failed["detail"]["error"], failed


async def test_a_reversal_approved_by_someone_whose_access_was_then_revoked_is_not_booked(
        payouts: Stack) -> None:
    """Half of a two-approver reversal comes from a token the admin then revokes; the second
    approval completed the round and the runbook held the payout and booked it back on it
    (reproduced: only a refund's and a reissue's gates asked). The compensating entry is
    refused at its step: nothing booked, the hold rolled back, finance and ops told why."""
    finance, payout, case_id = await awaiting_with_a_finance_manager(payouts)
    assert (await decide(payouts, finance, case_id)).status_code == 202
    assert await payouts.store.access.revoke_tokens(by="admin", user=finance)
    assert (await decide(payouts, "cora", case_id)).status_code == 202
    await wait_for_case(payouts, case_id, "rolled_back", "remediated")
    assert [e.template for e in await payouts.store.ledger.entries(case_id)] == []
    [failed] = [e for e in await payouts.store.audit.trail(case_id) if e["action"] == "ledger_failed"]
    assert finance in failed["detail"]["error"] and "revoked" in failed["detail"]["error"], failed
    # the books as before the hold: the payout paid, nothing booked back
    assert (await payouts.store.payouts.payout(payout.id)).status is PayoutStatus.PAID  # type: ignore[union-attr]


async def test_a_reissue_its_provider_cannot_make_is_refused_when_asked(payouts: Stack) -> None:
    """A payout of a provider that makes no payouts: its reissue request was taken and ran
    a whole approval round before it failed with "cannot make payouts". It is refused when
    asked (audited), the case staying remediated, nothing asked of approvers."""
    made, case_id = await remediated(payouts, 40_000)
    sandbox = payouts.providers["sandbox"]
    payouts.providers["sandbox"] = cast(Any, ListsPayoutsOnly(sandbox))
    try:
        asked = await ask_reissue(payouts, "omar", case_id)
    finally:
        payouts.providers["sandbox"] = sandbox
    assert asked.status_code == 409 and "cannot make payouts" in asked.json()["detail"], asked.text
    assert "reissue_refused" in [e["action"] for e in await payouts.store.audit.trail(case_id)]
    row = await payouts.store.payouts.case(case_id)
    assert row is not None and row["status"] == "remediated"
    assert await reissues_at_provider(payouts, made.reissue_id()) == []


async def two_remediated_of_one_beneficiary(payouts: Stack, *amounts: int
                                            ) -> tuple[str, PayoutSnapshot, PayoutSnapshot, str, str]:
    """Two paid payouts to one beneficiary that failed, each reversal approved (its runbook
    holds the beneficiary): (beneficiary, first payout, second payout, their case ids)."""
    beneficiary = f"ben_{uuid.uuid4().hex[:8]}"
    first, second = [await paid_payout(payouts, amount, beneficiary=beneficiary) for amount in amounts]
    for payout in (first, second):
        await move_payout(payouts, payout.provider_payout_id, "failed", failure_code="account_closed")
    case_id, other = (payout_case_id("sandbox", p.provider_payout_id) for p in (first, second))
    for case in (case_id, other):
        await wait_for_case(payouts, case, "awaiting_approval")
        assert (await decide(payouts, "lena", case)).status_code == 202
        await wait_for_case(payouts, case, "remediated")
    return beneficiary, first, second, case_id, other


async def test_who_asked_for_a_reissue_cannot_have_released_the_hold_it_waits_for(payouts: Stack) -> None:
    """The relay refuses a release by whoever asked for a reissue to the beneficiary, and a
    reissue asked by whoever released: two checks, each before the other's row exists. Sent
    at once (or the reissue's answer lost and the release sent next), both pass and one
    person both asks for a payout and lifts the hold meant to stop it. The reissue itself
    refuses to pay then: nothing is sent, ops are told."""
    beneficiary, first, _, case_id, other = await two_remediated_of_one_beneficiary(payouts, 41_000, 31_000)
    assert (await ask_reissue(payouts, "omar", case_id)).status_code == 202
    # the release as it passed the relay's check in the race: written as the endpoint writes it
    released = await payouts.store.payouts.release_beneficiary(other, "omar", "verified", via="api")
    assert released == beneficiary
    assert (await decide(payouts, "lena", case_id)).status_code == 202
    await wait_for_case(payouts, case_id, "reissue_failed")
    assert await reissues_at_provider(payouts, first.reissue_id()) == []
    [failed] = [e for e in await payouts.store.audit.trail(case_id) if e["action"] == "reissue_failed"]
    assert "omar" in failed["detail"]["error"] and other in failed["detail"]["error"], failed


async def test_who_approved_a_reissue_cannot_have_released_the_hold_it_waits_for(payouts: Stack) -> None:
    """As for whoever asked: one person approving a payout to the beneficiary and lifting
    the hold meant to stop it (omar is ops and a payout approver). The reissue approved,
    waiting for the other case's hold, omar released that hold: it paid. It refuses to pay
    then: nothing is sent, ops are told."""
    beneficiary, first, _, case_id, other = await two_remediated_of_one_beneficiary(payouts, 42_000, 32_000)
    assert (await ask_reissue(payouts, "olga", case_id)).status_code == 202
    assert (await decide(payouts, "omar", case_id)).status_code == 202
    await wait_for_actions(payouts, case_id, "reissue_waiting_for_beneficiary_hold")
    released = await payouts.store.payouts.release_beneficiary(other, "omar", "verified", via="api")
    assert released == beneficiary
    await wait_for_case(payouts, case_id, "reissue_failed")
    assert await reissues_at_provider(payouts, first.reissue_id()) == []
    [failed] = [e for e in await payouts.store.audit.trail(case_id) if e["action"] == "reissue_failed"]
    assert "omar approved" in failed["detail"]["error"] and other in failed["detail"]["error"], failed


async def test_who_released_a_hold_is_refused_as_an_approver_of_the_reissue_it_checks(payouts: Stack) -> None:
    """Released first, then asked to approve: refused up front (403, audited), so another
    approver fills the slot and the reissue pays; counted, it would only decline later."""
    _, first, _, case_id, other = await two_remediated_of_one_beneficiary(payouts, 43_000, 33_000)
    assert (await ask_reissue(payouts, "olga", case_id)).status_code == 202
    assert (await release_beneficiary(payouts, "omar", other)).status_code == 200
    refused = await decide(payouts, "omar", case_id)
    assert refused.status_code == 403 and "released this beneficiary's hold" in refused.text, refused.text
    assert (await decide(payouts, "lena", case_id)).status_code == 202
    await wait_for_case(payouts, case_id, "reissued")
    assert len(await reissues_at_provider(payouts, first.reissue_id())) == 1


async def test_a_reissue_waits_while_another_case_holds_the_beneficiary(payouts: Stack) -> None:
    """Two payouts to one beneficiary failed: each case holds the beneficiary's further
    payouts, and a reissue is such a payout. Both reissues approved, each waits for the
    other's hold (status reissuing, ops told once who holds, nothing paid) instead of
    failing for good, which left neither case able to pay. Ops (only ops, with a reason,
    audited) release one case's hold: the other's reissue pays, which ends its own hold,
    and then the first pays too. Each exactly once."""
    beneficiary, first, second, case_id, other = await two_remediated_of_one_beneficiary(
        payouts, 40_000, 30_000)
    for case, holder in ((case_id, other), (other, case_id)):
        assert (await ask_reissue(payouts, "omar", case)).status_code == 202
        assert (await decide(payouts, "lena", case)).status_code == 202
        trail = await wait_for_actions(payouts, case, "reissue_waiting_for_beneficiary_hold")
        [waiting] = [e for e in trail if e["action"] == "reissue_waiting_for_beneficiary_hold"]
        assert waiting["detail"]["held_by"] == [holder]
        assert notice_kinds(trail).count("payout_reissue_waiting_for_hold") == 1
    for payout in (first, second):
        assert await reissues_at_provider(payouts, payout.reissue_id()) == []
    await asyncio.sleep(5)  # several polls: still waiting, told once, nothing paid
    for case in (case_id, other):
        row = await payouts.store.payouts.case(case)
        assert row is not None and row["status"] == "reissuing"
        trail = await payouts.store.audit.trail(case)
        assert notice_kinds(trail).count("payout_reissue_waiting_for_hold") == 1
    assert await reissues_at_provider(payouts, first.reissue_id()) == []

    assert (await release_beneficiary(payouts, "lena", other)).status_code == 403  # an approver, not ops
    assert (await release_beneficiary(payouts, "omar", other)).status_code == 403  # asked for the reissues
    assert (await release_beneficiary(payouts, "olga", other)).status_code == 200
    assert (await release_beneficiary(payouts, "olga", other)).status_code == 409  # nothing held now
    for case in (case_id, other):
        await wait_for_case(payouts, case, "reissued")
    for payout in (first, second):
        assert len(await reissues_at_provider(payouts, payout.reissue_id())) == 1
    holds = {h.case_id: h.released_at for h in await payouts.store.payouts.beneficiary_holds(beneficiary)}
    assert None not in holds.values() and set(holds) == {case_id, other}
    trail = await payouts.store.audit.trail(other)
    [released] = [e for e in trail if e["action"] == "beneficiary_hold_released"]
    assert (released["actor"], released["detail"]["beneficiary_id"]) == ("olga", beneficiary)
    assert released["detail"]["reason"] == "beneficiary's new account verified by phone"
    refused = [e for e in trail if e["action"] == "beneficiary_hold_release_refused"]
    assert [e["actor"] for e in refused] == ["olga"]
    assert [e["actor"] for e in trail if e["action"] == "access_refused"] == ["lena", "omar"]


async def test_ops_are_told_again_when_the_holds_a_reissue_waits_for_change(payouts: Stack) -> None:
    """A reissue waits for two other cases' holds on its beneficiary; ops release one: the
    reissue still waits, for the other, and ops hear that (a second notice naming it; the
    notice's key was per status, so the second was dropped). Released too, it pays."""
    beneficiary = f"ben_{uuid.uuid4().hex[:8]}"
    made = [await remediated(payouts, amount, beneficiary=beneficiary) for amount in (40_000, 30_000, 20_000)]
    (first, case_id), (_, second), (_, third) = made
    assert (await ask_reissue(payouts, "omar", case_id)).status_code == 202
    assert (await decide(payouts, "lena", case_id)).status_code == 202
    await wait_for_actions(payouts, case_id, "reissue_waiting_for_beneficiary_hold")
    assert (await release_beneficiary(payouts, "olga", second)).status_code == 200
    trail = await wait_for_actions(payouts, case_id, "reissue_waiting_for_beneficiary_hold", 2)
    waits = [e["detail"]["held_by"] for e in trail if e["action"] == "reissue_waiting_for_beneficiary_hold"]
    assert waits == [[second, third], [third]], waits  # holders in the order they held
    assert notice_kinds(trail).count("payout_reissue_waiting_for_hold") == 2
    assert await reissues_at_provider(payouts, first.reissue_id()) == []
    assert (await release_beneficiary(payouts, "olga", third)).status_code == 200
    await wait_for_case(payouts, case_id, "reissued")
    assert len(await reissues_at_provider(payouts, first.reissue_id())) == 1


async def test_whoever_released_a_beneficiary_s_hold_cannot_ask_for_a_payout_to_them(payouts: Stack) -> None:
    """The other order of one person lifting the check on a payout they asked for: omar
    releases case B's hold first, then asks for case A's reissue to the same beneficiary
    (refused, 403, audited; olga may ask). His release of A's own hold is no such act: a
    case's own hold never holds its own reissue."""
    beneficiary = f"ben_{uuid.uuid4().hex[:8]}"
    (first, case_id), (_, other) = [await remediated(payouts, amount, beneficiary=beneficiary)
                                    for amount in (40_000, 30_000)]
    assert (await release_beneficiary(payouts, "omar", other)).status_code == 200
    refused = await ask_reissue(payouts, "omar", case_id)
    assert refused.status_code == 403 and other in refused.json()["detail"], refused.text
    trail = await payouts.store.audit.trail(case_id)
    assert [e["actor"] for e in trail if e["action"] == "access_refused"] == ["omar"]
    assert (await ask_reissue(payouts, "olga", case_id)).status_code == 202
    assert (await release_beneficiary(payouts, "olga", case_id)).status_code == 200  # its own hold
    assert (await decide(payouts, "lena", case_id)).status_code == 202
    await wait_for_case(payouts, case_id, "reissued")
    assert len(await reissues_at_provider(payouts, first.reissue_id())) == 1


async def test_a_payout_booked_under_a_reissue_id_is_not_taken_for_the_reissue(payouts: Stack) -> None:
    """`<id>-r1` is the reissue's id; a payout booked under it before registration refused
    that form (any beneficiary, any amount) is not the reissue: nothing is taken as paid,
    and the activity declines for ops instead of booking someone else's payout."""
    payout = await paid_payout(payouts, 60_000)
    await paid_payout(payouts, 1, payout_id=payout.reissue_id(), beneficiary="someone-else")
    activities = PayoutActivities(payouts.store, payouts.providers, load_policy())
    with pytest.raises(ApplicationError) as refused:
        await activities.reissue_payout(ReissueInput(case_id="c-squat", original=payout,
                                                     final_status=PayoutStatus.FAILED))
    assert refused.value.type == errors.DECLINED and refused.value.non_retryable
    assert "not a reissue of" in str(refused.value)
    await move_payout(payouts, payout.provider_payout_id, "failed", failure_code="account_closed")
    case_id = payout_case_id("sandbox", payout.provider_payout_id)
    await wait_for_case(payouts, case_id, "awaiting_approval")
    assert (await view(payouts, case_id))["reissue"] is None  # nor shown as the reissue


async def test_a_reissue_the_provider_made_before_a_crash_is_found_not_made_again(payouts: Stack) -> None:
    payout = await paid_payout(payouts, 80_000)
    async with payouts.sandbox() as sb:  # what the provider holds after a crash mid-activity
        await sb.post("/v1/payouts", json={"amount": 80_000, "currency": "USD",
                                           "destination": payout.beneficiary_id,
                                           "metadata": {"payout_reference": payout.reissue_id()}})
    activities = PayoutActivities(payouts.store, payouts.providers, load_policy())
    made = await activities.reissue_payout(ReissueInput(case_id="c-crash", original=payout,
                                                        final_status=PayoutStatus.FAILED))
    found = await reissues_at_provider(payouts, payout.reissue_id())
    assert [p["id"] for p in found] == [made.provider_payout_id]


async def test_a_payout_under_the_reissue_s_reference_paying_elsewhere_is_not_booked(payouts: Stack) -> None:
    """Anyone with access to the provider account can make a payout of the amount to their
    own account under the reissue's reference: found by the lookup, it was booked as the
    reissue paid, the beneficiary's holds ended and nobody was paid. Its destination is read."""
    payout = await paid_payout(payouts, 46_000)
    async with payouts.sandbox() as sb:
        (await sb.post("/v1/payouts", json={"amount": 46_000, "currency": "usd", "destination": "ba_mallory",
                                            "metadata": {"payout_reference": payout.reissue_id()}})
         ).raise_for_status()
    activities = PayoutActivities(payouts.store, payouts.providers, load_policy())
    with pytest.raises(ApplicationError) as declined:
        await activities.reissue_payout(ReissueInput(case_id="c-elsewhere", original=payout,
                                                     final_status=PayoutStatus.FAILED))
    assert declined.value.type == errors.DECLINED and "ba_mallory" in declined.value.message
    assert await payouts.store.payouts.payout(payout.reissue_id()) is None


@pytest.mark.parametrize(("amount", "status", "why"), [(45_000, "failed", "failed"),
                                                        (45_000, "reversed", "reversed"),
                                                        (44_000, None, "440.00 USD")])
async def test_a_reissue_found_failed_or_for_another_amount_is_not_booked_paid(
        payouts: Stack, amount: int, status: str | None, why: str) -> None:
    """An earlier attempt's create landed after its answer was lost, and the provider has
    since failed (or reversed) that payout, or made it for another amount: the lookup
    before the next create finds it. Booking it paid would show the beneficiary paid and
    release their holds; the activity declines for ops instead."""
    payout = await paid_payout(payouts, 45_000)
    async with payouts.sandbox() as sb:  # the landed attempt, under the reissue's reference
        made = await sb.post("/v1/payouts", json={"amount": amount, "currency": "usd",
                                                  "destination": payout.beneficiary_id, "metadata": {
            "payout_reference": payout.reissue_id()}})
    made.raise_for_status()
    if status is not None:
        await move_payout(payouts, str(made.json()["id"]), status, failure_code="account_closed")
    activities = PayoutActivities(payouts.store, payouts.providers, load_policy())
    with pytest.raises(ApplicationError) as refused:
        await activities.reissue_payout(ReissueInput(case_id="c-found", original=payout,
                                                     final_status=PayoutStatus.FAILED))
    assert refused.value.type == errors.DECLINED and refused.value.non_retryable
    assert why in str(refused.value)
    assert await payouts.store.payouts.payout(payout.reissue_id()) is None


async def test_no_reissue_once_the_provider_shows_the_original_paid(payouts: Stack) -> None:
    """A payout reported failed, reversed in our books, is later reported paid after all (a
    bank's late correction): the reissue's approval must not pay the beneficiary twice.
    The activity reads the original at the provider before any create and declines for ops."""
    payout, case_id = await remediated(payouts, 52_000)
    await move_payout(payouts, payout.provider_payout_id, "paid")
    assert (await ask_reissue(payouts, "omar", case_id)).status_code == 202
    assert (await decide(payouts, "lena", case_id)).status_code == 202
    await wait_for_case(payouts, case_id, "reissue_failed")
    assert await reissues_at_provider(payouts, payout.reissue_id()) == []
    [failed] = [e for e in await payouts.store.audit.trail(case_id) if e["action"] == "reissue_failed"]
    assert "is paid at the provider" in failed["detail"]["error"]
    assert await payouts.store.payouts.payout(payout.reissue_id()) is None


async def test_no_reissue_of_a_reissue_once_the_provider_shows_the_first_payout_paid(payouts: Stack) -> None:
    """X failed and was reissued as X-r1, which failed too: its case asks for X-r1-r1. The
    bank then corrects X to paid. The check read only X-r1 at the provider (failed) and
    paid the one debt twice (X, and X-r1-r1); every payout the reissue replaces is read."""
    first, first_case = await remediated(payouts, 61_000)
    assert (await ask_reissue(payouts, "omar", first_case)).status_code == 202
    assert (await decide(payouts, "lena", first_case)).status_code == 202
    await wait_for_case(payouts, first_case, "reissued")
    second = await payouts.store.payouts.payout(first.reissue_id())
    assert second is not None and second.reissue_of == first.id
    second_case = await remediate(payouts, second.provider_payout_id)
    await move_payout(payouts, first.provider_payout_id, "paid")
    assert (await ask_reissue(payouts, "omar", second_case)).status_code == 202
    assert (await decide(payouts, "lena", second_case)).status_code == 202
    await wait_for_case(payouts, second_case, "reissue_failed", "reissued")
    assert await reissues_at_provider(payouts, second.reissue_id()) == []
    [failed] = [e for e in await payouts.store.audit.trail(second_case) if e["action"] == "reissue_failed"]
    assert f"{first.provider_payout_id} is paid at the provider" in failed["detail"]["error"]


async def test_a_failure_for_another_amount_than_booked_goes_to_ops_not_to_a_reversal(payouts: Stack) -> None:
    """The provider reports our payout failed, for another amount than our books hold (a
    booking error, an adapter reading the wrong units): reversing what we booked could be
    wrong either way. The case opens in ops review with a break that shows both amounts,
    payments ops are told, and nothing is held, reversed or posted."""
    async with payouts.sandbox() as sb:
        made = await sb.post("/v1/payouts", json={"amount": 5_000, "currency": "usd"})
    booked = PayoutSnapshot(id=f"P-{uuid.uuid4().hex[:10]}", provider="sandbox",
                            provider_payout_id=str(made.json()["id"]), amount=50_000, currency="USD",
                            beneficiary_id=f"ben-{uuid.uuid4().hex[:8]}", status=PayoutStatus.PAID)
    assert await payouts.store.payouts.record_payout(booked)
    await move_payout(payouts, booked.provider_payout_id, "failed", failure_code="account_closed")
    case_id = payout_case_id("sandbox", booked.provider_payout_id)
    case = await wait_for_case(payouts, case_id, "ops_review")
    assert case.decision is None
    [found] = await payouts.store.database.fetch_all(
        "SELECT * FROM reconciliation_breaks WHERE refund_request_id = %s", (case_id,))
    assert (found["break_class"], found["state"], found["object_kind"]) == (
        "amount_mismatch", "ops_review", "payout")
    assert (found["evidence"]["booked"], found["evidence"]["reported"]) == ("500.00 USD", "50.00 USD")
    assert ("payout_amount_mismatch", "payments_ops") in {
        (n["kind"], n["audience"]) for n in await payouts.store.outbox.notices(case_id)}
    assert (await payouts.store.payouts.payout(booked.id)).status is PayoutStatus.PAID  # type: ignore[union-attr]
    assert await payouts.store.ledger.entries(case_id) == []


async def failed_before_booking(payouts: Stack, amount: int) -> tuple[str, str]:
    """A payout made at the sandbox that failed there before our books held it: its failure
    webhook found no payout. (provider payout id, case id)"""
    async with payouts.sandbox() as sb:
        made = await sb.post("/v1/payouts", json={"amount": amount, "currency": "usd"})
    provider_payout_id = str(made.json()["id"])
    case_id = payout_case_id("sandbox", provider_payout_id)
    await move_payout(payouts, provider_payout_id, "failed", failure_code="account_closed")
    await wait_for_actions(payouts, case_id, "payout_unknown")
    return provider_payout_id, case_id


async def test_a_failure_reported_before_its_payout_was_booked_opens_the_case_on_registration(
        payouts: Stack) -> None:
    """An instant payout fails at the provider seconds after it was made, before the payments
    system books it here: its failure webhook finds no payout and acts on nothing. Booking the
    payout afterwards must not leave it paid in our books with nobody told: the failure the
    relay already received opens its exception case then."""
    provider_payout_id, case_id = await failed_before_booking(payouts, 30_000)
    async with payouts.api("olga") as api:
        booked = await api.post("/v1/payouts", json={
            "id": f"P-{uuid.uuid4().hex[:10]}", "provider": "sandbox", "amount": 30_000, "currency": "USD",
            "provider_payout_id": provider_payout_id, "beneficiary_id": f"ben-{uuid.uuid4().hex[:8]}"})
    assert booked.status_code == 201, booked.text
    await wait_for_case(payouts, case_id, "awaiting_approval")


async def test_a_registration_resent_after_its_booking_committed_routes_the_earlier_failure(
        payouts: Stack) -> None:
    """The booking commits, then the relay dies (or its next read fails: a 500) before the
    earlier failure is routed: the payments system sends the registration again, which is
    the same booking (200). That repeat must route the failure; it did nothing (only a new
    booking did), and the receipt stayed processed, so the failure was lost for good. A
    repeat once the failure acted routes nothing again."""
    provider_payout_id, case_id = await failed_before_booking(payouts, 32_000)
    body = {"id": f"P-{uuid.uuid4().hex[:10]}", "provider": "sandbox", "amount": 32_000, "currency": "USD",
            "provider_payout_id": provider_payout_id, "beneficiary_id": f"ben-{uuid.uuid4().hex[:8]}"}
    booked, created = await payouts.store.payouts.register_payout(PayoutRegistration(**body), "olga")
    assert booked is not None and created  # ...and the relay is gone before it routed anything
    async with payouts.api("olga") as api:
        resent = await api.post("/v1/payouts", json=body)
        assert resent.status_code == 200 and resent.json()["created"] is False, resent.text
        await wait_for_case(payouts, case_id, "awaiting_approval")
        [routed] = [r for r in await payouts.store.receipts.find("sandbox") if r.workflow_id == case_id]
        again = await api.post("/v1/payouts", json=body)
        assert again.status_code == 200, again.text
    [still] = [r for r in await payouts.store.receipts.find("sandbox") if r.workflow_id == case_id]
    assert (still.id, still.processed_at) == (routed.id, routed.processed_at)


async def test_a_booking_whose_relay_died_before_routing_is_routed_by_the_re_drive(
        payouts: Stack) -> None:
    """As above, and the payments system never sends the registration again: the booking's
    own transaction leaves the earlier failure for the relay's re-drive."""
    provider_payout_id, case_id = await failed_before_booking(payouts, 33_000)
    booked, created = await payouts.store.payouts.register_payout(PayoutRegistration(
        id=f"P-{uuid.uuid4().hex[:10]}", provider="sandbox", provider_payout_id=provider_payout_id,
        beneficiary_id=f"ben-{uuid.uuid4().hex[:8]}", amount=33_000, currency="USD"), "olga")
    assert booked is not None and created  # ...and the relay is gone before it routed anything
    settings = payouts.settings.model_copy(update={"webhook_redrive_after_seconds": 0})
    await WebhookDesk(payouts.store, payouts.client, payouts.providers, settings).redrive()
    await wait_for_case(payouts, case_id, "awaiting_approval")


async def test_an_earlier_failure_that_cannot_act_at_registration_acts_at_the_next_re_drive(
        payouts: Stack) -> None:
    """The booking stands whatever routing the earlier failure does then; if Temporal is
    away at that moment, the failure must not be lost (it was: a log line, and for a
    provider reconciliation cannot list, nobody told). Its delivery waits for the relay's
    re-drive, which opens the case."""
    provider_payout_id, case_id = await failed_before_booking(payouts, 31_000)
    booked, created = await payouts.store.payouts.register_payout(PayoutRegistration(
        id=f"P-{uuid.uuid4().hex[:10]}", provider="sandbox", provider_payout_id=provider_payout_id,
        beneficiary_id=f"ben-{uuid.uuid4().hex[:8]}", amount=31_000, currency="USD"), "olga")
    assert booked is not None and created
    settings = payouts.settings.model_copy(update={"webhook_redrive_after_seconds": 0})
    away = WebhookDesk(payouts.store, cast(Client, StartRefused(payouts.client)), payouts.providers, settings)
    await away.payout_registered("sandbox", provider_payout_id)  # Temporal away: nothing opened
    with pytest.raises(RPCError):
        await payouts.client.get_workflow_handle(case_id).describe()
    await WebhookDesk(payouts.store, payouts.client, payouts.providers, settings).redrive()
    await wait_for_case(payouts, case_id, "awaiting_approval")


async def test_a_reissue_s_failure_heard_before_its_booking_is_routed_by_the_re_drive(
        payouts: Stack) -> None:
    """The reissue's payout fails at the provider and its webhook reaches the relay before
    the reissue's booking commits: no payout of ours, so it acts on nothing. The booking
    then showed the beneficiary paid, the holds released, and nobody routed the failure
    (reproduced: no case for it). The booking leaves it for the relay's re-drive, as a
    registration does."""
    original = await paid_payout(payouts, 34_000)
    provider_payout_id, case_id = await failed_before_booking(payouts, 34_000)
    made = ProviderPayout(provider="sandbox", payout_id=provider_payout_id, amount=34_000, currency="USD",
                          status=ProviderPayoutStatus.PENDING, raw_status="pending",
                          reference=original.reissue_id())
    await payouts.store.payouts.record_reissue(payout_case_id("sandbox", original.provider_payout_id),
                                               original, made, PayoutStatus.FAILED)
    settings = payouts.settings.model_copy(update={"webhook_redrive_after_seconds": 0})
    await WebhookDesk(payouts.store, payouts.client, payouts.providers, settings).redrive()
    await wait_for_case(payouts, case_id, "awaiting_approval")


async def test_a_reissue_attempt_that_wakes_past_its_time_creates_nothing(payouts: Stack) -> None:
    """An attempt paused past its start-to-close (a VM pause, a long GC): Temporal has timed
    it out and the workflow's next attempt, past the provider's horizon, looks up and creates.
    This one woke and created too, a second payout to the beneficiary where the provider
    keeps no idempotency key (reproduced). It creates nothing, audited, an unknown outcome."""
    payout = await paid_payout(payouts, 47_000)
    await move_payout(payouts, payout.provider_payout_id, "failed", failure_code="account_closed")
    case_id = payout_case_id("sandbox", payout.provider_payout_id)
    late = ActivityEnvironment()
    late.info = dataclasses.replace(late.info, start_to_close_timeout=timedelta(seconds=60),
                                    started_time=datetime.now(UTC) - timedelta(seconds=61))
    activities = PayoutActivities(payouts.store, payouts.providers, load_policy())
    with pytest.raises(ApplicationError) as unknown:
        await late.run(activities.reissue_payout, ReissueInput(case_id=case_id, original=payout,
                                                               final_status=PayoutStatus.FAILED))
    assert unknown.value.type == errors.OUTCOME_UNKNOWN and not unknown.value.non_retryable
    assert await reissues_at_provider(payouts, payout.reissue_id()) == []
    assert "reissue_create_abandoned" in [e["action"] for e in await payouts.store.audit.trail(case_id)]


async def test_a_reissue_at_a_provider_that_makes_no_payouts_is_declined(payouts: Stack) -> None:
    """The worker's providers are instrumented, and the wrapper answered as a payout maker
    for every provider: a reissue at one that makes none (a case started straight in
    Temporal; the relay refuses such registrations) was an unknown outcome, retried for ever
    (reproduced). It is the decline the activity means, nothing asked of the provider."""
    payout = await paid_payout(payouts, 48_000)
    stripe = StripeProvider("sk_test_unused", webhook_secrets=["whsec_unused"], api_base="http://127.0.0.1:9")
    try:
        activities = PayoutActivities(payouts.store, instrument({"sandbox": stripe}), load_policy())
        with pytest.raises(ApplicationError) as declined:
            await ActivityEnvironment().run(activities.reissue_payout, ReissueInput(
                case_id=payout_case_id("sandbox", payout.provider_payout_id), original=payout,
                final_status=PayoutStatus.FAILED))
    finally:
        await stripe.aclose()
    assert declined.value.type == errors.DECLINED and declined.value.non_retryable, declined.value
    assert "cannot make payouts" in str(declined.value)


@pytest.mark.parametrize(("aborts", "answer"), [(1, 202), (1_000, 503)],
                         ids=["aborted-once", "aborted-every-time"])
async def test_a_reissue_request_temporal_aborts_with_its_workflow_task_is_sent_again(
        store: Store, client: Client, temporal_server: TemporalDevServer, aborts: int, answer: int) -> None:
    """Temporal may drop the update asking for a reissue with the workflow task carrying it
    (never taken): the relay asks again while the answer window lasts, then answers 503,
    "send it again". Before, the caller heard 500 ("the workflow service refused the call")."""
    aborting = UpdatesAborted(aborts)
    async with stack_with(store, intercepted(client, aborting), temporal_server.address,
                          approval_answer_seconds=2) as stack:
        await add_payout_approvers(stack)
        _, case_id = await remediated(stack, 200_000)
        aborting.to = case_id
        response = await ask_reissue(stack, "omar", case_id)
        assert response.status_code == answer, response.text
        taken = "awaiting_reissue_approval" if answer == 202 else "remediated"
        row = await wait_for_case(stack, case_id, taken)
        trail = [e["action"] for e in await stack.store.audit.trail(case_id)]
    assert aborting.aborted >= 1 and row["status"] == taken
    assert trail.count("reissue_requested") == (1 if answer == 202 else 0), trail


async def failed_awaiting_approval(payouts: Stack) -> tuple[str, str, WebhookDesk]:
    """A 700.00 payout failed after it was paid (account closed), its case awaiting approval,
    and a relay's webhook desk: (the provider's payout id, the case id, the desk)."""
    payout = await paid_payout(payouts, 70_000)
    case_id = payout_case_id("sandbox", payout.provider_payout_id)
    await move_payout(payouts, payout.provider_payout_id, "failed", failure_code="account_closed")
    await wait_for_case(payouts, case_id, "awaiting_approval")
    return payout.provider_payout_id, case_id, WebhookDesk(payouts.store, payouts.client, payouts.providers,
                                                           payouts.settings)


async def test_a_payout_the_provider_corrects_to_paid_while_approvers_decide_tells_ops(
        payouts: Stack) -> None:
    """The bank corrects a failed payout to paid while its reversal waits for approval: the
    money left after all, and an approval would book it back. The case reads the report as
    stale (nothing moves by it); ops hear at once, once, and the timeline shows it. Before,
    only a report after the reversal was booked told anyone (reconciliation, later)."""
    provider_id, case_id, desk = await failed_awaiting_approval(payouts)
    await desk.route(PayoutEvent(  # the payout's own paid, from before its failure, arriving late
        provider="sandbox", event_id=f"evt_{uuid.uuid4().hex[:12]}", event_type="payout.paid",
        body_sha256="0" * 64, occurred_at=datetime.now(UTC) - timedelta(days=2),
        payout=ProviderPayout(provider="sandbox", payout_id=provider_id, amount=70_000, currency="USD",
                              status=ProviderPayoutStatus.PAID, raw_status="paid")))
    assert "payout_paid_after_failure" not in [e["action"] for e in await payouts.store.audit.trail(case_id)]
    await move_payout(payouts, provider_id, "paid", copies=2)
    trail = await wait_for_actions(payouts, case_id, "payout_paid_after_failure")
    assert [(n["kind"], n["audience"]) for n in await payouts.store.outbox.notices(case_id)].count(
        ("payout_paid_after_failure", "ops")) == 1
    assert "approval_granted" not in [e["action"] for e in trail]
    assert (await payouts.store.payouts.case(case_id))["status"] == "awaiting_approval"  # type: ignore[index]
    assert await payouts.store.ledger.entries(case_id) == []


async def test_a_paid_report_whose_audit_row_failed_is_written_when_delivered_again(
        payouts: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """The relay queued ops' notice of a paid-after-failure report, then failed before its
    audit row (a crash, the database gone): the delivery stays unprocessed, but when it came
    again the notice's dedup key was taken, so the row was never written, and the lookups
    that read it (a provider without a payout lookup before its reversal is booked, a
    reissue) never saw the money had left (reproduced). Both are written together or not."""
    provider_id, case_id, desk = await failed_awaiting_approval(payouts)
    paid = PayoutEvent(
        provider="sandbox", event_id=f"evt_{uuid.uuid4().hex[:12]}", event_type="payout.paid",
        body_sha256="0" * 64, occurred_at=datetime.now(UTC) + timedelta(seconds=1),
        payout=ProviderPayout(provider="sandbox", payout_id=provider_id, amount=70_000, currency="USD",
                              status=ProviderPayoutStatus.PAID, raw_status="paid"))
    append = AuditLog.append

    async def failing_once(conn: Any, chain: str | None, actor: str, action: str,
                           detail: dict[str, Any]) -> None:
        if action == "payout_paid_after_failure":
            monkeypatch.setattr(AuditLog, "append", staticmethod(append))
            raise psycopg.OperationalError("the connection was lost")
        await append(conn, chain, actor, action, detail)
    monkeypatch.setattr(AuditLog, "append", staticmethod(failing_once))
    with pytest.raises(psycopg.OperationalError):
        await desk.route(paid)
    await desk.route(paid)  # the re-drive, or the provider's retry
    trail = [e["action"] for e in await payouts.store.audit.trail(case_id)]
    assert trail.count("payout_paid_after_failure") == 1, trail
    assert [n["kind"] for n in await payouts.store.outbox.notices(case_id)].count(
        "payout_paid_after_failure") == 1


async def test_a_reissue_ask_no_worker_takes_in_time_is_503_then_answered_as_taken(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    """No worker answers the reissue ask within the answer time: 503, send it again (before,
    the SDK's cancel escaped as a 500). Sent again once a worker runs, the ask is taken once
    (Temporal held the first, or dropped it), and the same person sending it again hears the
    case's answer (202), not "already requested"."""
    async with stack_with(store, client, temporal_server.address, approval_answer_seconds=2) as stack:
        await add_payout_approvers(stack)
        _, case_id = await remediated(stack, 200_000)
        assert stack.worker is not None
        await stack.worker.shutdown()
        away = await ask_reissue(stack, "omar", case_id)
        assert away.status_code == 503, away.text
        await stack.start_worker()
        # Temporal may have held the ask (taken now) or dropped it (an update no worker
        # accepted is not durable): sent again, it is taken either way, once
        for _ in range(10):  # a worker just started may take longer than the answer time: 503 again
            if (resent := await ask_reissue(stack, "omar", case_id)).status_code != 503:
                break
        assert resent.status_code == 202, resent.text
        # the round's status lands a write after `reissue_requested`: a resend between the two
        # is answered with the case as its row shows it (still `remediated`)
        await wait_for_case(stack, case_id, "awaiting_reissue_approval")
        again = await ask_reissue(stack, "omar", case_id)
        assert again.status_code == 202, again.text
        assert again.json()["status"] == "awaiting_reissue_approval"
        other = await ask_reissue(stack, "lena", case_id)
        assert other.status_code in (403, 409), other.text
        trail = [e["action"] for e in await stack.store.audit.trail(case_id)]
    assert trail.count("reissue_requested") == 1


async def test_the_same_reissue_ask_sent_again_before_its_round_is_on_record_is_answered(
        payouts: Stack) -> None:
    """A double click: the same person's ask sent again after the case took the first, and
    before its round is on record (its audit write held here by a lock on the case's chain).
    The resend is refused as taken; it is their own ask, so it is answered as the first
    (202), not "already requested" (409)."""
    _, case_id = await remediated(payouts, 210_000)
    async with payouts.store.database.transaction() as conn:
        await conn.execute("SELECT 1 FROM audit_heads WHERE chain = %s FOR UPDATE", (case_id,))
        first = asyncio.create_task(ask_reissue(payouts, "omar", case_id))
        await asyncio.sleep(1.0)  # the case takes it; its `reissue_requested` waits for the lock
        assert not first.done()
        again = asyncio.create_task(ask_reissue(payouts, "omar", case_id))
        # the resend is refused as taken meanwhile (held 3 s: on a loaded machine, a resend that
        # reached the case only after the lock went would find the round on record either way)
        await asyncio.sleep(3.0)
    answers = [await first, await again]
    assert [a.status_code for a in answers] == [202, 202], [a.text for a in answers]
    trail = [e["action"] for e in await payouts.store.audit.trail(case_id)]
    assert trail.count("reissue_requested") == 1
    assert "reissue_refused" not in trail


async def test_a_correction_made_before_the_case_opened_but_after_the_failure_tells_ops(
        payouts: Stack) -> None:
    """The failure happened at the provider ten minutes before the case opened (a delivery
    retried late) and the bank corrected it to paid five minutes before: after the failure,
    so ops hear; the time compared is the failure's at the provider, not our case's opening."""
    payout = await paid_payout(payouts, 70_000)
    provider_id, now = payout.provider_payout_id, datetime.now(UTC)
    case_id = payout_case_id("sandbox", provider_id)
    desk = WebhookDesk(payouts.store, payouts.client, payouts.providers, payouts.settings)

    def reported(status: ProviderPayoutStatus, minutes_ago: int) -> PayoutEvent:
        return PayoutEvent(
            provider="sandbox", event_id=f"evt_{uuid.uuid4().hex[:12]}", event_type=f"payout.{status.value}",
            body_sha256="0" * 64, occurred_at=now - timedelta(minutes=minutes_ago),
            payout=ProviderPayout(provider="sandbox", payout_id=provider_id, amount=70_000, currency="USD",
                                  status=status, raw_status=status.value,
                                  failure_code="account_closed" if status is ProviderPayoutStatus.FAILED
                                  else None))

    await desk.route(reported(ProviderPayoutStatus.FAILED, 10))
    await wait_for_case(payouts, case_id, "awaiting_approval")
    await desk.route(reported(ProviderPayoutStatus.PAID, 5))
    await wait_for_actions(payouts, case_id, "payout_paid_after_failure")


@pytest.mark.parametrize("heard", [True, False], ids=["correction_heard", "correction_lost"])
async def test_an_approved_reversal_of_a_payout_the_provider_now_shows_paid_books_nothing(
        payouts: Stack, heard: bool) -> None:
    """The bank corrected the failed payout to paid before approvers approved its reversal:
    the money left after all. The runbook reads the payout at the provider before step A and
    goes to ops review: no hold, no compensating entry, ops and finance told. So whether or
    not the correction's webhook ever reached us (a lost one is the provider's word all the
    same). Before, the approval held the payout and booked `payout_reversed` for money gone."""
    payout = await paid_payout(payouts, 70_000)
    provider_id = payout.provider_payout_id
    case_id = payout_case_id("sandbox", provider_id)
    await move_payout(payouts, provider_id, "failed", failure_code="account_closed")
    await wait_for_case(payouts, case_id, "awaiting_approval")
    async with payouts.sandbox() as sb:
        await sb.post("/_sandbox/config", json={"hold_webhooks": not heard})
        await move_payout(payouts, provider_id, "paid")
        if not heard:
            assert (await sb.post("/_sandbox/discard-held")).json() == {"discarded": 1}
            await sb.post("/_sandbox/config", json={"hold_webhooks": False})
    if heard:
        await wait_for_actions(payouts, case_id, "payout_paid_after_failure")
    assert (await decide(payouts, "lena", case_id)).status_code == 202
    row = await wait_for_case(payouts, case_id, "ops_review", "remediated")
    trail = await payouts.store.audit.trail(case_id)
    actions = [e["action"] for e in trail]
    assert row["status"] == "ops_review", actions
    assert await payouts.store.ledger.entries(case_id) == []
    assert "payout_held" not in actions and "runbook_started" not in actions
    [seen] = [e["detail"] for e in trail if e["action"] == "payout_not_failed_at_provider"]
    assert seen["provider_status"] == "paid" and seen["approved_by"] == "lena"
    assert (await payouts.store.payouts.payout(payout.id)).status is not PayoutStatus.ON_HOLD  # type: ignore[union-attr]
    told = [(n["kind"], n["audience"]) for n in await payouts.store.outbox.notices(case_id)]
    assert {("payout_not_failed_at_provider", "payments_ops"),
            ("payout_not_failed_at_provider", "finance")} <= set(told)
    assert "payout_exception_remediated" not in [kind for kind, _ in told]


async def test_a_reversal_whose_payout_the_provider_does_not_hold_goes_to_ops_not_to_the_ledger(
        payouts: Stack) -> None:
    """The provider answers that it holds no such payout: nothing confirms the money came
    back, so the approved reversal holds and books nothing; ops review it, told what the
    provider answered. The payout stays paid in our books for reconciliation to raise."""
    provider_id = f"po_{uuid.uuid4().hex[:12]}"  # booked by us, unknown to the sandbox's API
    payout = PayoutSnapshot(id=f"P-{uuid.uuid4().hex[:10]}", provider="sandbox",
                            provider_payout_id=provider_id, beneficiary_id=f"ben-{uuid.uuid4().hex[:8]}",
                            amount=40_000, currency="USD", status=PayoutStatus.PAID)
    assert await payouts.store.payouts.record_payout(payout)
    case_id = payout_case_id("sandbox", provider_id)
    desk = WebhookDesk(payouts.store, payouts.client, payouts.providers, payouts.settings)
    await desk.route(PayoutEvent(
        provider="sandbox", event_id=f"evt_{uuid.uuid4().hex[:12]}", event_type="payout.failed",
        body_sha256="0" * 64, occurred_at=datetime.now(UTC),
        payout=ProviderPayout(provider="sandbox", payout_id=provider_id, amount=40_000, currency="USD",
                              status=ProviderPayoutStatus.FAILED, raw_status="failed",
                              failure_code="account_closed")))
    await wait_for_case(payouts, case_id, "awaiting_approval")
    assert (await decide(payouts, "lena", case_id)).status_code == 202
    await wait_for_case(payouts, case_id, "ops_review")
    trail = await payouts.store.audit.trail(case_id)
    [seen] = [e["detail"] for e in trail if e["action"] == "payout_not_failed_at_provider"]
    assert provider_id in seen["provider_status"] and "holds no payout" in seen["provider_status"]
    assert await payouts.store.ledger.entries(case_id) == []
    assert (await payouts.store.payouts.payout(payout.id)).status is PayoutStatus.PAID  # type: ignore[union-attr]


async def test_the_read_before_a_reversal_reaches_a_payout_lister_behind_the_worker_s_wrapper(
        payouts: Stack) -> None:
    """The worker's providers are instrumented; Stripe lists and reads payouts but makes
    none. The wrapper hid its `get_payout`, so the read answered "no payout lookup" and an
    approved reversal of a payout Stripe shows paid was held and booked on the webhook alone.
    The read goes through the wrapper (here to the sandbox, which answers as Stripe does)."""
    payout = await paid_payout(payouts, 30_000)
    stripe = StripeProvider("sk_test_unused", webhook_secrets=["whsec_unused"], api_base=payouts.sandbox_url)
    try:
        activities = PayoutActivities(payouts.store, instrument({"sandbox": stripe}), load_policy())
        shown = await ActivityEnvironment().run(activities.read_payout_at_provider, ReversalInput(
            case_id=payout_case_id("sandbox", payout.provider_payout_id), payout=payout))
    finally:
        await stripe.aclose()
    assert shown == PayoutAtProvider(status=ProviderPayoutStatus.PAID)
