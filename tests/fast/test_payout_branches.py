"""PayoutReversalWorkflow's branches against fake activities (see tests/fast/kit.py): the
runbook, its rollback when the compensating entry does not land, and a reissue."""

import asyncio
import uuid
from datetime import timedelta

import pytest
from temporalio.client import Client, WorkflowHandle
from temporalio.exceptions import ApplicationError

from domain import contracts
from domain.models import ApprovalSignal, Decision, LedgerKind, LedgerResult, PolicyDecision, RoleRequirement
from domain.payouts import (
    Admission,
    AdmitResult,
    HoldResult,
    LinkedTicket,
    PayoutAtProvider,
    PayoutCaseInput,
    PayoutCaseState,
    PayoutCaseStatus,
    PayoutDecision,
    PayoutEvent,
    PayoutSnapshot,
    PayoutStatus,
    ProviderPayout,
    ProviderPayoutStatus,
    ReissueAsk,
    ReleaseResult,
    TicketResult,
    TriageReceipt,
)
from tests.fast.kit import EPOCH, FakeActivities, fake_worker
from tests.fast.test_refund_branches import TIMINGS
from workflows.payout import PayoutReversalWorkflow

HOLD, REVERSAL, RELEASE, TICKET, REISSUE = (contracts.HOLD_PAYOUT, contracts.POST_PAYOUT_REVERSAL,
                                            contracts.RELEASE_PAYOUT_HOLD, contracts.OPEN_PAYOUT_TICKET,
                                            contracts.REISSUE_PAYOUT)
RUNBOOK = (HOLD, REVERSAL, RELEASE, TICKET, REISSUE)
APPROVE = ApprovalSignal(approver="approver@example.com", roles=("payments_approver",),
                         decision=Decision.APPROVE)


def snapshot(status: PayoutStatus = PayoutStatus.PAID) -> PayoutSnapshot:
    return PayoutSnapshot(id="po-1", provider="sandbox", provider_payout_id="po_1", beneficiary_id="ben-1",
                          amount=5000, currency="EUR", status=status)


def payout_fakes() -> FakeActivities:
    decision = PolicyDecision(auto_approve=False, rules_fired=("test",), policy_version="test", tier="t1",
                              requirements=(RoleRequirement(role="payments_approver"),))
    return FakeActivities({
        contracts.ADMIT_PAYOUT_EVENT.name: AdmitResult(admission=Admission.OPEN, payout=snapshot()),
        contracts.TRIAGE_PAYOUT_EXCEPTION.name: TriageReceipt(recorded=True, source="fake"),
        contracts.DECIDE_PAYOUT_REVERSAL.name: PayoutDecision(
            decision=decision, hold_beneficiary_payouts=False, rollback_hold_on_ledger_failure=True),
        contracts.READ_PAYOUT_AT_PROVIDER.name: PayoutAtProvider(status=ProviderPayoutStatus.FAILED),
        HOLD.name: HoldResult(held_from=PayoutStatus.PAID, newly_held=True, beneficiary_held=False),
        REVERSAL.name: LedgerResult(posting_key="payout_reversed:po-1", entry_id=1, newly_posted=True),
        RELEASE.name: ReleaseResult(rolled_back=True, posted=False, restored=PayoutStatus.PAID),
        TICKET.name: TicketResult(ticket_ref="pending", newly_queued=True, notice_key="po-1:ticket"),
        contracts.LINK_PAYOUT_TICKET.name: LinkedTicket(ticket_ref="INC0001", filed=True),
        REISSUE.name: snapshot().model_copy(update={"id": "po-1-r1", "provider_payout_id": "po_2",
                                                    "reissue_of": "po-1"}),
        contracts.POST_LEDGER.name: LedgerResult(posting_key="payout_reissued:po_2", entry_id=2,
                                                 newly_posted=True),
    })


def payout_event(event_id: str, status: ProviderPayoutStatus) -> PayoutEvent:
    """A verified webhook about payout po_1, as the relay signals it."""
    payout = ProviderPayout(provider="sandbox", payout_id="po_1", amount=5000, currency="EUR",
                            status=status, raw_status=status.value)
    return PayoutEvent(provider="sandbox", event_id=event_id, event_type=f"payout.{status.value}",
                       body_sha256="0" * 64, occurred_at=EPOCH, payout=payout)


async def start(client: Client, task_queue: str, *,
                reissue_window: timedelta) -> WorkflowHandle[PayoutReversalWorkflow, PayoutCaseState]:
    """Signal-with-start with the payout's failure, as the relay does."""
    case_id = f"sandbox-payout-{uuid.uuid4().hex[:12]}"
    return await client.start_workflow(
        PayoutReversalWorkflow.run, PayoutCaseInput(case_id=case_id, provider="sandbox", payout_id="po_1",
                                                    timings=TIMINGS, reissue_window=reissue_window),
        id=case_id, task_queue=task_queue, start_signal="payout_event",
        start_signal_args=[payout_event("evt_1", ProviderPayoutStatus.FAILED)])


async def approved(client: Client, fakes: FakeActivities,
                   reissue_window: timedelta = timedelta(milliseconds=200)) -> PayoutCaseState:
    """A case opened and its reversal approved as soon as asked, run to its end."""
    async with fake_worker(client, fakes) as queue:
        handle = await start(client, queue, reissue_window=reissue_window)
        await fakes.seen("approval_requested")
        await handle.signal(PayoutReversalWorkflow.approve, APPROVE)
        return await handle.result()


async def test_approved_runbook_holds_reverses_tickets_and_notifies(client: Client) -> None:
    fakes = payout_fakes()
    async with fake_worker(client, fakes) as queue:
        handle = await start(client, queue, reissue_window=timedelta(milliseconds=200))
        await fakes.seen("approval_requested")
        assert fakes.names(*RUNBOOK) == []  # nothing is held before the approval
        await handle.signal(PayoutReversalWorkflow.approve, APPROVE)
        state = await handle.result()
    assert state.status is PayoutCaseStatus.REMEDIATED
    assert state.runbook == ("hold", "compensating_entry", "ticket", "notice")
    assert fakes.names(*RUNBOOK) == [HOLD.name, REVERSAL.name, TICKET.name]
    assert fakes.recorded()[-1] == "reissue_window_closed"
    assert [i.kind for i in fakes.inputs(contracts.QUEUE_NOTICE)][-1] == "payout_exception_remediated"


@pytest.mark.parametrize("shown", [PayoutAtProvider(status=ProviderPayoutStatus.PAID),
                                   PayoutAtProvider(unread="sandbox holds no payout po_1")],
                         ids=["paid", "none_held"])
async def test_an_approved_reversal_the_provider_does_not_show_failed_holds_and_books_nothing(
        client: Client, shown: PayoutAtProvider) -> None:
    fakes = payout_fakes()
    fakes.script(contracts.READ_PAYOUT_AT_PROVIDER, shown)
    state = await approved(client, fakes)
    assert state.status is PayoutCaseStatus.OPS_REVIEW and state.runbook == ()
    assert fakes.names(HOLD, REVERSAL) == []
    assert fakes.recorded()[-1] == "payout_not_failed_at_provider"
    told = [(i.kind, i.audience) for i in fakes.inputs(contracts.QUEUE_NOTICE)]
    assert {("payout_not_failed_at_provider", "payments_ops"),
            ("payout_not_failed_at_provider", "finance")} <= set(told)


async def test_an_event_that_lands_while_the_case_reads_the_provider_is_taken_before_it_ends(
        client: Client) -> None:
    """The case found the payout not failed and ends in ops review: a failure the relay
    signalled meanwhile goes through the gate (onto the timeline), never left in the inbox."""
    fakes = payout_fakes()
    signalled = asyncio.Event()

    async def paid_once_signalled(_: object) -> PayoutAtProvider:
        await signalled.wait()
        return PayoutAtProvider(status=ProviderPayoutStatus.PAID)

    fakes.script(contracts.READ_PAYOUT_AT_PROVIDER, paid_once_signalled)
    async with fake_worker(client, fakes) as queue:
        handle = await start(client, queue, reissue_window=timedelta(milliseconds=200))
        await fakes.seen("approval_requested")
        await handle.signal(PayoutReversalWorkflow.approve, APPROVE)
        while not fakes.inputs(contracts.READ_PAYOUT_AT_PROVIDER):
            await asyncio.sleep(0.05)
        await handle.signal(PayoutReversalWorkflow.payout_event,
                            payout_event("evt_2", ProviderPayoutStatus.FAILED))
        signalled.set()
        state = await handle.result()
    assert state.status is PayoutCaseStatus.OPS_REVIEW
    admitted = [(i.event.event_id, i.case_open) for i in fakes.inputs(contracts.ADMIT_PAYOUT_EVENT)]
    assert admitted == [("evt_1", False), ("evt_2", True)]


async def test_a_provider_with_no_payout_lookup_leaves_the_signed_failure_standing(client: Client) -> None:
    fakes = payout_fakes()
    fakes.script(contracts.READ_PAYOUT_AT_PROVIDER, PayoutAtProvider(unread="no lookup", lookup=False))
    state = await approved(client, fakes)
    assert state.status is PayoutCaseStatus.REMEDIATED
    assert fakes.names(HOLD, REVERSAL) == [HOLD.name, REVERSAL.name]
    assert "payout_status_unconfirmed" in fakes.recorded()


async def test_an_event_that_lands_while_approvers_decide_goes_through_the_gate_at_once(
        client: Client) -> None:
    fakes = payout_fakes()
    admit = contracts.ADMIT_PAYOUT_EVENT
    fakes.script(admit, AdmitResult(admission=Admission.OPEN, payout=snapshot()),
                 AdmitResult(admission=Admission.JOIN, payout=snapshot()))
    async with fake_worker(client, fakes) as queue:
        handle = await start(client, queue, reissue_window=timedelta(milliseconds=200))
        await fakes.seen("approval_requested")
        await handle.signal(PayoutReversalWorkflow.payout_event,
                            payout_event("evt_2", ProviderPayoutStatus.REVERSED))
        while len(fakes.inputs(admit)) < 2:  # before any verdict (the test's timeout bounds it)
            await asyncio.sleep(0.05)
        assert (await handle.query(PayoutReversalWorkflow.state)).status is PayoutCaseStatus.AWAITING_APPROVAL
        assert fakes.names(*RUNBOOK) == []
        await handle.signal(PayoutReversalWorkflow.approve, APPROVE)
        state = await handle.result()
    admitted = [(i.event.event_id, i.case_open) for i in fakes.inputs(admit)]
    assert admitted == [("evt_1", False), ("evt_2", True)]
    assert state.status is PayoutCaseStatus.REMEDIATED


async def test_denied_case_holds_nothing(client: Client) -> None:
    fakes = payout_fakes()
    async with fake_worker(client, fakes) as queue:
        handle = await start(client, queue, reissue_window=timedelta(minutes=5))
        await fakes.seen("approval_requested")
        deny = APPROVE.model_copy(update={"decision": Decision.DENY})
        await handle.signal(PayoutReversalWorkflow.approve, deny)
        state = await handle.result()
    assert state.status is PayoutCaseStatus.DENIED
    assert state.runbook == ()
    assert fakes.names(*RUNBOOK) == []


async def test_compensating_entry_not_posted_rolls_the_hold_back(client: Client) -> None:
    fakes = payout_fakes()
    fakes.script(REVERSAL, ApplicationError("ledger unavailable"))
    state = await approved(client, fakes, reissue_window=timedelta(minutes=5))
    assert state.status is PayoutCaseStatus.ROLLED_BACK
    assert state.runbook == ("hold", "rollback")
    assert fakes.names(HOLD, RELEASE, TICKET) == [HOLD.name, RELEASE.name, TICKET.name]
    assert [i.priority for i in fakes.inputs(TICKET)] == ["high"]
    audiences = [i.audience for i in fakes.inputs(contracts.QUEUE_NOTICE) if i.kind == "payout_ledger_failed"]
    assert audiences == ["finance", "payments_ops"]


async def test_reissue_request_approved_pays_once_and_posts(client: Client) -> None:
    fakes = payout_fakes()
    async with fake_worker(client, fakes) as queue:
        handle = await start(client, queue, reissue_window=timedelta(minutes=5))
        await fakes.seen("approval_requested")
        await handle.signal(PayoutReversalWorkflow.approve, APPROVE)
        await fakes.seen("runbook_completed")
        progress = await handle.execute_update(PayoutReversalWorkflow.request_reissue, ReissueAsk(
            requester="ops@example.com", roles=("payments_ops",), reason="beneficiary fixed their account"))
        assert progress.status == PayoutCaseStatus.AWAITING_REISSUE_APPROVAL.value
        await handle.signal(PayoutReversalWorkflow.approve, APPROVE)
        state = await handle.result()
    assert state.status is PayoutCaseStatus.REISSUED
    assert state.reissue_payout_id == "po-1-r1"
    assert fakes.names(REISSUE) == [REISSUE.name]
    assert [i.kind for i in fakes.inputs(contracts.POST_LEDGER)] == [LedgerKind.PAYOUT_REISSUED]
