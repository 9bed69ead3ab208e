"""Reconciliation on the sandbox provider: the 90-day incident (47 terminal updates whose
webhooks never arrived, 9 of them failed or canceled while we show them refunded) is found
by one backfill and opens nine exception cases, once; every class of break is classified;
breaks are resolved only through the governed path."""

import asyncio
import contextlib
import csv
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import Client
from temporalio.service import RPCError
from temporalio.testing import ActivityEnvironment

from activities.reconciliation import ReconciliationActivities
from adapters.db import Store
from adapters.db.ledger import LedgerRepository
from adapters.db.rows import BreakRow, RunBreakRow, RunRow
from adapters.notify.message import render
from adapters.policy_file import load_policy
from adapters.providers import sandbox as sandbox_adapter
from adapters.providers.base import RefundLister
from adapters.schedules import ensure_reconciliation_schedules, schedule_id
from domain.ledger import REFUNDED_ACCOUNT
from domain.models import (
    CaseEventInput,
    CaseStatus,
    LedgerInput,
    LedgerKind,
    ProviderRefundStatus,
    RefundReason,
    RefundRequest,
)
from domain.reconciliation import BatchInput, ListedRefund
from starters.cli.progress import follow_run
from starters.dev.stack import TemporalDevServer
from tests.harness import Stack, open_stack
from tests.reconciliation_kit import (
    ago,
    another_approver,
    backfill,
    break_awaiting_approval,
    failed_break_with_a_trigger,
    history,
    landed_unknown_to_its_case,
    move_at_provider,
    seed_case,
    seed_provider,
    wait_for_breaks,
)

REFUNDS = str(Path(sys.executable).parent / "refunds")
FAILED_REASONS = ["expired_or_canceled_card", "card_account_closed", "lost_or_stolen_card",
                  "expired_or_canceled_card", "declined", "card_account_closed"]


async def refunds_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(subprocess.run, [REFUNDS, *args], capture_output=True, text=True,
                                   timeout=120, env={**os.environ, **env})


async def count(store: Store, sql: str, *params: Any) -> int:
    async with store.database.transaction() as conn:
        row = await (await conn.execute(sql, params)).fetchone()
    assert row is not None
    return int(row["n"])


async def test_ninety_day_backfill_finds_the_nine_breaks_once(stack: Stack, tmp_path: Path) -> None:
    refunds = [history(f"ch_{i:03d}", 1_800 + i, days_ago=1 + i * 1.8) for i in range(47)]
    too_old = history("ch_old", 900, days_ago=120)  # diverged too, but before the window
    await seed_provider(stack, [*refunds, too_old])
    cases = {r["id"]: await seed_case(stack, r) for r in [*refunds, too_old]}
    failed, canceled = refunds[:6], refunds[6:9]
    for refund in refunds[9:]:
        await move_at_provider(stack, refund["id"], "succeeded")
    for refund, reason in zip(failed, FAILED_REASONS, strict=True):
        await move_at_provider(stack, refund["id"], "failed", reason)
    for refund in [*canceled, too_old]:
        await move_at_provider(stack, refund["id"], "canceled" if refund in canceled else "failed")

    env = {"REFUNDS_RELAY_URL": stack.relay_url, "REFUNDS_TOKEN": stack.tokens["olga"]}
    first = await refunds_cli("reconcile", "--provider", "sandbox", "--since", "90d", env=env)
    assert first.returncode == 0, first.stderr
    assert "47 objects, 9 new breaks, 0 already known" in first.stdout
    assert "provider_failed_shown_refunded" in first.stdout
    diverged = [r["id"] for r in [*failed, *canceled]]
    breaks = await wait_for_breaks(stack, diverged, "awaiting_approval")
    assert sorted(b["object_id"] for b in breaks) == sorted(diverged)
    assert {b["break_class"] for b in breaks} == {"provider_failed_shown_refunded"}
    assert {b["object_id"]: (b["provider_status"], b["failure_reason"]) for b in breaks} == {
        **{r["id"]: ("failed", reason) for r, reason in zip(failed, FAILED_REASONS, strict=True)},
        **{r["id"]: ("canceled", None) for r in canceled}}
    assert {b["object_id"]: b["ledger_delta"] for b in breaks} == {r["id"]: -r["amount"] for r in
                                                                  [*failed, *canceled]}
    for refund in [*failed, *canceled]:
        case_id = cases[refund["id"]]
        actions = await stack.actions(case_id)
        assert {"reconciliation_break_found", "reconciliation_exception_opened"} <= set(actions)
        assert {(n["kind"], n["audience"]) for n in await stack.store.outbox.notices(case_id)} == {
            ("reconciliation_break", "ops"), ("reconciliation_approval_needed", "approvers")}
        # nothing moved without approval: the settlement stands, the case still shows refunded
        assert [e["template"] for e in await stack.store.ledger.entries(case_id)] == ["refund_settled"] * 2
        case = await stack.store.cases.get(case_id)
        assert case is not None and case.status == "succeeded"
    assert await stack.actions(cases[too_old["id"]]) == ["request_received", "provider_refund_created",
                                                        "ledger_posted", "seeded"]

    again = await backfill(stack)
    assert (again["objects_seen"], again["new_breaks"], again["known_breaks"]) == (47, 0, 9)
    assert {b["break_id"] for b in again["breaks"]} == {b["id"] for b in breaks}
    assert await count(stack.store, "SELECT count(*) AS n FROM reconciliation_breaks"
                       " WHERE object_id = ANY(%s)", [r["id"] for r in refunds]) == 9
    assert await count(stack.store, "SELECT count(*) AS n FROM notices WHERE refund_request_id = ANY(%s)",
                       list(cases.values())) == 18

    async with stack.api("dave") as api:  # an auditor reads the first run's report
        runs = (await api.get("/v1/reconciliation/runs")).json()
        report = (await api.get(f"/v1/reconciliation/runs/{runs[1]['run_id']}")).json()
    assert runs[0]["run_id"] == again["run_id"]
    assert report["classes"] == {"provider_failed_shown_refunded": {
        "new": 9, "seen": 9, "amounts": {"USD": sum(r["amount"] for r in [*failed, *canceled])},
        "ledger_delta": {"USD": -sum(r["amount"] for r in [*failed, *canceled])}}}
    assert report["oldest_break"]["object_id"] == canceled[-1]["id"]
    assert {b["links"]["case"] for b in report["breaks"]} == {
        f"/v1/refund-requests/{cases[r['id']]}" for r in [*failed, *canceled]}
    json_file, csv_file = report["report_files"]
    assert json.loads(Path(json_file).read_text())["new_breaks"] == 9
    rows = list(csv.DictReader(Path(csv_file).open()))
    assert sorted(r["object_id"] for r in rows) == sorted(diverged)
    assert {r["new_in_run"] for r in rows} == {"True"}


BREAK_SITUATIONS: dict[str, tuple[dict[str, Any], dict[str, Any] | None, int | None]] = {
    # class: (provider refund, our case (None: no case), the ledger move that would fix it)
    "provider_failed_shown_refunded": ({"status": "failed"}, {}, -1_000),
    "provider_succeeded_shown_pending": ({}, {"status": CaseStatus.PENDING,
                                              "held": ProviderRefundStatus.PENDING, "settled": 0}, 1_000),
    "provider_succeeded_shown_failed": ({}, {"status": CaseStatus.REFUND_FAILED,
                                             "held": ProviderRefundStatus.FAILED, "settled": 0}, 1_000),
    "unknown_to_us": ({}, None, 1_000),
    "amount_mismatch": ({"amount": 1_200}, {"amount": 1_000}, 200),
    "currency_mismatch": ({}, {"currency": "EUR"}, None),
    "stuck_non_terminal": ({"status": "pending", "days_ago": 5}, {"status": CaseStatus.PENDING,
                                                                  "held": ProviderRefundStatus.PENDING,
                                                                  "settled": 0}, 0),
    "ledger_missing": ({}, {"settled": 0}, 1_000),
    "ledger_doubled": ({}, {"settled": 2}, -1_000),
}


@pytest.mark.parametrize("break_class", sorted(BREAK_SITUATIONS))
async def test_each_class_of_break_is_found_alone(stack: Stack, break_class: str) -> None:
    provider_side, case_side, delta = BREAK_SITUATIONS[break_class]
    agreeing = history("ch_ok", 700, days_ago=2)
    diverging = history("ch_x", provider_side.get("amount", 1_000), provider_side.get("days_ago", 2),
                        status=provider_side.get("status", "succeeded"))
    await seed_provider(stack, [agreeing, diverging])
    await seed_case(stack, agreeing)
    case_id = await seed_case(stack, diverging, **case_side) if case_side is not None else None
    report = await backfill(stack, since_days=30)
    assert (report["objects_seen"], report["new_breaks"]) == (2, 1)
    assert set(report["classes"]) == {break_class}
    [found] = report["breaks"]
    assert (found["object_id"], found["case_id"], found["ledger_delta"]) == (diverging["id"], case_id, delta)
    assert found["evidence"]["provider"]["status"] == diverging["status"]
    [opened] = await wait_for_breaks(stack, [diverging["id"]], "awaiting_approval")  # no workflow: people
    chain = case_id or f"sandbox-refund-{diverging['id']}"
    assert opened["chain"] == chain
    assert "reconciliation_break_found" in await stack.actions(chain)


async def test_a_backfill_of_an_old_window_judges_what_was_made_just_before_its_end(stack: Stack) -> None:
    """A refund made minutes before an old window's end was skipped as still in flight (the
    grace measured from the window's end, not from the run), and no later run lists it:
    a refund nobody asked for, months old, never judged. Backfilled month by month, every
    month's last quarter hour was left out."""
    made = history(f"ch_{os.urandom(4).hex()}", 1_000, days_ago=20)  # no case of ours
    await seed_provider(stack, [made])
    until = datetime.fromtimestamp(made["created"], UTC) + timedelta(minutes=5)
    async with stack.api("olga") as api:
        started = await api.post("/v1/reconciliation/runs", json={
            "provider": "sandbox", "since": ago(21).isoformat(), "until": until.isoformat()})
        assert started.status_code == 202, started.text
        report = await follow_run(api, started.json()["run_id"], show_progress=False, poll_seconds=0.1)
    assert [b["break_class"] for b in report["breaks"] if b["object_id"] == made["id"]] == ["unknown_to_us"]


async def test_a_case_whose_own_posting_is_pending_is_no_ledger_break(stack: Stack) -> None:
    """`executed_ledger_pending`: the case's workflow retries its own entry until it lands
    (an incident is open). A `ledger_missing` break approved meanwhile posted a second
    settlement beside it (another posting key), and the ledger doubled once the case's
    landed. The case lands it; reconciliation leaves it alone."""
    refund = history(f"ch_{os.urandom(4).hex()}", 1_000, days_ago=2)
    await seed_provider(stack, [refund])
    await seed_case(stack, refund, status=CaseStatus.EXECUTED_LEDGER_PENDING, settled=0)
    report = await backfill(stack, since_days=30)
    assert report["objects_seen"] >= 1
    found = await stack.store.database.fetch_all(
        "SELECT break_class FROM reconciliation_breaks WHERE object_id = %s", (refund["id"],))
    assert found == []


async def test_a_refund_found_for_a_case_that_knows_none_is_handed_to_it_not_compensated_beside_it(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    """Every create failed as far as the case knew, so it went to ops review and only looks
    (hourly here); one create had in fact landed. The run finds that refund by the case's
    reference: the case adopts it through its own lifecycle (one entry, its notices), where
    an approved compensation beside it would have been posted again by the case's next
    lookup."""
    stack = await open_stack(store, client, temporal_server.address, status_poll_interval_seconds=3_600,
                             max_submit_attempts=2, reconciliation_grace_seconds=0)
    try:
        case_id, landed = await landed_unknown_to_its_case(stack, 1_600)
        report = await backfill(stack, since_days=1)
        assert [(b["object_id"], b["break_class"]) for b in report["breaks"]] == [
            (landed["id"], "provider_succeeded_shown_pending")]
        await wait_for_breaks(stack, [landed["id"]], "handed_to_case")
        row = await stack.wait_for_status(case_id, "succeeded")
        assert row["provider_refund_id"] == landed["id"]
        posted = {e["posting_key"] for e in await store.ledger.entries(case_id)}
        assert posted == {f"{case_id}:refund_settled"}
    finally:
        await stack.close()


async def test_running_cases_take_the_providers_state_through_their_own_lifecycle(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    stack = await open_stack(store, client, temporal_server.address, late_failure_window_seconds=300,
                             status_poll_interval_seconds=300, reconciliation_grace_seconds=0)
    try:
        succeeded = await stack.request_refund("alice", await stack.charge(10_000), 1_800)
        refund_id = (await stack.wait_for_status(succeeded, "succeeded"))["provider_refund_id"]
        async with stack.sandbox() as sb:
            await sb.post("/_sandbox/config", json={"refund_initial_status": "pending"})
        pending = await stack.request_refund("alice", await stack.charge(10_000), 700)
        pending_refund = (await stack.wait_for_status(pending, "pending"))["provider_refund_id"]
        await move_at_provider(stack, refund_id, "failed", "card_account_closed")
        await move_at_provider(stack, pending_refund, "succeeded")

        report = await backfill(stack, since_days=1)
        assert {b["object_id"]: b["break_class"] for b in report["breaks"]} == {
            refund_id: "provider_failed_shown_refunded", pending_refund: "provider_succeeded_shown_pending"}
        await wait_for_breaks(stack, [refund_id, pending_refund], "handed_to_case")
        failed = await stack.wait_for_status(succeeded, "refund_failed")
        assert (failed["failure_reason"], failed["reserved_amount"]) == ("card_account_closed", 0)
        assert {e["posting_key"] for e in await store.ledger.entries(succeeded)} == {
            f"{succeeded}:refund_settled", f"{succeeded}:refund_reversed"}
        assert {(n["kind"], n["audience"]) for n in await store.outbox.notices(succeeded)} == {
            ("refund_succeeded", "requester"), ("reconciliation_break", "ops"),
            ("refund_failed", "operator"), ("refund_could_not_be_processed", "customer")}
        trail = await store.audit.trail(succeeded)
        [late] = [e for e in trail if e["action"] == "refund_failed_after_success"]
        assert late["detail"]["source"].startswith("webhook:reconciliation.provider_state:")
        await stack.wait_for_status(pending, "succeeded")
        assert {e["posting_key"] for e in await store.ledger.entries(pending)} == {
            f"{pending}:refund_settled"}

        again = await backfill(stack, since_days=1)
        assert (again["objects_seen"], again["new_breaks"], again["known_breaks"]) == (2, 0, 0)
    finally:
        await stack.close()


async def decide(stack: Stack, user: str, break_id: int, decision: str = "approve") -> Any:
    """A verdict on the round `user` sees now (read from the break as an API client does)."""
    async with stack.api(user) as api:
        shown = await api.get(f"/v1/reconciliation/breaks/{break_id}")
        round_ = shown.json()["reopened"] if shown.status_code == 200 else 0
        return await api.post(f"/v1/reconciliation/breaks/{break_id}/approvals",
                              json={"decision": decision, "reason": f"{user} checked the provider",
                                    "reopened": round_})


async def test_a_closed_case_is_compensated_only_after_the_tiers_approvals(stack: Stack) -> None:
    refund = history("ch_big", 60_000, days_ago=3)  # above 500.00 USD: approver and finance manager
    await seed_provider(stack, [refund])
    case_id = await seed_case(stack, refund, requester="bob")
    await move_at_provider(stack, refund["id"], "canceled")
    await backfill(stack, since_days=30)
    [found] = await wait_for_breaks(stack, [refund["id"]], "awaiting_approval")
    break_id = found["id"]

    assert (await decide(stack, "olga", break_id)).status_code == 403  # ops may not approve money
    refused = await decide(stack, "bob", break_id)  # requested the refund being compensated
    assert refused.status_code == 403 and "cannot approve" in refused.json()["detail"]
    first = await decide(stack, "carol", break_id)
    assert (first.status_code, first.json()["missing_roles"]) == (202, ["finance_manager"])
    assert [e["template"] for e in await stack.store.ledger.entries(case_id)] == ["refund_settled"] * 2
    assert (await decide(stack, "carol", break_id)).status_code == 403  # a person counts once
    assert (await decide(stack, "frank", break_id)).status_code == 202
    [resolved] = await wait_for_breaks(stack, [refund["id"]], "resolved")

    key = f"{case_id}:refund_reversed"  # the case's first reversal: under the key its workflow uses
    assert resolved["resolution"]["outcome"]["posting_key"] == key
    assert {line["posting_key"] for line in await stack.store.ledger.entries(case_id)} == {
        f"{case_id}:refund_settled", key}
    case = await stack.store.cases.get(case_id)
    assert case is not None and (case["status"], case["provider_status"], case["reserved_amount"]) == (
        "refund_canceled", "canceled", 0)
    trail = await stack.store.audit.trail(case_id)
    [compensated] = [e for e in trail if e["action"] == "reconciliation_compensated"]
    assert compensated["detail"]["approvers"] == ["carol", "frank"]
    assert [e["actor"] for e in trail if e["action"] == "reconciliation_approval_refused"] == ["bob", "carol"]
    assert (await decide(stack, "carol", break_id)).status_code == 409
    async with stack.api("dave") as api:
        scraped = (await api.get("/metrics")).text
    assert ('refunds_reconciliation_breaks{break_class="provider_failed_shown_refunded",'
            'state="resolved"}') in scraped
    again = await backfill(stack, since_days=30)
    assert (again["new_breaks"], again["known_breaks"]) == (0, 0)
    assert len(await stack.store.ledger.entries(case_id)) == 4


async def test_a_break_approved_by_someone_whose_access_was_then_revoked_compensates_nothing(
        stack: Stack) -> None:
    """Half of a two-approver break comes from a token the admin then revokes (stolen, or its
    person left); the second approval completed the round and the compensation was posted
    on it (reproduced: refunds, reissues and payout reversals asked, breaks did not). The
    settlement goes to ops review: nothing posted, ops told who, a later run raises it again."""
    case_id, found = await break_awaiting_approval(stack, moved_to="canceled", requester="bob", amount=60_000)
    leaving = f"erin-{os.urandom(3).hex()}"
    await another_approver(stack, leaving)
    assert (await decide(stack, leaving, found["id"])).status_code == 202
    assert await stack.store.access.revoke_tokens(by="admin", user=leaving)
    assert (await decide(stack, "frank", found["id"])).status_code == 202
    [settled] = await wait_for_breaks(stack, [found["object_id"]], "ops_review")
    assert settled["resolution"]["approval_revoked"] == {"revoked": [leaving]}, settled["resolution"]
    assert [e["template"] for e in await stack.store.ledger.entries(case_id)] == ["refund_settled"] * 2
    [notice] = await stack.store.database.fetch_all(
        "SELECT * FROM notices WHERE refund_request_id = %s AND kind = %s",
        (case_id, "reconciliation_break_approval_revoked"))
    message = render(notice, await stack.store.cases.get(case_id), None, case_url=None, email_to=None)
    assert leaving in message.text and "revoked" in message.text
    await backfill(stack, since_days=30)  # raised again, for approvers who may decide it
    [again] = await wait_for_breaks(stack, [found["object_id"]], "awaiting_approval")
    assert (again["id"], again["reopened"]) == (found["id"], found["reopened"] + 1)


async def test_nobody_behind_the_refund_approves_its_compensation(stack: Stack) -> None:
    """A break's approvers exclude everyone a refund's approvers exclude: its requester and
    its trigger identities (a reissue's original requester, a ticket's opener)."""
    case_id, found = await failed_break_with_a_trigger(stack)
    for behind in ("bob", "carol"):
        refused = await decide(stack, behind, found["id"])
        assert refused.status_code == 403 and "cannot approve" in refused.json()["detail"], refused.text
    assert [e["template"] for e in await stack.store.ledger.entries(case_id)] == ["refund_settled"] * 2
    await another_approver(stack)
    assert (await decide(stack, "erin", found["id"])).status_code == 202
    await wait_for_breaks(stack, [found["object_id"]], "resolved")


async def test_a_second_refund_with_a_cases_reference_never_reverses_the_one_it_holds(stack: Stack) -> None:
    """A provider refund carrying a case's reference that is not the refund the case holds
    is a duplicate, judged as one: canceled or failed it moved no money and opens nothing
    (before, it read as the case's own refund failing, and an approval reversed the refund
    the provider really made); succeeded it moved money twice, a break for ops."""
    held = history(f"ch_{os.urandom(4).hex()}", 2_000, days_ago=3)
    await seed_provider(stack, [held])
    case_id = await seed_case(stack, held)
    canceled = history(str(held["charge"]), 2_000, days_ago=3, status="canceled", reference=case_id)
    twice = history(str(held["charge"]), 2_000, days_ago=3, reference=case_id)
    await seed_provider(stack, [canceled, twice])
    await backfill(stack, since_days=30)
    [duplicate] = await wait_for_breaks(stack, [twice["id"]], "ops_review")
    assert (duplicate["break_class"], duplicate["refund_request_id"], duplicate["ledger_delta"]) == (
        "duplicate_refund", case_id, 2_000)
    async with stack.store.database.transaction() as conn:
        others = list(await (await conn.execute(
            "SELECT break_class FROM reconciliation_breaks WHERE object_id = ANY(%s)",
            ([held["id"], canceled["id"], twice["id"]],))).fetchall())
    assert [r["break_class"] for r in others] == ["duplicate_refund"]
    case = await stack.store.cases.get(case_id)
    assert case is not None and case["status"] == "succeeded"


async def test_a_refund_of_another_charge_naming_a_case_is_no_duplicate_of_it(stack: Stack) -> None:
    """A refund of another charge carrying a case's reference moved that charge's money: it
    is unknown to us (no case holds it), not the case's duplicate (a break that kept every
    reissue of the request refused) nor, for a case holding none, the case's own refund."""
    held = history(f"ch_{os.urandom(4).hex()}", 2_000, days_ago=3)
    await seed_provider(stack, [held])
    case_id = await seed_case(stack, held)
    elsewhere = history(f"ch_{os.urandom(4).hex()}", 2_000, days_ago=3, reference=case_id)
    await seed_provider(stack, [elsewhere])
    await backfill(stack, since_days=30)
    [found] = await wait_for_breaks(stack, [elsewhere["id"]], "new", "awaiting_approval", "ops_review",
                                    "handed_to_case")
    assert (found["break_class"], found["refund_request_id"]) == ("unknown_to_us", None), found


async def test_a_duplicate_first_seen_pending_is_raised_again_once_it_moves_money(stack: Stack) -> None:
    """A second refund carrying a case's reference, first listed while pending (a bank debit
    still clearing): a duplicate break for ops with nothing moved yet. It then succeeded: the
    customer was refunded twice, and every later run only linked the break, which kept
    "pending" and a delta of 0. It is raised again with the money it moved, and ops are told."""
    held = history(f"ch_{os.urandom(4).hex()}", 2_000, days_ago=3)
    await seed_provider(stack, [held])
    case_id = await seed_case(stack, held)
    twice = history(str(held["charge"]), 2_000, days_ago=3, status="pending", reference=case_id)
    await seed_provider(stack, [twice])
    await backfill(stack, since_days=30)
    [first] = await wait_for_breaks(stack, [twice["id"]], "ops_review")
    assert (first["break_class"], first["provider_status"], first["ledger_delta"]) == (
        "duplicate_refund", "pending", 0)
    await move_at_provider(stack, twice["id"], "succeeded")
    await backfill(stack, since_days=30)
    [moved] = await wait_for_breaks(stack, [twice["id"]], "ops_review")
    assert (moved["id"], moved["provider_status"], moved["ledger_delta"]) == (first["id"], "succeeded", 2_000)
    notices = await stack.store.database.fetch_all(
        "SELECT dedup_key FROM notices WHERE refund_request_id = %s AND kind = 'reconciliation_break'",
        (case_id,))
    assert len(notices) == 2, notices
    again = await backfill(stack, since_days=30)  # no news: nothing raised
    assert again["new_breaks"] == 0


async def test_an_approved_break_a_later_word_overtook_tells_ops(stack: Stack) -> None:
    """The provider canceled a refund the case holds as succeeded; while that break waited
    for approval, the provider's word on the refund became one we cannot read. Approved, the
    break moves nothing (the provider no longer says what was approved) and goes to ops
    review: nobody was told, and nothing raises it again, so the approved compensation sat
    there for good. Ops hear of it."""
    case_id, found = await break_awaiting_approval(stack, moved_to="canceled", requester="bob")
    await move_at_provider(stack, found["object_id"], "partially_reversed_v2")
    await backfill(stack, since_days=30)
    assert (await decide(stack, "carol", int(found["id"]))).status_code == 202
    [settled] = [b for b in await wait_for_breaks(stack, [found["object_id"]], "ops_review")
                 if b["id"] == found["id"]]
    assert settled["resolution"]["overtaken_by"]["provider_status"] == "unmapped"
    notices = await stack.store.database.fetch_all(
        "SELECT * FROM notices WHERE refund_request_id = %s AND kind = 'reconciliation_break_overtaken'",
        (case_id,))
    assert [(n["audience"], n["detail"]["break_id"]) for n in notices] == [("ops", found["id"])], notices
    message = render(notices[0], await stack.store.cases.get(case_id), None, case_url=None, email_to=None)
    assert "unmapped" in message.text and "carol" in message.text


async def test_an_approved_break_whose_case_came_to_hold_another_refund_moves_nothing(stack: Stack) -> None:
    """A case closed failed holding no refund; the provider shows two refunds carrying its
    reference, each a break for approval. The second's approval made the case hold it. The
    first's approval then found the case's status agreeing with its own and compensated
    against the whole ledger, the other refund's entry included: nothing booked for the
    second 15.00 paid out and the break resolved (other amounts: a move against the other
    refund's entry). The case holds another refund than when the break was found: people
    look again."""
    charge = f"ch_{os.urandom(4).hex()}"
    case_id = stack.new_id("two")
    first, second = (history(charge, 1_500, days_ago=3, reference=case_id) for _ in range(2))
    await seed_provider(stack, [first, second])
    await stack.store.cases.create(RefundRequest(
        refund_request_id=case_id, provider="sandbox", charge_id=charge, amount=1_500, currency="USD",
        merchant_account="acct_1", reason=RefundReason.REQUESTED_BY_CUSTOMER), "alice")
    await stack.store.cases.record_event(CaseEventInput(
        refund_request_id=case_id, action="seeded", actor="test", status=CaseStatus.REFUND_FAILED))
    await backfill(stack, since_days=30)
    found = {b["object_id"]: b for b in await wait_for_breaks(stack, [first["id"], second["id"]],
                                                              "awaiting_approval")}
    assert (await decide(stack, "carol", int(found[second["id"]]["id"]))).status_code == 202
    await wait_for_breaks(stack, [second["id"]], "resolved")
    assert (await decide(stack, "carol", int(found[first["id"]]["id"]))).status_code == 202
    [settled] = await wait_for_breaks(stack, [first["id"]], "ops_review")
    assert settled["resolution"]["case_moved"]["provider_refund_id"] == second["id"]
    lines = await stack.store.ledger.entries(case_id)
    assert [(x["debit"], x["credit"]) for x in lines if x["account"] == REFUNDED_ACCOUNT] == [(1_500, 0)]


async def test_a_case_kept_in_ops_review_after_booking_its_refund_is_no_status_break(stack: Stack) -> None:
    """A case its workflow keeps in ops review after booking its refund's success (a second
    refund with its reference, another amount than asked, a contradiction): the provider's
    "succeeded" is what the case holds and booked. It read as a refund shown pending: a
    break for approvers at the refund's tier, whose approval moved nothing and set the case
    `succeeded`, off the ops list with its incident still open."""
    held, doubled = (history(f"ch_{os.urandom(4).hex()}", 2_000, days_ago=3) for _ in range(2))
    await seed_provider(stack, [held, doubled])
    case_id = await seed_case(stack, held, status=CaseStatus.OPS_REVIEW)
    await seed_case(stack, doubled, status=CaseStatus.OPS_REVIEW, settled=2)  # its ledger still judged
    report = await backfill(stack, since_days=30)
    found = [(b["object_id"], b["break_class"]) for b in report["breaks"]
             if b["object_id"] in (held["id"], doubled["id"])]
    assert found == [(doubled["id"], "ledger_doubled")], report["breaks"]
    case = await stack.store.cases.get(case_id)
    assert case is not None and case["status"] == "ops_review"


async def test_a_compensation_never_posts_more_than_its_approvals_covered(stack: Stack) -> None:
    """The tier was chosen for the ledger move found (100.00 over on a 900.00 refund: one
    approver); the ledger moved again before the approval (89,800 more). The approved
    break posts what was approved and no more; the rest is the next run's break, approved
    by its own tier."""
    refund = history(f"ch_{os.urandom(4).hex()}", 90_000, days_ago=3)
    await seed_provider(stack, [refund])
    case_id = await seed_case(stack, refund)
    extra = LedgerInput(refund_request_id=case_id, kind=LedgerKind.REFUND_SETTLED, amount=100,
                        currency="USD", provider_refund_id=refund["id"], reference="stray")
    await stack.store.ledger.post(extra)
    await backfill(stack, since_days=30)
    [found] = await wait_for_breaks(stack, [refund["id"]], "awaiting_approval")
    assert (found["break_class"], found["ledger_delta"]) == ("ledger_doubled", -100)
    await stack.store.ledger.post(extra.model_copy(update={"amount": 89_800, "reference": "stray-2"}))
    assert (await decide(stack, "carol", found["id"])).status_code == 202
    await wait_for_breaks(stack, [refund["id"]], "resolved")
    lines = await stack.store.ledger.entries(case_id)
    reversed_lines = [(x["debit"], x["credit"]) for x in lines if x["template"] == "refund_reversed"]
    assert sorted(reversed_lines) == [(0, 100), (100, 0)]
    trail = await stack.store.audit.trail(case_id)
    [compensated] = [e for e in trail if e["action"] == "reconciliation_compensated"]
    assert (compensated["detail"]["needed"], compensated["detail"]["approved"]) == (89_900, 100)


async def test_an_unknown_refund_becomes_a_tracking_case_only_when_approved(stack: Stack) -> None:
    adopted, denied = history("ch_u1", 2_500, days_ago=4), history("ch_u2", 900, days_ago=4)
    await seed_provider(stack, [adopted, denied])
    await backfill(stack, since_days=30)
    found = {b["object_id"]: b["id"] for b in await wait_for_breaks(
        stack, [adopted["id"], denied["id"]], "awaiting_approval")}
    assert (await decide(stack, "carol", found[denied["id"]], "deny")).status_code == 202
    assert (await decide(stack, "carol", found[adopted["id"]])).status_code == 202
    await wait_for_breaks(stack, [denied["id"]], "dismissed")
    await wait_for_breaks(stack, [adopted["id"]], "resolved")
    assert await stack.store.cases.get(f"sandbox-refund-{denied['id']}") is None
    case_id = f"sandbox-refund-{adopted['id']}"
    case = await stack.store.cases.get(case_id)
    assert case is not None and (case["status"], case["amount"], case["reserved_amount"]) == (
        "succeeded", 2_500, 2_500)
    assert next((x["posting_key"], x["debit"]) for x in await stack.store.ledger.entries(case_id)) == (
        f"{case_id}:refund_settled", 2_500)
    actions = await stack.actions(case_id)
    assert actions.index("reconciliation_break_found") < actions.index("tracking_opened") < actions.index(
        "reconciliation_compensated")
    again = await backfill(stack, since_days=30)  # the dismissed one stays a known break, nothing new
    assert (again["new_breaks"], again["known_breaks"]) == (0, 1)


async def test_an_exception_nobody_decides_expires_without_moving_money(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    stack = await open_stack(store, client, temporal_server.address, approval_timeout_seconds=2)
    try:
        refund = history("ch_exp", 1_000, days_ago=2)
        await seed_provider(stack, [refund])
        case_id = await seed_case(stack, refund, settled=0)
        await backfill(stack, since_days=30)
        [expired] = await wait_for_breaks(stack, [refund["id"]], "expired")
        assert expired["break_class"] == "ledger_missing"
        assert await store.ledger.entries(case_id) == []
        assert "reconciliation_break_expired" in await stack.actions(case_id)
    finally:
        await stack.close()


async def test_a_long_run_continues_as_new_and_a_stopped_run_resumes_at_its_cursor(
        store: Store, client: Client, temporal_server: TemporalDevServer, tmp_path: Path) -> None:
    stack = await open_stack(store, client, temporal_server.address, reconciliation_batch_size=4,
                             reconciliation_batches_per_run=2)
    try:
        refunds = [history(f"ch_{i}", 1_000 + i, days_ago=1 + i) for i in range(23)]
        await seed_provider(stack, refunds)
        for refund in refunds:
            await seed_case(stack, refund, settled=0 if refund is refunds[20] else 1)
        # A backfill that stopped after one batch (its workflow gone): only its row and cursor remain.
        run, _ = await store.reconciliation.open_backfill(
            "sandbox", ago(30), ago(0), "olga", stack.settings.task_queue)
        activities = ReconciliationActivities(store, stack.providers, client, load_policy(None),
                                              timings=stack.settings.timings(), reports_dir=tmp_path)
        first = await ActivityEnvironment().run(activities.reconcile_batch, BatchInput(
            run_id=run["id"], provider="sandbox", options=stack.settings.reconcile_options()))
        assert (first.objects, first.has_more) == (4, True)

        report = await backfill(stack, since_days=30, expect_status=200)  # resumed, not restarted
        assert report["run_id"] == run["id"]
        assert (report["objects_seen"], report["new_breaks"]) == (23, 1)
        assert [b["object_id"] for b in report["breaks"]] == [refunds[20]["id"]]
        [listed] = [r for r in await store.reconciliation.runs() if r.id == run.id]
        assert isinstance(listed, RunRow) and listed.objects_seen == 23 and listed.requested_by == "olga"
        [found] = [b async for b in store.reconciliation.breaks(run.id)]
        assert isinstance(found, RunBreakRow) and found.new_in_run and found.object_id == refunds[20]["id"]
        stored = await store.reconciliation.get_break(found.id)
        assert isinstance(stored, BreakRow) and (stored.amount, stored.state) == (found.amount, found.state)
        history_events = (await client.get_workflow_handle(run["id"]).fetch_history()).events
        started = history_events[0].workflow_execution_started_event_attributes
        assert started.continued_execution_run_id  # the last run of a chain that continued as new
    finally:
        await stack.close()


class GatedLister:
    """The provider's lister whose listing waits for `gate` (a listing slower than the batch
    activity's timeout: the attempt runs on while Temporal retries it)."""

    def __init__(self, inner: RefundLister, gate: asyncio.Event) -> None:
        self._inner, self._gate, self.waiting = inner, gate, asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def list_refunds(self, *window: Any) -> AsyncIterator[Any]:
        self.waiting.set()
        await self._gate.wait()
        async for item in self._inner.list_refunds(*window):
            yield item


async def test_a_batch_attempt_overtaken_by_its_retry_lets_the_run_go_on(
        store: Store, client: Client, temporal_server: TemporalDevServer, tmp_path: Path) -> None:
    """A batch attempt that outlived its timeout stores its batch after its retry stored the
    same cursor's: the run has moved on, so that attempt's batch is dropped and the run goes on
    from its cursor. It failed the whole run (`RunConflict`, non-retryable), so the rest of
    the window was never reconciled, and a backfill cannot resume a failed run."""
    stack = await open_stack(store, client, temporal_server.address, reconciliation_batch_size=2)
    try:
        refunds = [history(f"ch_{os.urandom(4).hex()}", 1_000 + i, days_ago=1 + i) for i in range(3)]
        await seed_provider(stack, refunds)
        for refund in refunds:
            await seed_case(stack, refund, settled=0 if refund is refunds[2] else 1)
        run, _ = await store.reconciliation.open_backfill("sandbox", ago(30), ago(0), "olga",
                                                          stack.settings.task_queue)
        sandbox = stack.providers["sandbox"]
        assert isinstance(sandbox, RefundLister)
        gate = asyncio.Event()
        slow = GatedLister(sandbox, gate)

        def batch(providers: dict[str, Any]) -> Any:
            activities = ReconciliationActivities(store, providers, client, load_policy(None),
                                                  timings=stack.settings.timings(), reports_dir=tmp_path)
            return ActivityEnvironment().run(activities.reconcile_batch, BatchInput(
                run_id=run["id"], provider="sandbox", options=stack.settings.reconcile_options()))

        first_attempt = asyncio.create_task(batch({"sandbox": slow}))
        await asyncio.wait_for(slow.waiting.wait(), 30)
        retried = await batch(dict(stack.providers))
        assert (retried.objects, retried.has_more) == (2, True)
        gate.set()
        late = await first_attempt
        assert (late.objects, late.new_breaks, late.has_more) == (0, 0, True)
        rest = await batch(dict(stack.providers))
        assert (rest.objects, rest.new_breaks) == (1, 1)
        [kept] = [r for r in await store.reconciliation.runs() if r.id == run["id"]]
        assert (kept.objects_seen, kept.state) == (3, "running")
    finally:
        await stack.close()


async def test_the_schedule_is_ensured_once_and_its_runs_reconcile_a_trailing_window(stack: Stack) -> None:
    refund = history("ch_sched", 1_500, days_ago=2, status="failed")
    await seed_provider(stack, [refund])
    await seed_case(stack, refund)
    hourly = stack.settings.model_copy(update={"reconciliation_interval_seconds": 3600})
    ids = await ensure_reconciliation_schedules(stack.client, hourly, stack.providers)
    slower = hourly.model_copy(update={"reconciliation_interval_seconds": 7200})
    assert await ensure_reconciliation_schedules(stack.client, slower, stack.providers) == ids == [
        schedule_id(hourly, "sandbox")]
    handle = stack.client.get_schedule_handle(ids[0])
    try:
        described = await handle.describe()
        assert described.schedule.spec.intervals[0].every == timedelta(hours=2)
        await handle.trigger()
        [found] = await wait_for_breaks(stack, [refund["id"]], "awaiting_approval")
        run = await stack.store.reconciliation.report(found["first_run_id"])
        assert run is not None and (run["kind"], run["requested_by"]) == ("scheduled", "schedule")
        since, until = (datetime.fromisoformat(run["window"][end]) for end in ("since", "until"))
        assert until - since == timedelta(days=14)
    finally:
        await handle.delete()


async def test_a_restart_keeps_ops_pause_and_a_schedule_turned_off_is_removed(stack: Stack) -> None:
    """Ops paused the schedule during a provider incident; every worker start sent the whole
    schedule again, its default state included, and the pause was gone. And with the
    interval set to 0 ("none") the schedule went on starting runs: nothing removed it."""
    hourly = stack.settings.model_copy(update={"reconciliation_interval_seconds": 3600})
    [ensured] = await ensure_reconciliation_schedules(stack.client, hourly, stack.providers)
    handle = stack.client.get_schedule_handle(ensured)
    try:
        await handle.pause(note="provider incident INC-42")
        await ensure_reconciliation_schedules(stack.client, hourly, stack.providers)  # a worker restart
        state = (await handle.describe()).schedule.state
        assert (state.paused, state.note) == (True, "provider incident INC-42")
        longer = hourly.model_copy(update={"task_queue": f"{hourly.task_queue}-2"})  # another queue's
        [neighbour] = await ensure_reconciliation_schedules(stack.client, longer, stack.providers)
        off = hourly.model_copy(update={"reconciliation_interval_seconds": 0})
        assert await ensure_reconciliation_schedules(stack.client, off, stack.providers) == []
        with pytest.raises(RPCError):
            await handle.describe()
        assert (await stack.client.get_schedule_handle(neighbour).describe()).id == neighbour
        await stack.client.get_schedule_handle(neighbour).delete()
    finally:
        with contextlib.suppress(RPCError):
            await handle.delete()


async def test_backfills_need_ops_and_a_provider_that_lists_refunds(stack: Stack) -> None:
    async with stack.api("alice") as api:
        assert (await api.get("/v1/reconciliation/runs")).status_code == 403
        assert (await api.post("/v1/reconciliation/runs", json={
            "provider": "sandbox", "since": ago(1).isoformat()})).status_code == 403
    async with stack.api("olga") as api:
        unknown = await api.post("/v1/reconciliation/runs", json={"provider": "cashfree",
                                                                  "since": ago(1).isoformat()})
        backwards = await api.post("/v1/reconciliation/runs", json={
            "provider": "sandbox", "since": ago(1).isoformat(), "until": ago(2).isoformat()})
        missing = await api.get("/v1/reconciliation/runs/reconcile-nope")
        # bounds the database stores but cannot read back in UTC (year 0, year 10000): a 500 before
        ancient = await api.post("/v1/reconciliation/runs", json={
            "provider": "sandbox", "since": "0001-01-01T00:00:00+05:00"})
        far = await api.post("/v1/reconciliation/runs", json={
            "provider": "sandbox", "since": ago(1).isoformat(), "until": "9999-12-31T23:59:59-05:00"})
    assert (unknown.status_code, backwards.status_code, missing.status_code) == (422, 422, 404)
    assert "cannot list refunds" in unknown.json()["detail"]
    assert (ancient.status_code, far.status_code) == (422, 422), (ancient.text, far.text)
    assert "1970" in ancient.json()["detail"] and "future" in far.json()["detail"]


async def test_the_sandbox_lists_a_window_newest_first_page_by_page(
        stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sandbox_adapter, "LIST_PAGE", 3)
    inside = [history("ch_w", 100 + i, days_ago=1 + i) for i in range(7)]
    await seed_provider(stack, [*inside, history("ch_w", 1, days_ago=20), history("ch_w", 2, days_ago=0.01)])
    sandbox = stack.providers["sandbox"]
    assert isinstance(sandbox, RefundLister)
    listed = [r async for r in sandbox.list_refunds(ago(10), ago(0.5)) if isinstance(r, ListedRefund)]
    assert [r.refund.refund_id for r in listed] == [r["id"] for r in inside]
    assert [r.created for r in listed] == sorted((r.created for r in listed), reverse=True)
    rest = [r.refund.refund_id async for r in sandbox.list_refunds(ago(10), ago(0.5), inside[3]["id"])
            if isinstance(r, ListedRefund)]
    assert rest == [r["id"] for r in inside[4:]]


async def test_a_reversal_the_case_books_while_its_compensation_settles_is_posted_once(
        stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """The provider failed a refund the case holds as succeeded; while the approved
    compensation settles, the case's own workflow books the same reversal (a tracking case a
    webhook started). The settlement read the ledger before the workflow's entry committed
    and asked whether that entry existed after: found, it posted its reversal beside it under
    a reference of its own (the refund reversed twice, net -20.00). It asks first."""
    case_id, found = await break_awaiting_approval(stack, moved_to="failed", requester="bob")
    row = await stack.store.cases.get(case_id)
    assert row is not None and row["provider_refund_id"]
    real, raced = LedgerRepository.posted_in, asyncio.Event()

    async def booked_meanwhile(conn: Any, posting_key: str) -> bool:
        if not raced.is_set():
            raced.set()
            await stack.store.ledger.post(LedgerInput(
                refund_request_id=case_id, kind=LedgerKind.REFUND_REVERSED, amount=2_000, currency="USD",
                provider_refund_id=row["provider_refund_id"]))
        return await real(conn, posting_key)

    monkeypatch.setattr(LedgerRepository, "posted_in", staticmethod(booked_meanwhile))
    assert (await decide(stack, "carol", int(found["id"]))).status_code == 202
    await wait_for_breaks(stack, [found["object_id"]], "resolved")
    assert raced.is_set()
    lines = await stack.store.ledger.entries(case_id)
    refunded = [(x["template"], x["debit"], x["credit"]) for x in lines if x["account"] == REFUNDED_ACCOUNT]
    assert sorted(refunded) == [("refund_reversed", 0, 2_000), ("refund_settled", 2_000, 0)]


async def test_a_run_whose_report_cannot_be_written_ends_failed(
        store: Store, client: Client, temporal_server: TemporalDevServer, tmp_path: Path) -> None:
    """The image's working directory is not its service user's: the report's folder could
    not be made, and the finishing step was retried every minute for good, so the run never
    ended and its schedule (overlap: skip) skipped every later run (reproduced: the run was
    still running). It ends failed, naming the folder, and the next run goes ahead."""
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    stack = await open_stack(store, client, temporal_server.address, reports_dir=blocked / "reports")
    try:
        try:
            report = await asyncio.wait_for(backfill(stack, since_days=1), 60)
        except TimeoutError:
            raise AssertionError("the run did not end while its report could not be written") from None
        assert report["state"] == "failed" and "reports" in str(report["failure"]), report
        again = await asyncio.wait_for(backfill(stack, since_days=1), 60)
        assert again["run_id"] != report["run_id"] and again["state"] == "failed"
    finally:
        await stack.close()


async def test_a_released_case_corrected_to_a_refund_still_in_flight_holds_its_amount_again(
        stack: Stack) -> None:
    """A closed case shown failed (its amount released) whose refund the provider still
    shows pending days later: the approved stuck break moves it to pending, and a refund in
    flight counts against its charge again, as the case's own workflow would hold it. Before,
    the case stayed released at 0: the charge took another refund for money that may leave."""
    refund = history(f"ch_{os.urandom(4).hex()}", 1_000, days_ago=5, status="pending")
    await seed_provider(stack, [refund])
    case_id = await seed_case(stack, refund, status=CaseStatus.REFUND_FAILED,
                              held=ProviderRefundStatus.FAILED, settled=0)
    await stack.store.database.execute(
        "UPDATE refund_cases SET reserved_amount = 0 WHERE refund_request_id = %s", (case_id,))
    await backfill(stack, since_days=30)
    [found] = await wait_for_breaks(stack, [refund["id"]], "awaiting_approval")
    assert found["break_class"] == "stuck_non_terminal"
    assert (await decide(stack, "carol", found["id"])).status_code == 202
    await wait_for_breaks(stack, [refund["id"]], "resolved")
    case = await stack.store.cases.get(case_id)
    assert case is not None and (case["status"], case["reserved_amount"]) == ("pending", 1_000)
