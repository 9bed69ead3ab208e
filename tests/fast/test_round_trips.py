"""How many history events a refund costs (issue 21): the dev server, and any Temporal
cluster, pays per event, so the happy paths have a budget. Counted from the real history
the fast tier's workflow writes (fakes answer at once; the events are the workflow's own)."""

import asyncio
from datetime import timedelta

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowHandle

from domain import contracts
from domain.models import (
    CaseStatus,
    CaseWrites,
    Decision,
    LedgerKind,
    ProviderRefund,
    RefundOutcome,
    RefundTimings,
    SubmitInput,
)
from tests.fast.kit import FakeActivities, fake_worker
from tests.fast.test_refund_branches import TIMINGS, new_case, refund, refund_fakes, start, unknown, verdict
from workflows.refund import RefundWorkflow

AUTO_APPROVED_BUDGET = 35
ONE_APPROVAL_BUDGET = 55


def steps_of(write: CaseWrites | SubmitInput) -> list[tuple[str | None, str | None]]:
    """A local write's steps (a submit's `before`) in order: (notice kind, None) or (None,
    case event action)."""
    writes = write.writes if isinstance(write, CaseWrites) else write.before
    return [(w.notice.kind if w.notice else None, w.event.action if w.event else None) for w in writes]


async def events(handle: WorkflowHandle[RefundWorkflow, RefundOutcome]) -> list[str]:
    return [EventType.Name(e.event_type) for e in (await handle.fetch_history()).events]


async def test_an_auto_approved_refund_stays_within_its_event_budget(client: Client) -> None:
    case_id = new_case()
    async with fake_worker(client, refund_fakes(case_id)) as queue:
        handle = await start(client, queue, case_id)
        await handle.result()
    written = await events(handle)
    assert len(written) <= AUTO_APPROVED_BUDGET, written


async def test_a_refund_with_one_approval_stays_within_its_event_budget(client: Client) -> None:
    case_id = new_case()
    fakes = refund_fakes(case_id, auto_approve=False)
    async with fake_worker(client, fakes) as queue:
        handle = await start(client, queue, case_id)
        while not [n for n in fakes.inputs(contracts.QUEUE_NOTICE) if n.kind == "approval_needed"]:
            await asyncio.sleep(0.05)  # approvers act once told
        await handle.execute_update(RefundWorkflow.submit_approval, verdict(Decision.APPROVE))
        await handle.result()
    written = await events(handle)
    assert len(written) <= ONE_APPROVAL_BUDGET, written


@pytest.mark.parametrize("advised_in_validation", [False, True])
async def test_the_auto_approved_steps_fold_bookkeeping_into_the_work_they_accompany(
        client: Client, advised_in_validation: bool) -> None:
    """Validation with the policy (a local activity: a read, no money moves), `execution_started`
    with the submit's intent, and the posting, its notice and the status in one local write;
    advice beside unless validation brought it (an in-process advisor); the notice queued for
    the worker pool to deliver. The submit is the one activity of the money path."""
    case_id = new_case()
    fakes = refund_fakes(case_id)
    fakes.advised_in_validation = advised_in_validation
    async with fake_worker(client, fakes) as queue:
        handle = await start(client, queue, case_id)
        await handle.result()
    history = (await handle.fetch_history()).events
    scheduled = sorted(e.activity_task_scheduled_event_attributes.activity_type.name
                       for e in history if e.HasField("activity_task_scheduled_event_attributes"))
    asked_for_advice = [] if advised_in_validation else [contracts.ADVISE_REFUND.name]
    assert scheduled == sorted([*asked_for_advice, contracts.SUBMIT_PROVIDER_REFUND.name])
    local = [e for e in history if e.HasField("marker_recorded_event_attributes")
             and e.marker_recorded_event_attributes.marker_name == "core_local_activity"]
    assert len(local) == 2  # validation, then the settlement's write
    assert len(fakes.inputs(contracts.VALIDATE_AND_DECIDE)) == 1
    [submit] = fakes.inputs(contracts.SUBMIT_PROVIDER_REFUND)
    assert submit.started is not None and submit.started.action == "execution_started"
    [write] = fakes.inputs(contracts.WRITE_CASE_STEPS)
    assert write.posting is not None and write.posting.kind is LedgerKind.REFUND_SETTLED
    assert steps_of(write) == [("refund_succeeded", None), (None, "refund_succeeded")]
    assert write.writes[0].notice is not None and write.writes[0].notice.dispatch_queue == queue
    assert fakes.recorded() == ["execution_started", "refund_succeeded"]  # every row, as before


async def approve_once_asked(client: Client, fakes: FakeActivities, case_id: str, *, cancel: bool = False,
                            timings: RefundTimings = TIMINGS) -> tuple[RefundOutcome, list[CaseWrites]]:
    """Opens the case, approves it once approvers are asked (an update; then cancels it at
    once, when told to) and waits for its end: the outcome and the local writes after the
    approval."""
    async with fake_worker(client, fakes) as queue:
        handle = await start(client, queue, case_id, timings)
        while not [n for n in fakes.inputs(contracts.QUEUE_NOTICE) if n.kind == "approval_needed"]:
            await asyncio.sleep(0.05)  # approvers act once told
        writes_before = len(fakes.inputs(contracts.WRITE_CASE_STEPS))
        await handle.execute_update(RefundWorkflow.submit_approval, verdict(Decision.APPROVE))
        if cancel:
            await handle.cancel()
        outcome = await handle.result()
    return outcome, fakes.inputs(contracts.WRITE_CASE_STEPS)[writes_before:]


async def test_the_deciding_approval_is_committed_with_the_submits_intent(client: Client) -> None:
    """After the approval a case is the submit, whose first transaction commits the approval's
    row and the requester's `refund_approved` notice with `execution_started` before the
    provider is called, and the settlement's write: the approval's own local write was a
    third of the work after it (issue 21's target 3)."""
    case_id = new_case()
    fakes = refund_fakes(case_id, auto_approve=False)
    outcome, after = await approve_once_asked(client, fakes, case_id)
    assert outcome.state.status is CaseStatus.SUCCEEDED
    assert [steps_of(write) for write in after] == [[("refund_succeeded", None), (None, "refund_succeeded")]]
    [submit] = fakes.inputs(contracts.SUBMIT_PROVIDER_REFUND)
    assert steps_of(submit) == [(None, "approval_granted"), ("refund_approved", None)]
    assert submit.started is not None and submit.started.action == "execution_started"
    approved = submit.before[1].notice
    assert approved is not None and approved.audience == "requester" and approved.dispatch_queue is not None
    assert approved.detail == {"by": verdict(Decision.APPROVE).approver}
    assert approved.dedup_key == f"{case_id}:refund_approved:requester:awaiting_approval"  # as before
    assert fakes.recorded()[-3:] == ["approval_granted", "execution_started", "refund_succeeded"]


async def test_an_approval_whose_submit_failed_is_written_unless_a_submit_began(client: Client) -> None:
    """A first attempt that failed may have failed before its transaction: the approval is
    written on its own then, guarded (PostgreSQL skips it if that submit began), before the
    verify-state step; the resubmit carries nothing of it."""
    case_id = new_case()
    fakes = refund_fakes(case_id, auto_approve=False)
    fakes.script(contracts.SUBMIT_PROVIDER_REFUND, unknown(), refund(case_id))
    outcome, after = await approve_once_asked(client, fakes, case_id)
    assert outcome.state.status is CaseStatus.SUCCEEDED
    guarded, settled = after
    assert guarded.unless_submitted and not settled.unless_submitted
    assert steps_of(guarded) == [(None, "approval_granted"), ("refund_approved", None)]
    first, second = fakes.inputs(contracts.SUBMIT_PROVIDER_REFUND)
    assert steps_of(first) == steps_of(guarded) and second.before == ()
    write, verify = contracts.WRITE_CASE_STEPS, contracts.VERIFY_PROVIDER_REFUND
    assert fakes.names(write, verify)[-3:] == [write.name, verify.name, write.name]


async def test_an_approval_cancelled_before_its_submit_answered_is_written_unless_a_submit_began(
        client: Client) -> None:
    """Ops cancel the case while its submit runs: once the attempt's horizon passed, the
    approval is written guarded (a submit that began wrote it), before `canceled_by_ops`."""
    case_id = new_case()
    fakes = refund_fakes(case_id, auto_approve=False)

    async def slow_unknown(_: SubmitInput) -> ProviderRefund:
        await asyncio.sleep(0.5)
        raise unknown()
    fakes.script(contracts.SUBMIT_PROVIDER_REFUND, slow_unknown)
    outcome, after = await approve_once_asked(client, fakes, case_id, cancel=True, timings=TIMINGS.model_copy(
        update={"submit_timeout": timedelta(seconds=1)}))
    assert outcome.state.status is CaseStatus.CANCELED_BY_OPS
    guarded, canceled = after
    assert guarded.unless_submitted and not canceled.unless_submitted
    assert steps_of(guarded) == [(None, "approval_granted"), ("refund_approved", None)]
    assert steps_of(canceled) == [(None, "canceled_by_ops")]
