"""The payout case's shared state: the patches a payout execution branches on, what each
approval step does to the case, the attributes every part of `PayoutReversalWorkflow`
reads, the hooks one part calls in a later one, and the case's records and notices. The
workflow is a chain of bases: `PayoutCase` (this), the reissue and continued runs
(`payout_reissue`), and the run with its runbook (`payout`).
"""

import asyncio
from datetime import datetime
from typing import Any

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from domain import contracts
    from domain.models import NoticeInput
    from domain.payouts import (
        PayoutCaseEventInput,
        PayoutCaseInput,
        PayoutCaseState,
        PayoutCaseStatus,
        PayoutDecision,
        PayoutEvent,
        PayoutSnapshot,
        ReissueAsk,
        TicketResult,
    )
    from workflows import history, retry
    from workflows.approvals import ApprovalOutcome, ApprovingWorkflow
    from workflows.news import NewsGate

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
# Events that land while a round awaits its approvers go through the gate as they land;
# histories recorded before let them wait in the inbox until the round ended.
EVENTS_WHILE_APPROVING_PATCH = "payout-events-while-approving-1"
# A denied or expired remediation round takes the events it left waiting (past the history
# bound) before the case finishes; histories recorded before finished with them in the inbox.
DENIED_ROUND_EVENTS_PATCH = "payout-denied-round-events-1"
# Approvers read the recommendation: when failures joined the timeline since it was made, it
# is made again as a round opens and after each join while the round waits; histories
# recorded before kept the first one for the whole case.
ADVICE_REFRESH_PATCH = "payout-advice-refresh-1"
# A reissue request counts only with the relay's seal (as a verdict does since
# `approval-relay-seal-1`): its requester is the one person barred from approving the
# reissue, so a request sent straight to Temporal naming someone else let one person ask and
# approve. Refused and audited (`reissue_request_refused`). Asked when a request arrives.
SEALED_REISSUE_PATCH = "payout-reissue-sealed-1"
# After the last reissue attempt with an unknown outcome the provider horizon is waited out
# and the reissue looked up once more (creating nothing): a payout that landed late is booked
# as the reissue. Before, the case went to ops at once and never looked again: the beneficiary
# paid, our books without the reissue, and ops who checked the provider then found nothing.
# Asked when the attempts are spent.
LATE_REISSUE_PATCH = "payout-reissue-looked-up-late-1"
# A reissue another case's beneficiary hold stops waits for that hold to end (ops told once
# per set of holders, asked again each `status_poll_interval`). Before, it failed for good:
# two failed payouts of one beneficiary each held it, so neither case could ever reissue.
# Asked when the activity answers `BeneficiaryHeld`.
HELD_REISSUE_PATCH = "payout-reissue-waits-for-holds-1"
# Step B failed where policy keeps the hold: the case asks whether the entry landed after all
# (then the runbook goes on) and fences off any attempt still running. Before, it reported
# `ledger_failed` unasked: an entry committed as the deadline passed stood in the ledger while
# finance were told to post it by hand. Asked when that branch is taken.
GIVE_UP_PATCH = "payout-reversal-given-up-1"
# After the reversal's approval, the payout is read at its provider before step A: one the
# bank corrected to paid (or sent again) since the failure goes to ops review, neither held
# nor booked back. Before, an approval held it and booked `payout_reversed` for money that
# had left, whether or not the correction's webhook had reached the case.
PAID_AT_PROVIDER_PATCH = "payout-read-before-reversal-1"
# Ops cancel the case while a reissue attempt runs: no attempt after it; once the one it came
# under can no longer land (its start-to-close, then the provider horizon) the reissue is looked
# up once (creating nothing) and booked if that attempt made it, else the case goes to ops
# review, the hold kept. Before, the cancel read as an attempt with
# an unknown outcome and the next attempt made the reissue ops had stopped. Asked when an
# attempt fails with the cancel.
REISSUE_CANCEL_PATCH = "payout-reissue-cancel-1"
# A refused unsealed reissue request is written as `temporal`'s, the requester it gave as
# `named`; before, as that person's (anyone reaching Temporal wrote rows under any name).
UNSEALED_REISSUE_UNNAMED_PATCH = "payout-reissue-unsealed-unnamed-1"


class PayoutCase(ApprovingWorkflow):
    """What every part of the payout workflow shares; `PayoutReversalWorkflow.__init__` sets it."""

    _inp: PayoutCaseInput | None
    _news: NewsGate
    _status: PayoutCaseStatus
    _status_recorded: PayoutCaseStatus
    _inbox: list[PayoutEvent]
    _keys: set[str]
    _timeline: list[PayoutEvent]
    _events_seen: int
    _advised_events: int
    _payout: PayoutSnapshot | None
    _decision: PayoutDecision | None
    _steps: dict[ApprovalOutcome, PayoutCaseStatus]
    _runbook: list[str]
    _reissue_closed: bool
    _reissue_ask: ReissueAsk | None
    _reissued: PayoutSnapshot | None
    _reissue_refused: bool
    _held_by: tuple[str, ...]
    _unknown_attempts: int

    def state(self) -> PayoutCaseState:
        """The case as the workflow knows it (its query, in `payout`)."""
        raise NotImplementedError

    async def _take_events(self, phase: str | None = None, deadline: datetime | None = None, *,
                           stop_at_bound: bool = False) -> None:
        """Later events onto the timeline, each a turn that may continue as new (in `payout`)."""
        raise NotImplementedError

    async def _advise(self) -> None:
        """Has the advisor store a recommendation from the timeline (in `payout`)."""
        raise NotImplementedError

    def _open_round(self, steps: dict[ApprovalOutcome, PayoutCaseStatus], requester: str) -> None:
        """Starts (or restores) an approval round with its steps (in `payout`)."""
        raise NotImplementedError

    async def _ticket(self, occasion: str, priority: str, detail: dict[str, str]) -> TicketResult:
        """Opens or updates the case's ticket once per occasion (in `payout`)."""
        raise NotImplementedError

    async def _collect_approvals(self) -> bool:
        """The round's verdicts (`ApprovalRound.collect`; True when approved). Meanwhile each
        event that lands goes through the gate onto the timeline at once, and the
        recommendation follows the failures that joined, so approvers decide on the case as
        it stands; an event never decides the round. A round cannot continue as new, so past
        the history bound the rest wait for its end (and a run that may continue as new takes
        them)."""
        assert self._inp is not None
        if not workflow.patched(EVENTS_WHILE_APPROVING_PATCH):
            return await self._round.collect(self, self._inp.timings)
        await self._advise_again()
        deciding = True

        async def take_while_deciding() -> None:
            while True:
                await workflow.wait_condition(lambda: bool(self._inbox) or not deciding)
                if not self._inbox or self._history_at_bound():
                    return
                await self._take_events(stop_at_bound=True)
                await self._advise_again()

        taking = asyncio.create_task(take_while_deciding())
        approved = await self._round.collect(self, self._inp.timings)
        deciding = False
        await taking  # the event in the gate is through it before the case moves on
        return approved

    async def _advise_again(self) -> None:
        """A recommendation made before the latest failure joined names a stale root cause
        (it follows the latest failure code): approvers get one made from the timeline as
        it stands. Stale or repeated statuses do not join, so they cost nothing here."""
        if len(self._timeline) > self._advised_events and workflow.patched(ADVICE_REFRESH_PATCH):
            await self._advise()

    def _history_at_bound(self) -> bool:
        assert self._inp is not None
        return history.at_bound(self._inp.timings.continue_as_new_after_events)

    # -- bookkeeping -------------------------------------------------------------------

    async def _finish(self) -> PayoutCaseState:
        await self.approvals_settled()
        await self._news.settled()
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

    async def _notify(self, kind: str, audience: str, detail: dict[str, Any], occasion: str = "") -> None:
        """Queues a notice in the outbox once per case, kind, audience, status and `occasion`;
        it carries the payout and its money, since the templates have no refund case to read
        them from."""
        assert self._inp is not None
        case_id = self._inp.case_id
        await contracts.QUEUE_NOTICE(
            NoticeInput(refund_request_id=case_id, kind=kind, audience=audience,
                        dedup_key=f"{case_id}:{kind}:{audience}:{self._status.value}"
                                  + (f":{occasion}" if occasion else ""),
                        detail={**self._facts(), **detail}),
            **retry.CASE_EVENT)

    def _facts(self) -> dict[str, Any]:
        if self._payout is None:
            return {}
        return {"payout_id": self._payout.id, "amount": self._payout.amount,
                "currency": self._payout.currency}

    def _approvers(self) -> str:
        return ", ".join(a.approver for a in self._round.approvals)
