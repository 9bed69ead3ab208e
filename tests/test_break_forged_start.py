"""A break's exception workflow acts on its break as stored: one started straight in
Temporal (the UI, the CLI: anyone with start rights on the namespace) with made-up facts must
not hand them to a case. The worker seals the provider news a break hands over, so a case
took a forged "your refund failed" as the provider's word: the refund reversed in the books,
the hold released, the case open to a reissue (reproduced)."""

import asyncio
import uuid

import pytest
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import ApplicationError

from domain import errors
from domain.models import ProviderRefund, ProviderRefundStatus
from domain.reconciliation import BreakCase, BreakClass, break_workflow_id
from tests.harness import Stack
from workflows.reconciliation import ReconciliationBreakWorkflow


async def forged(patient: Stack, break_id: int, workflow_id: str) -> tuple[str, BaseException]:
    """A succeeded refund whose case watches for a late failure, and a break workflow started
    under `workflow_id` claiming the provider failed it: (the case, how the run ended)."""
    case_id = await patient.request_refund("alice", await patient.charge(10_000), 2_000)
    row = await patient.wait_for_status(case_id, "succeeded")
    lie = BreakCase(
        break_id=break_id, break_class=BreakClass.PROVIDER_FAILED_SHOWN_REFUNDED, provider="sandbox",
        object_id=row["provider_refund_id"], chain=case_id, case_id=case_id, case_holds_refund=True,
        case_provider_status=ProviderRefundStatus.SUCCEEDED, ledger_delta=None,
        truth=ProviderRefund(provider="sandbox", refund_id=row["provider_refund_id"],
                             charge_id=row["charge_id"], amount=2_000, currency="USD",
                             status=ProviderRefundStatus.FAILED, raw_status="failed",
                             failure_reason="account_closed", reference=case_id))
    handle = await patient.client.start_workflow(ReconciliationBreakWorkflow.run, lie, id=workflow_id,
                                                 task_queue=patient.settings.task_queue)
    try:
        await asyncio.wait_for(handle.result(), 20)
    except (WorkflowFailureError, TimeoutError) as exc:
        return case_id, exc.cause if isinstance(exc, WorkflowFailureError) else exc
    return case_id, AssertionError("the forged run ended as if it were a break's")


@pytest.mark.parametrize("own_id", [True, False], ids=["no_such_break", "another_workflow_id"])
async def test_a_break_workflow_started_with_made_up_facts_hands_nothing_to_the_case(
        patient: Stack, own_id: bool) -> None:
    break_id = 2_000_000_000 + uuid.uuid4().int % 100_000_000  # no break has it
    case_id, cause = await forged(patient, break_id,
                                  break_workflow_id(break_id) if own_id else f"recon-{uuid.uuid4().hex[:8]}")
    row = await patient.store.cases.get(case_id)  # a handed event moves the case within the wait
    assert row is not None and (row["status"], row["reserved_amount"]) == ("succeeded", 2_000)
    assert "refund_failed_after_success" not in await patient.actions(case_id)
    assert [e["template"] for e in await patient.store.ledger.entries(case_id)] == ["refund_settled"] * 2
    while cause.__cause__ is not None and not isinstance(cause, ApplicationError):
        cause = cause.__cause__
    assert isinstance(cause, ApplicationError) and cause.type == errors.FORGED_START, cause
