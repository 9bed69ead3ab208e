"""RefundWorkflow: one governed refund, from request to a settled ledger.

Workflow id == refund_request_id, so every entry point that asks for the same refund
reaches this one execution. Money moves at most once: the provider submit is attempted
only after validation, policy and approval, and an ambiguous answer is verified at the
provider before any second submit. Idempotency of each step lives in its activity.
"""

import asyncio
from datetime import datetime, timedelta
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError, RetryState

with workflow.unsafe.imports_passed_through():
    from domain.events import STATUS_NOTICES, observe
    from domain.integrations import AdviceReceipt, AdviseInput, DeliverNoticeInput
    from domain.lifecycle import (
        FINAL_PROVIDER_STATUSES,
        StatusChange,
    )
    from domain.models import (
        CaseEventInput,
        CaseState,
        CaseStatus,
        EventKind,
        LedgerInput,
        LedgerKind,
        LedgerResult,
        NoticeInput,
        PolicyDecision,
        PolicyInput,
        ProviderEvent,
        ProviderRefund,
        ProviderRefundStatus,
        RefundOutcome,
        RefundRequest,
        RefundTimings,
        RefundWorkflowInput,
        SubmitInput,
        ValidateInput,
        ValidationResult,
        VerifyInput,
        VerifyResult,
    )
    from workflows import retry
    from workflows.approvals import ApprovalOutcome, ApprovalRound, ApprovingWorkflow

DECLINED = "ProviderDeclined"
UNEXPECTED_STATUS = "UnexpectedProviderStatus"
LOOKUP_UNSUPPORTED = "ProviderLookupUnsupported"
# Histories recorded before the advisor and notice delivery existed replay without them.
INTEGRATIONS_PATCH = "integrations-1"
# Histories recorded before the provider horizon resubmitted after the backoff alone.
HORIZON_PATCH = "resubmit-horizon-1"
# The case's action, the ops notice and the metric's reason when a provider refuses our key.
CONFIGURATION_INCIDENT = "provider_configuration_refused"


# What each approval step does to a refund case: its status, and the reservation released.
APPROVAL_STEPS = {ApprovalOutcome.REQUESTED: (CaseStatus.AWAITING_APPROVAL, False),
                  ApprovalOutcome.DENIED: (CaseStatus.DENIED, True),
                  ApprovalOutcome.EXPIRED: (CaseStatus.EXPIRED, True)}


@workflow.defn
class RefundWorkflow(ApprovingWorkflow):
    """Validate → policy → (approvals) → submit once → verify when unsure → ledger → watch."""

    def __init__(self) -> None:
        self._request: RefundRequest | None = None
        self._timings = RefundTimings()
        self._status = CaseStatus.REQUESTED
        self._decision: PolicyDecision | None = None
        self._round = ApprovalRound()
        self._event_inbox: list[ProviderEvent] = []
        self._event_ids: set[str] = set()
        self._refund: ProviderRefund | None = None
        self._failure_reason: str | None = None
        self._postings: list[str] = []
        self._events_seen = 0
        self._succeeded_at: datetime | None = None
        self._outbox: list[str] = []
        self._courier: asyncio.Task[None] | None = None
        self._closing = False
        self._lookup_escalated = False
        self._escalated: str | None = None
        self._status_before_escalation = CaseStatus.REQUESTED

    # -- interface ---------------------------------------------------------------------

    @workflow.signal
    def provider_event(self, event: ProviderEvent) -> None:
        """A verified webhook about this case (may be late, duplicated or out of order)."""
        self._events_seen += 1
        if event.event_id in self._event_ids:  # a re-driven delivery acts once
            return
        self._event_ids.add(event.event_id)
        self._event_inbox.append(event)

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
        self._request = request = inp.request
        self._round.requester = inp.requester
        self._round.conflicted = frozenset(request.trigger_identities)
        self._timings = inp.timings
        self._status = CaseStatus.VALIDATING
        for trigger in [e for e in self._event_inbox if e.kind is EventKind.REFUND_REQUESTED]:
            await self._record("trigger_received", actor=f"provider:{trigger.provider}",
                               detail={"event_id": trigger.event_id, "event_type": trigger.event_type,
                                       "body_sha256": trigger.body_sha256})
        validation = await self._validate(request)
        if not validation.ok:
            self._status = CaseStatus.REJECTED
            self._failure_reason = validation.reason
            return await self._finish()
        if workflow.patched(INTEGRATIONS_PATCH):
            await self._advise(validation)
        self._decision = await workflow.execute_activity(
            "decide_policy", PolicyInput(request=request, validation=validation),
            result_type=PolicyDecision, **retry.POLICY)
        self._round.requirements, self._round.tier = self._decision.requirements, self._decision.tier
        if not self._decision.auto_approve:
            if not await self._round.collect(self, self._timings):
                return await self._finish()
            if workflow.patched(INTEGRATIONS_PATCH):
                await self._notify("refund_approved", "requester",
                                   {"by": ", ".join(a.approver for a in self._round.approvals)})
        await self._record("execution_started", CaseStatus.EXECUTING)
        refund = await self._submit_exactly_once(request)
        if refund is None:
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
        await self._record(action, status, actor=actor, release=release, detail=detail)

    async def approval_notice(self, kind: str, audience: str, detail: dict[str, Any]) -> None:
        await self._notify(kind, audience, detail)

    # -- advice and notices (beside the case, never in its way) --------------------------

    async def _advise(self, validation: ValidationResult) -> None:
        """Has the advisor store a suggestion for approvers. Only whether it exists comes
        back, so nothing here can act on it; a failure or timeout means "no advice"."""
        assert self._request is not None
        try:
            await workflow.execute_activity(
                "advise_refund", AdviseInput(request=self._request, validation=validation),
                result_type=AdviceReceipt, start_to_close_timeout=self._timings.advice_timeout,
                retry_policy=retry.ADVISE_RETRY)
        except ActivityError as err:
            await self._record("advice_unavailable", detail={"error": str(err.cause)})

    async def _deliver_outbox(self) -> None:
        """Delivers queued notices one at a time and in order (a ticket sees its updates in
        order); a failing channel delays later notices, never the case."""
        while True:
            await workflow.wait_condition(lambda: bool(self._outbox) or self._closing)
            if not self._outbox:
                return
            key = self._outbox.pop(0)
            try:
                await workflow.execute_activity("deliver_notice", DeliverNoticeInput(dedup_key=key),
                                                **retry.DELIVER)
            except ActivityError as err:
                workflow.logger.warning("notice %s not delivered everywhere: %s", key, err.cause)

    # -- execution ---------------------------------------------------------------------

    async def _submit_exactly_once(self, request: RefundRequest) -> ProviderRefund | None:
        """Submits; on an unknown outcome verifies at the provider before submitting again."""
        key = request.idempotency_key()
        attempt = 0
        while True:
            attempt += 1
            try:
                submitted: ProviderRefund = await workflow.execute_activity(
                    "submit_provider_refund", SubmitInput(request=request, idempotency_key=key),
                    result_type=ProviderRefund, start_to_close_timeout=self._timings.submit_timeout,
                    retry_policy=retry.SUBMIT_RETRY)
                return submitted
            except ActivityError as err:
                cause = err.cause
                if isinstance(cause, ApplicationError) and cause.type == DECLINED:
                    self._failure_reason = cause.message
                    return None
                if isinstance(cause, ApplicationError) and cause.type == retry.CONFIGURATION_REFUSED:
                    await self._escalate(CONFIGURATION_INCIDENT, cause.message)  # nothing made now
                else:
                    workflow.logger.warning("submit attempt %d outcome unknown: %s", attempt, cause)
            ended = workflow.now()
            self._status = CaseStatus.VERIFYING
            found = await self._verify(f"submit attempt {attempt} outcome unknown")
            if found is not None:
                return found
            pause = min(timedelta(seconds=2 ** min(attempt, 12)), self._timings.status_poll_interval,
                        retry.RESUBMIT_BACKOFF_CAP)
            if workflow.patched(HORIZON_PATCH):  # the attempt's create can land until its horizon
                pause = max(pause, ended + self._timings.provider_horizon - workflow.now())
            await workflow.sleep(pause)
            self._status = CaseStatus.EXECUTING

    async def _verify(self, reason: str) -> ProviderRefund | None:
        """The verify-state step; a status we cannot map, refused credentials or exhausted
        retries send the case to ops review and it keeps asking, never assuming success."""
        assert self._request is not None
        while True:
            try:
                verified: VerifyResult = await workflow.execute_activity(
                    "verify_provider_refund", VerifyInput(request=self._request, reason=reason),
                    result_type=VerifyResult, **retry.provider_read(self._timings.provider_read_attempts))
                await self._answered()
                return verified.refund
            except ActivityError as err:
                cause = err.cause
                if isinstance(cause, ApplicationError) and cause.type == LOOKUP_UNSUPPORTED:
                    return await self._await_notification(reason)
                if await self._escalated_unanswered("verify", err):
                    continue
                if not (isinstance(cause, ApplicationError) and cause.type == UNEXPECTED_STATUS):
                    raise
                if self._status is not CaseStatus.OPS_REVIEW:
                    await self._notify("unexpected_provider_status", "operator",
                                       {"error": cause.message})
                    await self._record("unexpected_provider_status", CaseStatus.OPS_REVIEW,
                                       detail={"error": cause.message})
                await workflow.sleep(self._timings.status_poll_interval)

    async def _validate(self, request: RefundRequest) -> ValidationResult:
        """Validation at the provider; asked again every poll interval while it cannot be
        answered (a refused key, retries exhausted), with the case in ops review meanwhile."""
        while True:
            try:
                validation: ValidationResult = await workflow.execute_activity(
                    "validate_refund", ValidateInput(request=request), result_type=ValidationResult,
                    **retry.provider_read(self._timings.provider_read_attempts))
                await self._answered()
                return validation
            except ActivityError as err:
                if not await self._escalated_unanswered("validate", err):
                    raise

    async def _escalated_unanswered(self, step: str, err: ActivityError) -> bool:
        """For a provider read that cannot succeed by retrying (a refused key) or whose
        bounded retries ran out: escalates, waits a poll interval and says to ask again.
        False for any other failure, which the caller handles."""
        cause = err.cause
        if isinstance(cause, ApplicationError) and cause.type == retry.CONFIGURATION_REFUSED:
            reason = CONFIGURATION_INCIDENT
        elif err.retry_state in (RetryState.MAXIMUM_ATTEMPTS_REACHED, RetryState.TIMEOUT):
            reason = f"{step}_retries_exhausted"
        else:
            return False
        await self._escalate(reason, str(cause))
        await workflow.sleep(self._timings.status_poll_interval)
        return True

    async def _escalate(self, reason: str, error: str) -> None:
        """Once per incident: ops get a notice and the case shows ops review (the
        reservation stays; the metric counts it) while the workflow keeps asking."""
        if self._escalated == reason:
            return
        if self._escalated is None:
            self._status_before_escalation = self._status
        self._escalated = reason
        await self._notify(reason, "operator", {"error": error})
        await self._record(reason, CaseStatus.OPS_REVIEW, detail={"error": error})

    async def _answered(self) -> None:
        """The provider answers again: the case leaves ops review for the state it was in."""
        if self._escalated is None:
            return
        reason, self._escalated = self._escalated, None
        await self._record("provider_answering_again", self._status_before_escalation,
                           detail={"escalation": reason})

    def _notified(self) -> tuple[ProviderEvent, ProviderRefund] | None:
        """The first queued event that reports this case's refund (by our reference, or by
        the provider's refund id once we know it)."""
        assert self._request is not None
        for event in self._event_inbox:
            reported = event.as_refund()
            if reported is None:
                continue
            if reported.reference == self._request.refund_request_id or (
                    self._refund is not None and reported.refund_id == self._refund.refund_id):
                return event, reported
        return None

    async def _await_notification(self, reason: str) -> ProviderRefund:
        """Verify-state for a provider without a status lookup (Adyen): the notification is
        the only answer, so wait for it on durable timers, escalate to ops once when the
        first timer runs out, and never resubmit (a resend could refund twice)."""
        await self._record("awaiting_provider_notification", detail={"reason": reason})
        while (notified := self._notified()) is None:
            try:
                await workflow.wait_condition(lambda: self._notified() is not None,
                                              timeout=self._timings.status_poll_interval)
            except TimeoutError:
                if not self._lookup_escalated:
                    self._lookup_escalated = True
                    await self._notify("no_status_lookup_escalation", "operator", {"reason": reason})
                    await self._record("no_status_lookup_escalated", detail={"reason": reason})
        event, refund = notified
        self._event_inbox.remove(event)
        await self._record("provider_notification_received",
                           detail={"event_id": event.event_id, "event_type": event.event_type})
        return refund

    async def _follow_provider(self, refund: ProviderRefund) -> None:
        """Applies provider states until final, then watches for a late failure."""
        await self._observe(refund, "provider_status")
        while True:
            while self._event_inbox:
                event = self._event_inbox.pop(0)
                reported = event.as_refund()
                if reported is None:  # the trigger itself, or a request repeated
                    continue
                assert self._refund is not None
                if reported.refund_id != self._refund.refund_id:
                    workflow.logger.warning("ignoring event %s for refund %s", event.event_id,
                                            reported.refund_id)
                    continue
                await self._observe(reported, f"webhook:{event.event_type}:{event.event_id}")
            assert self._refund is not None
            status = self._refund.status
            if status in FINAL_PROVIDER_STATUSES:
                return
            if status is ProviderRefundStatus.SUCCEEDED:
                assert self._succeeded_at is not None
                wait = self._succeeded_at + self._timings.late_failure_window - workflow.now()
                if wait <= timedelta(0):
                    return
            else:
                wait = self._timings.status_poll_interval
            try:
                await workflow.wait_condition(lambda: bool(self._event_inbox), timeout=wait)
            except TimeoutError:
                if status is ProviderRefundStatus.SUCCEEDED:
                    return
                found = await self._verify(f"no terminal event within {wait}")
                if found is not None:
                    await self._observe(found, "verify_state")

    async def _observe(self, reported: ProviderRefund, source: str) -> None:
        """Moves the case forward for a reported status; never backwards. The ledger entry
        and the notices come before the status that announces them."""
        held = self._refund.status if self._refund else None
        step = observe(held, reported)
        if step.status is None:
            if step.change is not StatusChange.SAME:
                await self._record(step.action, detail={"reported": reported.status.value,
                                                        "source": source,
                                                        "held": held.value if held else None})
            return
        self._refund = reported
        self._failure_reason = reported.failure_reason
        if reported.status is ProviderRefundStatus.SUCCEEDED:
            self._succeeded_at = workflow.now()
        detail = {"source": source, "failure_reason": reported.failure_reason,
                  "provider_refund_id": reported.refund_id}
        if step.ledger is not None:
            await self._post(step.ledger, reported)
        notices = STATUS_NOTICES.get(reported.status, ())
        if reported.status is ProviderRefundStatus.SUCCEEDED and workflow.patched(INTEGRATIONS_PATCH):
            notices = (("refund_succeeded", "requester"),)
        for kind, audience in notices:
            await self._notify(kind, audience, detail)
        await self._record(step.action, step.status, release=step.release, refund=reported,
                           detail=detail)

    async def _post(self, kind: LedgerKind, refund: ProviderRefund) -> None:
        """Posts once the provider confirmed. If the ledger stays down, the case shows
        'executed, ledger pending', an incident is raised, and posting goes on until it
        lands; the provider is never called again for it."""
        assert self._request is not None
        posting = LedgerInput(refund_request_id=self._request.refund_request_id, kind=kind,
                              amount=refund.amount, currency=self._request.currency,
                              provider_refund_id=refund.refund_id)
        try:
            result: LedgerResult = await workflow.execute_activity(
                "post_ledger", posting, result_type=LedgerResult,
                schedule_to_close_timeout=self._timings.ledger_pending_after, **retry.LEDGER)
        except ActivityError as err:
            await self._notify("incident_ledger_pending", "finance_ops", {"template": kind.value})
            await self._record("ledger_pending", CaseStatus.EXECUTED_LEDGER_PENDING, refund=refund,
                               detail={"template": kind.value, "error": str(err.cause)})
            result = await workflow.execute_activity(
                "post_ledger", posting, result_type=LedgerResult, **retry.LEDGER)
            await self._record("ledger_recovered", detail={"posting_key": result.posting_key})
        self._postings.append(result.posting_key)

    # -- bookkeeping -------------------------------------------------------------------

    async def _finish(self) -> RefundOutcome:
        await workflow.wait_condition(workflow.all_handlers_finished)
        if self._courier is not None:
            self._closing = True
            await self._courier
        return RefundOutcome(state=self.state())

    async def _record(self, action: str, status: CaseStatus | None = None, *,
                      actor: str = "workflow", release: bool = False,
                      refund: ProviderRefund | None = None,
                      detail: dict[str, Any] | None = None) -> None:
        if status is not None:
            self._status = status
        assert self._request is not None
        await workflow.execute_activity(
            "record_case_event",
            CaseEventInput(refund_request_id=self._request.refund_request_id, action=action,
                           actor=actor, status=status, release_reservation=release,
                           provider_refund=refund, detail=detail or {}),
            **retry.CASE_EVENT)

    async def _notify(self, kind: str, audience: str, detail: dict[str, Any]) -> None:
        """Queues a notice in the outbox once per case, kind, audience and occasion, and
        hands it to the courier that delivers it beside the case."""
        assert self._request is not None
        case_id = self._request.refund_request_id
        occasion = self._refund.status.value if self._refund else self._status.value
        dedup_key = f"{case_id}:{kind}:{audience}:{occasion}"
        await workflow.execute_activity(
            "queue_notice",
            NoticeInput(refund_request_id=case_id, kind=kind, audience=audience,
                        dedup_key=dedup_key, detail=detail),
            **retry.CASE_EVENT)
        if workflow.patched(INTEGRATIONS_PATCH):
            self._outbox.append(dedup_key)
            if self._courier is None:
                self._courier = asyncio.create_task(self._deliver_outbox())
