"""Activities of the payout reversal workflow: the state gate, advice, policy and the
runbook steps (hold, compensating entry, rollback, ticket and its reference, reissue).

Each activity is idempotent: a retry finds what the first attempt wrote (the case row,
the hold, the entry by its posting key, the ticket notice by its dedup key, the reissue
by its id) instead of acting twice. Notices and the reissue's ledger entry go through
the refund activities `queue_notice` and `post_ledger`, registered on the same worker.
"""

import logging
from collections.abc import Callable, Mapping
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.refund import configuration_refused, current_step_key, past_start_to_close
from adapters.db import Store
from adapters.db.payouts import FAILURES_TAKEN, ApprovalRevoked, HoldReleased
from adapters.providers.base import (
    PayoutExecutor,
    PayoutReader,
    ProviderAdapter,
    ProviderConfigurationRefused,
    ProviderDeclined,
    ProviderError,
    ProviderOutcomeUnknown,
    UnexpectedProviderStatus,
)
from domain import contracts, errors
from domain.models import LedgerResult
from domain.payouts import (
    EXCEPTION_STATUSES,
    PAID_REPORTS,
    AdmitInput,
    AdmitResult,
    HoldInput,
    HoldResult,
    LinkedTicket,
    LinkTicketInput,
    PayoutAtProvider,
    PayoutCaseEventInput,
    PayoutDecision,
    PayoutOrder,
    PayoutPolicyInput,
    PayoutSnapshot,
    ProviderPayout,
    ProviderPayoutStatus,
    ReissueInput,
    ReleaseResult,
    ReversalInput,
    TicketInput,
    TicketResult,
    TriageInput,
    TriageReceipt,
    latest_at,
    not_the_reissue,
    paid_since,
    payout_case_id,
    reissue_problem,
)
from domain.policy import Policy, decide_payout_reversal
from domain.triage import triage_offline

log = logging.getLogger(__name__)



class PayoutActivities:
    """Holds the process-wide store, provider clients and policy the activities share."""

    def __init__(self, store: Store, providers: Mapping[str, ProviderAdapter], policy: Policy) -> None:
        self._book, self._audit, self._access = store.payouts, store.audit, store.access
        self._providers = providers
        self._policy = policy

    @activity.defn(name=contracts.ADMIT_PAYOUT_EVENT.name)
    async def admit_payout_event(self, inp: AdmitInput) -> AdmitResult:
        """The validation gate before any action: the payout exists internally, its status,
        whether the case is open; the first failure of a paid payout opens the case.

        Idempotent: the case row is inserted once; a retry re-reads the same state."""
        try:
            return await self._book.admit(inp.case_id, inp.event, case_open=inp.case_open)
        except LookupError as exc:
            raise ApplicationError(str(exc), type=errors.UNKNOWN_PAYOUT, non_retryable=True) from exc

    @activity.defn(name=contracts.TRIAGE_PAYOUT_EXCEPTION.name)
    async def triage_payout_exception(self, inp: TriageInput) -> TriageReceipt:
        """Advisory triage: stores a typed recommendation (root cause, next step, timeline)
        beside the case for approvers; only whether it was stored goes back, so nothing
        can act on it. Idempotent: a retry overwrites the field with the same rules' answer."""
        advice = triage_offline(inp.payout, inp.events)
        await self._book.record_case_field(inp.case_id, "recommendation", advice.model_dump(mode="json"),
                                           "ai_recommendation_recorded", f"advisor:{advice.source}")
        return TriageReceipt(recorded=True, source=advice.source)

    @activity.defn(name=contracts.DECIDE_PAYOUT_REVERSAL.name)
    async def decide_payout_reversal(self, inp: PayoutPolicyInput) -> PayoutDecision:
        """The policy's approval tier for the amount, and its runbook switches, stored on
        the case. A policy without payout tiers fails and is retried until it is fixed.

        Idempotent: deterministic over the loaded policy."""
        rules = self._policy.payout_reversal
        decision = PayoutDecision(
            decision=decide_payout_reversal(self._policy, inp.payout.amount, inp.payout.currency),
            hold_beneficiary_payouts=rules.hold_beneficiary_payouts,
            rollback_hold_on_ledger_failure=rules.rollback_hold_on_ledger_failure)
        await self._book.record_case_field(inp.case_id, "decision", decision.model_dump(mode="json"),
                                           "policy_decision", "policy")
        return decision

    @activity.defn(name=contracts.RECORD_PAYOUT_CASE_EVENT.name)
    async def record_payout_case_event(self, inp: PayoutCaseEventInput) -> None:
        """Moves the case's status and appends the audit row in one transaction, once per
        step: a stalled attempt waking after its retry writes nothing."""
        await self._book.record_event(inp, current_step_key(inp))

    @activity.defn(name=contracts.READ_PAYOUT_AT_PROVIDER.name)
    async def read_payout_at_provider(self, inp: ReversalInput) -> PayoutAtProvider:
        """Before runbook step A: the payout as its provider shows it now. The bank may have
        corrected the failure since the case opened (its webhook late or lost), and a payout
        that left must not be held and booked back. A failed read is retried; one the
        provider answers without a status we map (none held, our key refused, a 4xx, an
        unknown status) is `unread`. A provider with no payout lookup (Adyen) has one reading
        besides the failure: its signed report of the payout paid after it, and after any
        failure or return the case took since (paid, then returned again: the money is back;
        before, the older report held the reversal back). Idempotent: a read."""
        payout = inp.payout
        provider = self._providers.get(payout.provider)
        if not isinstance(provider, PayoutReader):
            trail = await self._audit.trail(inp.case_id)
            if paid_since(trail, latest_at(trail, FAILURES_TAKEN)):
                # its signed report of the payout paid after the failure (the relay's record):
                # the one reading there is, and the money left after all
                return PayoutAtProvider(status=ProviderPayoutStatus.PAID)
            return PayoutAtProvider(unread=f"{payout.provider} has no payout lookup", lookup=False)
        try:
            shown = await provider.get_payout(payout.provider_payout_id)
        except (ProviderConfigurationRefused, ProviderDeclined, UnexpectedProviderStatus) as exc:
            return PayoutAtProvider(unread=f"unreadable ({type(exc).__name__}: {exc})"[:300])
        except ProviderError as exc:
            raise ApplicationError(f"payout lookup failed: {exc}", type=errors.OUTCOME_UNKNOWN) from exc
        if shown is None:
            return PayoutAtProvider(unread=f"{payout.provider} holds no payout {payout.provider_payout_id}")
        return PayoutAtProvider(status=shown.status)

    @activity.defn(name=contracts.HOLD_PAYOUT.name)
    async def hold_payout(self, inp: HoldInput) -> HoldResult:
        """Runbook step A: the payout (and, per policy, the beneficiary's further payouts)
        on hold, remembering the status to return to. Idempotent: a held payout stays held,
        and an attempt woken after its retry (and the rollback) writes nothing."""
        return await self._book.hold(inp.case_id, inp.payout_id, hold_beneficiary=inp.hold_beneficiary,
                                     step_key=current_step_key(inp))

    @activity.defn(name=contracts.POST_PAYOUT_REVERSAL.name)
    async def post_payout_reversal(self, inp: ReversalInput) -> LedgerResult:
        """Runbook step B: the compensating entry (template `payout_reversed`), only while
        the hold stands. Idempotent by its posting key (case + template)."""
        try:
            return await self._book.post_reversal(inp.case_id, inp.payout)
        except HoldReleased as exc:
            raise ApplicationError(str(exc), type=errors.HOLD_RELEASED, non_retryable=True) from exc
        except ApprovalRevoked as exc:  # the failure branch: the hold rolled back, finance told why
            raise ApplicationError(str(exc), type=errors.APPROVAL_REVOKED, non_retryable=True) from exc

    @activity.defn(name=contracts.RELEASE_PAYOUT_HOLD.name)
    async def release_payout_hold(self, inp: ReversalInput) -> ReleaseResult:
        """The rollback after step B failed (where policy allows): hold → previous status.
        Idempotent: a released hold is not released again; a late posting keeps the hold."""
        return await self._book.after_failed_reversal(inp.case_id, inp.payout.id, keep_hold=False)

    @activity.defn(name=contracts.GIVE_UP_PAYOUT_REVERSAL.name)
    async def give_up_payout_reversal(self, inp: ReversalInput) -> ReleaseResult:
        """Step B failed where policy keeps the hold: the entry landed after all (`posted`),
        or it never will (an attempt still running is fenced off)."""
        return await self._book.after_failed_reversal(inp.case_id, inp.payout.id, keep_hold=True)

    @activity.defn(name=contracts.OPEN_PAYOUT_TICKET.name)
    async def open_payout_ticket(self, inp: TicketInput) -> TicketResult:
        """Runbook step C, first half: queues the `payout_exception_ticket` notice that opens
        (or updates) the case's ops ticket; the workflow then delivers it to ServiceNow and
        Jira (`deliver_notice`) and records the reference (`link_payout_ticket`).
        Idempotent: once per case and occasion."""
        ref, queued, key = await self._book.open_ticket(inp.case_id, inp.occasion, inp.priority,
                                                        inp.detail)
        return TicketResult(ticket_ref=ref, newly_queued=queued, notice_key=key)

    @activity.defn(name=contracts.LINK_PAYOUT_TICKET.name)
    async def link_payout_ticket(self, inp: LinkTicketInput) -> LinkedTicket:
        """Runbook step C, second half: the tickets ServiceNow and Jira filed become the
        case's reference (with an audit row). Idempotent: nothing changes on a repeat."""
        ref, filed = await self._book.link_ticket(inp.case_id, inp.occasion)
        return LinkedTicket(ticket_ref=ref, filed=filed)

    @activity.defn(name=contracts.REISSUE_PAYOUT.name)
    async def reissue_payout(self, inp: ReissueInput) -> PayoutSnapshot:
        """Pays the beneficiary again after an approved reissue request, once: our books
        first, then the provider by our reference, and only then a create (with a derived
        idempotency key). A failed lookup is never a decline (an unknown outcome; refused
        credentials go to ops). The workflow runs one attempt at a time and, after an
        unknown outcome, the next only past the provider horizon, so its lookup sees a
        create that landed late; after the last, a `lookup_only` one that creates nothing."""
        original = inp.original
        done = await self._book.payout(original.reissue_id())
        if done is not None:
            if done.reissue_of != original.id:  # booked under the reissue's id by someone else
                raise ApplicationError(f"payout {done.id} is booked but not a reissue of {original.id}",
                                       type=errors.DECLINED, non_retryable=True)
            return done
        provider = self._providers.get(original.provider)
        if not isinstance(provider, PayoutExecutor):
            raise ApplicationError(f"{original.provider} cannot make payouts", type=errors.DECLINED,
                                   non_retryable=True)
        order = PayoutOrder(reference=original.reissue_id(), beneficiary_id=original.beneficiary_id,
                            amount=original.amount, currency=original.currency)
        try:
            made = await provider.find_payout(order.reference)
            if made is not None and (foreign := not_the_reissue(original, made)):
                raise ApplicationError(foreign, type=errors.DECLINED, non_retryable=True)
            if made is None and inp.lookup_only:
                raise ApplicationError(f"no payout {order.reference} at {original.provider}: no attempt paid",
                                       type=errors.REISSUE_NOT_MADE, non_retryable=True)
            if made is None:
                await self._refuse_after_revoked_approval(inp.case_id, inp.approvers)
                await self._refuse_while_held_or_conflicted(inp.case_id, original, inp.approvers)
                for replaced in await self._book.lineage(original):
                    await self._refuse_unless_failed_still(provider, replaced)
                    await self._refuse_after_paid_report(replaced)
                if past_start_to_close():
                    # Temporal gave up on this attempt: the next one, past the provider's
                    # horizon, looks up and creates; a create now could land beside it
                    await self._audit.record(inp.case_id, "system", "reissue_create_abandoned",
                                             {"reference": order.reference})
                    raise ApplicationError("the reissue attempt woke past its start-to-close: the "
                                           "provider is not called", type=errors.OUTCOME_UNKNOWN)
                made = await self._create(inp.case_id, provider, order, original)
        except ProviderConfigurationRefused as exc:
            raise configuration_refused(exc) from exc
        except ProviderError as exc:  # a lookup that failed or was refused: still unknown
            raise ApplicationError(f"lookup failed, outcome unknown: {exc}",
                                   type=errors.OUTCOME_UNKNOWN) from exc
        if (problem := reissue_problem(original, made)) is not None:
            raise ApplicationError(problem, type=errors.DECLINED, non_retryable=True)
        return await self._book.record_reissue(inp.case_id, original, made, inp.final_status)

    async def _refuse_after_revoked_approval(self, case_id: str, approvers: tuple[str, ...]) -> None:
        """An approver of the reissue with a token revoked since their approval: it counts no
        more, and the round that counted it cannot know (a decline: ops told, nothing sent;
        `AccessRepository.approvals_revoked_in`, as a refund's money gate asks)."""
        revoked = [person for person in await self._access.approvals_revoked(case_id, "reissue_requested")
                   if person in approvers]
        if revoked:
            raise ApplicationError(
                f"a token of {', '.join(revoked)}, live when they approved this reissue, was revoked "
                "since: their approval counts no more; no payout is made",
                type=errors.DECLINED, non_retryable=True)

    async def _refuse_while_held_or_conflicted(self, case_id: str, original: PayoutSnapshot,
                                           approvers: tuple[str, ...]) -> None:
        """A reissue is one more payout to the beneficiary: while another case holds their
        payouts (another failure, until its reissue or ops release that hold), none is made.
        Not a decline: the workflow waits for the hold to end (the holders in the details).
        A hold its own requester or one of its approvers released is a decline: the release
        cannot be undone, and one person would have both lifted the check and asked for (or
        authorised) the payout it guards. So is one asked for or approved by whoever
        registered a payout it stands in for (and named the beneficiary it pays)."""
        beneficiary_id = original.beneficiary_id
        holding = [h.case_id for h in await self._book.beneficiary_holds(beneficiary_id)
                   if h.released_at is None and h.case_id != case_id]
        if holding:
            raise ApplicationError(f"beneficiary {beneficiary_id} is held by {', '.join(holding)}: "
                                   "no reissue while another case holds their payouts", holding,
                                   type=errors.BENEFICIARY_HELD, non_retryable=True)
        # The relay refuses either act by whoever did the other, but each check can pass
        # before the other's row exists (sent at once): the payout is where both are known.
        requester = await self._book.reissue_requester(case_id)
        for person, did in ((requester, "asked for"), *((a, "approved") for a in approvers)):
            if person is not None and (released := await self._book.acted_on_beneficiary(
                    case_id, person, "beneficiary_hold_released")):
                raise ApplicationError(
                    f"{person} {did} this reissue and released beneficiary {beneficiary_id}'s hold "
                    f"on {', '.join(released)}, which it checks: no payout is made; other people ask "
                    "for and approve it, or ops pay outside this case", type=errors.DECLINED,
                    non_retryable=True)
            registered = person and await self._book.registered_in_lineage(original, person)
            if registered:
                raise ApplicationError(
                    f"{person} {did} this reissue and registered payout {registered}, naming its "
                    "beneficiary: no payout is made; other people ask for and approve it",
                    type=errors.DECLINED, non_retryable=True)

    @staticmethod
    async def _refuse_unless_failed_still(provider: PayoutExecutor, original: PayoutSnapshot) -> None:
        """A payout the reissue replaces as the provider shows it now: a failure it later
        reported paid (a bank's late correction) makes a reissue a second payment (a decline:
        ops told, nothing sent). Our books and the case's events may not have caught up."""
        current = await provider.get_payout(original.provider_payout_id)
        if current is None or current.status not in EXCEPTION_STATUSES:
            shown = "unknown" if current is None else current.status.value
            raise ApplicationError(
                f"the original payout {original.provider_payout_id} is {shown} at the provider: a "
                "reissue would pay the beneficiary twice; ops decide", type=errors.DECLINED,
                non_retryable=True)

    async def _refuse_after_paid_report(self, replaced: PayoutSnapshot) -> None:
        """A payout the provider's own notice reported paid after its failure (the relay's
        record on its case): a reissue would pay twice, whatever a lookup that lags shows
        now (a decline: ops told, nothing sent)."""
        report = await self._audit.last_of(payout_case_id(replaced.provider, replaced.provider_payout_id),
                                           PAID_REPORTS)
        if report is not None:
            raise ApplicationError(
                f"the provider reported payout {replaced.provider_payout_id} paid after its failure "
                f"(event {report.get('event_id')}): a reissue would pay the beneficiary twice; "
                "ops decide", type=errors.DECLINED, non_retryable=True)

    async def _create(self, case_id: str, provider: PayoutExecutor, order: PayoutOrder,
                      original: PayoutSnapshot) -> ProviderPayout:
        """The create; a decline is looked up once more, as a refund's is: the provider may be
        refusing a second payout under our reference because an earlier attempt's landed
        after the lookup before this create. Found, it is the reissue; else the decline stands."""
        try:
            return await provider.create_payout(order, original.reissue_key())
        except ProviderDeclined as exc:
            landed = await provider.find_payout(order.reference)
            if landed is None:
                raise ApplicationError(str(exc), type=errors.DECLINED, non_retryable=True) from exc
            if foreign := not_the_reissue(original, landed):
                raise ApplicationError(foreign, type=errors.DECLINED, non_retryable=True) from exc
            await self._audit.record(case_id, f"provider:{provider.name}", "reissue_found_after_decline",
                                     {"provider_payout_id": landed.payout_id, "declined": str(exc)})
            return landed
        except ProviderOutcomeUnknown as exc:
            raise ApplicationError(str(exc), type=errors.OUTCOME_UNKNOWN) from exc

    def all(self) -> list[Callable[..., Any]]:
        """Every activity, for worker registration."""
        return [self.admit_payout_event, self.triage_payout_exception, self.decide_payout_reversal,
                self.record_payout_case_event, self.read_payout_at_provider, self.hold_payout,
                self.post_payout_reversal, self.release_payout_hold, self.give_up_payout_reversal,
                self.open_payout_ticket, self.link_payout_ticket, self.reissue_payout]
