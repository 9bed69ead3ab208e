"""Reconciliation: a run over a provider's refunds in a window, and one exception case per
break it finds.

ReconciliationWorkflow pages through the provider batch by batch (the cursor lives in
PostgreSQL, written with each batch, so a retried, continued or restarted run goes on where
it stopped) and continues as new before its history grows large. ReconciliationBreakWorkflow
resolves one break through the governed path: it hands the provider's truth to the case's
own workflow when that one is running and would accept it (its rules post and notify), and
otherwise waits for the approvals a refund of that amount needs before any compensating
entry is posted.

Deterministic: no I/O, no clocks but workflow time; activities are called by name.
"""

from temporalio import workflow
from temporalio.exceptions import ApplicationError, FailureError

with workflow.unsafe.imports_passed_through():
    from domain.lifecycle import check_approval, unfilled
    from domain.models import ApprovalSignal, ApprovalVerdict, CaseEventInput, Decision, RoleRequirement
    from domain.reconciliation import (
        BatchInput,
        BatchResult,
        BreakApproval,
        BreakCase,
        BreakOutcome,
        BreakProgress,
        BreakSettlement,
        BreakState,
        ReconcileInput,
        RunSummary,
        RunWindow,
        lifecycle_can_fix,
        truth_event,
    )
    from workflows import retry

RECONCILER = "reconciliation"
"""The requester of every exception case (segregation of duties: it never approves)."""


@workflow.defn
class ReconciliationWorkflow:
    """One reconciliation run. Idempotent: the run row is opened once, each batch commits
    with the cursor past it, breaks are unique per provider, object and class."""

    @workflow.run
    async def run(self, inp: ReconcileInput) -> RunSummary:
        if inp.run_id is None:  # a scheduled action: this workflow is the run, over a trailing window
            until = workflow.now()
            inp = inp.model_copy(update={"run_id": workflow.info().workflow_id,
                                         "since": until - inp.options.window, "until": until})
        assert inp.run_id is not None and inp.since is not None and inp.until is not None
        await workflow.execute_activity(
            "open_reconciliation_run",
            RunWindow(run_id=inp.run_id, provider=inp.provider, kind=inp.kind, since=inp.since,
                      until=inp.until, requested_by=inp.requested_by), **retry.RECONCILE_STEP)
        batches = 0
        while True:
            result = await workflow.execute_activity(
                "reconcile_batch", BatchInput(run_id=inp.run_id, provider=inp.provider, options=inp.options),
                result_type=BatchResult, **retry.RECONCILE_BATCH)
            batches += 1
            if not result.has_more:
                break
            if batches >= inp.options.batches_per_run or workflow.info().is_continue_as_new_suggested():
                workflow.continue_as_new(inp)
        summary: RunSummary = await workflow.execute_activity(
            "finish_reconciliation_run", inp.run_id, result_type=RunSummary, **retry.RECONCILE_STEP)
        return summary


@workflow.defn
class ReconciliationBreakWorkflow:
    """One break's exception case (id `recon-break-<break id>`): handed to the running case
    workflow, or approved (then compensated), denied or expired. Nothing posts to the
    ledger here but the approved settlement."""

    def __init__(self) -> None:
        self._case: BreakCase | None = None
        self._state = BreakState.NEW
        self._requirements: tuple[RoleRequirement, ...] = ()
        self._approved: list[tuple[str, frozenset[str]]] = []
        self._denial: tuple[str, str] | None = None

    @workflow.update
    async def submit_approval(self, signal: ApprovalSignal) -> BreakProgress:
        """An approver's verdict (who comes from the relay's authentication), checked by the
        refund approval rules: tier roles, segregation of duties, one slot per person."""
        verdict = self._check(signal)  # again: another verdict may have landed since validation
        if verdict.accepted:
            if signal.decision is Decision.DENY:
                self._denial = (signal.approver, signal.reason)
            else:
                self._approved.append((signal.approver, frozenset(signal.roles)))
        assert self._case is not None
        await workflow.execute_activity(
            "record_case_event",
            CaseEventInput(refund_request_id=self._case.chain, actor=signal.approver,
                           action=f"reconciliation_approval_{signal.decision.value}"
                           if verdict.accepted else "reconciliation_approval_refused",
                           detail={"break_id": self._case.break_id, "reason": signal.reason,
                                   "roles": list(signal.roles), "refusal": verdict.reason}),
            **retry.CASE_EVENT)
        return BreakProgress(accepted=verdict.accepted, reason=verdict.reason, state=self._state,
                             missing_roles=tuple(self._missing()))

    @submit_approval.validator
    def _validate_approval(self, signal: ApprovalSignal) -> None:
        if self._state is not BreakState.AWAITING_APPROVAL:
            raise ApplicationError(f"exception case is {self._state.value}, not awaiting approval",
                                   type="NotAwaitingApproval")
        verdict = self._check(signal)
        if not verdict.accepted:
            raise ApplicationError(verdict.reason, type="ApprovalRefused")

    @workflow.run
    async def run(self, case: BreakCase) -> BreakOutcome:
        self._case = case
        if lifecycle_can_fix(case) and case.case_id is not None:
            try:
                await workflow.get_external_workflow_handle(case.case_id).signal(
                    "provider_event", truth_event(case, workflow.now()))
            except FailureError as err:  # the case workflow is closed: people decide
                workflow.logger.info("case %s cannot take the provider's state: %s", case.case_id, err)
            else:
                return await self._settle(BreakState.HANDED_TO_CASE)
        approval: BreakApproval = await workflow.execute_activity(
            "open_break_exception", case, result_type=BreakApproval, **retry.RECONCILE_STEP)
        self._requirements = approval.requirements
        self._state = BreakState.AWAITING_APPROVAL
        try:
            await workflow.wait_condition(lambda: self._denial is not None or not self._missing(),
                                          timeout=case.timings.approval_timeout)
        except TimeoutError:
            return await self._settle(BreakState.EXPIRED)
        if self._denial is not None:
            return await self._settle(BreakState.DISMISSED, (self._denial[0],), self._denial[1])
        return await self._settle(BreakState.RESOLVED, tuple(person for person, _ in self._approved))

    def _missing(self) -> list[str]:
        return unfilled(self._requirements, self._approved)

    def _check(self, signal: ApprovalSignal) -> ApprovalVerdict:
        assert self._case is not None
        return check_approval(signal, requester=RECONCILER, conflicted=frozenset(self._case.conflicted),
                              requirements=self._requirements, approved=self._approved)

    async def _settle(self, state: BreakState, approvers: tuple[str, ...] = (),
                      reason: str = "") -> BreakOutcome:
        assert self._case is not None
        self._state = state
        outcome: BreakOutcome = await workflow.execute_activity(
            "settle_break", BreakSettlement(break_id=self._case.break_id, state=state, approvers=approvers,
                                            reason=reason),
            result_type=BreakOutcome, **retry.RECONCILE_STEP)
        await workflow.wait_condition(workflow.all_handlers_finished)
        return outcome
