"""PayoutReversalWorkflow: one governed payout exception, from the provider's late failure
of a payout we hold as paid to a held payout, a compensating entry, a ticket and a notice;
then, only on an approved and explicit request, one reissue.

Workflow id == case id == `<provider>-payout-<payout id>`, so every event about the payout
(each delivery, duplicate, late or out-of-order one) reaches this execution and acts at
most once by its idempotency key (`provider_event_id + payout_id`). The advisor's
recommendation never comes back here. Deterministic: no I/O, no clocks but workflow time;
activities are called by name; idempotency of each step lives in its activity.
"""

from datetime import datetime, timedelta
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from domain import contracts, errors
    from domain.integrations import DeliverNoticeInput
    from domain.models import (
        ApprovalProgress,
        LedgerInput,
        LedgerKind,
        NoticeInput,
    )
    from domain.payouts import (
        APPROVAL_STATUSES,
        Admission,
        AdmitInput,
        AdmitResult,
        HoldInput,
        HoldResult,
        LinkedTicket,
        LinkTicketInput,
        PayoutCarry,
        PayoutCaseEventInput,
        PayoutCaseInput,
        PayoutCaseState,
        PayoutCaseStatus,
        PayoutDecision,
        PayoutEvent,
        PayoutPolicyInput,
        PayoutSnapshot,
        ReissueAsk,
        ReissueInput,
        ReleaseResult,
        ReversalInput,
        TicketInput,
        TicketResult,
        TriageInput,
        final_status,
    )
    from workflows import retry
    from workflows.approvals import ApprovalOutcome, ApprovalRound, ApprovingWorkflow

# What each approval step does to the case, in the reversal round and the reissue round.
REVERSAL_STEPS = {ApprovalOutcome.REQUESTED: PayoutCaseStatus.AWAITING_APPROVAL,
                  ApprovalOutcome.DENIED: PayoutCaseStatus.DENIED,
                  ApprovalOutcome.EXPIRED: PayoutCaseStatus.EXPIRED}
REISSUE_STEPS = {ApprovalOutcome.REQUESTED: PayoutCaseStatus.AWAITING_REISSUE_APPROVAL,
                 ApprovalOutcome.DENIED: PayoutCaseStatus.REISSUE_DENIED,
                 ApprovalOutcome.EXPIRED: PayoutCaseStatus.REISSUE_EXPIRED}
# Step C files a real ticket (ServiceNow, Jira) and records its reference; histories
# recorded before only queued the ticket notice and kept a placeholder reference.
TICKETS_PATCH = "payout-tickets-1"
# Histories recorded before the provider horizon let Temporal retry a reissue at its backoff.
REISSUE_HORIZON_PATCH = "reissue-horizon-1"
# The reissue window and the reissue loop continue as new past `continue_as_new_after_events`,
# and a reissue stops after `max_submit_attempts` unknown outcomes (the case goes to ops, the
# hold kept); before, a long outage or a stream of events ran into Temporal's history limit.
BOUNDED_PATCH = "payout-bounded-history-1"
NEXT_STEPS = ("a reissue happens only on an explicit reissue request with its own approval; "
              "see the recommendation on the case")


@workflow.defn
class PayoutReversalWorkflow(ApprovingWorkflow):
    """Admit → advice → policy tier → approvals → hold → compensating entry → ticket →
    notice; if the entry cannot be posted, a high-priority ticket, notices and (where policy
    allows) the hold's rollback instead. A remediated case then waits `reissue_window` for
    a reissue request, which has its own approval round and executes once."""

    @workflow.init
    def __init__(self, inp: PayoutCaseInput) -> None:
        self._inp: PayoutCaseInput | None = inp
        self._status = PayoutCaseStatus.OPENING
        self._status_recorded = PayoutCaseStatus.OPENING
        self._inbox: list[PayoutEvent] = []
        self._keys: set[str] = set()
        self._timeline: list[PayoutEvent] = []
        self._events_seen = 0
        self._payout: PayoutSnapshot | None = None
        self._decision: PayoutDecision | None = None
        self._round = ApprovalRound()
        self._steps = REVERSAL_STEPS
        self._runbook: list[str] = []
        self._reissue_closed = False
        self._reissue_ask: ReissueAsk | None = None
        self._reissued: PayoutSnapshot | None = None
        self._reissue_refused = False  # ops told that our key is refused
        self._unknown_attempts = 0  # reissue attempts with an unknown outcome, across runs
        if inp.carried is not None:
            self._restore(inp.carried)

    # -- interface ---------------------------------------------------------------------

    @workflow.signal
    def payout_event(self, event: PayoutEvent) -> None:
        """A verified payout webhook (may be late, duplicated or out of order); a repeat of
        an idempotency key already taken is counted and dropped."""
        self._events_seen += 1
        key = event.idempotency_key()
        if key not in self._keys:
            self._keys.add(key)
            self._inbox.append(event)

    @workflow.update
    async def request_reissue(self, ask: ReissueAsk) -> ApprovalProgress:
        """An explicit request to pay the beneficiary again, taken once per case; answered
        once its own approval round is recorded (so the case row already says so), with the
        roles it needs."""
        if self._reissue_ask is not None:  # two requests validated in the same activation
            raise ApplicationError("a reissue was already requested for this case", type=errors.REISSUE_TAKEN)
        self._reissue_ask = ask
        await workflow.wait_condition(lambda: self._status_recorded is self._status
                                      and self._status is not PayoutCaseStatus.REMEDIATED)
        return ApprovalProgress(accepted=True, status=self._status.value,
                                missing_roles=tuple(self._round.missing()))

    @request_reissue.validator
    def _validate_reissue(self, ask: ReissueAsk) -> None:
        if self._reissue_ask is not None:
            raise ApplicationError("a reissue was already requested for this case", type=errors.REISSUE_TAKEN)
        # From the moment the case is remediated (the case row may say so before the offer
        # below starts) until the window closes.
        if self._status is not PayoutCaseStatus.REMEDIATED or self._reissue_closed:
            raise ApplicationError(f"case is {self._status.value}; only a remediated case takes a "
                                   "reissue request, within its window", type=errors.NOT_REISSUABLE)

    @workflow.query
    def state(self) -> PayoutCaseState:
        """The case as this workflow knows it."""
        return PayoutCaseState(
            case_id=workflow.info().workflow_id, status=self._status, payout=self._payout,
            decision=self._decision.decision if self._decision else None,
            approvals=tuple(self._round.approvals), refused_approvals=tuple(self._round.refused),
            missing_roles=tuple(self._round.missing()), runbook=tuple(self._runbook),
            events_seen=self._events_seen,
            reissue_payout_id=self._reissued.id if self._reissued else None)

    @workflow.run
    async def run(self, inp: PayoutCaseInput) -> PayoutCaseState:
        if inp.carried is not None:
            return await self._resume(inp.carried)
        await workflow.wait_condition(lambda: bool(self._inbox))
        first = self._inbox.pop(0)
        admitted = await self._admit(first, case_open=False)
        if admitted.admission is not Admission.OPEN or admitted.payout is None:
            self._status = PayoutCaseStatus.NO_ACTION
            return await self._finish()
        self._payout = admitted.payout
        self._timeline.append(first)
        await self._take_events()
        await self._advise()
        self._decision = decision = await contracts.DECIDE_PAYOUT_REVERSAL(
            PayoutPolicyInput(case_id=inp.case_id, payout=self._payout),
            **retry.POLICY)
        self._open_round(REVERSAL_STEPS, requester=f"provider:{inp.provider}")
        if not await self._round.collect(self, inp.timings):
            return await self._finish()
        await self._take_events()
        if await self._remediate(decision):
            await self._offer_reissue(decision)
        return await self._finish()

    # -- events ------------------------------------------------------------------------

    async def _admit(self, event: PayoutEvent, *, case_open: bool) -> AdmitResult:
        assert self._inp is not None
        result: AdmitResult = await contracts.ADMIT_PAYOUT_EVENT(
            AdmitInput(case_id=self._inp.case_id, event=event, case_open=case_open),
            **retry.PAYOUT_ADMIT)
        return result

    async def _take_events(self, phase: str | None = None, deadline: datetime | None = None) -> None:
        """Later events go through the same gate onto the timeline; none acts again: a
        second failure joins the case, `paid` after a failure never re-marks it paid. In a
        `phase` a continued run can resume, each event is a turn that may continue as new;
        in the reissue window a reissue request comes first (events wait for it)."""
        while self._inbox:
            if phase == "reissue_window" and self._reissue_ask is not None:
                return
            if phase is not None:
                await self._bound_history(phase, deadline)
            event = self._inbox.pop(0)
            if (await self._admit(event, case_open=True)).admission is Admission.JOIN:
                self._timeline.append(event)

    async def _advise(self) -> None:
        """Has the advisor store a recommendation for approvers. Only whether it exists
        comes back, so nothing here can act on it; a failure means "no advice"."""
        assert self._inp is not None and self._payout is not None
        try:
            await contracts.TRIAGE_PAYOUT_EXCEPTION(
                TriageInput(case_id=self._inp.case_id, payout=self._payout, events=tuple(self._timeline)),
                **retry.PAYOUT_TRIAGE)
        except ActivityError as err:
            await self._record("recommendation_unavailable", detail={"error": str(err.cause)})

    # -- approvals (the round calls back here) -------------------------------------------

    def _open_round(self, steps: dict[ApprovalOutcome, PayoutCaseStatus], requester: str) -> None:
        assert self._decision is not None
        if steps is not self._steps:
            self._round = ApprovalRound()
        self._steps = steps
        self._round.requirements = self._decision.decision.requirements
        self._round.tier = self._decision.decision.tier
        self._round.requester = requester

    def approval_status(self) -> tuple[bool, str]:
        return self._status in APPROVAL_STATUSES, self._status.value

    async def approval_step(self, action: str, outcome: ApprovalOutcome | None = None, *,
                            actor: str = "workflow", detail: dict[str, Any] | None = None) -> None:
        await self._record(action, self._steps[outcome] if outcome else None, actor=actor, detail=detail)

    async def approval_notice(self, kind: str, audience: str, detail: dict[str, Any]) -> None:
        await self._notify(kind, audience, detail)

    # -- the runbook -------------------------------------------------------------------

    async def _remediate(self, decision: PayoutDecision) -> bool:
        """The fixed runbook, each step once: A hold, B compensating entry, C ticket, D
        notice. If B does not land within `ledger_pending_after`, the failure branch runs
        instead of C and D. True when the case is remediated."""
        assert self._inp is not None and self._payout is not None
        case_id, payout = self._inp.case_id, self._payout
        await self._record("runbook_started", PayoutCaseStatus.EXECUTING)
        hold: HoldResult = await contracts.HOLD_PAYOUT(
            HoldInput(case_id=case_id, payout_id=payout.id,
                      hold_beneficiary=decision.hold_beneficiary_payouts),
            **retry.PAYOUT_HOLD)
        self._runbook.append("hold")
        try:
            await contracts.POST_PAYOUT_REVERSAL(
                ReversalInput(case_id=case_id, payout=payout),
                schedule_to_close_timeout=self._inp.timings.ledger_pending_after,
                **retry.LEDGER)
        except ActivityError as err:
            if not await self._ledger_failed(decision, str(err.cause)):
                return False
        else:
            self._runbook.append("compensating_entry")
        approvers = self._approvers()
        ticket = await self._ticket("remediated", "normal", {
            "summary": f"payout {payout.id} failed at {payout.provider} after it was paid; held and "
                       "reversed in the ledger", "approved_by": approvers})
        self._runbook.append("ticket")
        await self._notify("payout_exception_remediated", "stakeholders", {
            "decision": "approved", "approved_by": approvers,
            "tier": decision.decision.tier, "held_from": hold.held_from.value,
            "beneficiary_held": hold.beneficiary_held, "ticket_ref": ticket.ticket_ref,
            "next_steps": NEXT_STEPS})
        self._runbook.append("notice")
        await self._record("runbook_completed", PayoutCaseStatus.REMEDIATED,
                           detail={"runbook": list(self._runbook), "ticket_ref": ticket.ticket_ref})
        return True

    async def _ledger_failed(self, decision: PayoutDecision, error: str) -> bool:
        """Step B failed after A: the hold returns to its previous state where policy
        allows, then finance and payments ops hear of it and a high-priority ticket opens.
        True when the entry turns out to have landed after all (the runbook goes on)."""
        assert self._inp is not None and self._payout is not None
        outcome = "hold_kept"
        if decision.rollback_hold_on_ledger_failure:
            released: ReleaseResult = await contracts.RELEASE_PAYOUT_HOLD(
                ReversalInput(case_id=self._inp.case_id, payout=self._payout),
                **retry.PAYOUT_HOLD)
            if released.posted:
                self._runbook.append("compensating_entry")
                return True
            outcome = "hold_rolled_back"
            self._runbook.append("rollback")
        detail = {"error": error, "outcome": outcome, "priority": "high", "approved_by": self._approvers()}
        for audience in ("finance", "payments_ops"):
            await self._notify("payout_ledger_failed", audience, detail)
        await self._ticket("ledger_failed", "high", {"summary": f"compensating entry for payout "
                                                                f"{self._payout.id} failed: {outcome}"})
        rolled_back = outcome == "hold_rolled_back"
        await self._record("ledger_failed", PayoutCaseStatus.ROLLED_BACK if rolled_back
                           else PayoutCaseStatus.LEDGER_FAILED, detail=detail)
        return False

    async def _ticket(self, occasion: str, priority: str, detail: dict[str, str]) -> TicketResult:
        """Opens (first occasion) or updates the case's ticket, once per occasion: queues its
        notice, delivers it to ServiceNow and Jira (a lost create answer is found by the
        retry's search, so one ticket per case) and records the ticket's reference. A
        ticketing outage is recorded and never stops the runbook."""
        assert self._inp is not None
        case_id = self._inp.case_id
        ticket: TicketResult = await contracts.OPEN_PAYOUT_TICKET(
            TicketInput(case_id=case_id, occasion=occasion, priority=priority,
                        detail={**self._facts(), **detail}),
            **retry.PAYOUT_TICKET)
        if not workflow.patched(TICKETS_PATCH) or ticket.notice_key is None:
            return ticket
        try:
            await contracts.DELIVER_NOTICE(DeliverNoticeInput(dedup_key=ticket.notice_key), **retry.DELIVER)
        except ActivityError as err:
            await self._record("ticket_delivery_incomplete",
                               detail={"occasion": occasion, "error": str(err.cause)})
        linked: LinkedTicket = await contracts.LINK_PAYOUT_TICKET(
            LinkTicketInput(case_id=case_id, occasion=occasion),
            **retry.PAYOUT_TICKET)
        return TicketResult(ticket_ref=linked.ticket_ref, newly_queued=ticket.newly_queued,
                            notice_key=ticket.notice_key)

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
        if await self._round.collect(self, self._inp.timings):
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
                    ReissueInput(case_id=case_id, original=self._payout,
                                 final_status=final_status(failure)),
                    **(retry.PAYOUT_REISSUE_ONCE if one_at_a_time else retry.PAYOUT_REISSUE))
                break
            except ActivityError as err:
                cause = err.cause
                if one_at_a_time and not (isinstance(cause, ApplicationError) and cause.non_retryable):
                    # The outcome is unknown (or the attempt timed out): its create can land
                    # until the provider horizon, so the next lookup and create wait past it.
                    if await self._reissue_exhausted():
                        return
                    await workflow.sleep(self._inp.timings.provider_horizon)
                    await self._bound_history("reissuing")
                    continue
                if isinstance(cause, ApplicationError) and cause.type == errors.CONFIGURATION_REFUSED:
                    # Our key was refused, not the payout: an earlier attempt may have paid, so
                    # the case stays reissuing (ops told once) and asks again until fixed.
                    if not self._reissue_refused:
                        self._reissue_refused = True
                        await self._notify("payout_reissue_configuration_refused", "payments_ops",
                                           {"error": cause.message})
                        await self._record("reissue_configuration_refused", detail={"error": cause.message})
                    await workflow.sleep(self._inp.timings.status_poll_interval)
                    await self._bound_history("reissuing")
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

    # -- bounded histories (continue-as-new, reissue escalation) --------------------------

    async def _reissue_exhausted(self) -> bool:
        """After a reissue attempt with an unknown outcome: the `max_submit_attempts`-th
        sends the case to ops (the hold stays; an attempt may still have paid, which ops
        check at the provider) and the loop stops creating. False: try again."""
        assert self._inp is not None
        self._unknown_attempts += 1
        attempts = self._unknown_attempts
        if attempts < self._inp.timings.max_submit_attempts or not workflow.patched(BOUNDED_PATCH):
            return False
        await self._notify("payout_reissue_attempts_exhausted", "payments_ops",
                           {"attempts": attempts, "approved_by": self._approvers()})
        await self._record("reissue_attempts_exhausted", PayoutCaseStatus.OPS_REVIEW,
                           detail={"attempts": attempts})
        return True

    async def _bound_history(self, phase: str, deadline: datetime | None = None) -> None:
        """Past the history threshold, continues as new carrying the case and the wait it
        was in (`phase`). Not while a reissue request is being taken: the window ends then."""
        assert self._inp is not None and self._payout is not None and self._decision is not None
        info = workflow.info()
        if ((info.get_current_history_length() < self._inp.timings.continue_as_new_after_events
             and not info.is_continue_as_new_suggested()) or not workflow.patched(BOUNDED_PATCH)):
            return
        await self.approvals_settled()
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
            reissue_ask=self._reissue_ask, reissue_refused=self._reissue_refused,
            unknown_attempts=self._unknown_attempts, reissued=self._reissued,
            runs=carried.runs + 1 if carried else 2)}))

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
        self._runbook, self._timeline = list(carried.runbook), list(carried.timeline)
        self._events_seen = carried.events_seen
        self._inbox, self._keys = list(carried.inbox), set(carried.keys)
        self._reissue_ask, self._reissue_refused = carried.reissue_ask, carried.reissue_refused
        self._unknown_attempts, self._reissued = carried.unknown_attempts, carried.reissued

    # -- bookkeeping -------------------------------------------------------------------

    async def _finish(self) -> PayoutCaseState:
        await self.approvals_settled()
        await workflow.wait_condition(workflow.all_handlers_finished)
        return self.state()

    async def _record(self, action: str, status: PayoutCaseStatus | None = None, *,
                      actor: str = "workflow", detail: dict[str, Any] | None = None) -> None:
        if status is not None:
            self._status = status
        assert self._inp is not None
        await contracts.RECORD_PAYOUT_CASE_EVENT(
            PayoutCaseEventInput(case_id=self._inp.case_id, action=action, actor=actor, status=status,
                                 detail=detail or {}),
            **retry.CASE_EVENT)
        if status is not None:
            self._status_recorded = status

    async def _notify(self, kind: str, audience: str, detail: dict[str, Any]) -> None:
        """Queues a notice in the outbox once per case, kind, audience and status; it carries
        the payout and its money, since the templates have no refund case to read them from."""
        assert self._inp is not None
        case_id = self._inp.case_id
        await contracts.QUEUE_NOTICE(
            NoticeInput(refund_request_id=case_id, kind=kind, audience=audience,
                        dedup_key=f"{case_id}:{kind}:{audience}:{self._status.value}",
                        detail={**self._facts(), **detail}),
            **retry.CASE_EVENT)

    def _facts(self) -> dict[str, Any]:
        if self._payout is None:
            return {}
        return {"payout_id": self._payout.id, "amount": self._payout.amount,
                "currency": self._payout.currency}

    def _approvers(self) -> str:
        return ", ".join(a.approver for a in self._round.approvals)
