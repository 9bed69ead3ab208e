"""A local activity runs again whenever its workflow task does not complete: the worker dies
before it reports, or, as here, a signal lands while the task that ran it tries to close the
workflow (Temporal rejects the completion, `UnhandledCommand`, and the task runs again with the
signal). The case's step writes are local activities, so a second run must write nothing twice:
not the status change, not the audit row, not the posting, not the notice.

The race is the one the provider makes itself: its webhook about the refund arrives while the
workflow's last task posts the ledger. The webhook is held at the sandbox provider and
released from inside that step, before its transaction commits (once it has, the relay sees
the settlement the workflow applied and does not signal the repeat: test_no_news_webhooks.py);
the test waits until the relay's signal is sent before the step writes.

What tells a step's second run from another step, its key, is tested in test_case_writes.py."""

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client

from adapters.approval_seal import ApprovalKeys, sealing_client
from adapters.db import Store
from domain.models import (
    ApprovalSignal,
    CaseStatus,
    CaseWrites,
    CaseWritten,
    Decision,
    EventKind,
    ProviderEvent,
    RefundOutcome,
    Vetted,
)
from starters.dev.stack import TemporalDevServer
from tests.harness import APPROVAL_KEYS, Stack, open_stack
from workflows.refund import RefundWorkflow

SIGNALLED = EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED
TASK_FAILED = EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED


@pytest.fixture
async def closing_stack(store: Store, client: Client,
                        temporal_server: TemporalDevServer) -> AsyncIterator[Stack]:
    """No late-failure window: the task that posts the ledger also closes the workflow."""
    stack = await open_stack(store, client, temporal_server.address, late_failure_window_seconds=0)
    yield stack
    await stack.close()


async def history_types(stack: Stack, case_id: str) -> list[int]:
    history = await stack.client.get_workflow_handle(case_id).fetch_history()
    return [event.event_type for event in history.events]


async def release_webhooks_into(stack: Stack, case_id: str) -> None:
    """The provider's held webhooks go out now; returns once the relay signalled the case
    (its receipt processed: a signal sent while a workflow task runs is not in the history
    before that task ends)."""
    async with stack.sandbox() as sandbox:
        (await sandbox.post("/_sandbox/config", json={"hold_webhooks": False})).raise_for_status()
    for _ in range(200):
        if await stack.store.database.fetch_one(
                "SELECT 1 FROM webhook_receipts WHERE workflow_id = %s AND event_type LIKE 'refund.%%'"
                " AND processed_at IS NOT NULL", (case_id,)):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the provider's webhook never reached {case_id}")


async def signal_a_charge_notice(client: Client, case_id: str) -> None:
    """Signals the case a provider's notice about its charge: an event that moves nothing,
    so any step it lands beside runs again with its task and nothing else changes."""
    notice = ProviderEvent(provider="sandbox", event_id=f"evt_{uuid.uuid4().hex}",
                           event_type="charge.updated", kind=EventKind.REFUND_STATUS,
                           body_sha256="0" * 64, occurred_at=datetime.now(UTC))
    await client.get_workflow_handle(case_id).signal(RefundWorkflow.provider_event, notice)


async def test_a_step_run_again_by_a_signal_at_the_close_writes_nothing_twice(
        closing_stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    stack = closing_stack
    async with stack.sandbox() as sandbox:
        (await sandbox.post("/_sandbox/config", json={"hold_webhooks": True})).raise_for_status()
    write = stack.store.cases.write_case_steps
    closing_runs: list[CaseWritten] = []

    async def racing_write(steps: CaseWrites, step_key: str | None = None,
                           **options: Callable[[CaseWritten], None]) -> CaseWritten:
        closing = any(w.event is not None and w.event.action == "refund_succeeded" for w in steps.writes)
        if closing and not closing_runs:
            await release_webhooks_into(stack, steps.refund_request_id)
        written = await write(steps, step_key, **options)
        if closing:
            closing_runs.append(written)
        return written

    monkeypatch.setattr(stack.store.cases, "write_case_steps", racing_write)
    charge = await stack.charge(10_000)
    case_id = await stack.request_refund("alice", charge, 1_000)
    outcome = await stack.client.get_workflow_handle(case_id, result_type=RefundOutcome).result()

    assert outcome.state.status is CaseStatus.SUCCEEDED
    history = await history_types(stack, case_id)
    assert TASK_FAILED in history and SIGNALLED in history  # the closing task ran again, with the signal
    actions = await stack.actions(case_id)
    assert [a for a in actions if actions.count(a) > 1] == [], actions
    assert actions[-3:] == ["ledger_posted", "notice_queued", "refund_succeeded"]
    assert len(closing_runs) == 2 and closing_runs[0] == closing_runs[1]  # the second run: the first's answer
    entries = await stack.store.database.fetch_all(
        "SELECT posting_key FROM ledger_entries WHERE refund_request_id = %s", (case_id,))
    assert len(entries) == 1


async def test_a_rejecting_validation_run_again_by_a_signal_at_the_close_rejects_once(
        closing_stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first workflow task validates, rejects and closes the case: a signal landing
    meanwhile runs validation (and the rejection's writes) again."""
    stack = closing_stack
    reject = stack.store.cases.reject
    rejections: list[Vetted] = []

    async def racing_reject(case_id: str, reason: str, step_key: str | None = None) -> Vetted:
        vetted = await reject(case_id, reason, step_key)
        rejections.append(vetted)
        if len(rejections) == 1:  # any signal: a provider's notice about the charge, here
            await signal_a_charge_notice(stack.client, case_id)
        return vetted

    monkeypatch.setattr(stack.store.cases, "reject", racing_reject)
    case_id = await stack.request_refund("alice", f"ch_missing_{uuid.uuid4().hex[:8]}", 1_000)
    outcome = await stack.client.get_workflow_handle(case_id, result_type=RefundOutcome).result()

    assert outcome.state.status is CaseStatus.REJECTED
    history = await history_types(stack, case_id)
    assert TASK_FAILED in history and SIGNALLED in history  # the first task ran again, with the signal
    assert len(rejections) == 2 and rejections[0] == rejections[1]
    actions = await stack.actions(case_id)
    assert [a for a in actions if actions.count(a) > 1] == [], actions
    assert "validation_rejected" in actions


async def test_a_step_redone_after_a_cancel_writes_nothing_twice(
        closing_stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ops cancel a case while its settlement's local activity runs longer than its workflow
    task (the worker heartbeats the task): the cancel interrupts the step after its commit and
    the workflow applies the provider's status again, a new local activity with the same
    writes; it must find the first's answer, not append `refund_succeeded` again."""
    stack = closing_stack
    write = stack.store.cases.write_case_steps
    committed = asyncio.Event()

    async def slow_write(steps: CaseWrites, step_key: str | None = None,
                         **options: Callable[[CaseWritten], None]) -> CaseWritten:
        written = await write(steps, step_key, **options)
        if any(w.event is not None and w.event.action == "refund_succeeded" for w in steps.writes) \
                and not committed.is_set():
            committed.set()
            await asyncio.sleep(60)  # past the task's heartbeat, until the cancel interrupts it
        return written

    monkeypatch.setattr(stack.store.cases, "write_case_steps", slow_write)
    case_id = await stack.request_refund("alice", await stack.charge(10_000), 1_000)
    await asyncio.wait_for(committed.wait(), 30)
    handle = stack.client.get_workflow_handle(case_id, result_type=RefundOutcome)
    await handle.cancel()
    outcome = await asyncio.wait_for(handle.result(), 60)

    assert outcome.state.status is CaseStatus.SUCCEEDED
    actions = await stack.actions(case_id)
    assert "cancel_after_provider_refund" in actions
    assert [a for a in actions if actions.count(a) > 1] == [], actions
    entries = await stack.store.database.fetch_all(
        "SELECT posting_key FROM ledger_entries WHERE refund_request_id = %s", (case_id,))
    assert len(entries) == 1


async def test_a_denial_whose_task_runs_again_behind_an_approval_stands_alone(
        closing_stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two approvers race: bob's sealed approval (a signal) lands while carol's denial (an
    update) is written. Written by a local activity, the denial's task, closing the case,
    never completed and ran again with the signal in its history ahead of the update Temporal
    delivered again: bob's approval decided, the denial stayed written (status denied, hold
    released), the submit was refused, and carol heard "already decided". What a lost task
    wrote must not stand beside what the retried one decided: one decision, in the workflow,
    the case row and the trail alike, the other verdict refused, and carol answered as what
    happened to hers. (Written once the task that took it completed, the denial stands.)"""
    stack = closing_stack
    relay = sealing_client(stack.client, ApprovalKeys([APPROVAL_KEYS]))
    write = stack.store.cases.write_case_steps
    denials: list[CaseWrites] = []

    async def racing_write(steps: CaseWrites, step_key: str | None = None,
                           **options: Callable[[CaseWritten], None]) -> CaseWritten:
        written = await write(steps, step_key, **options)
        if any(w.event is not None and w.event.action == "approval_denied" for w in steps.writes) \
                and not denials:
            denials.append(steps)
            await relay.get_workflow_handle(steps.refund_request_id).signal(
                RefundWorkflow.approve, ApprovalSignal(approver="bob", roles=("approver",),
                                                       decision=Decision.APPROVE,
                                                       verdict_id=uuid.uuid4().hex))
        return written

    monkeypatch.setattr(stack.store.cases, "write_case_steps", racing_write)
    charge = await stack.charge(20_000)
    case_id = await stack.request_refund("alice", charge, 9_000)
    await stack.wait_for_status(case_id, "awaiting_approval")
    async with stack.api("carol") as api:
        denied = await api.post(f"/v1/refund-requests/{case_id}/approvals", json={"decision": "deny"})
    outcome = await asyncio.wait_for(
        stack.client.get_workflow_handle(case_id, result_type=RefundOutcome).result(), 60)

    history = await history_types(stack, case_id)
    row = await stack.store.cases.get(case_id)
    assert row is not None
    decisions = [a for a in await stack.actions(case_id) if a in ("approval_denied", "approval_granted")]
    refunds = await stack.provider_refunds(charge)
    trail = await stack.store.audit.trail(case_id)
    refused = [e["actor"] for e in trail if e["action"] == "approval_refused"]
    assert denials and SIGNALLED in history  # bob's approval landed while the denial was written
    assert row["status"] == outcome.state.status.value, (row["status"], outcome.state.status)
    assert len(decisions) == 1, decisions
    if decisions == ["approval_denied"]:
        assert (denied.status_code, refunds, refused) == (202, [], ["bob"]), denied.text
    else:
        assert (denied.status_code, len(refunds), refused) == (409, 1, ["carol"]), denied.text
        assert outcome.state.status is CaseStatus.SUCCEEDED
