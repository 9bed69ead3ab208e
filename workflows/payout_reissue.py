"""The remediated payout case: the reissue window, the one reissue (with its horizon and
its bound on unknown outcomes), and continue-as-new, which only its waits need."""

from datetime import datetime, timedelta
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError, is_cancelled_exception

with workflow.unsafe.imports_passed_through():
    from domain import contracts, errors
    from domain.models import LedgerInput, LedgerKind
    from domain.payouts import (
        PayoutCarry,
        PayoutCaseState,
        PayoutCaseStatus,
        PayoutDecision,
        PayoutSnapshot,
        ProviderPayoutStatus,
        ReissueInput,
        final_status,
    )
    from workflows import retry
    from workflows.payout_case import (
        BOUNDED_PATCH,
        HELD_REISSUE_PATCH,
        LATE_REISSUE_PATCH,
        REISSUE_CANCEL_PATCH,
        REISSUE_HORIZON_PATCH,
        REISSUE_STEPS,
        REVERSAL_STEPS,
        PayoutCase,
    )


class PayoutReissue(PayoutCase):
    """After the runbook: a reissue on request, and the runs a long wait continues into."""

    # -- reissue -----------------------------------------------------------------------

    async def _offer_reissue(self, decision: PayoutDecision, deadline: datetime | None = None) -> None:
        """Keeps the remediated case open for `reissue_window` (until `deadline` in a
        continued run): later events join its timeline; an explicit reissue request gets its
        own approval round (the requester cannot approve it) and, approved, one reissue."""
        assert self._inp is not None
        deadline = deadline or workflow.now() + self._inp.reissue_window
        while self._reissue_ask is None:
            await self._take_events("reissue_window", deadline)
            remaining = deadline - workflow.now()
            if remaining <= timedelta(0):
                break
            try:
                await workflow.wait_condition(
                    lambda: bool(self._inbox) or self._reissue_ask is not None, timeout=remaining)
            except TimeoutError:
                break
        self._reissue_closed = True
        ask = self._reissue_ask
        if ask is None:
            await self._record("reissue_window_closed")
            return
        await self._record("reissue_requested", actor=ask.requester,
                           detail={"reason": ask.reason, "roles": list(ask.roles)})
        self._open_round(REISSUE_STEPS, requester=ask.requester)
        if await self._collect_approvals():
            await self._reissue()
        await self._take_events("closing")

    async def _reissue(self, *, resumed: bool = False) -> None:
        """Pays the beneficiary again (once: the activity's contract), posts the reissue
        entry, updates the ticket and tells everyone. `resumed`: a continued run goes on."""
        assert self._inp is not None and self._payout is not None
        case_id = self._inp.case_id
        if not resumed:
            await self._record("reissue_started", PayoutCaseStatus.REISSUING)
        failure = self._timeline[0].payout.status
        one_at_a_time = workflow.patched(REISSUE_HORIZON_PATCH)
        while True:
            try:
                made: PayoutSnapshot = await contracts.REISSUE_PAYOUT(
                    ReissueInput(case_id=case_id, original=self._payout, final_status=final_status(failure),
                                 approvers=tuple(a.approver for a in self._round.approvals)),
                    **(retry.PAYOUT_REISSUE_ONCE if one_at_a_time else retry.PAYOUT_REISSUE))
                break
            except ActivityError as err:
                cause = err.cause
                if is_cancelled_exception(err) and workflow.patched(REISSUE_CANCEL_PATCH):
                    # ops cancelled the case: no attempt after this one; what it may still make
                    # is looked up once it can no longer land (and booked), else ops decide
                    landed = await self._landed_late(failure, canceled=True)
                    if landed is None:
                        return
                    made = landed
                    break
                if one_at_a_time and not (isinstance(cause, ApplicationError) and cause.non_retryable):
                    # The outcome is unknown (or the attempt timed out): its create can land
                    # until the provider horizon, so the next lookup and create wait past it.
                    if self._attempts_spent():
                        landed = await self._landed_late(failure)
                        if landed is None:
                            return
                        made = landed
                        break
                    await workflow.sleep(self._inp.timings.provider_horizon)
                    await self._bound_history("reissuing")
                    continue
                if isinstance(cause, ApplicationError) and cause.type == errors.CONFIGURATION_REFUSED:
                    # Our key was refused, not the payout: an earlier attempt may have paid, so
                    # the case stays reissuing (ops told once) and asks again until fixed.
                    if not self._reissue_refused:
                        self._reissue_refused = True
                        await self._tell_ops_of_wait("payout_reissue_configuration_refused",
                                                     "reissue_configuration_refused",
                                                     {"error": cause.message})
                    await self._wait_to_ask_again()
                    continue
                if (isinstance(cause, ApplicationError) and cause.type == errors.BENEFICIARY_HELD
                        and workflow.patched(HELD_REISSUE_PATCH)):
                    # Another case holds the beneficiary: nothing was sent; asked again until
                    # its reissue or ops end that hold (ops told whenever the holders change).
                    held_by = tuple(str(c) for c in cause.details[0]) if cause.details else ()
                    if held_by != self._held_by:
                        self._held_by = held_by
                        await self._tell_ops_of_wait("payout_reissue_waiting_for_hold",
                                                     "reissue_waiting_for_beneficiary_hold", {
                                                         "held_by": list(held_by),
                                                         "beneficiary_id": self._payout.beneficiary_id},
                                                     occasion=",".join(held_by))
                    await self._wait_to_ask_again()
                    continue
                await self._notify("payout_reissue_failed", "payments_ops",
                                   {"error": str(cause), "approved_by": self._approvers()})
                await self._record("reissue_failed", PayoutCaseStatus.REISSUE_FAILED,
                                   detail={"error": str(cause)})
                return
        self._reissued = made
        await contracts.POST_LEDGER(
            LedgerInput(refund_request_id=case_id, kind=LedgerKind.PAYOUT_REISSUED,
                        amount=made.amount, currency=made.currency,
                        provider_refund_id=made.provider_payout_id),
            **retry.LEDGER)
        await self._ticket("reissued", "normal",
                           {"summary": f"payout {self._payout.id} reissued as {made.id}"})
        await self._notify("payout_reissued", "stakeholders", {
            "reissue_id": made.id, "approved_by": [a.approver for a in self._round.approvals],
            "amount": made.amount, "currency": made.currency})
        await self._record("reissue_completed", PayoutCaseStatus.REISSUED, detail={"reissue_id": made.id})

    async def _tell_ops_of_wait(self, kind: str, action: str, detail: dict[str, Any],
                                occasion: str = "") -> None:
        """Why the reissue waits, once per `occasion`: a notice to payments ops and the case's
        timeline."""
        await self._notify(kind, "payments_ops", detail, occasion)
        await self._record(action, detail=detail)

    async def _wait_to_ask_again(self) -> None:
        """The reissue loop's pause before it asks the activity again (may continue as new)."""
        assert self._inp is not None
        await workflow.sleep(self._inp.timings.status_poll_interval)
        await self._bound_history("reissuing")

    # -- bounded histories (continue-as-new, reissue escalation) --------------------------

    def _attempts_spent(self) -> bool:
        """After a reissue attempt with an unknown outcome: whether it was the
        `max_submit_attempts`-th, after which the loop stops creating."""
        assert self._inp is not None
        self._unknown_attempts += 1
        return (self._unknown_attempts >= self._inp.timings.max_submit_attempts
                and workflow.patched(BOUNDED_PATCH))

    async def _landed_late(self, failure: ProviderPayoutStatus, *,
                           canceled: bool = False) -> PayoutSnapshot | None:
        """The attempts are spent (or `canceled`: ops cancelled the case under one, which runs
        on to its start-to-close): the last one's create can still land until the provider
        horizon, so (since LATE_REISSUE_PATCH) that is waited out and the reissue looked up
        once more, creating nothing; found, it is the reissue (booked by the lookup). Else the
        case goes to ops, the hold kept, told whether the provider was seen to hold none."""
        assert self._inp is not None and self._payout is not None
        looked: dict[str, Any] = {}
        if canceled:
            await self._record("reissue_cancel_taken", detail={"attempts": self._unknown_attempts})
        if canceled or workflow.patched(LATE_REISSUE_PATCH):
            # a cancel does not reach the attempt it came under: it may still create until its
            # start-to-close, and what it creates lands within the horizon after
            running: timedelta = (retry.PAYOUT_REISSUE_ONCE["start_to_close_timeout"] if canceled
                                  else timedelta(0))
            await workflow.sleep(running + self._inp.timings.provider_horizon)
            try:
                found: PayoutSnapshot = await contracts.REISSUE_PAYOUT(
                    ReissueInput(case_id=self._inp.case_id, original=self._payout,
                                 final_status=final_status(failure), lookup_only=True),
                    **retry.PAYOUT_REISSUE_LOOKUP)
                return found
            except ActivityError as err:
                cause = err.cause
                none = isinstance(cause, ApplicationError) and cause.type == errors.REISSUE_NOT_MADE
                looked = {"provider_holds_none": none, "lookup": str(cause)}
        attempts = self._unknown_attempts
        ended = "canceled" if canceled else "attempts_exhausted"
        await self._notify(f"payout_reissue_{ended}", "payments_ops",
                           {"attempts": attempts, "approved_by": self._approvers(), **looked})
        await self._record(f"reissue_{ended}", PayoutCaseStatus.OPS_REVIEW,
                           detail={"attempts": attempts, **looked})
        return None

    async def _bound_history(self, phase: str, deadline: datetime | None = None) -> None:
        """Past the history threshold, continues as new carrying the case and the wait it
        was in (`phase`). Not while a reissue request is being taken: the window ends then."""
        assert self._inp is not None and self._payout is not None and self._decision is not None
        if not self._history_at_bound() or not workflow.patched(BOUNDED_PATCH):
            return
        await self.approvals_settled()
        await self._news.settled()
        asked = phase == "reissue_window"
        await workflow.wait_condition(lambda: workflow.all_handlers_finished()
                                      or (asked and self._reissue_ask is not None))
        if asked and self._reissue_ask is not None:
            return
        carried = self._inp.carried
        workflow.continue_as_new(self._inp.model_copy(update={"carried": PayoutCarry(
            phase=phase, status=self._status, payout=self._payout, decision=self._decision,
            reissue_round=self._steps is REISSUE_STEPS, requester=self._round.requester,
            approvals=tuple(self._round.approvals), refused=tuple(self._round.refused),
            runbook=tuple(self._runbook), timeline=tuple(self._timeline), keys=tuple(sorted(self._keys)),
            inbox=tuple(self._inbox), events_seen=self._events_seen, deadline=deadline,
            reissue_ask=self._reissue_ask, reissue_refused=self._reissue_refused, held_by=self._held_by,
            unknown_attempts=self._unknown_attempts, reissued=self._reissued,
            runs=carried.runs + 1 if carried else 2, verdict_ids=tuple(sorted(self._round.verdict_ids)))}))

    async def _resume(self, carried: PayoutCarry) -> PayoutCaseState:
        """A continued run: the wait it was in (the reissue window, the reissue loop, or the
        events that came meanwhile: `closing`); `__init__` restored the case."""
        if carried.phase == "reissue_window":
            await self._offer_reissue(carried.decision, carried.deadline)
            return await self._finish()
        self._reissue_closed = True
        if carried.phase == "reissuing":
            await self._reissue(resumed=True)
        await self._take_events("closing")
        return await self._finish()

    def _restore(self, carried: PayoutCarry) -> None:
        """The carried case, from `__init__`: before any handler of the new run, so a reissue
        request or event that comes with its first activation is judged against the case,
        not an opening one. Only state: no command, so no patch is needed."""
        self._status = self._status_recorded = carried.status
        self._payout, self._decision = carried.payout, carried.decision
        self._open_round(REISSUE_STEPS if carried.reissue_round else REVERSAL_STEPS, carried.requester)
        self._round.approvals, self._round.refused = list(carried.approvals), list(carried.refused)
        self._round.decided = True
        self._round.remember(carried.verdict_ids)
        self._runbook, self._timeline = list(carried.runbook), list(carried.timeline)
        self._events_seen = carried.events_seen
        self._inbox, self._keys = list(carried.inbox), set(carried.keys)
        self._reissue_ask, self._reissue_refused = carried.reissue_ask, carried.reissue_refused
        self._held_by = carried.held_by
        self._unknown_attempts, self._reissued = carried.unknown_attempts, carried.reissued
