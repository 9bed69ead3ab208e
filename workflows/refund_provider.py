"""The refund's provider side: validate, submit exactly once, verify an unknown outcome,
the resubmit horizon and bound, and following the provider's notifications and lookups
to a final state (with a second refund under our reference as an incident)."""

import asyncio
from datetime import timedelta
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
    from domain.events import (
        CONTRADICTED,
        OPS_READ_PREFIX,
        OPS_RESOLUTION,
        STATUS_NOTICES,
        Observation,
        contradicts_booked,
        no_refund_id,
        observe,
        refund_mismatch,
    )
    from domain.incidents import DUPLICATE_REPORTED, DuplicateRefundInput, ProviderWordInput, duplicate_detail
    from domain.lifecycle import FINAL_PROVIDER_STATUSES, StatusChange
    from domain.models import (
        CaseEventInput,
        CaseStatus,
        CaseWrite,
        ProviderEvent,
        ProviderRefund,
        ProviderRefundStatus,
        RefundRequest,
        SubmitInput,
        ValidateInput,
        VerifyInput,
        VerifyResult,
        Vetted,
    )
    from workflows import retry
    from workflows.refund_case import (
        ADYEN_WAIT_PATCH,
        BOUNDED_PATCH,
        CANCEL_VALIDATION_PATCH,
        CASE_MOVED_ON_PATCH,
        CHARGE_SCOPED_WAIT_PATCH,
        CONFIGURATION_INCIDENT,
        CONTRADICTION_PATCH,
        DUPLICATE_PATCH,
        EXECUTOR_EVENTS_PATCH,
        FOLLOW_SCOPE_PATCH,
        FOLLOWED_WAIT_PATCH,
        HELD_MONEY_PATCH,
        HORIZON_PATCH,
        INTEGRATIONS_PATCH,
        MISMATCH_PATCH,
        OPS_NONE_CONTRADICTED_PATCH,
        OPS_READ_CONTRADICTED_PATCH,
        SUPERSEDED_RESOLUTION,
        SUPERSEDED_RESOLUTION_PATCH,
        TAKEN_NOTIFICATION_PATCH,
        VERIFY_DUPLICATES_PATCH,
        ValidationAbandoned,
    )
    from workflows.refund_writes import RefundWrites


class RefundProvider(RefundWrites):
    """Everything the refund workflow asks of, and takes from, the provider."""

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
            before, self._deferred = self._deferred, ()  # the deciding approval's writes
            self._unsubmitted = before
            try:
                submitted: ProviderRefund = await contracts.SUBMIT_PROVIDER_REFUND(
                    SubmitInput(request=request, idempotency_key=key, started=started, before=before),
                    start_to_close_timeout=self._timings.submit_timeout,
                    retry_policy=retry.SUBMIT_RETRY)
                self._unsubmitted = ()
                return submitted
            except ActivityError as err:
                if self._cancelled(err):  # a cancel is no unknown outcome
                    raise
                started, self._holding = None, False  # committed before the provider was called
                cause = err.cause
                if (isinstance(cause, ApplicationError) and cause.type == errors.CASE_MOVED_ON
                        and workflow.patched(CASE_MOVED_ON_PATCH)):
                    # nothing was sent; the deciding approval's rows are written (what people
                    # did), never `execution_started`, which would reopen a closed case
                    self._moved_on = cause.message
                    await self._settle_unsubmitted()
                    return None
                if isinstance(cause, ApplicationError) and cause.type == errors.DECLINED:
                    self._failure_reason, self._unsubmitted = cause.message, ()  # declined after the intent
                    return None
                await self._settle_unsubmitted()  # the attempt may have failed before its intent
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
                if self._local_validation:
                    vetted: Vetted = await contracts.VALIDATE_AND_DECIDE.local(ValidateInput(request=request),
                                                                               **options)
                elif self._trips:
                    vetted = await contracts.VALIDATE_AND_DECIDE(ValidateInput(request=request), **options)
                else:
                    vetted = Vetted(validation=await contracts.VALIDATE_REFUND(
                        ValidateInput(request=request), **options))
                await self._answered()
                return vetted
            except FailureError as err:  # a local activity's failure comes unwrapped
                if not await self._escalated_unanswered("validate", err, cancellable=True):
                    raise

    async def _escalated_unanswered(self, step: str, err: FailureError, *, cancellable: bool = False) -> bool:
        """For a provider read that cannot succeed by retrying (a refused key) or whose
        bounded retries ran out: escalates, waits a poll interval and says to ask again.
        False for any other failure, which the caller handles. A local activity's failure
        (validation's, since LOCAL_VALIDATION_PATCH) comes unwrapped, without a retry state:
        reaching the workflow at all, its retries are over. `cancellable` (validation, which
        holds nothing between attempts): a cancel ends the wait, back in the status before
        the escalation, by raising ValidationAbandoned."""
        if isinstance(err, ActivityError):
            cause = err.cause
            over = err.retry_state in (RetryState.MAXIMUM_ATTEMPTS_REACHED, RetryState.TIMEOUT)
        else:  # a cancellation is never an outcome (validation is shielded from one anyway)
            cause, over = err, not is_cancelled_exception(err)
        if isinstance(cause, ApplicationError) and cause.type == errors.CONFIGURATION_REFUSED:
            reason = CONFIGURATION_INCIDENT
        elif over:
            reason = f"{step}_retries_exhausted"
        else:
            return False
        await self._escalate(reason, str(cause))
        if cancellable and workflow.patched(CANCEL_VALIDATION_PATCH):
            try:
                await workflow.wait_condition(lambda: self._cancel_requested,
                                              timeout=self._timings.status_poll_interval)
            except TimeoutError:
                return True
            self._status = self._status_before_escalation
            raise ValidationAbandoned(reason)
        await workflow.sleep(self._timings.status_poll_interval)
        return True

    async def _escalate(self, reason: str, error: str) -> None:
        """Once per incident: ops get a notice and the case shows ops review (the
        reservation stays; the metric counts it) while the workflow keeps asking. Each
        incident is its own occasion, its run's id and its count in that run: the same in a
        workflow task tried again, another after continue-as-new or a reset (a new run), so a
        second outage is told too, and nothing is carried a worker of an older version cannot
        read."""
        if self._escalated == reason:
            return
        if self._escalated is None:
            self._status_before_escalation = self._status
        self._escalated = reason
        self._escalations += 1
        await self._notify(reason, "operator", {"error": error},
                           occasion=f"{workflow.info().run_id}:{self._escalations}")
        await self._record(reason, CaseStatus.OPS_REVIEW, detail={"error": error})

    async def _answered(self) -> None:
        """The provider answers again: the case leaves ops review for the state it was in."""
        if self._escalated is None:
            return
        reason, self._escalated = self._escalated, None
        await self._record("provider_answering_again", self._status_before_escalation,
                           detail={"escalation": reason})

    def _notified(self) -> tuple[ProviderEvent, ProviderRefund] | None:
        """The first queued event that reports this case's refund (by our reference, on the
        case's charge since CHARGE_SCOPED_WAIT_PATCH, or by the provider's refund id once we
        know it)."""
        assert self._request is not None
        request = self._request
        for event in self._event_inbox:
            reported = event.as_refund()
            if reported is None or (self._provider_scoped and reported.provider != request.provider):
                continue
            other_charge = (self._charge_scoped and bool(reported.charge_id)
                            and reported.charge_id != request.charge_id)
            if (reported.reference == request.refund_request_id and not other_charge) or (
                    self._refund is not None and reported.refund_id == self._refund.refund_id):
                return event, reported
        return None

    async def _await_notification(self, reason: str) -> ProviderRefund:
        """Verify-state for a provider without a status lookup (Adyen): the notification is
        the only answer, so wait for it on durable timers, escalate to ops review once when
        the first timer runs out, and never resubmit (a resend could refund twice). Ops end
        the wait with what the provider shows (`starters.provider_wait`): the same event."""
        await self._record("awaiting_provider_notification", detail={"reason": reason})
        self._scope_wait()
        while True:
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
            if (refund := await self._take_notification(notified)) is not None:
                return refund

    def _scope_wait(self) -> None:
        """What a wait by reference takes: the case's charge's refunds, and while the case
        follows a refund, only that refund's word."""
        self._charge_scoped = workflow.patched(CHARGE_SCOPED_WAIT_PATCH)
        self._follow_scoped = (self._context == "follow" and self._refund is not None
                               and workflow.patched(FOLLOWED_WAIT_PATCH))

    async def _take_notification(
            self, notified: tuple[ProviderEvent, ProviderRefund]) -> ProviderRefund | None:
        """Takes a queued event that reports this case's refund off the inbox, with its row;
        another refund carrying our reference while the case follows its own is raised as a
        duplicate instead (None: the wait goes on)."""
        event, refund = notified
        self._event_inbox.remove(event)
        if self._follow_scoped and self._refund is not None and refund.refund_id != self._refund.refund_id:
            await self._duplicate_refund(refund, f"webhook:{event.event_type}:{event.event_id}")
            return None
        try:
            await self._record("provider_notification_received",
                               detail={"event_id": event.event_id, "event_type": event.event_type})
        except (asyncio.CancelledError, FailureError) as err:
            if self._cancelled(err) and workflow.patched(TAKEN_NOTIFICATION_PATCH):
                self._event_inbox.insert(0, event)  # the cancel's look takes it again
            raise
        return refund

    async def _follow_provider(self, refund: ProviderRefund) -> None:
        """Applies provider states until final, then watches for a late failure."""
        self._context = "follow"
        await self._observe(refund, "provider_status")
        self._holding = False
        await self._watch()

    async def _watch(self) -> None:
        """Reads the queued events and waits for more until the refund is final, or its late
        failure window (from its success) has passed."""
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
                assert self._refund is not None and self._request is not None
                if await self._superseded(event, reported):
                    continue
                foreign = reported.provider != self._request.provider
                if (foreign and reported.provider == self._refund.provider
                        and workflow.patched(EXECUTOR_EVENTS_PATCH)):
                    foreign = False  # the executor's own word on the refund followed
                if self._provider_scoped and foreign and workflow.patched(FOLLOW_SCOPE_PATCH):
                    workflow.logger.warning("ignoring event %s of provider %s", event.event_id,
                                            reported.provider)
                    continue
                if reported.refund_id != self._refund.refund_id:
                    if await self._reconcile_ops_read_contradicted(event, reported):
                        continue
                    if reported.reference == self._request_id() and self.since(DUPLICATE_PATCH):
                        await self._duplicate_refund(reported, f"webhook:{event.event_type}:{event.event_id}")
                    else:
                        workflow.logger.warning("ignoring event %s for refund %s", event.event_id,
                                                reported.refund_id)
                    continue
                await self._reconcile_ops_read_contradicted(event, reported)
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

    async def _reconcile_ops_read_contradicted(self, event: ProviderEvent, reported: ProviderRefund) -> bool:
        """The provider's own success for the refund the case holds failed on ops' reading of
        a wait ("no refund": its raw status `ops:`), or, the case holding ops' "none" (its
        create answer lost), for a refund under our reference on its charge (the one that
        create made): the case never moves backwards, so it is reconciled as the relay
        reconciles such a word after the close (a break for ops and its tier's approvers, who
        correct the case and book the refund). True when it was."""
        held, request = self._refund, self._request
        if (held is None or request is None or held.status not in FINAL_PROVIDER_STATUSES
                or not held.raw_status.startswith(OPS_READ_PREFIX)
                or reported.status is not ProviderRefundStatus.SUCCEEDED
                or event.event_type.startswith(f"{OPS_RESOLUTION}.")):
            return False
        if reported.refund_id == held.refund_id:
            if not workflow.patched(OPS_READ_CONTRADICTED_PATCH):
                return False
        elif (held.refund_id != no_refund_id(request.refund_request_id)
              or reported.reference != request.refund_request_id
              or reported.charge_id not in ("", request.charge_id)
              or not workflow.patched(OPS_NONE_CONTRADICTED_PATCH)):
            return False
        await contracts.RECONCILE_PROVIDER_WORD(
            ProviderWordInput(event_id=event.event_id, refund=reported, occurred_at=event.occurred_at),
            **retry.CASE_EVENT)
        return True

    async def _superseded(self, event: ProviderEvent, reported: ProviderRefund) -> bool:
        """Whether `event` is an ops resolution of the notification wait that came after the
        provider's own word had ended it (the relay lets one through only while the wait is
        open, so here it raced that word) about the refund the case follows, or naming none:
        ops' older reading of the dashboard, recorded and not applied, and ops told (they
        were answered "resolved"). One that agrees with what the case holds is read as any
        repeat; one naming another refund goes on to the duplicate check."""
        assert self._refund is not None
        agrees = (reported.refund_id, reported.status) == (self._refund.refund_id, self._refund.status)
        if (not event.event_type.startswith(f"{OPS_RESOLUTION}.") or agrees
                or reported.refund_id not in (self._refund.refund_id, no_refund_id(self._request_id()))
                or not workflow.patched(SUPERSEDED_RESOLUTION_PATCH)):
            return False
        detail = {"event_id": event.event_id, "resolution": event.raw_status,
                  "reason": reported.failure_reason, "provider_refund_id": self._refund.refund_id,
                  "provider_status": self._refund.status.value}
        notice = self._notice(SUPERSEDED_RESOLUTION, "operator", detail, occasion=event.event_id)
        await self._record(SUPERSEDED_RESOLUTION, detail=detail, notices=(notice,))
        self._deliver_later(notice.dedup_key)
        return True

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
        if duplicate.refund_id in self._duplicates:
            return
        self._duplicates.add(duplicate.refund_id)
        self._reporting.append((duplicate, source))  # a cancel meanwhile reports it again
        await self._report_duplicate(duplicate, source)
        self._reporting.remove((duplicate, source))

    async def _report_duplicate(self, duplicate: ProviderRefund, source: str) -> None:
        """The duplicate's incident: its break, the ops notice, the case to ops review."""
        assert self._refund is not None
        detail = duplicate_detail(self._refund.refund_id, duplicate, source)
        await contracts.OPEN_DUPLICATE_REFUND_BREAK(
            DuplicateRefundInput(case_id=self._request_id(), followed_refund_id=self._refund.refund_id,
                                 duplicate=duplicate, source=source),
            **retry.CASE_EVENT)
        await self._notify(DUPLICATE_REPORTED, "operator", detail, occasion=duplicate.refund_id)
        await self._record(DUPLICATE_REPORTED, CaseStatus.OPS_REVIEW, detail=detail)

    async def _observe(self, reported: ProviderRefund, source: str) -> None:
        """Moves the case forward for a reported status; never backwards. The ledger entry
        and the notices come before the status that announces them."""
        held = self._refund.status if self._refund else None
        step = observe(held, reported)
        if step.status is None:
            detail = {"reported": reported.status.value, "source": source,
                      "held": held.value if held else None}
            if contradicts_booked(held, reported) and workflow.patched(CONTRADICTION_PATCH):
                notice = self._notice(CONTRADICTED, "operator", detail)
                await self._record(CONTRADICTED, CaseStatus.OPS_REVIEW, detail=detail, notices=(notice,),
                                   kept=True)
                self._deliver_later(notice.dedup_key)
            elif step.change is not StatusChange.SAME:
                await self._record(step.action, detail=detail)
            elif self._held_for_other_money(reported):
                await self._check_mismatch(reported)
            return
        self._refund = reported
        self._failure_reason = reported.failure_reason
        if reported.status is ProviderRefundStatus.SUCCEEDED:
            self._succeeded_at = workflow.now()
        detail = {"source": source, "failure_reason": reported.failure_reason,
                  "provider_refund_id": reported.refund_id}
        self._applying = (step, reported, detail)  # before any await: a cancel applies it
        await self._check_mismatch(reported)
        await self._apply(step, reported, detail)
        self._applying = None

    def _held_for_other_money(self, reported: ProviderRefund) -> bool:
        """The refund the case holds, reported in the same status for other money than it
        booked (ops' reading of a wait booked the request's amount): the provider's word is
        news the ledger did not follow."""
        held = self._refund
        return (held is not None and held.refund_id == reported.refund_id
                and refund_mismatch(held, reported) is not None and workflow.patched(HELD_MONEY_PATCH))

    async def _check_mismatch(self, reported: ProviderRefund) -> None:
        """Once per case: a refund the provider holds for another amount or currency than
        the request moved money other than approved. The ledger books what the provider
        reports; the case stays with ops, whatever its refund does next."""
        assert self._request is not None
        if self._mismatched or (found := refund_mismatch(self._request, reported)) is None:
            return
        if not workflow.patched(MISMATCH_PATCH):
            return
        detail = {**found, "provider_refund_id": reported.refund_id}
        await self._notify("provider_refund_mismatch", "operator", detail)
        await self._record("provider_refund_mismatch", CaseStatus.OPS_REVIEW, detail=detail)
        self._mismatched = True  # once both are written: a cancel in between checks again

    async def _apply(self, step: Observation, reported: ProviderRefund, detail: dict[str, Any]) -> None:
        """The ledger entry, the notices, then the status; each step idempotent, so a
        cancelled application can run again. In the newest shape all three are one
        transaction."""
        # After a duplicate or mismatched refund the case stays with ops, whatever it does.
        status = CaseStatus.OPS_REVIEW if self._duplicates or self._mismatched else step.status
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
        if reported.status is ProviderRefundStatus.REQUIRES_ACTION and not self._dispatched:
            return ()  # announced since; in older shapes a notice is a command of its own
        return STATUS_NOTICES.get(reported.status, ())

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
        self._scope_wait()
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
            if (refund := await self._take_notification(notified)) is not None:
                return refund
