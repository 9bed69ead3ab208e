"""Activities of the refund workflow.

Each activity is idempotent: a retry after a crash finds what the first attempt wrote
(reservation, decision, submission intent, ledger posting key) instead of acting twice.
"""

import hashlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel
from temporalio import activity
from temporalio.exceptions import ApplicationError

from adapters.db import Store
from adapters.db.cases import SubmissionRefused
from adapters.metrics import OPS_REVIEW_ESCALATIONS
from adapters.providers.base import (
    ProviderAdapter,
    ProviderConfigurationRefused,
    ProviderDeclined,
    ProviderError,
    ProviderLookupUnsupported,
    ProviderOutcomeUnknown,
    RefundExecutor,
    RefundsDuplicated,
    UnexpectedProviderStatus,
)
from adapters.providers.manual import ManualRefunds
from domain import contracts, errors
from domain.incidents import DUPLICATE_REPORTED, DuplicateRefundInput, duplicate_detail
from domain.integrations import AdviceReceipt, AdviseInput
from domain.lifecycle import FINAL_PROVIDER_STATUSES
from domain.models import (
    CaseEventInput,
    CaseStatus,
    CaseWrites,
    CaseWritten,
    ChargeSnapshot,
    LedgerInput,
    LedgerResult,
    NoticeInput,
    PolicyDecision,
    PolicyInput,
    ProviderRefund,
    ProviderRefundStatus,
    RefundMethod,
    RefundRequest,
    SubmitInput,
    ValidateInput,
    ValidationResult,
    VerifyInput,
    VerifyResult,
    Vetted,
)
from domain.policy import ChargePriors, Policy, charge_problem, decide, policy_context

log = logging.getLogger(__name__)



def past_start_to_close() -> bool:
    """Whether this activity attempt runs past its start-to-close timeout: Temporal has
    timed it out (and may have scheduled a retry, or the workflow moved on without it)."""
    info = activity.info()
    timeout = info.start_to_close_timeout
    return timeout is not None and datetime.now(UTC) >= info.started_time + timeout


def foreign_answer(refund: ProviderRefund) -> ApplicationError:
    """A provider answering a refund under another reference than ours (one matching ids
    loosely): taken for ours, the case would book another case's refund, and ours may or may
    not exist. An unknown outcome, asked again."""
    return ApplicationError(f"the provider answered refund {refund.refund_id} under the reference "
                            f"{refund.reference!r}, not ours: outcome unknown", type=errors.OUTCOME_UNKNOWN)


def _unexpected(exc: UnexpectedProviderStatus) -> ApplicationError:
    return ApplicationError(str(exc), type=errors.UNEXPECTED_STATUS, non_retryable=True)


def _no_lookup(exc: ProviderLookupUnsupported) -> ApplicationError:
    """Asking again cannot help: the workflow waits for the provider's notification."""
    return ApplicationError(str(exc), type=errors.LOOKUP_UNSUPPORTED, non_retryable=True)


def configuration_refused(exc: ProviderConfigurationRefused) -> ApplicationError:
    """Retrying with a refused key cannot help: the workflow sends the case to ops."""
    return ApplicationError(str(exc), type=errors.CONFIGURATION_REFUSED, non_retryable=True)


def _count_escalation(event: CaseEventInput) -> None:
    """A case sent to ops review is counted by its reason (the action)."""
    if event.status is CaseStatus.OPS_REVIEW:
        OPS_REVIEW_ESCALATIONS.labels(event.action).inc()


def step_key(run_id: str, activity_id: str, step: BaseModel) -> str:
    """A step's key: its workflow run, its activity id and its input's digest. A run again
    of the same step has all three (its retries, and a local activity run again with its
    workflow task). The id alone is not enough: a workflow task tried again may hold events
    the failed attempt did not (an update, a signal), and a handler's step can then take the
    id the failed attempt gave another step; that other step's kept answer must not stand
    for it."""
    digest = hashlib.sha256(step.model_dump_json().encode()).hexdigest()[:32]
    return f"{run_id}/{activity_id}/{digest}"


def current_step_key(step: BaseModel, *, by_content: bool = False) -> str | None:
    """The running activity's step key (see `step_key`); none outside a workflow. `by_content`:
    keyed by the run and the input alone (see `_redone_after_cancel`)."""
    info = activity.info()
    if info.workflow_run_id is None:
        return None
    return step_key(info.workflow_run_id, "by-content" if by_content else info.activity_id, step)


def _redone_after_cancel(steps: CaseWrites) -> bool:
    """Whether the workflow runs this step again, as a new local activity with the same input,
    when a cancel interrupts it (possibly after its commit): applying a provider status (its
    event carries the refund), the guarded write of what a submit carried, and a duplicate
    refund's report (its event names the duplicate). Each is unique in its run by its input
    (a status is applied once per refund, the guarded write once, a duplicate reported once),
    so it is keyed by its input, and the redo gets the first run's answer."""
    return steps.unless_submitted or any(
        write.event is not None and (write.event.provider_refund is not None
                                     or write.event.action == DUPLICATE_REPORTED)
        for write in steps.writes)


class RefundActivities:
    """Holds the process-wide store and provider clients the activities share."""

    def __init__(self, store: Store, providers: Mapping[str, ProviderAdapter], policy: Policy, *,
                 advise: Callable[[AdviseInput], Awaitable[AdviceReceipt | None]] | None = None) -> None:
        """`advise`: advice made inside validation when the advisor allows it (see
        `IntegrationActivities.advise_in_process`); `None` there leaves it to the workflow."""
        self._store = store
        self._providers = providers
        self._policy = policy
        self._advise = advise
        self._manual = ManualRefunds(store)

    def _provider(self, name: str) -> ProviderAdapter:
        try:
            return self._providers[name]
        except KeyError:
            raise ApplicationError(f"unknown provider {name!r}", type=errors.UNKNOWN_PROVIDER,
                                   non_retryable=True) from None

    def _executor(self, request: RefundRequest) -> RefundExecutor:
        """Where the money moves: the provider, or a manual instruction for ops."""
        if request.method is RefundMethod.PROVIDER:
            return self._provider(request.provider)
        return self._manual

    @activity.defn(name=contracts.VALIDATE_REFUND.name)
    async def validate_refund(self, inp: ValidateInput) -> ValidationResult:
        """Checks the charge at the provider and takes the reservation in PostgreSQL.

        Idempotent: a retry finds the reservation it already holds.
        """
        charge = await self._valid_charge(inp.request, current_step_key(inp))
        if isinstance(charge, Vetted):
            return charge.validation
        return await self._store.cases.reserve(inp.request, charge)

    @activity.defn(name=contracts.VALIDATE_AND_DECIDE.name)
    async def validate_and_decide(self, inp: ValidateInput) -> Vetted:
        """`validate_refund` and `decide_policy` in one activity: the charge is read at the
        provider, then the reservation and the (pure) policy's decision commit together.
        Idempotent: a retry finds both, and a run again (as a local activity, its workflow
        task not completed) answers what the first run did, whatever the provider says now."""
        request = inp.request
        key = current_step_key(inp)
        charge = await self._valid_charge(request, key)
        if isinstance(charge, Vetted):
            return charge

        def decided(validation: ValidationResult, prior: ChargePriors) -> PolicyDecision:
            return decide(self._policy, request, policy_context(
                request, validation.amount_captured, validation.dispute_count, prior))
        vetted = await self._store.cases.reserve_and_decide(request, charge, decided, key)
        if self._advise is None or not vetted.validation.ok:
            return vetted
        advice = await self._advise(AdviseInput(request=request, validation=vetted.validation))
        return vetted.model_copy(update={"advised": advice is not None})

    async def _valid_charge(self, request: RefundRequest, key: str | None) -> ChargeSnapshot | Vetted:
        """The charge at the provider when it can take the refund; otherwise the case is
        rejected (status and audit row) and the step's answer comes back (see `reject`).
        First, the request must be the one a case holds: the relay records a request before
        it starts its workflow, so a run started straight in Temporal (no case, or other
        terms than the case of its id) is refused, audited, and changes no case."""
        recorded = await self._store.cases.get(request.refund_request_id)
        if recorded is None or recorded["params_hash"] != request.params_hash():
            reason = ("no case holds this request" if recorded is None else
                      "the case of this id holds other terms") + ": refunds start only through the relay"
            await self._store.audit.record(request.refund_request_id, "system", "start_refused",
                                           {"reason": reason, "params_hash": request.params_hash(),
                                            "amount": request.amount, "currency": request.currency})
            return Vetted(validation=ValidationResult(ok=False, reason=reason))
        if request.provider not in self._providers:
            return await self._store.cases.reject(request.refund_request_id,
                                                  f"unknown provider {request.provider!r}", key)
        try:
            charge = await self._provider(request.provider).get_charge(request.charge_id)
            problem = charge_problem(request, charge)
        except ProviderDeclined as exc:  # refused for good (e.g. a webhooks-only provider)
            charge, problem = None, str(exc)
        except ProviderConfigurationRefused as exc:  # our key, not the charge: ops, not a rejection
            raise configuration_refused(exc) from exc
        if problem is not None or charge is None:
            return await self._store.cases.reject(request.refund_request_id, problem or "charge not found",
                                                  key)
        return charge

    @activity.defn(name=contracts.DECIDE_POLICY.name)
    async def decide_policy(self, inp: PolicyInput) -> PolicyDecision:
        """Evaluates the deterministic policy and stores the decision with its rules."""
        request = inp.request
        prior = await self._store.cases.charge_priors(request.provider, request.charge_id,
                                                      request.refund_request_id)
        context = policy_context(request, inp.validation.amount_captured, inp.validation.dispute_count, prior)
        decision = decide(self._policy, request, context)
        await self._store.cases.record_decision(request.refund_request_id, decision.model_dump(mode="json"))
        return decision

    @activity.defn(name=contracts.RECORD_CASE_EVENT.name)
    async def record_case_event(self, inp: CaseEventInput) -> None:
        """Moves the case's status and appends the audit row in one transaction, once per
        step (a stalled attempt waking after its retry writes nothing); a case sent to ops
        review is counted by its reason (the action), when written."""
        await self._store.cases.record_event(inp, current_step_key(inp),
                                             after_commit=lambda _: _count_escalation(inp))

    @activity.defn(name=contracts.WRITE_CASE_STEPS.name)
    async def write_case_steps(self, inp: CaseWrites) -> CaseWritten:
        """A case step's ledger posting, notices and events in one transaction (run as a
        local activity: database only; a run again, its workflow task not completed, finds
        the first run's answer by its step key and writes nothing)."""
        def count_escalations(written: CaseWritten) -> None:
            """Only for events this run wrote: none when it answered as before, none when a
            guarded write found a submit begun."""
            if written.actions:
                for write in inp.writes:
                    if write.event is not None:
                        _count_escalation(write.event)

        return await self._store.cases.write_case_steps(
            inp, current_step_key(inp, by_content=_redone_after_cancel(inp)), after_commit=count_escalations)

    @activity.defn(name=contracts.SUBMIT_PROVIDER_REFUND.name)
    async def submit_provider_refund(self, inp: SubmitInput) -> ProviderRefund:
        """Calls the provider once. If any earlier attempt started (a crash, a timeout),
        it looks the refund up first and returns it instead of calling again. Only the
        answer to the create can decline; the lookup's failures never do (see `_find`)."""
        request = inp.request
        provider = self._executor(request)
        case_id = request.refund_request_id
        try:
            started = await self._store.cases.begin_submission(
                case_id, inp.idempotency_key, inp.intent_writes(), charge_now=await self._charge_now(request))
        except SubmissionRefused as exc:
            raise ApplicationError(str(exc), type=errors.CASE_MOVED_ON, non_retryable=True) from exc
        if started:
            found = await self._found_before(request, "resubmit after an earlier attempt",
                                             "provider_refund_found_before_resubmit")
            if found is not None:
                return found
        if past_start_to_close():
            # Temporal gave up on this attempt (a cancel waits exactly that long before it
            # looks at the provider and releases the hold): a create now would land after
            # that look. A retry, if any, records its intent and looks first.
            await self._store.audit.record(case_id, "system", "provider_submit_abandoned",
                                           {"idempotency_key": inp.idempotency_key})
            raise ApplicationError("the submit attempt woke past its start-to-close: the provider is not "
                                   "called", type=errors.OUTCOME_UNKNOWN)
        try:
            refund = await provider.create_refund(request, inp.idempotency_key)
        except UnexpectedProviderStatus as exc:
            raise _unexpected(exc) from exc
        except ProviderDeclined as exc:
            await self._store.audit.record(case_id, f"provider:{provider.name}",
                                           "provider_refund_declined", {"error": str(exc)})
            if started:
                return await self._landed_before(request, exc)
            raise ApplicationError(str(exc), type=errors.DECLINED, non_retryable=True) from exc
        except ProviderConfigurationRefused as exc:
            await self._store.audit.record(case_id, f"provider:{provider.name}",
                                           "provider_credentials_refused", {"error": str(exc)})
            raise configuration_refused(exc) from exc
        except ProviderOutcomeUnknown as exc:
            await self._store.audit.record(case_id, f"provider:{provider.name}",
                                           "provider_outcome_unknown", {"error": str(exc)})
            raise ApplicationError(str(exc), type=errors.OUTCOME_UNKNOWN) from exc
        if refund.reference not in (None, case_id):  # a create answer that does not echo ours is silent
            foreign = foreign_answer(refund)
            await self._store.audit.record(case_id, f"provider:{provider.name}", "provider_outcome_unknown",
                                           {"error": str(foreign)})
            raise foreign
        await self._store.cases.record_provider_refund(
            case_id, refund, "provider_refund_created", {"idempotency_key": inp.idempotency_key})
        return refund

    async def _charge_now(self, request: RefundRequest) -> ChargeSnapshot | None:
        """A bank transfer's charge as its provider shows it now, for its submission to check
        the amount against once more (None for a provider refund: the provider refuses an
        over-refund itself). A failed read is retried; one the provider refuses for good, or
        a charge it no longer shows as this one (gone, not captured), reads as nothing left."""
        if request.method is RefundMethod.PROVIDER:
            return None
        try:
            charge = await self._provider(request.provider).get_charge(request.charge_id)
        except ProviderDeclined:
            charge = None
        except ProviderConfigurationRefused as exc:
            raise configuration_refused(exc) from exc
        if charge is None or charge_problem(request, charge) is not None:
            return ChargeSnapshot(provider=request.provider, charge_id=request.charge_id,
                                  currency=request.currency, merchant_account=request.merchant_account,
                                  amount=0, amount_captured=0, amount_refunded=0, captured=False)
        return charge

    async def _landed_before(self, request: RefundRequest, declined: ProviderDeclined) -> ProviderRefund:
        """A resubmit declined: the provider may be refusing a second refund because an
        earlier attempt's landed (a key it no longer honours; "already refunded"), which
        the lookup before the create had missed. Looked up once more: found, it is the
        case's refund; still missing, the decline stands (a genuine one, a closed card, must
        fail the case, not resubmit for hours; a refund every lookup missed is
        reconciliation's `provider_succeeded_shown_failed`)."""
        found = await self._found_before(request, "decline after an earlier attempt",
                                         "provider_refund_found_after_decline")
        if found is None:
            raise ApplicationError(str(declined), type=errors.DECLINED, non_retryable=True) from declined
        return found

    async def _found_before(self, request: RefundRequest, reason: str, action: str) -> ProviderRefund | None:
        """The refund an earlier attempt made, recorded on the case (`action`), or None. Any
        other carrying our reference moved money a second time: its `duplicate_refund` break
        (which holds a reissue) and ops' notice, as verify-state's duplicates get. Before,
        only the first was kept: when it failed, the case showed no refund beside one that
        had paid, and a reissue paid again."""
        refunds = await self._find(request, reason)
        if not refunds:
            return None
        found, *duplicates = refunds
        case_id = request.refund_request_id
        await self._store.cases.record_provider_refund(
            case_id, found, action, {"also_found": [d.refund_id for d in duplicates]} if duplicates else None)
        for duplicate in duplicates:
            if await self._store.reconciliation.open_duplicate_refund_break(DuplicateRefundInput(
                    case_id=case_id, followed_refund_id=found.refund_id, duplicate=duplicate, source=reason)):
                await self._store.outbox.queue(NoticeInput(
                    refund_request_id=case_id, kind=DUPLICATE_REPORTED, audience="operator",
                    dedup_key=f"{case_id}:{DUPLICATE_REPORTED}:operator:{duplicate.refund_id}",
                    detail=duplicate_detail(found.refund_id, duplicate, reason),
                    dispatch_queue=activity.info().task_queue))
        return found

    async def _find(self, request: RefundRequest, reason: str) -> list[ProviderRefund]:
        """Looks our refund up: every refund carrying our reference, the one to follow
        first (more than one is an incident): of several, one that moved or may move money
        before a failed or canceled one (followed, a failure released the hold while the
        other refund had paid, its success never booked). A failed lookup says nothing about the money:
        refused credentials are a case for ops, any other failure or refusal (a 404
        included) an outcome still unknown, asked again; never a decline."""
        case_id = request.refund_request_id
        try:
            found = await self._executor(request).find_refund(request)
            if found is not None and found.reference != case_id:
                raise foreign_answer(found)
            return [found] if found is not None else []
        except RefundsDuplicated as exc:  # a paid one first, then one that may pay, then the rest
            return sorted(exc.refunds, key=lambda r: (r.status in FINAL_PROVIDER_STATUSES,
                                                      r.status is not ProviderRefundStatus.SUCCEEDED))
        except ProviderLookupUnsupported as exc:  # an earlier attempt may have made it: no resend
            await self._store.audit.record(case_id, "system", "verify_state",
                                           {"lookup": "unsupported", "reason": reason})
            raise _no_lookup(exc) from exc
        except UnexpectedProviderStatus as exc:
            await self._store.audit.record(case_id, "system", "verify_state",
                                           {"error": str(exc), "reason": reason})
            raise _unexpected(exc) from exc
        except ProviderConfigurationRefused as exc:
            await self._store.audit.record(case_id, "system", "verify_state",
                                           {"error": str(exc), "reason": reason})
            raise configuration_refused(exc) from exc
        except ProviderError as exc:
            raise ApplicationError(f"lookup failed, outcome unknown: {exc}",
                                   type=errors.OUTCOME_UNKNOWN) from exc

    @activity.defn(name=contracts.VERIFY_PROVIDER_REFUND.name)
    async def verify_provider_refund(self, inp: VerifyInput) -> VerifyResult:
        """Asks the provider whether our refund exists (the verify-state step)."""
        request = inp.request
        refunds = await self._find(request, inp.reason)
        if not refunds:
            await self._store.audit.record(request.refund_request_id, "system", "verify_state",
                                           {"found": False, "reason": inp.reason})
            return VerifyResult(refund=None)
        case = await self._store.cases.get(request.refund_request_id)
        followed = case["provider_refund_id"] if case else None  # the case keeps the refund it follows
        found, *duplicates = sorted(refunds, key=lambda r: r.refund_id != followed)
        await self._store.cases.record_provider_refund(
            request.refund_request_id, found, "verify_state",
            {"found": True, "reason": inp.reason,
             **({"also_found": [r.refund_id for r in duplicates]} if duplicates else {})})
        return VerifyResult(refund=found, duplicates=tuple(duplicates))

    @activity.defn(name=contracts.POST_LEDGER.name)
    async def post_ledger(self, inp: LedgerInput) -> LedgerResult:
        """Posts one balanced journal entry per posting key; retries find the first one."""
        return await self._store.ledger.post(inp)

    @activity.defn(name=contracts.QUEUE_NOTICE.name)
    async def queue_notice(self, inp: NoticeInput) -> None:
        """Writes the notice to the outbox once per dedup key (delivery is the integrations')."""
        await self._store.outbox.queue(inp)

    def all(self) -> list[Callable[..., Any]]:
        """Every activity, for worker registration."""
        return [self.validate_refund, self.decide_policy, self.record_case_event,
                self.submit_provider_refund, self.verify_provider_refund, self.post_ledger,
                self.queue_notice, self.validate_and_decide, self.write_case_steps]
