"""A refund workflow moves money only for a request the relay recorded: someone with write
access to Temporal (its UI, its CLI) who starts one directly, with a request no case holds
or with other terms than the case of that id holds, gets a rejected run and no refund."""

import contextlib
from typing import Any

import pytest
from temporalio.client import WorkflowFailureError
from temporalio.common import WorkflowIDReusePolicy
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError

from adapters.db.cases import request_from_row
from domain import errors
from domain.models import CaseStatus, RefundCarry, RefundRequest, RefundWorkflowInput
from tests.harness import Stack
from workers.case_sweep import sweep_cases_once
from workflows.refund import RefundWorkflow


async def _started_directly(stack: Stack, request: RefundRequest) -> Any:
    handle = await stack.client.start_workflow(
        RefundWorkflow.run, RefundWorkflowInput(request=request, requester="mallory",
                                                timings=stack.settings.timings()),
        id=request.refund_request_id, task_queue=stack.settings.task_queue)
    return await handle.result()


@pytest.mark.parametrize("recorded", [False, True])
async def test_a_refund_started_straight_in_temporal_moves_no_money(stack: Stack, recorded: bool) -> None:
    charge = await stack.charge(10_000)
    body = stack.refund_body(charge, 1_000)
    request = RefundRequest.model_validate({**body, "source": "api"})
    if recorded:  # the case of that id was requested for 10.00; the forged start asks 99.00
        await stack.store.cases.create(request, "alice")
        request = request.model_copy(update={"amount": 9_900})
    outcome = await _started_directly(stack, request)
    assert outcome.state.status == "rejected"
    assert await stack.provider_refunds(charge) == []
    row = await stack.store.cases.get(request.refund_request_id)
    if recorded:  # the recorded case is left as it was: its own start is still to come
        assert row is not None
        assert (row["status"], row["amount"], row["reserved_amount"]) == ("requested", 1_000, 0)
    else:
        assert row is None
    assert "start_refused" in [e["action"] for e in await stack.store.audit.trail(request.refund_request_id)]


async def _recorded_request(stack: Stack, case_id: str) -> RefundRequest:
    row = await stack.store.cases.get(case_id)
    assert row is not None
    return request_from_row(row)


async def _failed_case(stack: Stack, charge: str) -> str:
    """A refund of 20.00 the provider failed after accepting it: its workflow is over."""
    async with stack.sandbox() as sb:
        await sb.post("/_sandbox/config", json={"refund_initial_status": "pending"})
    case_id = await stack.request_refund("alice", charge, 2_000)
    row = await stack.wait_for_status(case_id, "pending")
    await stack.set_provider_status(row["provider_refund_id"], "failed", failure_reason="card_account_closed")
    await stack.wait_for_status(case_id, "refund_failed")
    async with stack.sandbox() as sb:
        await sb.post("/_sandbox/config", json={"refund_initial_status": "succeeded"})
    await stack.client.get_workflow_handle(case_id).result()
    return case_id


async def test_a_start_carrying_a_continued_run_s_state_moves_no_money(stack: Stack) -> None:
    """A continued run resumes where its previous run was (submitting, approvals taken):
    started straight in Temporal with such a `carried` input, a run skipped validation,
    policy and approvals and submitted the request it named. Only a run Temporal continued
    may carry state: the forged one fails at once, and the case waiting for its approvers is
    left as it was."""
    charge = await stack.charge(20_000)
    case_id = await stack.request_refund("alice", charge, 9_000)  # above auto-approval: people decide
    await stack.wait_for_status(case_id, "awaiting_approval")
    request = await _recorded_request(stack, case_id)
    carried = RefundCarry(context="submit", phase="", status=CaseStatus.EXECUTING)
    for workflow_id in (f"forged-{case_id}", case_id):
        with pytest.raises((WorkflowFailureError, WorkflowAlreadyStartedError)):
            handle = await stack.client.start_workflow(
                RefundWorkflow.run, RefundWorkflowInput(request=request, requester="mallory",
                                                        timings=stack.settings.timings(), carried=carried),
                id=workflow_id, task_queue=stack.settings.task_queue)
            await handle.result()
    assert await stack.provider_refunds(charge) == []
    row = await stack.wait_for_status(case_id, "awaiting_approval")
    assert row["reserved_amount"] == 9_000

    # under the case's own id once its workflow is over: the carried state alone is refused
    other_charge = await stack.charge(20_000)
    ended = await _failed_case(stack, other_charge)
    replayed = RefundWorkflowInput(request=await _recorded_request(stack, ended), requester="mallory",
                                   timings=stack.settings.timings(), carried=carried)
    handle = await stack.client.start_workflow(
        RefundWorkflow.run, replayed, id=ended, task_queue=stack.settings.task_queue,
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE)
    with pytest.raises(WorkflowFailureError) as failed:
        await handle.result()
    assert isinstance(failed.value.cause, ApplicationError) and failed.value.cause.type == errors.FORGED_START
    assert "carried" in failed.value.cause.message
    assert [r["status"] for r in await stack.provider_refunds(other_charge)] == ["failed"]


async def test_a_start_of_a_recorded_request_outside_its_own_case_moves_no_money(stack: Stack) -> None:
    """The request a case recorded, started straight in Temporal under another workflow id,
    or again under its own once its case ended (a provider's failure), passed validation
    (same terms), reserved again and, below auto-approval, refunded a second time. A run
    acts only as its case's one workflow (its id), and only on a case no run has taken yet."""
    charge = await stack.charge(10_000)
    case_id = await _failed_case(stack, charge)
    request = await _recorded_request(stack, case_id)
    for workflow_id in (f"forged-{case_id}", case_id):
        handle = await stack.client.start_workflow(
            RefundWorkflow.run, RefundWorkflowInput(request=request, requester="mallory",
                                                    timings=stack.settings.timings()),
            id=workflow_id, task_queue=stack.settings.task_queue,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE)
        with contextlib.suppress(WorkflowFailureError):
            outcome = await handle.result()
            assert outcome.state.status == "rejected"
    assert [r["status"] for r in await stack.provider_refunds(charge)] == ["failed"]
    after = await stack.store.cases.get(case_id)
    assert after is not None and (after["status"], after["reserved_amount"]) == ("refund_failed", 0)
    refused = [e for e in await stack.store.audit.trail(case_id) if e["action"] == "start_refused"]
    assert len(refused) == 1 and "another run took it" in refused[0]["detail"]["reason"]


async def test_a_start_of_a_swept_case_s_request_moves_no_money(stack: Stack) -> None:
    """A case whose workflow was terminated is swept to ops review (its reservation released
    where the provider holds no refund). Started again under its id with its recorded
    request, the run passed validation (ops review is not an end: a live workflow resumes a
    validation there), reserved again and acted on the stored decision behind ops' back.
    A swept case is ended for validation: start_refused, the row as the sweep left it."""
    charge = await stack.charge(20_000)
    case_id = await stack.request_refund("alice", charge, 9_000)
    await stack.wait_for_status(case_id, "awaiting_approval")
    await stack.client.get_workflow_handle(case_id).terminate("terminated in the Temporal UI")
    assert case_id in await sweep_cases_once(stack.store, stack.client, stack.providers, idle_seconds=0)
    handle = await stack.client.start_workflow(
        RefundWorkflow.run, RefundWorkflowInput(request=await _recorded_request(stack, case_id),
                                                requester="mallory", timings=stack.settings.timings()),
        id=case_id, task_queue=stack.settings.task_queue,
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE)
    assert (await handle.result()).state.status == "rejected"
    row = await stack.store.cases.get(case_id)
    assert row is not None and (row["status"], row["reserved_amount"]) == ("ops_review", 0)
    assert "start_refused" in await stack.actions(case_id)
    assert await stack.provider_refunds(charge) == []


async def test_a_run_started_again_under_another_requester_lets_no_one_approve_their_own_refund(
        stack: Stack) -> None:
    """The case's workflow is terminated and started again in Temporal with its recorded
    request but another requester: validation passed (the terms match), the round barred the
    requester the start named, so the real requester (also an approver) approved her own
    refund and the provider paid it. The submission's transaction reads who is behind the
    case from its row: no refund, whoever the run believes asked."""
    stack.tokens["rita"] = await stack.store.access.create_token(
        "rita", ["requester", "approver"], token="t-rita-forged-start", by="test")
    charge = await stack.charge(20_000)
    case_id = await stack.request_refund("rita", charge, 9_000)
    await stack.wait_for_status(case_id, "awaiting_approval")
    await stack.client.get_workflow_handle(case_id).terminate("terminated in the Temporal UI")
    handle = await stack.client.start_workflow(
        RefundWorkflow.run, RefundWorkflowInput(request=await _recorded_request(stack, case_id),
                                                requester="mallory", timings=stack.settings.timings()),
        id=case_id, task_queue=stack.settings.task_queue,
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE)
    await stack.wait_for_audit(case_id, "approval_requested", count=2)
    async with stack.api("rita") as api:
        await api.post(f"/v1/refund-requests/{case_id}/approvals",
                       json={"decision": "approve", "reason": "my own"})
    with contextlib.suppress(WorkflowFailureError):
        await handle.result()
    assert await stack.provider_refunds(charge) == []
    row = await stack.store.cases.get(case_id)
    assert row is not None and row["status"] == "ops_review"
    [refused] = [e for e in await stack.store.audit.trail(case_id) if e["action"] == "submission_refused"]
    assert "rita asked for" in refused["detail"]["reason"]
    # her approval is on record (what people did); nobody is told the refund goes ahead
    assert "approval_granted" in await stack.actions(case_id)
    assert "refund_approved" not in [n["kind"] for n in await stack.store.outbox.notices(case_id)]
