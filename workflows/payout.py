"""PayoutReversalWorkflow: one governed payout exception, from the provider's late failure
of a payout we hold as paid to a held payout, a compensating entry, a ticket and a notice;
then, only on an approved and explicit request, one reissue.

Workflow id == case id == `<provider>-payout-<payout id>`, so every event about the payout
(each delivery, duplicate, late or out-of-order one) reaches this execution and acts at
most once by its idempotency key (`provider_event_id + payout_id`). The advisor's
recommendation never comes back here. Deterministic: no I/O, no clocks but workflow time;
activities are called by name; idempotency of each step lives in its activity.
"""

from datetime import datetime
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from domain import contracts, errors
    from domain.integrations import DeliverNoticeInput
    from domain.models import ApprovalProgress
    from domain.payouts import (
        APPROVAL_STATUSES,
        Admission,
        AdmitInput,
        AdmitResult,
        HoldInput,
        HoldResult,
        LinkedTicket,
        LinkTicketInput,
        PayoutAtProvider,
        PayoutCaseInput,
        PayoutCaseState,
        PayoutCaseStatus,
        PayoutDecision,
        PayoutEvent,
        PayoutPolicyInput,
        PayoutSnapshot,
        ReissueAsk,
        ReleaseResult,
        ReversalInput,
        TicketInput,
        TicketResult,
        TriageInput,
    )
    from domain.seals import UNSEALED_SENDER, reissue_refusal
    from workflows import retry
    from workflows.approvals import UNSEALED, ApprovalOutcome, ApprovalRound
    from workflows.history import forged_start
    from workflows.news import NewsGate
    from workflows.payout_case import (
        DENIED_ROUND_EVENTS_PATCH,
        GIVE_UP_PATCH,
        PAID_AT_PROVIDER_PATCH,
        REVERSAL_STEPS,
        SEALED_REISSUE_PATCH,
        TICKETS_PATCH,
        UNSEALED_REISSUE_UNNAMED_PATCH,
    )
    from workflows.payout_reissue import PayoutReissue

NEXT_STEPS = ("a reissue happens only on an explicit reissue request with its own approval; "
              "see the recommendation on the case")


@workflow.defn
class PayoutReversalWorkflow(PayoutReissue):
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
        self._advised_events = 0  # the timeline's length the stored recommendation was made from
        self._payout: PayoutSnapshot | None = None
        self._decision: PayoutDecision | None = None
        self._round = ApprovalRound()
        self._news = NewsGate()
        self._steps = REVERSAL_STEPS
        self._runbook: list[str] = []
        self._reissue_closed = False
        self._reissue_ask: ReissueAsk | None = None
        self._reissued: PayoutSnapshot | None = None
        self._reissue_refused = False  # ops told that our key is refused
        self._held_by: tuple[str, ...] = ()  # the cases whose beneficiary hold ops were told of
        self._unknown_attempts = 0  # reissue attempts with an unknown outcome, across runs
        if inp.carried is not None:
            self._restore(inp.carried)

    # -- interface ---------------------------------------------------------------------

    @workflow.signal
    def payout_event(self, event: PayoutEvent) -> None:
        """A verified payout webhook (may be late, duplicated or out of order), taken only
        under the relay's or a worker's seal (`NewsGate`); a repeat of an idempotency key
        already taken is counted and dropped."""
        self._events_seen += 1
        if (admitted := self._news.admit_payout(event, self._record_refused_news)) is None:
            return
        event = admitted
        key = event.idempotency_key()
        if key not in self._keys:
            self._keys.add(key)
            self._inbox.append(event)

    async def _record_refused_news(self, action: str, detail: dict[str, Any]) -> None:
        await self._record(action, actor=UNSEALED_SENDER, detail=detail)

    @workflow.update
    async def request_reissue(self, ask: ReissueAsk) -> ApprovalProgress:
        """An explicit request to pay the beneficiary again, taken once per case; answered
        once its own approval round is recorded (so the case row already says so), with the
        roles it needs."""
        if self._reissue_ask is not None:  # two requests validated in the same activation
            raise ApplicationError("a reissue was already requested for this case", type=errors.REISSUE_TAKEN)
        unsealed = reissue_refusal(ask)
        if unsealed and workflow.patched(SEALED_REISSUE_PATCH):
            # checked here, not in the validator, so the refusal is audited
            actor, detail = ask.requester, {"refusal": unsealed}
            if workflow.patched(UNSEALED_REISSUE_UNNAMED_PATCH):
                actor, detail = UNSEALED_SENDER, {**detail, "named": ask.requester}
            await self._record("reissue_request_refused", actor=actor, detail=detail)
            raise ApplicationError(unsealed, type=UNSEALED)
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
        if refusal := forged_start(inp.case_id, inp.carried):
            raise ApplicationError(refusal, type=errors.FORGED_START, non_retryable=True)
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
        if not await self._collect_approvals():
            if workflow.patched(DENIED_ROUND_EVENTS_PATCH):
                await self._take_events("closing")
            return await self._finish()
        await self._take_events()
        if workflow.patched(PAID_AT_PROVIDER_PATCH) and not await self._failed_at_provider():
            await self._take_events("closing")
            return await self._finish()
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

    async def _take_events(self, phase: str | None = None, deadline: datetime | None = None, *,
                           stop_at_bound: bool = False) -> None:
        """Later events go through the same gate onto the timeline; none acts again: a
        second failure joins the case, `paid` after a failure never re-marks it paid. In a
        `phase` a continued run can resume, each event is a turn that may continue as new;
        in the reissue window a reissue request comes first (events wait for it).
        `stop_at_bound`: where the run cannot continue as new, the rest wait past the bound."""
        while self._inbox:
            if phase == "reissue_window" and self._reissue_ask is not None:
                return
            if stop_at_bound and self._history_at_bound():
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
        self._advised_events = len(self._timeline)
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
            self._round = ApprovalRound(after=self._round)
        self._steps = steps
        self._round.requirements = self._decision.decision.requirements
        self._round.tier = self._decision.decision.tier
        self._round.requester = requester
        self._round.awaiting = steps[ApprovalOutcome.REQUESTED].value

    def approval_status(self) -> tuple[bool, str]:
        return self._status in APPROVAL_STATUSES, self._status.value

    async def approval_step(self, action: str, outcome: ApprovalOutcome | None = None, *,
                            actor: str = "workflow", detail: dict[str, Any] | None = None) -> None:
        await self._record(action, self._steps[outcome] if outcome else None, actor=actor, detail=detail)

    async def approval_notice(self, kind: str, audience: str, detail: dict[str, Any]) -> None:
        await self._notify(kind, audience, detail)

    # -- the runbook -------------------------------------------------------------------

    async def _failed_at_provider(self) -> bool:
        """Before step A: whether the provider still shows the payout failed. The bank may
        have corrected it (its webhook late, lost, or heard while approvers decided), or sent
        it again: then nothing is held or booked back, the case goes to ops review (ops and
        finance told, a high-priority ticket) and the payout stays paid in our books, where a
        reconciliation run raises it for approval once the provider shows it failed. The same
        for a payout the provider cannot show failed (none held, unreadable, an outage past
        its reads). A provider with no payout lookup: the signed failure stands (unless it
        reported the payout paid since), and the timeline says the status was not confirmed."""
        assert self._inp is not None and self._payout is not None
        payout = self._payout
        try:
            shown: PayoutAtProvider = await contracts.READ_PAYOUT_AT_PROVIDER(
                ReversalInput(case_id=self._inp.case_id, payout=payout),
                **retry.provider_read(self._inp.timings.provider_read_attempts))
        except ActivityError as err:
            shown = PayoutAtProvider(unread=f"lookup failed: {err.cause}")
        if shown.confirmed_failed():
            return True
        if not shown.lookup:
            await self._record("payout_status_unconfirmed", detail={"reason": shown.unread})
            return True
        detail = {"provider_status": shown.shown(), "approved_by": self._approvers()}
        for audience in ("payments_ops", "finance"):
            await self._notify("payout_not_failed_at_provider", audience, detail)
        await self._ticket("not_failed_at_provider", "high", {
            "summary": f"payout {payout.id}, approved for reversal, is not failed at {payout.provider} "
                       f"({shown.shown()}): nothing held or booked back"})
        await self._record("payout_not_failed_at_provider", PayoutCaseStatus.OPS_REVIEW, detail=detail)
        return False

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
        reversal = ReversalInput(case_id=self._inp.case_id, payout=self._payout)
        if decision.rollback_hold_on_ledger_failure:
            released: ReleaseResult = await contracts.RELEASE_PAYOUT_HOLD(reversal, **retry.PAYOUT_HOLD)
            if released.posted:
                self._runbook.append("compensating_entry")
                return True
            outcome = "hold_rolled_back"
            self._runbook.append("rollback")
        elif workflow.patched(GIVE_UP_PATCH):
            given_up: ReleaseResult = await contracts.GIVE_UP_PAYOUT_REVERSAL(reversal, **retry.PAYOUT_HOLD)
            if given_up.posted:
                self._runbook.append("compensating_entry")
                return True
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
