"""RefundWorkflow: one governed refund, from request to a settled ledger.

Workflow id == refund_request_id, so every entry point that asks for the same refund
reaches this one execution. Money moves at most once: the provider submit is attempted
only after validation, policy and approval, and an ambiguous answer is verified at the
provider before any second submit. Idempotency of each step lives in its activity.
"""

import asyncio
import contextlib
from datetime import datetime, timedelta
from typing import Any

from temporalio import workflow
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    FailureError,
    RetryState,
    is_cancelled_exception,
)

with workflow.unsafe.imports_passed_through():
    from domain import contracts, errors
    from domain.events import STATUS_NOTICES, Observation, observe
    from domain.incidents import DuplicateRefundInput
    from domain.integrations import AdviseInput, DeliverNoticeInput, DeliverNoticesInput
    from domain.lifecycle import (
        FINAL_PROVIDER_STATUSES,
        StatusChange,
    )
    from domain.models import (
        CLOSED_STATUSES,
        CaseEventInput,
        CaseState,
        CaseStatus,
        CaseWrite,
        CaseWrites,
        CaseWritten,
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
        RefundCarry,
        RefundOutcome,
        RefundRequest,
        RefundWorkflowInput,
        SubmitInput,
        ValidateInput,
        ValidationResult,
        VerifyInput,
        VerifyResult,
        Vetted,
    )
    from domain.money import format_minor
    from workflows import retry
    from workflows.approvals import (
        LATE_VERDICTS_PATCH,
        ApprovalOutcome,
        ApprovalRound,
        ApprovingWorkflow,
    )

PROVIDER_SCOPED_WAIT_PATCH = "provider-scoped-notification-1"
"""From this patch on, the wait for a notification takes only the case's provider's events."""
# Histories recorded before the advisor and notice delivery existed replay without them.
INTEGRATIONS_PATCH = "integrations-1"
# A second provider refund with our reference was a log line before it was an incident.
DUPLICATE_PATCH = "duplicate-refund-incident-1"
# An escalated notification wait left the case `executing`; it is in ops review since.
ADYEN_WAIT_PATCH = "adyen-wait-ops-review-1"
# A cancelled case releases its reservation, or follows a refund the provider holds to the
# ledger; before, cancellation simply ended the workflow and froze the case.
CANCEL_PATCH = "refund-cancel-1"
# Statuses in which a submit may be at the provider while we do not know its refund yet.
SUBMITTING = frozenset({CaseStatus.EXECUTING, CaseStatus.VERIFYING, CaseStatus.OPS_REVIEW})
# Open-ended waits continue as new past `continue_as_new_after_events`, and resubmits stop
# after `max_submit_attempts` (the case goes to ops, still looking); before, a long outage
# ran into Temporal's history limit.
BOUNDED_PATCH = "refund-bounded-history-1"
# Histories recorded before the provider horizon resubmitted after the backoff alone.
HORIZON_PATCH = "resubmit-horizon-1"
# A verify-state lookup that finds several refunds with our reference raises the duplicate
# incident; before, the lookup followed one and logged the others.
VERIFY_DUPLICATES_PATCH = "verify-duplicate-refunds-1"
# Fewer round trips per refund (issue 21): validation and the policy's decision in one
# activity; `execution_started` committed with the submit's intent; the ledger posting, its
# notices and the status in one transaction; the case's database writes as local
# activities; advice beside the money path. Every patch above holds for such an execution,
# so their markers are not written again (`since`).
TRIPS_PATCH = "fewer-round-trips-1"
# The case's action, the ops notice and the metric's reason when a provider refuses our key.
CONFIGURATION_INCIDENT = "provider_configuration_refused"


# What each approval step does to a refund case: its status, and the reservation released.
APPROVAL_STEPS = {ApprovalOutcome.REQUESTED: (CaseStatus.AWAITING_APPROVAL, False),
                  ApprovalOutcome.DENIED: (CaseStatus.DENIED, True),
                  ApprovalOutcome.EXPIRED: (CaseStatus.EXPIRED, True)}


@workflow.defn
class RefundWorkflow(ApprovingWorkflow):
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
        self._postings: list[str] = []
        self._events_seen = 0
        self._succeeded_at: datetime | None = None
        self._outbox: list[str] = []
        self._courier: asyncio.Task[None] | None = None
        self._advising: asyncio.Task[None] | None = None
        self._holding = False  # the courier waits: a submit and its first settlement are under way
        self._trips = False  # the fewer-round-trips shape (TRIPS_PATCH)
        self._closing = False
        self._provider_scoped = False
        self._lookup_escalated = False
        self._duplicates: set[str] = set()
        self._found_duplicates: list[ProviderRefund] = []  # seen by a lookup, not reported yet
        # a provider state being applied (ledger, notices, status), redone if cancelled midway
        self._applying: tuple[Observation, ProviderRefund, dict[str, Any]] | None = None
        self._validating: asyncio.Future[Vetted] | None = None
        self._cancel_requested = False
        self._input: RefundWorkflowInput | None = inp
        self._context = "submit"  # or "follow": where a continued run picks up
        self._escalated: str | None = None
        self._status_before_escalation = CaseStatus.REQUESTED
        self._attempt = 0  # submits made, across continued runs
        self._submit_ended: datetime | None = None  # when the last unanswered submit ended
        self._round.requester = inp.requester
        self._round.conflicted = frozenset(inp.request.trigger_identities)
        if inp.carried is not None:
            self._restore(inp.carried)

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
        try:
            return await self._run(inp)
        except (asyncio.CancelledError, FailureError) as err:  # FailureError: a local activity's too
            if not self._cancelled(err):
                raise
            return await self._canceled()

    async def _run(self, inp: RefundWorkflowInput) -> RefundOutcome:
        request = inp.request
        self._trips = workflow.patched(TRIPS_PATCH)
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
            if self.since(INTEGRATIONS_PATCH):
                await self._notify("refund_approved", "requester",
                                   {"by": ", ".join(a.approver for a in self._round.approvals)})
        started = None
        if self._trips:  # recorded with the submit's intent, in its transaction
            self._status = CaseStatus.EXECUTING
            started = self._case_event("execution_started", CaseStatus.EXECUTING)
        else:
            await self._record("execution_started", CaseStatus.EXECUTING)
        return await self._submitted(await self._submit_exactly_once(request, started=started))

    async def _submitted(self, refund: ProviderRefund | None) -> RefundOutcome:
        """After the submit: a decline closes the case, a refund is followed."""
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

    def since(self, patch: str) -> bool:
        """An older patch holds: without a marker for an execution of the newest shape,
        which only ever ran after it (each marker costs two history events)."""
        return self._trips or workflow.patched(patch)

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
            await contracts.ADVISE_REFUND(
                AdviseInput(request=self._request, validation=validation),
                start_to_close_timeout=self._timings.advice_timeout,
                retry_policy=retry.ADVISE_RETRY)
        except ActivityError as err:
            if self._cancelled(err):
                raise
            await self._record("advice_unavailable", detail={"error": str(err.cause)})

    async def _deliver_outbox(self) -> None:
        """Delivers queued notices one at a time and in order (a ticket sees its updates in
        order); a failing channel delays later notices, never the case. Advice being asked
        is waited for first, so an approver's notice carries it. In the newest shape the
        courier takes every queued notice in one activity, and waits while a submit and its
        settlement run (seconds), so the approval and the outcome go out together."""
        if self._advising is not None:
            await self._advising
        if self._trips:
            while True:
                await workflow.wait_condition(
                    lambda: (bool(self._outbox) and not self._holding) or self._closing)
                if not self._outbox:
                    return
                keys, self._outbox = tuple(self._outbox), []
                try:
                    await contracts.DELIVER_NOTICES(DeliverNoticesInput(dedup_keys=keys), **retry.DELIVER)
                except ActivityError as err:
                    workflow.logger.warning("notices %s not delivered everywhere: %s", keys, err.cause)
        while True:
            await workflow.wait_condition(lambda: bool(self._outbox) or self._closing)
            if not self._outbox:
                return
            key = self._outbox.pop(0)
            try:
                await contracts.DELIVER_NOTICE(DeliverNoticeInput(dedup_key=key), **retry.DELIVER)
            except ActivityError as err:
                workflow.logger.warning("notice %s not delivered everywhere: %s", key, err.cause)

    # -- execution ---------------------------------------------------------------------

    async def _submit_exactly_once(self, request: RefundRequest, attempt: int = 0, *,
                                   started: CaseEventInput | None = None) -> ProviderRefund | None:
        """Submits; on an unknown outcome verifies at the provider before submitting again.
        `attempt`: submits made before (by a run that continued as new); `started`: the case
        event the first submit records with its intent."""
        key = request.idempotency_key()
        while True:
            if attempt and (escalated := await self._bound_resubmits(attempt)) is not None:
                return escalated
            attempt += 1
            self._attempt = attempt
            self._holding = self._trips and self._status is not CaseStatus.OPS_REVIEW
            try:
                submitted: ProviderRefund = await contracts.SUBMIT_PROVIDER_REFUND(
                    SubmitInput(request=request, idempotency_key=key, started=started),
                    start_to_close_timeout=self._timings.submit_timeout,
                    retry_policy=retry.SUBMIT_RETRY)
                return submitted
            except ActivityError as err:
                if self._cancelled(err):  # a cancel is no unknown outcome
                    raise
                started, self._holding = None, False  # committed before the provider was called
                cause = err.cause
                if isinstance(cause, ApplicationError) and cause.type == errors.DECLINED:
                    self._failure_reason = cause.message
                    return None
                if isinstance(cause, ApplicationError) and cause.type == errors.CONFIGURATION_REFUSED:
                    await self._escalate(CONFIGURATION_INCIDENT, cause.message)  # nothing made now
                else:
                    workflow.logger.warning("submit attempt %d outcome unknown: %s", attempt, cause)
            ended = self._submit_ended = workflow.now()
            self._status = CaseStatus.VERIFYING
            found = await self._verify(f"submit attempt {attempt} outcome unknown")
            if found is not None:
                return found
            pause = min(timedelta(seconds=2 ** min(attempt, 12)), self._timings.status_poll_interval,
                        retry.RESUBMIT_BACKOFF_CAP)
            if self.since(HORIZON_PATCH):  # the attempt's create can land until its horizon
                pause = max(pause, ended + self._timings.provider_horizon - workflow.now())
            await workflow.sleep(pause)
            self._status = CaseStatus.EXECUTING

    async def _verify(self, reason: str) -> ProviderRefund | None:
        """The verify-state step; a status we cannot map, refused credentials or exhausted
        retries send the case to ops review and it keeps asking, never assuming success."""
        assert self._request is not None
        while True:
            try:
                verified: VerifyResult = await contracts.VERIFY_PROVIDER_REFUND(
                    VerifyInput(request=self._request, reason=reason),
                    **retry.provider_read(self._timings.provider_read_attempts))
                await self._answered()
                return self._followed(verified)
            except ActivityError as err:
                cause = err.cause
                if isinstance(cause, ApplicationError) and cause.type == errors.LOOKUP_UNSUPPORTED:
                    return await self._await_notification(reason)
                if await self._escalated_unanswered("verify", err):
                    await self._bound_history("verify", reason=reason)
                    continue
                if not (isinstance(cause, ApplicationError) and cause.type == errors.UNEXPECTED_STATUS):
                    raise
                if self._status is not CaseStatus.OPS_REVIEW:
                    await self._notify("unexpected_provider_status", "operator",
                                       {"error": cause.message})
                    await self._record("unexpected_provider_status", CaseStatus.OPS_REVIEW,
                                       detail={"error": cause.message})
                await workflow.sleep(self._timings.status_poll_interval)
                await self._bound_history("verify", reason=reason)

    async def _validate(self, request: RefundRequest) -> Vetted:
        """Validation at the provider (with the policy's decision, in the newest shape);
        asked again every poll interval while it cannot be answered (a refused key, retries
        exhausted), with the case in ops review meanwhile."""
        while True:
            try:
                options = retry.provider_read(self._timings.provider_read_attempts)
                if self._trips:
                    vetted: Vetted = await contracts.VALIDATE_AND_DECIDE(ValidateInput(request=request),
                                                                         **options)
                else:
                    vetted = Vetted(validation=await contracts.VALIDATE_REFUND(
                        ValidateInput(request=request), **options))
                await self._answered()
                return vetted
            except ActivityError as err:
                if not await self._escalated_unanswered("validate", err):
                    raise

    async def _escalated_unanswered(self, step: str, err: ActivityError) -> bool:
        """For a provider read that cannot succeed by retrying (a refused key) or whose
        bounded retries ran out: escalates, waits a poll interval and says to ask again.
        False for any other failure, which the caller handles."""
        cause = err.cause
        if isinstance(cause, ApplicationError) and cause.type == errors.CONFIGURATION_REFUSED:
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
            if reported is None or (self._provider_scoped and reported.provider != self._request.provider):
                continue
            if reported.reference == self._request.refund_request_id or (
                    self._refund is not None and reported.refund_id == self._refund.refund_id):
                return event, reported
        return None

    async def _await_notification(self, reason: str) -> ProviderRefund:
        """Verify-state for a provider without a status lookup (Adyen): the notification is
        the only answer, so wait for it on durable timers, escalate to ops review once when
        the first timer runs out, and never resubmit (a resend could refund twice). Ops end
        the wait with what the provider shows (`starters.provider_wait`): the same event."""
        await self._record("awaiting_provider_notification", detail={"reason": reason})
        while (notified := self._notified()) is None:
            try:
                await workflow.wait_condition(lambda: self._notified() is not None,
                                              timeout=self._timings.status_poll_interval)
            except TimeoutError:
                if not self._lookup_escalated:
                    self._lookup_escalated = True
                    await self._notify("no_status_lookup_escalation", "operator", {"reason": reason})
                    # The case waits in ops review, where ops resolve it with what the
                    # provider's dashboard shows (an event like the notification).
                    await self._record("no_status_lookup_escalated",
                                       CaseStatus.OPS_REVIEW if self.since(ADYEN_WAIT_PATCH)
                                       else None, detail={"reason": reason})
                await self._bound_history("notification", reason=reason)
        return await self._take_notification(notified)

    async def _take_notification(self, notified: tuple[ProviderEvent, ProviderRefund]) -> ProviderRefund:
        """Takes a queued event that reports this case's refund off the inbox, with its row."""
        event, refund = notified
        self._event_inbox.remove(event)
        await self._record("provider_notification_received",
                           detail={"event_id": event.event_id, "event_type": event.event_type})
        return refund

    async def _follow_provider(self, refund: ProviderRefund) -> None:
        """Applies provider states until final, then watches for a late failure."""
        self._context = "follow"
        await self._observe(refund, "provider_status")
        self._holding = False
        while True:
            while self._found_duplicates:  # before any continue-as-new, which would lose them
                await self._duplicate_refund(self._found_duplicates.pop(0), "verify_state")
            await self._bound_history("follow")
            while self._event_inbox:
                await self._bound_history("follow")  # a burst of events is turns too
                event = self._event_inbox.pop(0)
                reported = event.as_refund()
                if reported is None:  # the trigger itself, or a request repeated
                    continue
                assert self._refund is not None
                if reported.refund_id != self._refund.refund_id:
                    if reported.reference == self._request_id() and self.since(DUPLICATE_PATCH):
                        await self._duplicate_refund(reported, f"webhook:{event.event_type}:{event.event_id}")
                    else:
                        workflow.logger.warning("ignoring event %s for refund %s", event.event_id,
                                                reported.refund_id)
                    continue
                await self._observe(reported, f"webhook:{event.event_type}:{event.event_id}")
            assert self._refund is not None
            status = self._refund.status
            if status in FINAL_PROVIDER_STATUSES:
                return
            if status is ProviderRefundStatus.SUCCEEDED:
                if self._cancel_requested:  # ops ended the case: reconciliation watches from here
                    return
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

    def _request_id(self) -> str:
        assert self._request is not None
        return self._request.refund_request_id

    def _followed(self, verified: VerifyResult) -> ProviderRefund | None:
        """The refund a lookup found for the case: the one it follows, or the lookup's
        first; others with our reference wait as duplicates for the follow loop to report
        (the incident needs the case's own refund)."""
        if not verified.duplicates or not self.since(VERIFY_DUPLICATES_PATCH):
            return verified.refund
        found = [r for r in (verified.refund, *verified.duplicates) if r is not None]
        held = self._refund.refund_id if self._refund else None
        ours = next((r for r in found if r.refund_id == held), found[0])
        self._found_duplicates += [r for r in found if r.refund_id not in (ours.refund_id, *self._duplicates)]
        return ours

    async def _duplicate_refund(self, duplicate: ProviderRefund, source: str) -> None:
        """A second provider refund carrying our reference moved money twice: an incident.
        The case goes to ops review (and stays there while it follows its own refund to the
        ledger), ops hear of it and a reconciliation break records it; once per refund."""
        assert self._refund is not None
        if duplicate.refund_id in self._duplicates:
            return
        self._duplicates.add(duplicate.refund_id)
        detail = {"duplicate_refund_id": duplicate.refund_id,
                  "duplicate_amount": format_minor(duplicate.amount, duplicate.currency),
                  "duplicate_status": duplicate.status.value,
                  "provider_refund_id": self._refund.refund_id, "source": source}
        await contracts.OPEN_DUPLICATE_REFUND_BREAK(
            DuplicateRefundInput(case_id=self._request_id(), followed_refund_id=self._refund.refund_id,
                                 duplicate=duplicate, source=source),
            **retry.CASE_EVENT)
        await self._notify("duplicate_provider_refund", "operator", detail)
        await self._record("duplicate_provider_refund", CaseStatus.OPS_REVIEW, detail=detail)

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
        self._applying = (step, reported, detail)
        await self._apply(step, reported, detail)
        self._applying = None

    async def _apply(self, step: Observation, reported: ProviderRefund, detail: dict[str, Any]) -> None:
        """The ledger entry, the notices, then the status; each step idempotent, so a
        cancelled application can run again. In the newest shape all three are one
        transaction."""
        # After a duplicate refund the case stays with ops, whatever its own refund does.
        status = CaseStatus.OPS_REVIEW if self._duplicates else step.status
        if self._trips:
            writes = [CaseWrite(notice=self._notice(kind, audience, detail))
                      for kind, audience in self._status_notices(reported)]
            writes.append(CaseWrite(event=self._case_event(step.action, status, release=step.release,
                                                           refund=reported, detail=detail)))
            if step.ledger is None:
                await self._write(*writes)
            else:
                await self._post_with(step.ledger, reported, writes)
            if status is not None:
                self._status = status
            for write in writes:
                if write.notice is not None:
                    self._deliver_later(write.notice.dedup_key)
            return
        if step.ledger is not None:
            await self._post(step.ledger, reported)
        for kind, audience in self._status_notices(reported):  # the patch is asked after the post
            await self._notify(kind, audience, detail)
        await self._record(step.action, status, release=step.release, refund=reported,
                           detail=detail)

    def _status_notices(self, reported: ProviderRefund) -> tuple[tuple[str, str], ...]:
        """The notices (kind, audience) a provider status announces."""
        if reported.status is ProviderRefundStatus.SUCCEEDED and self.since(INTEGRATIONS_PATCH):
            return (("refund_succeeded", "requester"),)
        return STATUS_NOTICES.get(reported.status, ())

    def _cancelled(self, err: BaseException) -> bool:
        """Whether an error is the workflow's cancellation (an activity awaited when it came
        fails with it); such an error is never an outcome to act on."""
        return is_cancelled_exception(err) and self.since(CANCEL_PATCH)

    async def _canceled(self) -> RefundOutcome:
        """Ops cancelled the case (Temporal UI, CLI). Before any submit the reservation is
        released and the case reads `canceled_by_ops`. Once a submit may have gone out, the
        attempt's horizon (its start-to-close) is waited out and the provider asked: a
        refund it holds is followed to its end and the ledger, as if nothing happened;
        none, and the case is released like before a submit. Runs after the cancel, so
        nothing here is cancelled again."""
        self._cancel_requested, self._holding = True, False
        if self._validating is not None and not self._validating.done():
            with contextlib.suppress(ActivityError):
                await self._validating
        refund = self._refund
        if refund is None and self._status in CLOSED_STATUSES:  # decided already: only finishing
            return await self._finish()
        if refund is None and self._status in SUBMITTING:
            await workflow.sleep(self._timings.submit_timeout)
            refund = await self._verify("case cancelled after a submit")
        if refund is None:
            await self._record("canceled_by_ops", CaseStatus.CANCELED_BY_OPS, actor="ops", release=True,
                               detail={"stage": self._status.value})
            await self._round.close(self)
            return await self._finish()
        await self._round.close(self)
        await self._record("cancel_after_provider_refund", actor="ops",
                           detail={"provider_refund_id": refund.refund_id, "stage": self._status.value})
        if self._applying is not None:
            await self._apply(*self._applying)
            self._applying = None
        if self._refund is None or self._refund.status not in (
                *FINAL_PROVIDER_STATUSES, ProviderRefundStatus.SUCCEEDED):
            await self._follow_provider(refund)
        return await self._finish()

    def _posting(self, kind: LedgerKind, refund: ProviderRefund) -> LedgerInput:
        assert self._request is not None
        return LedgerInput(refund_request_id=self._request.refund_request_id, kind=kind,
                           amount=refund.amount, currency=self._request.currency,
                           provider_refund_id=refund.refund_id)

    async def _ledger_pending(self, kind: LedgerKind, refund: ProviderRefund, err: FailureError) -> None:
        """The ledger did not answer in time: the incident and 'executed, ledger pending'."""
        error = err.cause if isinstance(err, ActivityError) else err
        self._holding = False  # the incident goes out now
        await self._notify("incident_ledger_pending", "finance_ops", {"template": kind.value})
        await self._record("ledger_pending", CaseStatus.EXECUTED_LEDGER_PENDING, refund=refund,
                           detail={"template": kind.value, "error": str(error)})

    async def _post_with(self, kind: LedgerKind, refund: ProviderRefund, writes: list[CaseWrite]) -> None:
        """`_post` with the step's notices and status in the posting's transaction (a local
        activity); while the ledger stays down, the incident is recorded on its own and
        the whole step retried until it lands."""
        posting = self._posting(kind, refund)
        try:
            written = await self._write(*writes, posting=posting,
                                        **retry.ledger_within(self._timings.ledger_pending_after))
        except FailureError as err:  # a local activity's failure comes unwrapped (no ActivityError)
            if self._cancelled(err):
                raise
            await self._ledger_pending(kind, refund, err)
            recovered = CaseWrite(event=self._case_event("ledger_recovered",
                                                         detail={"posting_key": posting.posting_key()}))
            written = await self._write(recovered, *writes, posting=posting, **retry.LEDGER)
        assert written.posting is not None
        self._postings.append(written.posting.posting_key)

    async def _post(self, kind: LedgerKind, refund: ProviderRefund) -> None:
        """Posts once the provider confirmed. If the ledger stays down, the case shows
        'executed, ledger pending', an incident is raised, and posting goes on until it
        lands; the provider is never called again for it."""
        posting = self._posting(kind, refund)
        try:
            result: LedgerResult = await contracts.POST_LEDGER(
                posting, schedule_to_close_timeout=self._timings.ledger_pending_after, **retry.LEDGER)
        except ActivityError as err:
            if self._cancelled(err):
                raise
            await self._ledger_pending(kind, refund, err)
            result = await contracts.POST_LEDGER(posting, **retry.LEDGER)
            await self._record("ledger_recovered", detail={"posting_key": result.posting_key})
        self._postings.append(result.posting_key)

    # -- bookkeeping -------------------------------------------------------------------

    async def _finish(self) -> RefundOutcome:
        await self._drain()
        return RefundOutcome(state=self.state())

    async def _drain(self) -> None:
        """Late verdicts recorded, handlers finished, queued notices delivered: what a run
        waits for before it ends or continues as new."""
        if self._advising is not None:
            await self._advising
        await self.approvals_settled()
        await workflow.wait_condition(workflow.all_handlers_finished)
        if self._courier is not None:
            self._closing = True
            await self._courier
            self._courier, self._closing = None, False

    # -- bounded histories (continue-as-new, resubmit escalation) ------------------------

    async def _bound_history(self, phase: str, *, reason: str = "") -> None:
        """Past the history threshold, continues as new carrying the case and where it was
        (`phase`: the wait to resume). Never during a cancel: that run finishes the case."""
        info = workflow.info()
        long = (info.get_current_history_length() >= self._timings.continue_as_new_after_events
                or info.is_continue_as_new_suggested())
        if not long or self._cancel_requested or not self.since(BOUNDED_PATCH):
            return
        await self._drain()
        assert self._input is not None
        carried = self._input.carried
        workflow.continue_as_new(self._input.model_copy(update={"carried": RefundCarry(
            context=self._context, phase=phase, status=self._status, decision=self._decision,
            approvals=tuple(self._round.approvals), refused=tuple(self._round.refused),
            refund=self._refund, failure_reason=self._failure_reason, postings=tuple(self._postings),
            events_seen=self._events_seen, event_ids=tuple(sorted(self._event_ids)),
            inbox=tuple(self._event_inbox), succeeded_at=self._succeeded_at,
            lookup_escalated=self._lookup_escalated, duplicates=tuple(sorted(self._duplicates)),
            escalated=self._escalated, status_before_escalation=self._status_before_escalation,
            attempt=self._attempt, submit_ended_at=self._submit_ended, reason=reason,
            runs=carried.runs + 1 if carried else 2)}))

    async def _bound_resubmits(self, attempt: int) -> ProviderRefund | None:
        """Before submit `attempt + 1`: past `max_submit_attempts` the case goes to ops
        (reservation kept) and only looks from then on; past the history threshold the loop
        continues as new. A refund found while looking comes back."""
        if attempt >= self._timings.max_submit_attempts and self.since(BOUNDED_PATCH):
            reason = f"{attempt} submits without a refund at the provider"
            await self._notify("resubmits_exhausted", "operator", {"attempts": attempt})
            await self._record("resubmits_exhausted", CaseStatus.OPS_REVIEW, detail={"attempts": attempt})
            return await self._look_without_submitting(reason)
        await self._bound_history("submit")
        return None

    async def _look_without_submitting(self, reason: str) -> ProviderRefund:
        """After the last allowed submit: no more creates; the provider's lookup and events
        are watched until a refund shows up (or ops cancel the case)."""
        while True:
            await self._bound_history("look", reason=reason)
            try:
                await workflow.wait_condition(lambda: self._notified() is not None,
                                              timeout=self._timings.status_poll_interval)
            except TimeoutError:
                if (found := await self._verify(reason)) is not None:
                    return found
                continue
            notified = self._notified()
            assert notified is not None
            return await self._take_notification(notified)

    async def _resume(self, carried: RefundCarry) -> RefundOutcome:
        """A continued run: the wait it was in (`__init__` restored the case)."""
        found: ProviderRefund | None = None
        if carried.phase == "verify":
            found = await self._verify(carried.reason)
        elif carried.phase == "notification":
            found = await self._await_notification(carried.reason)
        elif carried.phase == "look":
            found = await self._look_without_submitting(carried.reason)
        if carried.context == "follow":
            if found is not None:
                await self._observe(found, "verify_state")
            assert self._refund is not None
            await self._follow_provider(self._refund)
            return await self._finish()
        if found is None:
            assert self._request is not None
            if carried.submit_ended_at is not None and self.since(HORIZON_PATCH):
                # the last create may still land until its horizon, whichever run waits it out
                horizon = carried.submit_ended_at + self._timings.provider_horizon - workflow.now()
                if horizon > timedelta(0):
                    await workflow.sleep(horizon)
            found = await self._submit_exactly_once(self._request, self._attempt)
        return await self._submitted(found)

    def _restore(self, carried: RefundCarry) -> None:
        """The carried case, from `__init__`: before any handler of the new run, so an early
        signal or update is judged against the case (and a late verdict meets a decided
        round), not the fresh run's state. Only state: no command, so no patch is needed."""
        self._status, self._decision = carried.status, carried.decision
        if carried.decision is not None:
            self._round.requirements, self._round.tier = carried.decision.requirements, carried.decision.tier
        self._round.approvals, self._round.refused = list(carried.approvals), list(carried.refused)
        self._round.decided = True
        self._refund, self._failure_reason = carried.refund, carried.failure_reason
        self._postings = list(carried.postings)
        self._events_seen = carried.events_seen
        self._event_inbox, self._event_ids = list(carried.inbox), set(carried.event_ids)
        self._succeeded_at, self._lookup_escalated = carried.succeeded_at, carried.lookup_escalated
        self._duplicates = set(carried.duplicates)
        self._escalated, self._status_before_escalation = carried.escalated, carried.status_before_escalation
        self._attempt, self._submit_ended = carried.attempt, carried.submit_ended_at

    def _case_event(self, action: str, status: CaseStatus | None = None, *,
                    actor: str = "workflow", release: bool = False,
                    refund: ProviderRefund | None = None,
                    detail: dict[str, Any] | None = None) -> CaseEventInput:
        return CaseEventInput(refund_request_id=self._request_id(), action=action, actor=actor,
                              status=status, release_reservation=release, provider_refund=refund,
                              detail=detail or {})

    async def _record(self, action: str, status: CaseStatus | None = None, *,
                      actor: str = "workflow", release: bool = False,
                      refund: ProviderRefund | None = None,
                      detail: dict[str, Any] | None = None) -> None:
        if status is not None:
            self._status = status
        event = self._case_event(action, status, actor=actor, release=release, refund=refund, detail=detail)
        if self._trips:
            await self._write(CaseWrite(event=event))
        else:
            await contracts.RECORD_CASE_EVENT(event, **retry.CASE_EVENT)

    def _notice(self, kind: str, audience: str, detail: dict[str, Any]) -> NoticeInput:
        """A notice, once per case, kind, audience and occasion (its dedup key)."""
        case_id = self._request_id()
        occasion = self._refund.status.value if self._refund else self._status.value
        return NoticeInput(refund_request_id=case_id, kind=kind, audience=audience,
                           dedup_key=f"{case_id}:{kind}:{audience}:{occasion}", detail=detail)

    async def _notify(self, kind: str, audience: str, detail: dict[str, Any]) -> None:
        """Queues a notice in the outbox and hands it to the courier that delivers it
        beside the case."""
        notice = self._notice(kind, audience, detail)
        if self._trips:
            await self._write(CaseWrite(notice=notice))
        else:
            await contracts.QUEUE_NOTICE(notice, **retry.CASE_EVENT)
        if self.since(INTEGRATIONS_PATCH):
            self._deliver_later(notice.dedup_key)

    def _deliver_later(self, dedup_key: str) -> None:
        """Hands a queued notice to the courier (started with the first)."""
        self._outbox.append(dedup_key)
        if self._courier is None:
            self._courier = asyncio.create_task(self._deliver_outbox())

    async def _write(self, *writes: CaseWrite, posting: LedgerInput | None = None,
                     **options: Any) -> CaseWritten:
        """A case step's database writes in one transaction, as a local activity: short,
        idempotent (posting and dedup keys) and with nothing outside PostgreSQL."""
        written: CaseWritten = await contracts.WRITE_CASE_STEPS.local(
            CaseWrites(refund_request_id=self._request_id(), posting=posting, writes=writes),
            **(options or retry.CASE_EVENT))
        return written
