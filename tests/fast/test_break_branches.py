"""ReconciliationBreakWorkflow's branches against fake activities (see tests/fast/kit.py):
a break no case can take goes to people; approved it settles as resolved with its
approvers, denied it is dismissed, and only the settlement is asked to move money."""

import uuid

import pytest
from temporalio.client import Client

from domain import contracts
from domain.models import ApprovalSignal, Decision, ProviderRefund, ProviderRefundStatus, RoleRequirement
from domain.reconciliation import BreakApproval, BreakCase, BreakClass, BreakOutcome, BreakState
from tests.fast.kit import FakeActivities, fake_worker
from tests.fast.test_refund_branches import TIMINGS
from workflows.reconciliation import ReconciliationBreakWorkflow

SETTLE = contracts.SETTLE_BREAK


def amount_mismatch(break_id: int) -> BreakCase:
    """Our case holds 2500, the provider refunded 2400: no lifecycle move fixes that."""
    truth = ProviderRefund(provider="sandbox", refund_id="re_1", charge_id="ch_1", amount=2400,
                           currency="EUR", status=ProviderRefundStatus.SUCCEEDED, raw_status="succeeded",
                           reference="case-1")
    return BreakCase(break_id=break_id, break_class=BreakClass.AMOUNT_MISMATCH, provider="sandbox",
                     object_id="re_1", chain="case-1", case_id="case-1", case_holds_refund=True,
                     case_provider_status=ProviderRefundStatus.SUCCEEDED, truth=truth, ledger_delta=-100,
                     timings=TIMINGS)


@pytest.mark.parametrize(("decision", "state"), [(Decision.APPROVE, BreakState.RESOLVED),
                                                 (Decision.DENY, BreakState.DISMISSED)])
async def test_break_decided_by_people(client: Client, decision: Decision, state: BreakState) -> None:
    break_id = uuid.uuid4().int % 1_000_000_000
    fakes = FakeActivities({
        contracts.OPEN_BREAK_EXCEPTION.name: BreakApproval(
            tier="t1", requirements=(RoleRequirement(role="finance_approver"),)),
        SETTLE.name: BreakOutcome(break_id=break_id, state=state),
    })
    async with fake_worker(client, fakes) as queue:
        handle = await client.start_workflow(ReconciliationBreakWorkflow.run, amount_mismatch(break_id),
                                             id=f"recon-break-{break_id}", task_queue=queue)
        await fakes.seen("reconciliation_approval_requested")
        assert fakes.names(SETTLE) == []  # nothing settles before people decide
        await handle.signal(ReconciliationBreakWorkflow.approve, ApprovalSignal(
            approver="finance@example.com", roles=("finance_approver",), decision=decision, reason="checked"))
        outcome = await handle.result()
    assert outcome.state is state
    assert fakes.names(contracts.HAND_BREAK_TO_PAYOUT_CASE) == []
    settled = fakes.inputs(SETTLE)
    assert [(s.state, s.approvers) for s in settled] == [(state, ("finance@example.com",))]
