"""RefundWorkflow's branches against fake activities (see tests/fast/kit.py): what the
workflow decides from each answer, without relay, PostgreSQL or provider."""

import uuid
from datetime import timedelta

from temporalio.client import Client, WorkflowHandle
from temporalio.exceptions import ApplicationError

from domain import contracts, errors
from domain.integrations import AdviceReceipt
from domain.models import (
    ApprovalSignal,
    CaseStatus,
    Decision,
    EventKind,
    LedgerInput,
    LedgerKind,
    LedgerResult,
    PolicyDecision,
    ProviderEvent,
    ProviderRefund,
    ProviderRefundStatus,
    RefundOutcome,
    RefundReason,
    RefundRequest,
    RefundTimings,
    RefundWorkflowInput,
    RoleRequirement,
    ValidationResult,
    VerifyResult,
)
from tests.fast.kit import EPOCH, FakeActivities, fake_worker
from workflows.refund import RefundWorkflow

TIMINGS = RefundTimings(approval_timeout=timedelta(minutes=5), submit_timeout=timedelta(seconds=5),
                        status_poll_interval=timedelta(milliseconds=300), late_failure_window=timedelta(0),
                        approval_reminder=None, approval_escalation=None,
                        ledger_pending_after=timedelta(milliseconds=500),
                        provider_horizon=timedelta(milliseconds=200))
SUBMIT, VERIFY, LEDGER = (contracts.SUBMIT_PROVIDER_REFUND, contracts.VERIFY_PROVIDER_REFUND,
                          contracts.POST_LEDGER)
APPROVERS = (RoleRequirement(role="refund_approver"),)


def refund(case_id: str, status: ProviderRefundStatus = ProviderRefundStatus.SUCCEEDED) -> ProviderRefund:
    return ProviderRefund(provider="sandbox", refund_id=f"re_{case_id}", charge_id="ch_1", amount=2500,
                          currency="EUR", status=status, raw_status=status.value, reference=case_id,
                          failure_reason="bank_rejected" if status is ProviderRefundStatus.FAILED else None)


async def posted(inp: LedgerInput) -> LedgerResult:
    return LedgerResult(posting_key=f"{inp.kind.value}:{inp.provider_refund_id}", entry_id=1,
                        newly_posted=True)


def refund_fakes(case_id: str, *, auto_approve: bool = True) -> FakeActivities:
    """Every activity answering as on the happy path: valid, the policy's verdict, the
    refund succeeded at once, nothing found by verify, the ledger posted."""
    decision = PolicyDecision(auto_approve=auto_approve, rules_fired=("test",), policy_version="test",
                              tier=None if auto_approve else "t1",
                              requirements=() if auto_approve else APPROVERS)
    fakes = FakeActivities({
        contracts.VALIDATE_REFUND.name: ValidationResult(ok=True, remaining_before=2500,
                                                         amount_captured=2500),
        contracts.DECIDE_POLICY.name: decision,
        contracts.ADVISE_REFUND.name: AdviceReceipt(available=True, source="fake"),
        SUBMIT.name: refund(case_id),
        VERIFY.name: VerifyResult(refund=None),
        contracts.OPEN_DUPLICATE_REFUND_BREAK.name: True,
    })
    fakes.script(LEDGER, posted)
    return fakes


async def start(client: Client, task_queue: str, case_id: str,
                timings: RefundTimings = TIMINGS) -> WorkflowHandle[RefundWorkflow, RefundOutcome]:
    request = RefundRequest(refund_request_id=case_id, provider="sandbox", charge_id="ch_1", amount=2500,
                            currency="EUR", merchant_account="acct_1",
                            reason=RefundReason.REQUESTED_BY_CUSTOMER)
    inp = RefundWorkflowInput(request=request, requester="requester@example.com", timings=timings)
    return await client.start_workflow(RefundWorkflow.run, inp, id=case_id, task_queue=task_queue)


def new_case() -> str:
    return f"fast-{uuid.uuid4().hex[:12]}"


def unknown() -> ApplicationError:
    return ApplicationError("read timed out", type=errors.OUTCOME_UNKNOWN)


def verdict(decision: Decision) -> ApprovalSignal:
    return ApprovalSignal(approver="approver@example.com", roles=("refund_approver",), decision=decision)


async def test_auto_approved_refund_submits_once_and_settles(client: Client) -> None:
    case_id = new_case()
    fakes = refund_fakes(case_id)
    async with fake_worker(client, fakes) as queue:
        state = (await (await start(client, queue, case_id)).result()).state
    assert state.status is CaseStatus.SUCCEEDED
    assert state.ledger_postings == (f"refund_settled:re_{case_id}",)
    assert fakes.names(SUBMIT, VERIFY) == [SUBMIT.name]
    assert [i.kind for i in fakes.inputs(LEDGER)] == [LedgerKind.REFUND_SETTLED]
    assert "approval_requested" not in fakes.recorded()


async def test_approval_then_success(client: Client) -> None:
    case_id = new_case()
    fakes = refund_fakes(case_id, auto_approve=False)
    async with fake_worker(client, fakes) as queue:
        handle = await start(client, queue, case_id)
        await fakes.seen("approval_requested")
        assert (await handle.query(RefundWorkflow.state)).status is CaseStatus.AWAITING_APPROVAL
        assert fakes.names(SUBMIT) == []  # nothing moves before the approval
        await handle.signal(RefundWorkflow.approve, verdict(Decision.APPROVE))
        state = (await handle.result()).state
    assert state.status is CaseStatus.SUCCEEDED
    assert [a.approver for a in state.approvals] == ["approver@example.com"]
    assert fakes.names(SUBMIT) == [SUBMIT.name]


async def test_denied_refund_releases_and_never_submits(client: Client) -> None:
    case_id = new_case()
    fakes = refund_fakes(case_id, auto_approve=False)
    async with fake_worker(client, fakes) as queue:
        handle = await start(client, queue, case_id)
        await fakes.seen("approval_requested")
        await handle.signal(RefundWorkflow.approve, verdict(Decision.DENY))
        state = (await handle.result()).state
    assert state.status is CaseStatus.DENIED
    assert fakes.names(SUBMIT, LEDGER) == []
    released = [i for i in fakes.inputs(contracts.RECORD_CASE_EVENT) if i.release_reservation]
    assert [i.status for i in released] == [CaseStatus.DENIED]


async def test_unanswered_approval_expires(client: Client) -> None:
    case_id = new_case()
    fakes = refund_fakes(case_id, auto_approve=False)
    async with fake_worker(client, fakes) as queue:
        handle = await start(client, queue, case_id, TIMINGS.model_copy(
            update={"approval_timeout": timedelta(milliseconds=300)}))
        state = (await handle.result()).state
    assert state.status is CaseStatus.EXPIRED
    assert "approval_expired" in fakes.recorded()
    assert fakes.names(SUBMIT) == []


async def test_decline_fails_the_case_without_verify(client: Client) -> None:
    case_id = new_case()
    fakes = refund_fakes(case_id)
    fakes.script(SUBMIT, ApplicationError("insufficient funds", type=errors.DECLINED, non_retryable=True))
    async with fake_worker(client, fakes) as queue:
        state = (await (await start(client, queue, case_id)).result()).state
    assert state.status is CaseStatus.REFUND_FAILED
    assert state.failure_reason == "insufficient funds"
    assert fakes.names(SUBMIT, VERIFY, LEDGER) == [SUBMIT.name]


async def test_unknown_outcome_then_verify_finds_the_refund(client: Client) -> None:
    case_id = new_case()
    fakes = refund_fakes(case_id)
    fakes.script(SUBMIT, unknown())
    fakes.script(VERIFY, VerifyResult(refund=refund(case_id)))
    async with fake_worker(client, fakes) as queue:
        state = (await (await start(client, queue, case_id)).result()).state
    assert state.status is CaseStatus.SUCCEEDED
    assert state.provider_refund_id == f"re_{case_id}"
    assert fakes.names(SUBMIT, VERIFY) == [SUBMIT.name, VERIFY.name]  # found: never sent twice


async def test_unknown_outcome_not_found_resubmits_after_verify_with_the_same_key(client: Client) -> None:
    case_id = new_case()
    fakes = refund_fakes(case_id)
    fakes.script(SUBMIT, unknown(), refund(case_id))
    async with fake_worker(client, fakes) as queue:
        state = (await (await start(client, queue, case_id)).result()).state
    assert state.status is CaseStatus.SUCCEEDED
    assert fakes.names(SUBMIT, VERIFY) == [SUBMIT.name, VERIFY.name, SUBMIT.name]
    first, second = fakes.inputs(SUBMIT)
    assert first.idempotency_key == second.idempotency_key


async def test_ledger_pending_then_recovered(client: Client) -> None:
    case_id = new_case()
    fakes = refund_fakes(case_id)
    fakes.script(LEDGER, ApplicationError("ledger unavailable"), posted)
    async with fake_worker(client, fakes) as queue:
        state = (await (await start(client, queue, case_id)).result()).state
    assert state.status is CaseStatus.SUCCEEDED
    assert state.ledger_postings == (f"refund_settled:re_{case_id}",)
    recorded = fakes.recorded()
    assert recorded.index("ledger_pending") < recorded.index("ledger_recovered")
    assert CaseStatus.EXECUTED_LEDGER_PENDING in [i.status for i in fakes.inputs(contracts.RECORD_CASE_EVENT)]
    assert fakes.names(SUBMIT) == [SUBMIT.name]  # the provider is never asked again for the ledger


async def test_unexpected_status_goes_to_ops_review_and_keeps_asking(client: Client) -> None:
    case_id = new_case()
    fakes = refund_fakes(case_id)
    fakes.script(SUBMIT, unknown())
    weird = ApplicationError("status 'weird'", type=errors.UNEXPECTED_STATUS, non_retryable=True)
    fakes.script(VERIFY, weird, VerifyResult(refund=refund(case_id)))
    async with fake_worker(client, fakes) as queue:
        state = (await (await start(client, queue, case_id)).result()).state
    assert state.status is CaseStatus.SUCCEEDED
    ops = [i for i in fakes.inputs(contracts.RECORD_CASE_EVENT) if i.action == "unexpected_provider_status"]
    assert [i.status for i in ops] == [CaseStatus.OPS_REVIEW]
    assert fakes.names(SUBMIT, VERIFY) == [SUBMIT.name, VERIFY.name, VERIFY.name]


async def test_a_run_continued_twice_while_following_its_refund_never_submits_again(client: Client) -> None:
    """The provider's status read fails for a long time while the case follows its pending
    refund: the run continues as new, and the next run (resuming the read) continues as new
    again. That second run carried "submit" as where it was (a continued run never took the
    context it was given), so once a read answered "no refund" (a list missing it) the third
    run sent a second create for a case whose refund existed."""
    case_id = new_case()
    fakes = refund_fakes(case_id)
    fakes.script(SUBMIT, refund(case_id, ProviderRefundStatus.PENDING))
    weird = ApplicationError("status 'weird'", type=errors.UNEXPECTED_STATUS, non_retryable=True)
    fakes.script(VERIFY, *[weird] * 16, VerifyResult(refund=None), VerifyResult(refund=refund(case_id)))
    timings = TIMINGS.model_copy(update={"continue_as_new_after_events": 40,
                                         "status_poll_interval": timedelta(milliseconds=20)})
    async with fake_worker(client, fakes) as queue:
        handle = await start(client, queue, case_id, timings)
        state = (await handle.result()).state
        assert handle.first_execution_run_id is not None
        carried = await carried_contexts(client, case_id, handle.first_execution_run_id)
    assert state.status is CaseStatus.SUCCEEDED
    assert fakes.names(SUBMIT) == [SUBMIT.name]
    assert len(carried) >= 3 and carried[1:] == ["follow"] * (len(carried) - 1), carried


async def carried_contexts(client: Client, case_id: str, run_id: str | None) -> list[str | None]:
    """Where each run of the case says it was (its carried context; None for the first)."""
    contexts: list[str | None] = []
    while run_id is not None:
        events = (await client.get_workflow_handle(case_id, run_id=run_id).fetch_history()).events
        started = events[0].workflow_execution_started_event_attributes
        [inp] = await client.data_converter.decode(started.input.payloads, [RefundWorkflowInput])
        contexts.append(inp.carried.context if inp.carried else None)
        last = events[-1]
        run_id = (last.workflow_execution_continued_as_new_event_attributes.new_execution_run_id
                  if last.HasField("workflow_execution_continued_as_new_event_attributes") else None)
    return contexts


async def test_refused_credentials_go_to_ops_review_until_the_provider_answers(client: Client) -> None:
    case_id = new_case()
    fakes = refund_fakes(case_id)
    fakes.script(SUBMIT, ApplicationError("401", type=errors.CONFIGURATION_REFUSED, non_retryable=True))
    fakes.script(VERIFY, VerifyResult(refund=refund(case_id)))
    async with fake_worker(client, fakes) as queue:
        state = (await (await start(client, queue, case_id)).result()).state
    assert state.status is CaseStatus.SUCCEEDED
    recorded = fakes.recorded()
    assert recorded.index("provider_configuration_refused") < recorded.index("provider_answering_again")
    assert fakes.names(SUBMIT, VERIFY) == [SUBMIT.name, VERIFY.name]  # looked up, never sent again


async def test_no_status_lookup_waits_for_the_notification_in_ops_review(client: Client) -> None:
    case_id = new_case()
    fakes = refund_fakes(case_id)
    fakes.script(SUBMIT, unknown())
    fakes.script(VERIFY, ApplicationError("no lookup", type=errors.LOOKUP_UNSUPPORTED, non_retryable=True))
    async with fake_worker(client, fakes) as queue:
        handle = await start(client, queue, case_id)
        await fakes.seen("no_status_lookup_escalated")
        assert (await handle.query(RefundWorkflow.state)).status is CaseStatus.OPS_REVIEW
        await handle.signal(RefundWorkflow.provider_event,
                            notification(case_id, ProviderRefundStatus.SUCCEEDED))
        state = (await handle.result()).state
    assert state.status is CaseStatus.SUCCEEDED
    assert fakes.names(SUBMIT, VERIFY) == [SUBMIT.name, VERIFY.name]  # waited: never resubmitted
    assert "provider_notification_received" in fakes.recorded()


async def test_late_failure_after_success_reverses_the_ledger(client: Client) -> None:
    case_id = new_case()
    fakes = refund_fakes(case_id)
    async with fake_worker(client, fakes) as queue:
        handle = await start(client, queue, case_id, TIMINGS.model_copy(
            update={"late_failure_window": timedelta(minutes=5)}))
        await fakes.seen("refund_succeeded")
        await handle.signal(RefundWorkflow.provider_event, notification(case_id, ProviderRefundStatus.FAILED))
        state = (await handle.result()).state
    assert state.status is CaseStatus.REFUND_FAILED
    assert [i.kind for i in fakes.inputs(LEDGER)] == [LedgerKind.REFUND_SETTLED, LedgerKind.REFUND_REVERSED]
    assert fakes.names(SUBMIT) == [SUBMIT.name]


async def test_cancel_before_submit_releases_the_case(client: Client) -> None:
    case_id = new_case()
    fakes = refund_fakes(case_id, auto_approve=False)
    async with fake_worker(client, fakes) as queue:
        handle = await start(client, queue, case_id)
        await fakes.seen("approval_requested")
        await handle.cancel()
        state = (await handle.result()).state
    assert state.status is CaseStatus.CANCELED_BY_OPS
    assert fakes.names(SUBMIT) == []
    canceled = [i for i in fakes.inputs(contracts.RECORD_CASE_EVENT) if i.action == "canceled_by_ops"]
    assert [(i.status, i.release_reservation) for i in canceled] == [(CaseStatus.CANCELED_BY_OPS, True)]


def notification(case_id: str, status: ProviderRefundStatus) -> ProviderEvent:
    """The provider's webhook about the case's refund, as the relay signals it."""
    reported = refund(case_id, status)
    return ProviderEvent(provider="sandbox", event_id=f"evt_{status.value}_{case_id}",
                         event_type="refund.updated", kind=EventKind.REFUND_STATUS, body_sha256="0" * 64,
                         occurred_at=EPOCH, refund_id=reported.refund_id, charge_id=reported.charge_id,
                         refund_request_id=case_id,
                         amount=reported.amount, currency=reported.currency, status=status,
                         raw_status=status.value, failure_reason=reported.failure_reason)
