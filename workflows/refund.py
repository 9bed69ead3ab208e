"""RefundWorkflow: one governed refund, from request to a settled ledger.

Workflow id == refund_request_id, so every entry point that asks for the same refund
reaches this one execution. Money moves at most once: the provider submit is attempted
only after validation, policy and approval, and an ambiguous answer is verified at the
provider before any second submit.
"""

from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from domain.lifecycle import (
        FINAL_PROVIDER_STATUSES,
        StatusChange,
        case_status_for,
        check_approval,
        classify_status_change,
    )
    from domain.models import (
        ApprovalRecord,
        ApprovalSignal,
        CaseEventInput,
        CaseState,
        CaseStatus,
        Decision,
        EventKind,
        LedgerInput,
        LedgerKind,
        LedgerResult,
        PolicyDecision,
        PolicyInput,
        ProviderEvent,
        ProviderRefund,
        ProviderRefundStatus,
        RefundOutcome,
        RefundRequest,
        RefundWorkflowInput,
        SubmitInput,
        ValidateInput,
        ValidationResult,
        VerifyInput,
        VerifyResult,
    )
    from workflows import retry


@workflow.defn
class RefundWorkflow:
    """Validate → policy → (approvals) → submit once → verify when unsure → ledger → watch."""

    def __init__(self) -> None:
        self._request: RefundRequest | None = None
        self._requester = ""
        self._status = CaseStatus.REQUESTED
        self._decision: PolicyDecision | None = None
        self._approvals: list[ApprovalRecord] = []
        self._refused: list[ApprovalRecord] = []
        self._approval_inbox: list[ApprovalSignal] = []
        self._event_inbox: list[ProviderEvent] = []
        self._event_ids: set[str] = set()
        self._refund: ProviderRefund | None = None
        self._failure_reason: str | None = None
        self._postings: list[str] = []
        self._events_seen = 0
        self._succeeded_at: datetime | None = None

    # -- interface ---------------------------------------------------------------------

    @workflow.signal
    def approve(self, signal: ApprovalSignal) -> None:
        """An approver's verdict; checked for segregation of duties before it counts."""
        self._approval_inbox.append(signal)

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
            approvals=tuple(self._approvals), refused_approvals=tuple(self._refused),
            ledger_postings=tuple(self._postings), events_seen=self._events_seen,
        )

    @workflow.run
    async def run(self, inp: RefundWorkflowInput) -> RefundOutcome:
        self._request = request = inp.request
        self._requester = inp.requester
        self._status = CaseStatus.VALIDATING
        for trigger in [e for e in self._event_inbox if e.kind is EventKind.REFUND_REQUESTED]:
            await self._record("trigger_received", actor=f"provider:{trigger.provider}",
                               detail={"event_id": trigger.event_id, "event_type": trigger.event_type,
                                       "body_sha256": trigger.body_sha256})
        validation = await workflow.execute_activity(
            "validate_refund", ValidateInput(request=request), result_type=ValidationResult,
            **retry.VALIDATE)
        if not validation.ok:
            self._status = CaseStatus.REJECTED
            self._failure_reason = validation.reason
            return await self._finish()
        self._decision = await workflow.execute_activity(
            "decide_policy", PolicyInput(request=request, validation=validation),
            result_type=PolicyDecision, **retry.POLICY)
        if not self._decision.auto_approve:
            approved = await self._collect_approvals(
                self._decision.required_approvals, inp.timings.approval_timeout)
            if not approved:
                return await self._finish()
        await self._record("execution_started", CaseStatus.EXECUTING)
        refund = await self._submit_exactly_once(request, inp.timings.submit_timeout,
                                                 inp.timings.status_poll_interval)
        if refund is None:
            await self._record("refund_declined", CaseStatus.REFUND_FAILED, release=True,
                               detail={"reason": self._failure_reason})
            return await self._finish()
        await self._follow_provider(refund, inp.timings.status_poll_interval,
                                    inp.timings.late_failure_window)
        return await self._finish()

    # -- steps -------------------------------------------------------------------------

    async def _finish(self) -> RefundOutcome:
        await workflow.wait_condition(workflow.all_handlers_finished)
        return RefundOutcome(state=self.state())

    async def _record(self, action: str, status: CaseStatus | None = None, *,
                      actor: str = "workflow", release: bool = False,
                      refund: ProviderRefund | None = None,
                      detail: dict[str, object] | None = None) -> None:
        if status is not None:
            self._status = status
        assert self._request is not None
        await workflow.execute_activity(
            "record_case_event",
            CaseEventInput(refund_request_id=self._request.refund_request_id, action=action,
                           actor=actor, status=status, release_reservation=release,
                           provider_refund=refund, detail=detail or {}),
            **retry.CASE_EVENT)

    async def _collect_approvals(self, needed: int, timeout: timedelta) -> bool:
        """Waits durably for enough distinct, authorised approvals, a denial, or expiry."""
        await self._record("approval_requested", CaseStatus.AWAITING_APPROVAL,
                           detail={"required_approvals": needed,
                                   "rules_fired": list(self._decision.rules_fired
                                                       if self._decision else ())})
        deadline = workflow.now() + timeout
        while True:
            while self._approval_inbox:
                signal = self._approval_inbox.pop(0)
                record = ApprovalRecord(approver=signal.approver, decision=signal.decision,
                                        reason=signal.reason, at=workflow.now())
                verdict = check_approval(signal, self._requester,
                                         frozenset(a.approver for a in self._approvals))
                if not verdict.accepted:
                    self._refused.append(record)
                    await self._record("approval_refused", actor=signal.approver,
                                       detail={"decision": signal.decision.value,
                                               "refusal": verdict.reason})
                    continue
                if signal.decision is Decision.DENY:
                    self._approvals.append(record)
                    await self._record("approval_denied", CaseStatus.DENIED, actor=signal.approver,
                                       release=True, detail={"reason": signal.reason})
                    return False
                self._approvals.append(record)
                await self._record("approval_granted", actor=signal.approver,
                                   detail={"reason": signal.reason, "roles": list(signal.roles)})
                if len(self._approvals) >= needed:
                    return True
            remaining = deadline - workflow.now()
            if remaining <= timedelta(0):
                await self._record("approval_expired", CaseStatus.EXPIRED, release=True)
                return False
            try:
                await workflow.wait_condition(lambda: bool(self._approval_inbox), timeout=remaining)
            except TimeoutError:
                continue

    async def _submit_exactly_once(self, request: RefundRequest, submit_timeout: timedelta,
                                   backoff_cap: timedelta) -> ProviderRefund | None:
        """Submits; on an unknown outcome verifies at the provider before submitting again."""
        key = request.idempotency_key()
        attempt = 0
        while True:
            attempt += 1
            try:
                submitted: ProviderRefund = await workflow.execute_activity(
                    "submit_provider_refund", SubmitInput(request=request, idempotency_key=key),
                    result_type=ProviderRefund, start_to_close_timeout=submit_timeout,
                    retry_policy=retry.SUBMIT_RETRY)
                return submitted
            except ActivityError as err:
                cause = err.cause
                if isinstance(cause, ApplicationError) and cause.type == "ProviderDeclined":
                    self._failure_reason = cause.message
                    return None
                workflow.logger.warning("submit attempt %d outcome unknown: %s", attempt, cause)
            self._status = CaseStatus.VERIFYING
            verified: VerifyResult = await workflow.execute_activity(
                "verify_provider_refund",
                VerifyInput(request=request, reason=f"submit attempt {attempt} outcome unknown"),
                result_type=VerifyResult, **retry.VERIFY)
            if verified.refund is not None:
                return verified.refund
            pause = min(timedelta(seconds=2 ** min(attempt, 12)), backoff_cap,
                        retry.RESUBMIT_BACKOFF_CAP)
            await workflow.sleep(pause)
            self._status = CaseStatus.EXECUTING

    async def _follow_provider(self, refund: ProviderRefund, poll: timedelta,
                               late_failure_window: timedelta) -> None:
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
                wait = self._succeeded_at + late_failure_window - workflow.now()
                if wait <= timedelta(0):
                    return
            else:
                wait = poll
            try:
                await workflow.wait_condition(lambda: bool(self._event_inbox), timeout=wait)
            except TimeoutError:
                if status is ProviderRefundStatus.SUCCEEDED:
                    return
                assert self._request is not None
                verified = await workflow.execute_activity(
                    "verify_provider_refund",
                    VerifyInput(request=self._request, reason=f"no terminal event within {wait}"),
                    result_type=VerifyResult, **retry.VERIFY)
                if verified.refund is not None:
                    await self._observe(verified.refund, "verify_state")

    async def _observe(self, reported: ProviderRefund, source: str) -> None:
        """Moves the case forward for a reported status; never backwards."""
        change = classify_status_change(self._refund.status if self._refund else None,
                                        reported.status)
        if change in (StatusChange.SAME, StatusChange.STALE, StatusChange.IMPOSSIBLE):
            if change is not StatusChange.SAME:
                await self._record(f"provider_status_{change.value}_ignored",
                                   detail={"reported": reported.status.value, "source": source,
                                           "held": self._refund.status.value if self._refund else None})
            return
        self._refund = reported
        self._failure_reason = reported.failure_reason
        status = case_status_for(reported.status)
        if reported.status is ProviderRefundStatus.SUCCEEDED:
            self._succeeded_at = workflow.now()
            await self._post(LedgerKind.REFUND_SETTLED, reported)
            await self._record("refund_succeeded", status, refund=reported, detail={"source": source})
        elif change is StatusChange.LATE_FAILURE:
            await self._post(LedgerKind.REFUND_REVERSED, reported)
            await self._record("refund_failed_after_success", status, release=True, refund=reported,
                               detail={"source": source, "failure_reason": reported.failure_reason})
        elif reported.status in FINAL_PROVIDER_STATUSES:
            await self._record(f"refund_{reported.status.value}", status, release=True,
                               refund=reported, detail={"source": source,
                                                        "failure_reason": reported.failure_reason})
        else:
            await self._record("provider_status_changed", status, refund=reported,
                               detail={"source": source})

    async def _post(self, kind: LedgerKind, refund: ProviderRefund) -> None:
        assert self._request is not None
        result = await workflow.execute_activity(
            "post_ledger",
            LedgerInput(refund_request_id=self._request.refund_request_id, kind=kind,
                        amount=refund.amount, currency=self._request.currency,
                        provider_refund_id=refund.refund_id),
            result_type=LedgerResult, **retry.LEDGER)
        self._postings.append(result.posting_key)

