"""A payout case's open-ended waits continue as new with the case carried, and its reissue
loop ends with ops after a bounded number of attempts (issue 18, item 5): the reissue window
takes hundreds of provider events, each run's history stays near a tiny threshold, and the
case, its approvals and its audit come through whole to a reissue made once."""

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from temporalio.client import Client

from adapters.approval_seal import approval_keys
from adapters.db import Store
from domain import contracts
from domain.models import ApprovalSignal, Decision
from domain.payouts import PayoutCaseState, PayoutEvent, ProviderPayout, ProviderPayoutStatus, payout_case_id
from starters.dev.stack import TemporalDevServer
from tests.harness import Stack, open_stack, with_seal
from tests.payouts_kit import (
    add_payout_approvers,
    ask_reissue,
    decide,
    move_payout,
    paid_payout,
    wait_for_actions,
    wait_for_case,
)
from tests.test_bounded_history import BATCH, THRESHOLD, _runs, in_batches
from tests.test_money_ambiguity import rig_for
from workflows import retry
from workflows.payout import PayoutReversalWorkflow

TURNS = 300
TINY: dict[str, Any] = {"continue_as_new_after_events": THRESHOLD, "max_submit_attempts": 3,
        "provider_http_timeout_seconds": 0.5, "resubmit_margin_seconds": 0, "submit_timeout_seconds": 3}


async def _awaiting_reversal(stack: Stack, amount: int = 150_000) -> tuple[str, str]:
    """A paid payout that failed at the provider: its case waits for the reversal's approval.
    Returns the case id and the provider's payout id."""
    await add_payout_approvers(stack)
    payout = await paid_payout(stack, amount)
    await move_payout(stack, payout.provider_payout_id, "failed", failure_code="account_closed")
    case_id = payout_case_id("sandbox", payout.provider_payout_id)
    await wait_for_case(stack, case_id, "awaiting_approval")
    return case_id, payout.provider_payout_id


async def _remediated(stack: Stack, amount: int = 150_000) -> tuple[str, str]:
    """A failed payout's case, approved, held and reversed: its reissue window is open."""
    case_id, provider_payout_id = await _awaiting_reversal(stack, amount)
    assert (await decide(stack, "lena", case_id)).status_code == 202
    await wait_for_case(stack, case_id, "remediated")
    return case_id, provider_payout_id


def _stale_paid(stack: Stack, case_id: str, provider_payout_id: str,
                amount: int) -> Callable[[int], Awaitable[None]]:
    """Sends the n-th `paid` after the failure: a turn of the window (and no action)."""
    handle = stack.client.get_workflow_handle(case_id)

    async def event(n: int) -> None:
        await handle.signal(PayoutReversalWorkflow.payout_event, PayoutEvent(
            provider="sandbox", event_id=f"evt-paid-{n}", event_type="payout.paid",
            body_sha256="0" * 64, occurred_at=datetime.now(UTC), payout=ProviderPayout(
                provider="sandbox", payout_id=provider_payout_id, amount=amount, currency="usd",
                status=ProviderPayoutStatus.PAID, raw_status="paid")))

    return event


async def _stale_events(stack: Stack, case_id: str, provider_payout_id: str, amount: int) -> None:
    """`paid` after the failure, again and again, a batch at a time, each batch once the
    case took the previous one (its audit row written), not once the signal handler saw it:
    a turn here is an activity, so a loaded worker would otherwise let batches pile up in a
    run faster than its turns reach the bound (a run of 301 events in a full suite)."""
    async def taken() -> int:
        actions = [e["action"] for e in await stack.store.audit.trail(case_id)]
        return actions.count("payout_status_stale_ignored")

    await in_batches(_stale_paid(stack, case_id, provider_payout_id, amount), taken, TURNS)


async def _window_turns(stack: Stack, case_id: str, runs: list[tuple[str, int, bool]]
                        ) -> tuple[list[int], list[tuple[str, int]]]:
    """Each run's length in the reissue window (up to the reissue request, where a round
    begins that cannot continue as new: the last run goes on to the reissue), and the
    turns taken once the window's run was at the bound (run id, the taking task's history
    length): none may be. Signals sent while a turn's activity runs each add a workflow
    task, so how far past the bound a run ends depends on the machine's load; whether
    it takes another turn there does not."""
    waits: list[int] = []
    late: list[tuple[str, int]] = []
    for run_id, _, _ in runs:
        events = (await stack.client.get_workflow_handle(case_id, run_id=run_id).fetch_history()).events
        asked = next((e.event_id for e in events
                      if e.HasField("workflow_execution_update_accepted_event_attributes")
                      and e.workflow_execution_update_accepted_event_attributes.accepted_request
                      .input.name == "request_reissue"), len(events))
        waits.append(asked)
        late += [(run_id, task_started) for e in events
                 if e.event_id < asked and e.HasField("activity_task_scheduled_event_attributes")
                 and e.activity_task_scheduled_event_attributes.activity_type.name
                 == contracts.ADMIT_PAYOUT_EVENT.name
                 and (task_started := e.activity_task_scheduled_event_attributes
                      .workflow_task_completed_event_id - 1) >= THRESHOLD]
    return waits, late


async def test_the_reissue_window_continues_as_new_with_the_case_intact(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    tiny = await open_stack(store, client, temporal_server.address, **TINY)
    try:
        case_id, provider_payout_id = await _remediated(tiny)
        handle = tiny.client.get_workflow_handle(case_id, result_type=PayoutCaseState)
        first_run = (await handle.describe()).run_id
        await _stale_events(tiny, case_id, provider_payout_id, 150_000)
        assert (await ask_reissue(tiny, "omar", case_id)).status_code == 202
        assert (await decide(tiny, "lena", case_id)).status_code == 202
        state = await asyncio.wait_for(handle.result(), 60)
        runs = await _runs(tiny, case_id, first_run)
        waits, late = await _window_turns(tiny, case_id, runs)
        assert state.reissue_payout_id is not None
        made = await reissues_of(tiny, state.reissue_payout_id)
        actions = [e["action"] for e in await tiny.store.audit.trail(case_id)]
    finally:
        await tiny.close()
    assert len(runs) >= 5, runs
    assert [continued for *_, continued in runs] == [True] * (len(runs) - 1) + [False]
    assert all(length < THRESHOLD + 2 * BATCH for _, length, _ in runs[:-1]), runs
    assert waits[-1] < THRESHOLD + 2 * BATCH, (waits, runs)  # the window's part of the last run
    assert late == [], late
    assert state.status == "reissued"
    assert state.events_seen >= TURNS + 1
    assert state.runbook == ("hold", "compensating_entry", "ticket", "notice")
    assert [a.approver for a in state.approvals] == ["lena"]  # the reissue round's
    assert actions.count("runbook_completed") == actions.count("reissue_completed") == 1
    assert actions.count("payout_status_stale_ignored") == TURNS
    assert len(made) == 1


async def test_events_still_queued_when_a_reissue_round_opens_keep_each_run_bounded(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    """A round cannot continue as new, so what it takes meanwhile stops at the history bound;
    the rest wait for the round's end, where each is a turn that may continue as new."""
    tiny = await open_stack(store, client, temporal_server.address, **TINY)
    try:
        case_id, provider_payout_id = await _remediated(tiny)
        handle = tiny.client.get_workflow_handle(case_id, result_type=PayoutCaseState)
        first_run = (await handle.describe()).run_id
        send = _stale_paid(tiny, case_id, provider_payout_id, 150_000)
        await asyncio.gather(*(send(n) for n in range(BATCH)))
        assert (await ask_reissue(tiny, "omar", case_id)).status_code == 202  # most still queued
        assert (await decide(tiny, "lena", case_id)).status_code == 202
        state = await asyncio.wait_for(handle.result(), 60)
        runs = await _runs(tiny, case_id, first_run)
        actions = [e["action"] for e in await tiny.store.audit.trail(case_id)]
    finally:
        await tiny.close()
    assert all(length < THRESHOLD + 2 * BATCH for _, length, _ in runs), runs
    assert state.status == "reissued"
    assert actions.count("payout_status_stale_ignored") == BATCH


async def test_events_left_past_the_bound_when_the_remediation_is_denied_still_join_the_case(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    """A denied (or expired) round finishes the case; the events it left waiting past the
    history bound go through the gate first, in runs that continue as new: none is dropped."""
    tiny = await open_stack(store, client, temporal_server.address, **TINY)
    try:
        case_id, provider_payout_id = await _awaiting_reversal(tiny)
        handle = tiny.client.get_workflow_handle(case_id, result_type=PayoutCaseState)
        first_run = (await handle.describe()).run_id
        send = _stale_paid(tiny, case_id, provider_payout_id, 150_000)
        await asyncio.gather(*(send(n) for n in range(BATCH)))
        assert (await decide(tiny, "lena", case_id, "deny")).status_code == 202
        state = await asyncio.wait_for(handle.result(), 60)
        runs = await _runs(tiny, case_id, first_run)
        actions = [e["action"] for e in await tiny.store.audit.trail(case_id)]
    finally:
        await tiny.close()
    assert state.status == "denied"
    assert actions.count("payout_status_stale_ignored") == BATCH
    assert state.events_seen == BATCH + 1
    assert all(length < THRESHOLD + 2 * BATCH for _, length, _ in runs), runs


async def reissues_of(stack: Stack, reference: str) -> list[object]:
    """The provider's payouts carrying `reference` (a reissue's)."""
    async with stack.sandbox() as sb:
        return list((await sb.get("/v1/payouts", params={"reference": reference})).json()["data"])


async def test_a_reissue_whose_outcome_stays_unknown_goes_to_ops_after_its_attempts(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    async with rig_for("sandbox", store, client, temporal_server, **TINY) as rig:
        case_id, _ = await _remediated(rig.stack)
        rig.proxy.refuse_next("POST", "/v1/payouts", *[503] * 10)  # every create: outcome unknown
        assert (await ask_reissue(rig.stack, "omar", case_id)).status_code == 202
        assert (await decide(rig.stack, "lena", case_id)).status_code == 202
        row = await wait_for_case(rig.stack, case_id, "ops_review", "reissued", "reissue_failed")
        assert row["status"] == "ops_review"
        actions = [e["action"] for e in await rig.stack.store.audit.trail(case_id)]
        assert "reissue_attempts_exhausted" in actions and "reissue_failed" not in actions
        assert [s for *_, s in rig.proxy.refused] == [503] * 3  # three attempts, then ops
        [spent] = [e for e in await rig.stack.store.audit.trail(case_id)
                   if e["action"] == "reissue_attempts_exhausted"]
        assert spent["detail"]["provider_holds_none"] is True  # looked up past the horizon
        assert ("payout_reissue_attempts_exhausted", "payments_ops") in {
            (n["kind"], n["audience"]) for n in await rig.stack.store.outbox.notices(case_id)}
        payout = await rig.stack.store.payouts.payout(row["payout_id"])
        assert payout is not None and payout.status == "on_hold"  # the hold stays for ops
        assert await reissues_of(rig.stack, payout.reissue_id()) == []


async def test_a_sealed_reversal_approval_replayed_into_the_next_run_does_not_approve_the_reissue(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    """A seal's nonce counts once per run; the run that follows a continue-as-new carries the
    verdict ids it saw, so the reversal's sealed approval sent again within its 15 minutes,
    after the reissue round opened in a new run, is a resend: it approves nothing."""
    tiny = await open_stack(store, client, temporal_server.address, **TINY)
    try:
        case_id, provider_payout_id = await _awaiting_reversal(tiny)
        verdict = ApprovalSignal(approver="lena", roles=("payments_ops_lead",), decision=Decision.APPROVE,
                                 reason="captured", verdict_id="v-captured-once")
        keys = approval_keys(tiny.settings)
        assert keys is not None
        replaying = with_seal(tiny.client, keys.seal(case_id, verdict, now=datetime.now(UTC), chain=(
            await tiny.client.get_workflow_handle(case_id).describe()).run_id)).get_workflow_handle(case_id)
        await replaying.signal("approve", verdict)  # the relay's own verdict, as it sent it
        await wait_for_case(tiny, case_id, "remediated")
        handle = tiny.client.get_workflow_handle(case_id)
        first_run = (await handle.describe()).run_id
        await _stale_events(tiny, case_id, provider_payout_id, 150_000)
        assert (await ask_reissue(tiny, "omar", case_id)).status_code == 202
        await wait_for_case(tiny, case_id, "awaiting_reissue_approval")
        assert (await handle.describe()).run_id != first_run  # the round is in a later run
        await replaying.signal("approve", verdict)  # the same verdict and seal, again
        await tiny.client.get_workflow_handle(case_id).signal("approve", ApprovalSignal(
            approver="lena", roles=("payments_ops_lead",), decision=Decision.APPROVE,
            reason="unsealed marker"))  # refused and recorded, after the replay
        trail = await wait_for_actions(tiny, case_id, "approval_refused")
        row = await tiny.store.payouts.case(case_id)
    finally:
        await tiny.close()
    assert row is not None and row["status"] == "awaiting_reissue_approval", row
    assert [e["detail"].get("refusal") for e in trail if e["action"] == "approval_refused"] == [
        "approval not sealed by the relay"]


@pytest.mark.parametrize("in_flight", ["lookup", "create"])
async def test_a_reissue_cancelled_while_its_attempt_runs_makes_nothing_more(
        store: Store, client: Client, temporal_server: TemporalDevServer,
        monkeypatch: pytest.MonkeyPatch, in_flight: str) -> None:
    """Ops cancel the case while the approved reissue's attempt runs. Its lookup held (nothing
    sent yet): the cancel read as an attempt with an unknown outcome, and the next attempt
    paid the beneficiary ops had stopped (reproduced). No attempt after a cancel; the one it
    came under runs on (a cancel does not reach it) and may create until its start-to-close,
    landing within the horizon after: that is waited out and the reissue looked up once,
    creating nothing. Found (its create landed late), it is booked; else ops review with the
    hold kept, payments ops told."""
    monkeypatch.setitem(retry.PAYOUT_REISSUE_ONCE, "start_to_close_timeout", timedelta(seconds=6))
    slow = {**TINY, "provider_http_timeout_seconds": 3, "submit_timeout_seconds": 10}
    async with rig_for("sandbox", store, client, temporal_server, **slow) as rig:
        case_id, _ = await _remediated(rig.stack)
        if in_flight == "lookup":
            rig.proxy.lose_next("GET", "/v1/payouts")  # the attempt's lookup: its answer held 3 s
        else:  # the create reaches the provider 2 s after the client gave up on it
            rig.proxy.act_late("POST", "/v1/payouts", after_seconds=2)
        assert (await ask_reissue(rig.stack, "omar", case_id)).status_code == 202
        assert (await decide(rig.stack, "lena", case_id)).status_code == 202
        await wait_for_actions(rig.stack, case_id, "reissue_started")
        await asyncio.sleep(1)
        await rig.stack.client.get_workflow_handle(case_id).cancel()
        row = await wait_for_case(rig.stack, case_id, "ops_review", "reissued", "reissue_failed")
        actions = [e["action"] for e in await rig.stack.store.audit.trail(case_id)]
        payout = await rig.stack.store.payouts.payout(row["payout_id"])
        assert payout is not None and "reissue_cancel_taken" in actions, actions
        made = await reissues_of(rig.stack, payout.reissue_id())
        if in_flight == "lookup":
            assert row["status"] == "ops_review" and "reissue_canceled" in actions, actions
            assert made == [] and payout.status == "on_hold"  # the hold stays for ops
            assert ("payout_reissue_canceled", "payments_ops") in {
                (n["kind"], n["audience"]) for n in await rig.stack.store.outbox.notices(case_id)}
        else:
            assert row["status"] == "reissued" and len(made) == 1, (row["status"], actions)
            assert [x["template"] for x in await rig.stack.store.ledger.entries(case_id)].count(
                "payout_reissued") == 2  # its two lines
