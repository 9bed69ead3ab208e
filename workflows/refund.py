"""RefundWorkflow: one governed refund, from request to a settled ledger.

Workflow id == refund_request_id, so every entry point that asks for the same refund
reaches this one execution. Money moves at most once: the provider submit is attempted
only after validation, policy and approval, and an ambiguous answer is verified at the
provider before any second submit. Idempotency of each step lives in its activity.
"""

import asyncio
from datetime import datetime
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError, FailureError

with workflow.unsafe.imports_passed_through():
    from domain import contracts, errors
    from domain.events import Observation
    from domain.integrations import AdviseInput
    from domain.models import (
        CaseState,
        CaseStatus,
        CaseWrite,
        EventKind,
        PolicyDecision,
        PolicyInput,
        ProviderEvent,
        ProviderRefund,
        RefundOutcome,
        RefundRequest,
        RefundWorkflowInput,
        ValidationResult,
        Vetted,
    )
    from domain.seals import UNSEALED_SENDER
    from workflows import retry
    from workflows.approvals import (
        LATE_VERDICTS_PATCH,
        ApprovalOutcome,
        ApprovalRound,
    )
    from workflows.history import forged_start
    from workflows.news import NewsGate
    from workflows.refund_case import (
        APPROVAL_WITH_SUBMIT_PATCH,
        APPROVED_NOTICE_PATCH,
        DISPATCH_PATCH,
        INTEGRATIONS_PATCH,
        LOCAL_VALIDATION_PATCH,
        PROVIDER_SCOPED_WAIT_PATCH,
        TRIPS_PATCH,
        VERDICTS_COMMITTED_PATCH,
    )
    from workflows.refund_lifecycle import RefundLifecycle


# What each approval step does to a refund case: its status, and the reservation released.
APPROVAL_STEPS = {ApprovalOutcome.REQUESTED: (CaseStatus.AWAITING_APPROVAL, False),
                  ApprovalOutcome.DENIED: (CaseStatus.DENIED, True),
                  ApprovalOutcome.EXPIRED: (CaseStatus.EXPIRED, True)}
# The steps that record a verdict: what they write depends on the order verdicts were taken in.
VERDICT_STEPS = frozenset({"approval_granted", "approval_denied", "approval_refused"})


@workflow.defn
class RefundWorkflow(RefundLifecycle):
    """Validate → policy → (approvals) → submit once → verify when unsure → ledger → watch."""

    @workflow.init
    def __init__(self, inp: RefundWorkflowInput) -> None:
        self._request: RefundRequest | None = inp.request
        self._timings = inp.timings
        self._status = CaseStatus.REQUESTED
        self._decision: PolicyDecision | None = None
        self._round = ApprovalRound()
        self._event_inbox: list[ProviderEvent] = []
        self._event_ids: set[str] = set()
        self._refund: ProviderRefund | None = None
        self._failure_reason: str | None = None
        self._moved_on: str | None = None  # why a submit was refused: the case moved on under it
        self._postings: list[str] = []
        self._events_seen = 0
        self._succeeded_at: datetime | None = None
        self._outbox: list[str] = []
        self._courier: asyncio.Task[None] | None = None
        self._advising: asyncio.Task[None] | None = None
        self._holding = False  # the courier waits: a submit and its first settlement are under way
        self._trips = False  # the fewer-round-trips shape (TRIPS_PATCH)
        self._dispatched = False  # notices delivered by the worker pool (DISPATCH_PATCH)
        self._local_validation = False  # validation as a local activity (LOCAL_VALIDATION_PATCH)
        self._approved_folded = False  # the deciding approval writes its notice (APPROVED_NOTICE_PATCH)
        self._approval_with_submit = False  # ... with the submit's intent (APPROVAL_WITH_SUBMIT_PATCH)
        self._deferred = ()  # written with the case's next write
        self._unsubmitted = ()  # handed to a submit, not known written
        self._rewritten_on_cancel = None  # a write a cancel must not lose, until it is done
        self._closing = False
        self._provider_scoped = False
        self._charge_scoped = False  # a wait by reference takes only the case's charge's refunds
        self._follow_scoped = False  # a wait while following takes only the followed refund's word
        self._lookup_escalated = False
        self._duplicates: set[str] = set()
        self._mismatched = False  # the provider's refund is not what was asked: ops review
        self._found_duplicates: list[ProviderRefund] = []  # seen by a lookup, not reported yet
        self._reporting: list[tuple[ProviderRefund, str]] = []  # duplicates being reported (source)
        # a provider state being applied (ledger, notices, status), redone if cancelled midway
        self._applying: tuple[Observation, ProviderRefund, dict[str, Any]] | None = None
        self._validating: asyncio.Future[Vetted] | None = None
        self._cancel_requested = False
        self._input: RefundWorkflowInput | None = inp
        self._context = "submit"  # or "follow": where a continued run picks up
        self._escalated: str | None = None
        self._escalations = 0  # provider incidents in this run: each its own notice
        self._status_before_escalation = CaseStatus.REQUESTED
        self._attempt = 0  # submits made, across continued runs
        self._submit_ended: datetime | None = None  # when the last unanswered submit ended
        self._round.requester = inp.requester
        self._round.conflicted = frozenset(inp.request.trigger_identities)
        self._news = NewsGate()
        if inp.carried is not None:
            self._restore(inp.carried)

    # -- interface ---------------------------------------------------------------------

    @workflow.signal
    def provider_event(self, event: ProviderEvent) -> None:
        """A verified webhook about this case (may be late, duplicated or out of order),
        taken only under the relay's or a worker's seal (`NewsGate`)."""
        self._events_seen += 1
        if (admitted := self._news.admit_refund(event, self._record_refused_news)) is None:
            return
        event = admitted
        if event.event_id in self._event_ids:  # a re-driven delivery acts once
            return
        self._event_ids.add(event.event_id)
        self._event_inbox.append(event)

    async def _record_refused_news(self, action: str, detail: dict[str, Any]) -> None:
        await contracts.RECORD_CASE_EVENT(self._case_event(action, actor=UNSEALED_SENDER, detail=detail),
                                          **retry.CASE_EVENT)

    @workflow.query
    def state(self) -> CaseState:
        """The case as this workflow knows it."""
        request = self._request
        return CaseState(
            refund_request_id=request.refund_request_id if request else workflow.info().workflow_id,
            status=self._status, amount=request.amount if request else 0,
            currency=request.currency if request else "",
            provider_refund_id=self._refund.refund_id if self._refund else None,
            provider_status=self._refund.status if self._refund else None,
            failure_reason=self._failure_reason, decision=self._decision,
            approvals=tuple(self._round.approvals), refused_approvals=tuple(self._round.refused),
            ledger_postings=tuple(self._postings), events_seen=self._events_seen,
        )

    @workflow.run
    async def run(self, inp: RefundWorkflowInput) -> RefundOutcome:
        if refusal := forged_start(inp.request.refund_request_id, inp.carried):
            raise ApplicationError(refusal, type=errors.FORGED_START, non_retryable=True)
        try:
            return await self._run(inp)
        except (asyncio.CancelledError, FailureError) as err:  # FailureError: a local activity's too
            if not self._cancelled(err):
                raise
            return await self._canceled()

    async def _run(self, inp: RefundWorkflowInput) -> RefundOutcome:
        request = inp.request
        self._approval_with_submit = workflow.patched(APPROVAL_WITH_SUBMIT_PATCH)
        self._approved_folded = self._approval_with_submit or workflow.patched(APPROVED_NOTICE_PATCH)
        self._local_validation = self._approved_folded or workflow.patched(LOCAL_VALIDATION_PATCH)
        self._dispatched = self._local_validation or workflow.patched(DISPATCH_PATCH)
        self._trips = self._dispatched or workflow.patched(TRIPS_PATCH)
        self._provider_scoped = self.since(PROVIDER_SCOPED_WAIT_PATCH)
        if inp.carried is not None:
            return await self._resume(inp.carried)
        self._status = CaseStatus.VALIDATING
        for trigger in [e for e in self._event_inbox if e.kind is EventKind.REFUND_REQUESTED]:
            await self._record("trigger_received", actor=f"provider:{trigger.provider}",
                               detail={"event_id": trigger.event_id, "event_type": trigger.event_type,
                                       "body_sha256": trigger.body_sha256})
        # shielded: a cancel waits for the reservation to be taken before it releases it
        self._validating = asyncio.ensure_future(self._validate(request))
        vetted = await asyncio.shield(self._validating)
        validation = vetted.validation
        if not validation.ok:
            self._status = CaseStatus.REJECTED
            self._failure_reason = validation.reason
            return await self._finish()
        if self._trips:  # advice is for people: beside the money path, never awaited by it
            if not vetted.advised:  # an in-process advisor answered inside validation
                self._advising = asyncio.create_task(self._advise(validation))
            assert vetted.decision is not None
            self._decision = vetted.decision
        else:
            if workflow.patched(INTEGRATIONS_PATCH):
                await self._advise(validation)
            self._decision = await contracts.DECIDE_POLICY(
                PolicyInput(request=request, validation=validation),
                **retry.POLICY)
        self._round.requirements, self._round.tier = self._decision.requirements, self._decision.tier
        if self._decision.auto_approve:
            if self.since(LATE_VERDICTS_PATCH):
                await self._round.close(self)
        else:
            if not await self._round.collect(self, self._timings):
                return await self._finish()
            if self.since(INTEGRATIONS_PATCH) and not self._approved_folded:
                await self._notify(*self._approved_notice())
        started = None
        if self._trips:  # recorded with the submit's intent, in its transaction
            self._status = CaseStatus.EXECUTING
            started = self._case_event("execution_started", CaseStatus.EXECUTING)
        else:
            await self._record("execution_started", CaseStatus.EXECUTING)
        return await self._submitted(await self._submit_exactly_once(request, started=started))

    async def _submitted(self, refund: ProviderRefund | None) -> RefundOutcome:
        """After the submit: a decline closes the case, a refund is followed; a case that
        moved on under the submit (closed, its hold released) ends here as its row says."""
        if refund is None and self._moved_on is not None:
            self._holding = False
            await self._record("submit_refused_case_moved_on", detail={"reason": self._moved_on})
            await self._notify("submit_refused_case_moved_on", "operator", {"reason": self._moved_on})
            return await self._finish()
        if refund is None:
            self._holding = False
            await self._record("refund_declined", CaseStatus.REFUND_FAILED, release=True,
                               detail={"reason": self._failure_reason})
            await self._notify("refund_failed", "operator", {"reason": self._failure_reason})
            return await self._finish()
        await self._follow_provider(refund)
        return await self._finish()

    # -- approvals (the round calls back here) -------------------------------------------

    def approval_status(self) -> tuple[bool, str]:
        return self._status is CaseStatus.AWAITING_APPROVAL, self._status.value

    async def approval_step(self, action: str, outcome: ApprovalOutcome | None = None, *,
                            actor: str = "workflow", detail: dict[str, Any] | None = None) -> None:
        status, release = APPROVAL_STEPS[outcome] if outcome else (None, False)
        deciding = action == "approval_granted" and self._round.decided
        if deciding and self._approval_with_submit:  # written with the case's next write: the submit's
            self._deferred = (CaseWrite(event=self._case_event(action, actor=actor, detail=detail)),
                              CaseWrite(notice=self._notice(*self._approved_notice())))
            return
        # the deciding approval queues the requester's notice in its own transaction
        notices = (self._notice(*self._approved_notice()),) if deciding and self._approved_folded else ()
        committed = action in VERDICT_STEPS and self._trips and workflow.patched(VERDICTS_COMMITTED_PATCH)
        await self._record(action, status, actor=actor, release=release, detail=detail, notices=notices,
                           local=not committed)

    def _approved_notice(self) -> tuple[str, str, dict[str, Any]]:
        """The requester's notice that the refund is approved: kind, audience, detail."""
        return "refund_approved", "requester", {"by": ", ".join(a.approver for a in self._round.approvals)}

    async def approval_notice(self, kind: str, audience: str, detail: dict[str, Any]) -> None:
        if self._dispatched and self._advising is not None:
            # an approver's notice carries the advice (the courier waited too); shielded: a
            # cancel meanwhile stops this wait, not the advice, which the case's end awaits
            await asyncio.shield(self._advising)
        await self._notify(kind, audience, detail)

    # -- advice and notices (beside the case, never in its way) --------------------------

    async def _advise(self, validation: ValidationResult) -> None:
        """Has the advisor store a suggestion for approvers. Only whether it exists comes
        back, so nothing here can act on it; a failure or timeout means "no advice"."""
        assert self._request is not None
        try:
            await contracts.ADVISE_REFUND(
                AdviseInput(request=self._request, validation=validation),
                start_to_close_timeout=self._timings.advice_timeout,
                retry_policy=retry.ADVISE_RETRY)
        except ActivityError as err:
            if self._cancelled(err):
                raise
            await self._record("advice_unavailable", detail={"error": str(err.cause)})
