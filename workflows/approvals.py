"""Approvals, shared by the case workflows (refunds, payout reversals).

An approval round collects the tier's distinct, authorised approvals (segregation of
duties and slot matching in `domain.lifecycle`), a denial, or expiry, waiting on durable
timers with reminders and escalation. Verdicts arrive as a signal (channels that cannot
wait) or an update whose validator answers at once; both are checked the same way when
processed. The host workflow says what each step means for its case (status, reservation)
through `ApprovalHost`. Deterministic: no I/O, activities only through the host.
"""

import asyncio
from collections.abc import Coroutine, Iterable
from datetime import datetime
from enum import StrEnum
from typing import Any, Protocol

from temporalio import workflow
from temporalio.exceptions import ApplicationError

with workflow.unsafe.imports_passed_through():
    from domain.audit import APPROVAL_REQUESTED
    from domain.errors import ALREADY_DECIDED, ALREADY_RECEIVED, APPROVAL_REFUSED, NOT_AWAITING_APPROVAL
    from domain.lifecycle import check_approval, unfilled
    from domain.models import (
        ApprovalProgress,
        ApprovalRecord,
        ApprovalSignal,
        ApprovalVerdict,
        Decision,
        RefundTimings,
        RoleRequirement,
    )
    from domain.seals import UNSEALED_SENDER, late_denial, named_by_relay, seal_refusal, verdict_sealed_at

LATE_VERDICTS_PATCH = "approval-late-verdicts-1"
"""Verdicts that arrive once a round is decided are answered at once and audited; before,
an update taken in that window waited forever on a round nobody read."""
SEALED_APPROVALS_PATCH = "approval-relay-seal-1"
"""A verdict counts only with the relay's seal, checked by the worker before the workflow
sees it (`adapters.approval_seal`); others are refused and audited. Before, anyone who could
signal the workflow approved with any roles."""
DEADLINE_FIRST_PATCH = "approval-deadline-first-1"
"""Past its deadline a round expires before it reads its inbox: a verdict the worker takes
together with the expiry timer (it lagged: killed, restarting, saturated) is refused as
late. Before, the inbox came first, and an approval sent after the deadline could count."""
EXPIRY_NOTICE_PATCH = "approval-expiry-notice-1"
"""An expired round tells its requester (as a denial does): nothing will happen unless they
ask again. Before, expiry only wrote the status and nobody heard."""
VERDICT_TAKING_PATCH = "approval-verdict-taking-1"
"""Each queued verdict is taken only before the round's deadline, by a task of its own that
answers it (a verdict refused after the decision too). One queued while an earlier verdict's
step was written (an activity: seconds) and reached after the deadline is refused as late;
before, it counted. A cancel while a verdict's step is written lets that step finish and
answer its caller, and a refund's cancel refuses what is still queued behind a decision;
before, such callers were never answered and the case waited for their handlers for ever."""
LATE_DENIALS_PATCH = "approval-late-denials-1"
"""A denial the relay sealed that the workflow took past its seal's window (a worker away
longer than it) still denies: a denial moves no money. Before, it was refused as stale, the
channel had answered "signalled" (ServiceNow sends a rejection once), and another approver's
approval then moved the money against it."""
UNSEALED_UNNAMED_PATCH = "approval-unsealed-unnamed-1"
"""A refused verdict the relay did not seal is written as `temporal`'s, the name it gave as
`named`; before, as that person's (anyone reaching Temporal could put rows under any name in
a case's audit trail)."""
VERDICT_ROUND_PATCH = "approval-verdict-round-1"
"""A verdict naming the round it was given for (`ApprovalSignal.awaiting`: the status its
approver was shown) is refused in another round of the case (a payout's reversal, then its
reissue, can need the same role). Before, a reversal approver's verdict that reached the
workflow once the reissue round had opened (a stalled relay, a durable resend) counted there
and paid the beneficiary again."""
UNSEALED = "ApprovalUnsealed"
RESENT = "this verdict was already received (the relay's resend); it counted, or was refused, once"


class ApprovalOutcome(StrEnum):
    """The approval steps that move a case: it starts waiting, is denied, or expires."""

    REQUESTED = "requested"
    DENIED = "denied"
    EXPIRED = "expired"


class ApprovalHost(Protocol):
    """What a round needs from its workflow: the audit step, the notice, the status."""

    async def approval_step(self, action: str, outcome: ApprovalOutcome | None = None, *,
                            actor: str = "workflow", detail: dict[str, Any] | None = None) -> None:
        """Records one approval step; `outcome` moves the case."""

    async def approval_notice(self, kind: str, audience: str, detail: dict[str, Any]) -> None:
        """Queues a notice about the round."""

    def approval_status(self) -> tuple[bool, str]:
        """Whether the case takes approvals now, and its status (for answers)."""


class ApprovalRound:
    """One decision's approvals. Verdicts that arrive before the round starts wait in its
    inbox; those that arrive once it is decided (approved, denied, expired: `decided`) are
    recorded as refused, never counted, and their callers answered at once.

    `after` is the case's previous round: the verdict ids it saw carry over, so a resend of a
    verdict the earlier round took counts nowhere in this one. (No patch guards the ids:
    every history recorded before them has none, and a verdict without one takes the old path.)"""

    def __init__(self, after: "ApprovalRound | None" = None) -> None:
        self.requirements: tuple[RoleRequirement, ...] = ()
        self.tier: str | None = None
        self.requester = ""
        self.conflicted: frozenset[str] = frozenset()
        self.awaiting = ""
        """The case status this round is, for a host with more than one round; empty: any."""
        self.approvals: list[ApprovalRecord] = []
        self.refused: list[ApprovalRecord] = []
        self._roles: list[tuple[str, frozenset[str]]] = []
        self._inbox: list[tuple[int, ApprovalSignal]] = []
        self._received = 0
        self._verdicts: dict[int, tuple[bool, str]] = {}
        self._too_late: set[int] = set()
        self.decided = False
        self._late: list[tuple[ApprovalSignal, str | None]] = []
        self._late_recorder: asyncio.Task[None] | None = None
        self._verdict_ids: set[str] = after._verdict_ids if after is not None else set()
        self._taking: asyncio.Future[bool | None] | None = None  # the verdict being recorded

    @property
    def verdict_ids(self) -> frozenset[str]:
        """The sealed verdicts' ids seen, for a run that continues as new to carry."""
        return frozenset(self._verdict_ids)

    def remember(self, verdict_ids: Iterable[str]) -> None:
        """The ids an earlier run of this case saw: their verdicts, sent again, are resends."""
        self._verdict_ids.update(verdict_ids)

    def resent(self, signal: ApprovalSignal) -> bool:
        """Whether a verdict with this id arrived before (sealed or not: a validator sees no
        seal, and an unsealed verdict is refused anyway)."""
        return bool(signal.verdict_id) and signal.verdict_id in self._verdict_ids

    def first_sight(self, signal: ApprovalSignal) -> bool:
        """False for a sealed verdict whose id arrived before: the relay's resend, which
        counts nowhere, not even as a refusal. Notes a sealed verdict's id; only sealed ids
        are noted, so no one without the relay's key can shadow a verdict."""
        if not signal.verdict_id or seal_refusal(signal):
            return True
        if signal.verdict_id in self._verdict_ids:
            return False
        self._verdict_ids.add(signal.verdict_id)
        return True

    @property
    def queued(self) -> bool:
        """Whether verdicts wait in the inbox (taken by no one yet)."""
        return bool(self._inbox)

    def receive(self, signal: ApprovalSignal) -> int:
        """Queues a verdict; its position is how its update finds the answer."""
        self._received += 1
        self._inbox.append((self._received, signal))
        return self._received

    async def answer(self, position: int) -> tuple[bool, str, bool]:
        """(accepted, why not, whether it came after the decision) for a queued verdict."""
        await workflow.wait_condition(lambda: position in self._verdicts)
        accepted, reason = self._verdicts.pop(position)
        return accepted, reason, position in self._too_late

    def missing(self) -> list[str]:
        return unfilled(self.requirements, self._roles)

    def check(self, signal: ApprovalSignal) -> ApprovalVerdict:
        return check_approval(signal, requester=self.requester, conflicted=self.conflicted,
                              requirements=self.requirements, approved=self._roles)

    def given_elsewhere(self, signal: ApprovalSignal) -> str:
        """Why a verdict was given for another round of the case ("" when not): it names
        the status its approver was shown, and this round is another."""
        if signal.awaiting and self.awaiting and signal.awaiting != self.awaiting:
            return (f"this verdict was given for the case {signal.awaiting}; it is now "
                    f"{self.awaiting}: reload it and decide again")
        return ""

    async def collect(self, host: ApprovalHost, timings: RefundTimings) -> bool:
        """Waits durably for the tier's distinct, authorised approvals, a denial, or expiry;
        reminds and escalates on the way. True when approved."""
        await host.approval_step(APPROVAL_REQUESTED, ApprovalOutcome.REQUESTED,
                                 detail={"tier": self.tier, "missing_roles": self.missing()})
        await host.approval_notice("approval_needed", "approvers", {"missing_roles": self.missing()})
        started = workflow.now()
        deadline = started + timings.approval_timeout
        nudges = [(started + after, kind) for after, kind in
                  ((timings.approval_reminder, "approval_reminder"),
                   (timings.approval_escalation, "approval_escalated")) if after is not None]
        outcome: bool | None = None
        while outcome is None:
            # workflow.patched itself, not host.since: executions on the newest shape that
            # began before this patch answer that without a marker, and must replay as they ran
            if workflow.now() >= deadline and workflow.patched(DEADLINE_FIRST_PATCH):
                outcome = await self._expire(host)
                break
            outcome = await self._handle_inbox(host, deadline)
            if outcome is not None:
                break
            now = workflow.now()
            for due, kind in [n for n in nudges if n[0] <= now]:
                nudges.remove((due, kind))
                await host.approval_step(kind, detail={"missing_roles": self.missing()})
                audience = "escalation" if kind == "approval_escalated" else "approvers"
                await host.approval_notice(kind, audience, {"missing_roles": self.missing()})
            if now >= deadline:
                outcome = await self._expire(host)
                break
            wake = min([deadline, *(due for due, _ in nudges)])
            try:
                await workflow.wait_condition(lambda: bool(self._inbox), timeout=wake - now)
            except TimeoutError:
                continue
        await self._refuse_leftovers(host)
        return outcome

    async def _expire(self, host: ApprovalHost) -> bool:
        """Ends the round unapproved at its deadline; verdicts still queued are refused."""
        self.decided = True
        await host.approval_step("approval_expired", ApprovalOutcome.EXPIRED)
        if workflow.patched(EXPIRY_NOTICE_PATCH):
            await host.approval_notice("approval_expired", "requester", {"missing_roles": self.missing()})
        return False

    async def _handle_inbox(self, host: ApprovalHost, deadline: datetime) -> bool | None:
        """Records each queued verdict; True when the tier is satisfied, False on denial;
        None with verdicts still queued once the deadline passed (the round expires)."""
        while self._inbox:
            if workflow.now() >= deadline and workflow.patched(VERDICT_TAKING_PATCH):
                return None
            outcome = await self._answering(self._take(host, *self._inbox.pop(0)))
            if outcome is not None:
                return outcome
        return None

    async def _take(self, host: ApprovalHost, position: int, signal: ApprovalSignal) -> bool | None:
        """Records one verdict and answers it: True when the tier is satisfied, False on a
        denial, None otherwise."""
        record = ApprovalRecord(approver=signal.approver, decision=signal.decision,
                                reason=signal.reason, at=workflow.now())
        verdict = self.check(signal)
        if verdict.accepted and (elsewhere := self.given_elsewhere(signal)) and workflow.patched(
                VERDICT_ROUND_PATCH):
            verdict = ApprovalVerdict(accepted=False, reason=elsewhere)
        if not verdict.accepted:
            self.refused.append(record)
            await host.approval_step("approval_refused", actor=signal.approver, detail={
                "decision": signal.decision.value, "refusal": verdict.reason})
            self._verdicts[position] = (False, verdict.reason)
            return None
        self.approvals.append(record)
        if signal.decision is Decision.DENY:
            self.decided = True
            await host.approval_step("approval_denied", ApprovalOutcome.DENIED, actor=signal.approver,
                                     detail={"reason": signal.reason})
            await host.approval_notice("approval_denied", "requester", {"by": signal.approver})
            self._verdicts[position] = (True, "")
            return False
        self._roles.append((signal.approver, frozenset(signal.roles)))
        missing = self.missing()
        self.decided = not missing
        sealed = verdict_sealed_at(signal)  # the money gate judges the approver's token as of it
        await host.approval_step("approval_granted", actor=signal.approver,
                                 detail={"reason": signal.reason, "roles": list(signal.roles),
                                         "missing_roles": missing,
                                         **({"sealed_at": sealed.isoformat()} if sealed else {})})
        self._verdicts[position] = (True, "")
        return None if missing else True

    async def _answering(self, step: Coroutine[Any, Any, bool | None]) -> bool | None:
        """Runs a step that records and answers one verdict: since VERDICT_TAKING_PATCH in a
        task of its own, shielded, so a cancel meanwhile lets it finish and answer its caller
        (`taken` waits for it); before, inline."""
        if not workflow.patched(VERDICT_TAKING_PATCH):
            return await step
        self._taking = asyncio.ensure_future(step)
        return await asyncio.shield(self._taking)

    async def taken(self) -> None:
        """Waits for the verdict being recorded, if any: a cancel lets it finish first, so
        the trail shows it before the cancel."""
        if self._taking is not None:
            await self._taking

    async def close(self, host: ApprovalHost) -> None:
        """Ends a round that never runs (the case needs no approval): verdicts already
        queued are refused and recorded, later ones too."""
        self.decided = True
        await self._refuse_leftovers(host)

    async def _refuse_leftovers(self, host: ApprovalHost) -> None:
        """Verdicts that arrive after the decision are recorded, never counted."""
        while self._inbox:
            await self._answering(self._refuse_late(host, *self._inbox.pop(0)))

    async def _refuse_late(self, host: ApprovalHost, position: int, signal: ApprovalSignal) -> None:
        """Records a verdict that came after the decision as refused, then answers it."""
        refusal = f"case is already {host.approval_status()[1]}"
        await self.record_refusal(host, signal, refusal)
        self._too_late.add(position)
        self._verdicts[position] = (False, refusal)

    async def record_refusal(self, host: ApprovalHost, signal: ApprovalSignal, refusal: str) -> None:
        self.refused.append(ApprovalRecord(approver=signal.approver, decision=signal.decision,
                                           reason=signal.reason, at=workflow.now()))
        actor, detail = signal.approver, {"refusal": refusal}
        if not named_by_relay(signal) and workflow.patched(UNSEALED_UNNAMED_PATCH):
            actor, detail = UNSEALED_SENDER, {**detail, "named": signal.approver}
        await host.approval_step("approval_refused", actor=actor, detail=detail)

    def refuse_signalled(self, host: ApprovalHost, signal: ApprovalSignal, refusal: str | None) -> None:
        """A signalled verdict refused (`None`: after the decision, with the case's status
        when recorded): recorded beside the case (a signal handler cannot wait for an
        activity), in arrival order, never counted."""
        self._late.append((signal, refusal))
        if self._late_recorder is None or self._late_recorder.done():
            self._late_recorder = asyncio.create_task(self._record_late(host))

    async def _record_late(self, host: ApprovalHost) -> None:
        while self._late:
            signal, refusal = self._late.pop(0)
            await self.record_refusal(
                host, signal, refusal or f"already decided: case is {host.approval_status()[1]}")

    async def settled(self) -> None:
        """Waits until every late verdict is recorded (a case closes only after)."""
        if self._late_recorder is not None:
            await workflow.wait_condition(
                lambda: not self._late and self._late_recorder is not None and self._late_recorder.done())


class ApprovingWorkflow:
    """The approval handlers every case workflow shares: `approve` (signal) and
    `submit_approval` (update with a validator that answers at once). The subclass holds
    the current round in `_round` and implements the `ApprovalHost` calls."""

    _round: ApprovalRound

    def approval_status(self) -> tuple[bool, str]:
        raise NotImplementedError

    async def approval_step(self, action: str, outcome: ApprovalOutcome | None = None, *,
                            actor: str = "workflow", detail: dict[str, Any] | None = None) -> None:
        raise NotImplementedError

    async def approval_notice(self, kind: str, audience: str, detail: dict[str, Any]) -> None:
        raise NotImplementedError

    def since(self, patch: str) -> bool:
        """Whether `patch` holds for this execution; a host whose newer patch implies it may
        answer without writing its marker again."""
        return workflow.patched(patch)

    @workflow.signal
    def approve(self, signal: ApprovalSignal) -> None:
        """An approver's verdict from a channel that cannot wait for an answer (tickets,
        chat buttons); checked like an update before it counts, audited as refused once the
        round is decided or without the relay's seal. The relay's resend of a verdict this
        case already has (same id) is dropped."""
        if not self._round.first_sight(signal):
            return
        if self._round.decided and self.since(LATE_VERDICTS_PATCH):
            self._round.refuse_signalled(self, signal, None)
            return
        unsealed = seal_refusal(signal)
        if unsealed and late_denial(signal) and workflow.patched(LATE_DENIALS_PATCH):
            # a denial moves no money: taken however late it came (asked of Temporal, never
            # implied by a host's newest shape: runs of that shape refused it before)
            unsealed = ""
        if unsealed and self.since(SEALED_APPROVALS_PATCH):
            self._round.refuse_signalled(self, signal, unsealed)
            return
        self._round.receive(signal)

    @workflow.update
    async def submit_approval(self, signal: ApprovalSignal) -> ApprovalProgress:
        """An approver's verdict with an immediate answer: refused ones never get here
        (see the validator); accepted ones return once the workflow has taken them (in its
        history; a refund's deciding approval reaches the database with its submit's first
        transaction, `approval-with-submit-1`)."""
        if not self._round.first_sight(signal):  # its resend signal came first
            raise ApplicationError(RESENT, type=ALREADY_RECEIVED)
        return await self.take_approval(signal)

    async def take_approval(self, signal: ApprovalSignal) -> ApprovalProgress:
        """The update's work, apart from its handler so a host can route older executions
        elsewhere."""
        current = self._round
        if current.decided and self.since(LATE_VERDICTS_PATCH):
            # validated just before the decision: answered now, never queued (the caller audits)
            raise ApplicationError(f"already decided: case is {self.approval_status()[1]}",
                                   type=ALREADY_DECIDED)
        unsealed = seal_refusal(signal)
        if unsealed and self.since(SEALED_APPROVALS_PATCH):
            # checked here, not in the validator, so the refusal is audited
            await current.record_refusal(self, signal, unsealed)
            raise ApplicationError(unsealed, type=UNSEALED)
        accepted, reason, too_late = await current.answer(current.receive(signal))
        if too_late and self.since(LATE_VERDICTS_PATCH):
            raise ApplicationError(f"already decided: {reason}", type=ALREADY_DECIDED)
        return ApprovalProgress(accepted=accepted, reason=reason, status=self.approval_status()[1],
                                missing_roles=tuple(current.missing()))

    async def approvals_settled(self) -> None:
        """Every late verdict recorded: what a case waits for before it closes."""
        await self._round.settled()

    @submit_approval.validator
    def _validate_approval(self, signal: ApprovalSignal) -> None:
        taking, status = self.approval_status()
        if self._round.resent(signal):
            raise ApplicationError(RESENT, type=ALREADY_RECEIVED)
        if not taking:
            raise ApplicationError(f"case is {status}, not awaiting approval", type=NOT_AWAITING_APPROVAL)
        if self._round.decided:
            raise ApplicationError(f"already decided: case is {status}", type=ALREADY_DECIDED)
        if elsewhere := self._round.given_elsewhere(signal):  # refused here, nothing is recorded
            raise ApplicationError(elsewhere, type=NOT_AWAITING_APPROVAL)
        verdict = self._round.check(signal)
        if not verdict.accepted:
            raise ApplicationError(verdict.reason, type=APPROVAL_REFUSED)
