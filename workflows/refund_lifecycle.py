"""The refund case's lifecycle: cancel by ops, finishing a run, and continue-as-new (what
a run carries and how the next one resumes)."""

import contextlib
from datetime import timedelta

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from domain.lifecycle import FINAL_PROVIDER_STATUSES
    from domain.models import (
        CLOSED_STATUSES,
        CaseStatus,
        ProviderRefund,
        ProviderRefundStatus,
        RefundCarry,
        RefundOutcome,
    )
    from workflows import history
    from workflows.approvals import VERDICT_TAKING_PATCH
    from workflows.refund_case import (
        BOUNDED_PATCH,
        CANCEL_HORIZON_PATCH,
        CANCEL_NEWS_PATCH,
        CANCEL_NOTIFIED_PATCH,
        CHARGE_SCOPED_WAIT_PATCH,
        FINISH_NEWS_PATCH,
        FINISH_NOTIFIED_PATCH,
        HORIZON_PATCH,
        SUBMITTING,
        ValidationAbandoned,
    )
    from workflows.refund_provider import RefundProvider


class RefundLifecycle(RefundProvider):
    """How a refund run ends: cancelled, finished, or continued as new."""

    async def _canceled(self) -> RefundOutcome:
        """Ops cancelled the case (Temporal UI, CLI). Before any submit the reservation is
        released and the case reads `canceled_by_ops`. Once a submit may have gone out, the
        attempt (its start-to-close) and then the provider horizon are waited out (a create
        lands at the latest that long after its call ended) and the provider asked: a
        refund it holds is followed to its end and the ledger, as if nothing happened;
        none, and the case is released like before a submit. Runs after the cancel, so
        nothing here is cancelled again."""
        self._cancel_requested, self._holding = True, False
        if self._validating is not None and not self._validating.done():
            with contextlib.suppress(ActivityError, ValidationAbandoned):
                await self._validating
        await self._round.taken()
        await self._settle_interrupted()
        refund = self._refund
        if refund is None and self._status in CLOSED_STATUSES:  # decided already: only finishing
            if self._round.queued and workflow.patched(VERDICT_TAKING_PATCH):
                # verdicts queued behind a decision the cancel interrupted (a denial or expiry
                # being written): refused and answered, or their handlers hold the case open
                await self._round.close(self)
            return await self._finish()
        if refund is None and self._status in SUBMITTING:
            wait = self._timings.submit_timeout
            if workflow.patched(CANCEL_HORIZON_PATCH):
                wait += self._timings.provider_horizon
            await workflow.sleep(wait)
            await self._settle_unsubmitted()  # the approval, where the cancelled submit did not write it
            refund = await self._verify("case cancelled after a submit") or await self._told_of_refund()
        if refund is None:
            await self._record("canceled_by_ops", CaseStatus.CANCELED_BY_OPS, actor="ops", release=True,
                               detail={"stage": self._status.value})
            await self._round.close(self)
            return await self._finish()
        await self._round.close(self)
        await self._record("cancel_after_provider_refund", actor="ops",
                           detail={"provider_refund_id": refund.refund_id, "stage": self._status.value})
        if self._applying is not None:
            await self._check_mismatch(self._applying[1])
            await self._apply(*self._applying)
            self._applying = None
        news = bool(self._reporting or self._event_inbox or self._found_duplicates) and workflow.patched(
            CANCEL_NEWS_PATCH)
        while news and self._reporting:  # a report the cancel interrupted
            await self._report_duplicate(*self._reporting[0])
            self._reporting.pop(0)
        if self._refund is None or self._refund.status not in (
                *FINAL_PROVIDER_STATUSES, ProviderRefundStatus.SUCCEEDED):
            await self._follow_provider(refund)
        elif news:
            await self._follow_provider(self._refund)  # reads the rest, then ends (cancelled)
        return await self._finish()

    async def _told_of_refund(self, patch: str = CANCEL_NOTIFIED_PATCH) -> ProviderRefund | None:
        """The refund a queued event reports, when the lookup after a cancel missed it: its
        webhook came while the cancel waited out the horizon (a list lagging the write), or
        while the run waited for its last writes (`patch`: the branch's own marker)."""
        if self._notified() is None or not workflow.patched(patch):
            return None
        self._charge_scoped = workflow.patched(CHARGE_SCOPED_WAIT_PATCH)
        notified = self._notified()
        return await self._take_notification(notified) if notified is not None else None

    # -- bookkeeping -------------------------------------------------------------------

    async def _finish(self) -> RefundOutcome:
        await self._drain()
        while self._event_inbox and await self._read_late_news():
            await self._drain()
        return RefundOutcome(state=self.state())

    async def _read_late_news(self) -> bool:
        """News that came while the run waited for its last writes: read as in the watch when
        the case follows a refund; after a submit without one, a refund it reports is taken
        and followed. False when nothing here reads it (the run ends)."""
        if self._refund is not None:
            if not workflow.patched(FINISH_NEWS_PATCH):
                return False
            await self._watch()
            return True
        refund = await self._told_of_refund(FINISH_NOTIFIED_PATCH) if self._attempt else None
        if refund is None:
            return False
        await self._follow_provider(refund)
        return True

    async def _drain(self) -> None:
        """Late verdicts recorded, handlers finished, queued notices delivered: what a run
        waits for before it ends or continues as new."""
        if self._advising is not None:
            await self._advising
        await self.approvals_settled()
        await self._news.settled()
        await workflow.wait_condition(workflow.all_handlers_finished)
        if self._courier is not None:
            self._closing = True
            await self._courier
            self._courier, self._closing = None, False

    # -- bounded histories (continue-as-new, resubmit escalation) ------------------------

    async def _bound_history(self, phase: str, *, reason: str = "") -> None:
        """Past the history threshold, continues as new carrying the case and where it was
        (`phase`: the wait to resume). Never during a cancel: that run finishes the case."""
        long = history.at_bound(self._timings.continue_as_new_after_events)
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
            mismatched=self._mismatched,
            escalated=self._escalated, status_before_escalation=self._status_before_escalation,
            attempt=self._attempt, submit_ended_at=self._submit_ended, reason=reason,
            runs=carried.runs + 1 if carried else 2)}))

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
        self._context = carried.context  # carried on by this run's own continue-as-new
        if carried.decision is not None:
            self._round.requirements, self._round.tier = carried.decision.requirements, carried.decision.tier
        self._round.approvals, self._round.refused = list(carried.approvals), list(carried.refused)
        self._round.decided = True
        self._refund, self._failure_reason = carried.refund, carried.failure_reason
        self._postings = list(carried.postings)
        self._events_seen = carried.events_seen
        self._event_inbox, self._event_ids = list(carried.inbox), set(carried.event_ids)
        self._succeeded_at, self._lookup_escalated = carried.succeeded_at, carried.lookup_escalated
        self._duplicates, self._mismatched = set(carried.duplicates), carried.mismatched
        self._escalated, self._status_before_escalation = carried.escalated, carried.status_before_escalation
        self._attempt, self._submit_ended = carried.attempt, carried.submit_ended_at
