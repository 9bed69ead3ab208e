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

from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError, FailureError

with workflow.unsafe.imports_passed_through():
    from domain import contracts, errors
    from domain.lifecycle import check_approval, unfilled
    from domain.models import ApprovalProgress, ApprovalSignal, CaseEventInput, Decision, NoticeInput
    from domain.payouts import ProviderPayout
    from domain.reconciliation import (
        BatchInput,
        BreakApproval,
        BreakCase,
        BreakOutcome,
        BreakSettlement,
        BreakState,
        ReconcileInput,
        RunFailure,
        RunSummary,
        RunWindow,
        break_workflow_id,
        case_can_take,
        lifecycle_can_fix,
        truth_event,
    )
    from workflows import retry
    from workflows.approvals import ApprovalOutcome, ApprovalRound, ApprovingWorkflow

RECONCILER = "reconciliation"
"""The requester of every exception case (segregation of duties: it never approves)."""
RUN_OUTCOME_PATCH = "recon-run-failed"
"""A run whose step fails for good is recorded `failed` with the reason; before, it stayed running."""


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
        try:
            return await self._reconcile(inp)
        except ActivityError as err:
            if not workflow.patched(RUN_OUTCOME_PATCH):
                raise
            cause = err.cause
            reason = (f"{cause.type}: {cause.message}" if isinstance(cause, ApplicationError) and cause.type
                      else str(cause or err))
            await contracts.FAIL_RECONCILIATION_RUN(RunFailure(run_id=inp.run_id, reason=reason),
                                                    **retry.RECONCILE_STEP)
            raise ApplicationError(reason, type=errors.RECONCILIATION_FAILED, non_retryable=True) from err

    async def _reconcile(self, inp: ReconcileInput) -> RunSummary:
        """Opens the run, reads it batch by batch, then writes its report."""
        assert inp.run_id is not None and inp.since is not None and inp.until is not None
        await contracts.OPEN_RECONCILIATION_RUN(
            RunWindow(run_id=inp.run_id, provider=inp.provider, kind=inp.kind, since=inp.since,
                      until=inp.until, requested_by=inp.requested_by), **retry.RECONCILE_STEP)
        batches = 0
        while True:
            result = await contracts.RECONCILE_BATCH(
                BatchInput(run_id=inp.run_id, provider=inp.provider, options=inp.options),
                **retry.RECONCILE_BATCH)
            batches += 1
            if not result.has_more:
                break
            if batches >= inp.options.batches_per_run or workflow.info().is_continue_as_new_suggested():
                workflow.continue_as_new(inp)
        summary: RunSummary = await contracts.FINISH_RECONCILIATION_RUN(inp.run_id, **retry.RECONCILE_STEP)
        return summary


APPROVAL_ROUND_PATCH = "recon-break-approval-round"
"""Breaks wait on the shared ApprovalRound (reminders, escalation); before it, a bare wait."""
PAYOUT_BREAK_PATCH = "recon-payout-breaks"
"""Payout breaks are handed to the payout's exception case first."""
STORED_CASE_PATCH = "break-acts-on-its-row-1"
"""The run acts on its break as stored, under the break's own workflow id: a run started
straight in Temporal with made-up facts (a refund "failed" that succeeded) handed them to the
case as provider news, which this worker's seal made good; before, the start input was
taken as true."""
UNHELD_REFUND_PATCH = "recon-hand-unheld-refund-1"
"""A refund carrying the case's reference, found while the case knows none, is handed to the
running case (`case_can_take`); before, it waited for a compensation's approvals while the
case's own lookup could post it too (the ledger doubled)."""


@workflow.defn
class ReconciliationBreakWorkflow(ApprovingWorkflow):
    """One break's exception case (id `recon-break-<break id>`): handed to the running case
    workflow (a refund's, or the payout's exception case), or approved (then compensated),
    denied or expired, with the approval round every case shares. Nothing posts to the
    ledger here but the approved settlement."""

    def __init__(self) -> None:
        self._case: BreakCase | None = None
        self._state = BreakState.NEW
        self._round = ApprovalRound()
        self._on_round = True
        # the bare wait of workflows started before the approval round (replay only)
        self._approved: list[tuple[str, frozenset[str]]] = []
        self._denial: tuple[str, str] | None = None

    async def take_approval(self, signal: ApprovalSignal) -> ApprovalProgress:
        """The round takes the verdict; a break opened before the round records it here."""
        if self._on_round:
            return await super().take_approval(signal)
        verdict = check_approval(signal, requester=RECONCILER, conflicted=self._round.conflicted,
                                 requirements=self._round.requirements, approved=self._approved)
        if verdict.accepted:
            if signal.decision is Decision.DENY:
                self._denial = (signal.approver, signal.reason)
            else:
                self._approved.append((signal.approver, frozenset(signal.roles)))
        await self._event(f"reconciliation_approval_{signal.decision.value}" if verdict.accepted
                          else "reconciliation_approval_refused", signal.approver,
                          {"reason": signal.reason, "roles": list(signal.roles), "refusal": verdict.reason})
        return ApprovalProgress(accepted=verdict.accepted, reason=verdict.reason, status=self._state.value,
                                missing_roles=tuple(self._legacy_missing()))

    @workflow.run
    async def run(self, case: BreakCase) -> BreakOutcome:
        if workflow.patched(STORED_CASE_PATCH):
            if (found := workflow.info().workflow_id) != break_workflow_id(case.break_id):
                raise ApplicationError(f"workflow id {found!r} is not break {case.break_id}'s",
                                       type=errors.FORGED_START, non_retryable=True)
            case = await contracts.LOAD_BREAK_CASE(case, **retry.RECONCILE_STEP)
        self._case = case
        if isinstance(case.truth, ProviderPayout) and workflow.patched(PAYOUT_BREAK_PATCH):
            if await contracts.HAND_BREAK_TO_PAYOUT_CASE(case, **retry.RECONCILE_STEP):
                return await self._settle(BreakState.HANDED_TO_CASE)
        elif case.case_id is not None and (lifecycle_can_fix(case) or (
                case_can_take(case) and workflow.patched(UNHELD_REFUND_PATCH))):
            try:
                await workflow.get_external_workflow_handle(case.case_id).signal(
                    "provider_event", truth_event(case, workflow.now()))
            except FailureError as err:  # the case workflow is closed: people decide
                workflow.logger.info("case %s cannot take the provider's state: %s", case.case_id, err)
            else:
                return await self._settle(BreakState.HANDED_TO_CASE)
        approval: BreakApproval = await contracts.OPEN_BREAK_EXCEPTION(case, **retry.RECONCILE_STEP)
        self._round.requirements, self._round.tier = approval.requirements, approval.tier
        self._round.requester, self._round.conflicted = RECONCILER, frozenset(case.conflicted)
        self._on_round = workflow.patched(APPROVAL_ROUND_PATCH)
        self._state = BreakState.AWAITING_APPROVAL
        if not self._on_round:
            return await self._bare_wait(case)
        if await self._round.collect(self, case.timings):
            return await self._settle(BreakState.RESOLVED, tuple(a.approver for a in self._round.approvals))
        denial = next((a for a in self._round.approvals if a.decision is Decision.DENY), None)
        if denial is None:
            return await self._settle(BreakState.EXPIRED)
        return await self._settle(BreakState.DISMISSED, (denial.approver,), denial.reason)

    async def _bare_wait(self, case: BreakCase) -> BreakOutcome:
        """The approval wait of breaks opened before the approval round: expiry only."""
        try:
            await workflow.wait_condition(lambda: self._denial is not None or not self._legacy_missing(),
                                          timeout=case.timings.approval_timeout)
        except TimeoutError:
            return await self._settle(BreakState.EXPIRED)
        if self._denial is not None:
            return await self._settle(BreakState.DISMISSED, (self._denial[0],), self._denial[1])
        return await self._settle(BreakState.RESOLVED, tuple(person for person, _ in self._approved))

    def _legacy_missing(self) -> list[str]:
        return unfilled(self._round.requirements, self._approved)

    # -- the approval round calls back here ---------------------------------------------------

    def approval_status(self) -> tuple[bool, str]:
        return self._state is BreakState.AWAITING_APPROVAL, self._state.value

    async def approval_step(self, action: str, outcome: ApprovalOutcome | None = None, *,
                            actor: str = "workflow", detail: dict[str, Any] | None = None) -> None:
        """The round's steps on the break's chain; the break's state moves when it settles."""
        await self._event(f"reconciliation_{action}", actor, detail or {})

    async def approval_notice(self, kind: str, audience: str, detail: dict[str, Any]) -> None:
        """Once per break, round and kind: `approval_needed` dedups against the notice the
        exception's opening already queued; the requester's notices go to ops (the
        reconciler has no inbox)."""
        assert self._case is not None
        case = self._case
        suffix = f":reopen-{case.reopened}" if case.reopened else ""
        key = (f"reconciliation_approval:{case.break_id}" if kind == "approval_needed"
               else f"reconciliation_{kind}:{case.break_id}")
        await contracts.QUEUE_NOTICE(
            NoticeInput(refund_request_id=case.chain, kind=f"reconciliation_{kind}",
                        audience="ops" if audience == "requester" else audience,
                        dedup_key=key + suffix,
                        detail={"break_id": case.break_id, **detail}),
            **retry.CASE_EVENT)

    async def _event(self, action: str, actor: str, detail: dict[str, Any]) -> None:
        assert self._case is not None
        await contracts.RECORD_CASE_EVENT(
            CaseEventInput(refund_request_id=self._case.chain, actor=actor, action=action,
                           detail={"break_id": self._case.break_id, **detail}),
            **retry.CASE_EVENT)

    async def _settle(self, state: BreakState, approvers: tuple[str, ...] = (),
                      reason: str = "") -> BreakOutcome:
        assert self._case is not None
        self._state = state
        outcome: BreakOutcome = await contracts.SETTLE_BREAK(
            BreakSettlement(break_id=self._case.break_id, state=state, approvers=approvers,
                            reason=reason, round=self._case.reopened),
            **retry.RECONCILE_STEP)
        await self.approvals_settled()
        await workflow.wait_condition(workflow.all_handlers_finished)
        return outcome
