"""The request, event and result models that cross workflow and activity boundaries.
(Over 400 lines on purpose: what recorded workflow histories carry stays in one module.)

One input model and one result model per call, so fields can be added later without
breaking running workflows (new fields always get defaults).
"""

import hashlib
import json
import re
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from domain.money import MAX_MINOR_AMOUNT, normalise_currency

CASE_ID_MAX = 128
"""The longest id of ours: a case's, its workflow's, a caller's."""
Identifier = Annotated[str, Field(min_length=1, max_length=CASE_ID_MAX,
                                  pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")]

REISSUE_SUFFIX = r"-r[0-9]+$"
"""How a reissue's id ends (a refund's `<id>-r<n>`, a payout's `<id>-r1`)."""
SYSTEM_ID_FORMS = re.compile(
    r"^(?:recon-break-|reconcile-|servicenow-|[A-Za-z0-9_]+-(?:payout|refund)-)|" + REISSUE_SUFFIX)
"""The ids of cases and workflows the system opens (reconciliation breaks and runs, ServiceNow
tickets, payout exceptions, provider-made refunds, reissues `<id>-r<n>`): a caller may not
take one first and squat its case, or be answered 202 for a workflow that is another's. (A
provider's own requests, `<provider>-<id>`, are refused at the relay, which knows them.)"""


def _caller_chosen(value: str) -> str:
    if SYSTEM_ID_FORMS.search(value):
        raise ValueError("ids starting recon-break-, reconcile-, servicenow-, <provider>-payout- or "
                         "<provider>-refund-, or ending -r<n>, are reserved for cases the "
                         "system opens")
    return value


CallerId = Annotated[Identifier, AfterValidator(_caller_chosen)]
"""An id a caller chooses: never one of the system's forms."""


def _bounded_evidence(value: dict[str, str]) -> dict[str, str]:
    if len(value) > 32 or any(len(k) > 64 or len(v) > 2000 for k, v in value.items()):
        raise ValueError("evidence allows at most 32 fields, keys <= 64 and values <= 2000 chars")
    return value


MinorAmount = Annotated[int, Field(gt=0, le=MAX_MINOR_AMOUNT, strict=True,
                                   description="integer minor units of `currency`")]
Currency = Annotated[str, Field(min_length=3, max_length=3), AfterValidator(normalise_currency)]
Evidence = Annotated[dict[str, str], AfterValidator(_bounded_evidence)]


def _instant(value: datetime) -> datetime:
    """A provider's event time as an instant: one without an offset is UTC (Rainforest
    documents UTC; the others send an offset), since a naive time cannot be compared with
    our aware ones. Outside 1970-9998 in UTC it is no real event's time (nor one
    PostgreSQL and Python both read back): a ValueError, so a malformed delivery."""
    aware = value if value.utcoffset() is not None else value.replace(tzinfo=UTC)
    try:
        year = aware.astimezone(UTC).year
    except OverflowError as exc:
        raise ValueError(f"event time {value.isoformat()} is out of range") from exc
    if not 1970 <= year <= 9998:
        raise ValueError(f"event time {value.isoformat()} is out of range")
    return aware


EventTime = Annotated[datetime, AfterValidator(_instant)]
"""When a provider says an event happened."""


class Frozen(BaseModel):
    """Immutable, strict-about-unknown-fields base for everything we pass around."""

    model_config = ConfigDict(frozen=True, extra="forbid")


ROLES = frozenset({"requester", "approver", "payments_ops_lead", "finance_manager", "compliance",
                   "treasury", "ops", "auditor", "admin"})
APPROVER_ROLES = frozenset({"approver", "payments_ops_lead", "finance_manager", "compliance",
                            "treasury"})


class RequestSource(StrEnum):
    """Where a refund request entered the system (all entry points share one path)."""

    API = "api"
    CLI = "cli"
    CONSOLE = "console"
    TICKET = "ticket"
    WEBHOOK = "webhook"


class RefundReason(StrEnum):
    """Reason codes; policy treats some as high risk."""

    REQUESTED_BY_CUSTOMER = "requested_by_customer"
    DUPLICATE = "duplicate"
    FRAUDULENT = "fraudulent"
    ITEM_NOT_RECEIVED = "item_not_received"
    ITEM_DAMAGED = "item_damaged"
    SERVICE_ISSUE = "service_issue"
    OTHER = "other"


class RefundMethod(StrEnum):
    """How the money goes back: through the provider, or paid out by ops by hand."""

    PROVIDER = "provider"
    BANK_TRANSFER = "bank_transfer"


class RefundRequest(Frozen):
    """What a caller asks for. The requester is never part of it: it comes from auth."""

    refund_request_id: Identifier
    provider: Identifier
    charge_id: Identifier
    amount: MinorAmount
    currency: Currency
    merchant_account: Identifier
    reason: RefundReason
    evidence: Evidence = Field(default_factory=dict)
    source: RequestSource = RequestSource.API
    method: RefundMethod = RefundMethod.PROVIDER
    parent_refund_request_id: Identifier | None = Field(
        default=None, description="set on a reissue: the failed request it replaces")
    trigger_identities: tuple[str, ...] = Field(
        default=(), max_length=200,  # a reissue adds its family's people: ten was reached in a few rounds
        description="people behind the triggering event (e.g. the ticket's opener): they cannot approve")

    def params_hash(self) -> str:
        """Binds the request id to its parameters: a repeat with other values is a conflict."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def idempotency_key(self) -> str:
        """The provider idempotency key: derived from our id, never random, never reused."""
        digest = hashlib.sha256(f"refund:{self.refund_request_id}".encode()).hexdigest()
        return f"rfo_{digest[:40]}"


class RefundRequestBody(Frozen):
    """What a caller may say when asking for a refund (API, CLI). Source, method, parent
    and trigger identities are the server's: the channel, the reissue path and the
    integrations set them, so nobody can name who may not approve or hijack a reissue."""

    refund_request_id: CallerId
    provider: Identifier
    charge_id: Identifier
    amount: MinorAmount
    currency: Currency
    merchant_account: Identifier
    reason: RefundReason
    evidence: Evidence = Field(default_factory=dict)

    def as_request(self, source: RequestSource) -> RefundRequest:
        """The internal request, validated again by its own rules (currency, evidence)."""
        return RefundRequest.model_validate({**self.model_dump(), "source": source})


class RefundTimings(Frozen):
    """Durations the workflow waits for; settings, so tests can use seconds."""

    approval_timeout: timedelta = timedelta(days=3)
    submit_timeout: timedelta = timedelta(seconds=30)
    status_poll_interval: timedelta = timedelta(hours=1)
    late_failure_window: timedelta = timedelta(days=10)
    approval_reminder: timedelta | None = timedelta(days=1)
    approval_escalation: timedelta | None = timedelta(days=2)
    ledger_pending_after: timedelta = timedelta(minutes=2)
    advice_timeout: timedelta = timedelta(seconds=30)
    continue_as_new_after_events: int = 10_000
    """An open-ended wait continues as new past this history length (Temporal's limit: 51,200)."""
    max_submit_attempts: int = 20
    """Submits of one refund before the case goes to ops, reservation kept, still looking."""
    provider_horizon: timedelta = timedelta(seconds=70)
    """How long after a provider call ended the provider may still act on it (its HTTP
    timeout plus a margin): no second create goes out before it has passed."""
    provider_read_attempts: int = 8
    """Attempts of a provider read (validation, verify-state) before ops are told."""

    def create_lands_within(self) -> timedelta:
        """How long after a submit attempt started a create it sent may still land: the
        attempt's timeout, then the provider horizon."""
        return self.submit_timeout + self.provider_horizon


class CaseStatus(StrEnum):
    """The refund case state machine (see the architecture notes)."""

    REQUESTED = "requested"
    VALIDATING = "validating"
    REJECTED = "rejected"
    AWAITING_APPROVAL = "awaiting_approval"
    DENIED = "denied"
    EXPIRED = "expired"
    EXECUTING = "executing"
    VERIFYING = "verifying"
    PENDING = "pending"
    REQUIRES_ACTION = "requires_action"
    IN_REVIEW = "in_review"
    SUCCEEDED = "succeeded"
    REFUND_FAILED = "refund_failed"
    REFUND_CANCELED = "refund_canceled"
    EXECUTED_LEDGER_PENDING = "executed_ledger_pending"
    OPS_REVIEW = "ops_review"
    TRACKING = "tracking"
    CANCELED_BY_OPS = "canceled_by_ops"


CLOSED_STATUSES = frozenset(
    {CaseStatus.REJECTED, CaseStatus.DENIED, CaseStatus.EXPIRED, CaseStatus.REFUND_FAILED,
     CaseStatus.REFUND_CANCELED, CaseStatus.CANCELED_BY_OPS}
)


class ProviderRefundStatus(StrEnum):
    """Every provider's refund states map onto these six."""

    PENDING = "pending"
    REQUIRES_ACTION = "requires_action"
    IN_REVIEW = "in_review"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


class ProviderRefund(Frozen):
    """A refund as the provider reports it."""

    provider: str
    refund_id: str
    charge_id: str
    amount: MinorAmount  # a provider's word for no refund's amount (0, negative, past 64 bits) is malformed
    currency: str
    status: ProviderRefundStatus
    raw_status: str
    failure_reason: str | None = None
    reference: str | None = Field(default=None, description="our refund_request_id, if set")


class ChargeSnapshot(Frozen):
    """What the provider says about a charge, for eligibility."""

    provider: str
    charge_id: str
    currency: str
    merchant_account: str
    amount: int
    amount_captured: int
    captured: bool
    dispute_count: int | None = 0
    """None when the provider does not say; the rules read an unknown history as disputed."""
    amount_refunded: int = 0
    """What the provider reports refunded already; validation never lets captured minus
    this be exceeded, whatever our own cases hold."""
    refunded_counts_pending: bool = True
    """Whether `amount_refunded` counts refunds still in flight (Stripe, Rainforest and
    Cashfree do; Adyen's, read from its notifications, counts only successes)."""


class EventKind(StrEnum):
    """What a verified webhook means to us, whatever the provider called it."""

    REFUND_REQUESTED = "refund_requested"
    REFUND_STATUS = "refund_status"


class ProviderEvent(Frozen):
    """A verified, normalised webhook event (the canonical event model)."""

    provider: str
    event_id: str
    event_type: str
    kind: EventKind
    body_sha256: str
    occurred_at: EventTime
    refund_id: str | None = None
    charge_id: str | None = None
    refund_request_id: str | None = None
    amount: MinorAmount | None = None
    currency: str | None = None
    status: ProviderRefundStatus | None = None
    raw_status: str | None = None
    failure_reason: str | None = None
    merchant_account: str | None = None
    reason: RefundReason | None = None
    request_object_id: str | None = Field(
        default=None, description="the provider's id of a refund request object (kind=refund_requested)"
    )
    evidence: dict[str, str] = Field(default_factory=dict)

    def as_refund(self) -> ProviderRefund | None:
        """The refund this event reports, if it reports one completely."""
        if self.kind is not EventKind.REFUND_STATUS or self.status is None:
            return None
        if self.refund_id is None or self.charge_id is None or self.amount is None:
            return None
        return ProviderRefund(
            provider=self.provider, refund_id=self.refund_id, charge_id=self.charge_id,
            amount=self.amount, currency=self.currency or "", status=self.status,
            raw_status=self.raw_status or self.status.value, failure_reason=self.failure_reason,
            reference=self.refund_request_id,
        )


class Decision(StrEnum):
    APPROVE = "approve"
    DENY = "deny"


class ApprovalSignal(Frozen):
    """An approver's verdict; identity and roles come from the relay's authentication.
    `verdict_id` is the relay's name for one verdict: when it stops waiting for the update it
    sends the same verdict again as a signal, and a case takes one id once. Empty (verdicts
    from other channels, and every history recorded before ids) means never deduplicated."""

    approver: str
    roles: tuple[str, ...]
    decision: Decision
    reason: str = ""
    verdict_id: str = Field(default="", max_length=64)
    awaiting: str = Field(default="", max_length=64)
    """The case's status its approver was shown: a payout case's two rounds (the reversal,
    then a reissue) can need the same role, so a verdict counts only in the round it was
    given for. Empty (other channels, histories recorded before) means any."""


class RefundWorkflowInput(Frozen):
    """Start input of RefundWorkflow (workflow id == request.refund_request_id); `carried`
    when it continues as new."""

    request: RefundRequest
    requester: str
    timings: RefundTimings = RefundTimings()
    task_queue: str | None = None
    carried: "RefundCarry | None" = None


class ValidateInput(Frozen):
    request: RefundRequest


class ValidationResult(Frozen):
    ok: bool
    reason: str = ""
    remaining_before: int | None = None
    prior_refund_count: int = 0
    amount_captured: int | None = None
    dispute_count: int | None = 0


class PolicyInput(Frozen):
    request: RefundRequest
    validation: ValidationResult


class RoleRequirement(Frozen):
    """`count` distinct people holding `role` must approve."""

    role: str = Field(min_length=1)
    count: int = Field(default=1, ge=1, le=10)


class PolicyContext(Frozen):
    """Facts about the charge that the rules read, gathered by the policy activity."""

    prior_refund_count: int = 0
    prior_partial_refund: bool = False
    is_partial: bool = False
    prior_dispute_count: int | None = 0
    """None: the provider does not tell (its rules read as disputed)."""
    prior_refund_total: int = 0
    """What the other refunds holding money on the charge add up to, in the request's minor
    units: the tier is chosen on it plus the request (a refund asked in parts needs the
    approvals of the whole). 0 in decisions made before it was counted."""
    prior_refusal_count: int = 0
    """The charge's other requests that people denied or let expire: a request asked again
    after a refusal is for people, however the requester words it. 0 in decisions made
    before it was counted."""
    prior_refunded_outside: int = 0
    """What the provider reports refunded on the charge beyond the refunds our cases made
    there (a dashboard refund, one from before we ran, one whose webhook never came): in the
    count (as one) and the total above. 0 in decisions made before it was counted."""


class PolicyDecision(Frozen):
    """Deterministic verdict with the rules that fired and the policy that decided, so
    it can be explained (and re-simulated) later."""

    auto_approve: bool
    rules_fired: tuple[str, ...]
    policy_version: str
    policy_hash: str = ""
    tier: str | None = None
    requirements: tuple[RoleRequirement, ...] = ()
    context: PolicyContext = PolicyContext()


class ApprovalRecord(Frozen):
    approver: str
    decision: Decision
    reason: str
    at: datetime


class RefundCarry(Frozen):
    """What a refund workflow takes across continue-as-new: its state, and where it was
    (`context`: submitting or following the provider; `phase`: the wait it was in)."""

    context: str
    phase: str
    status: CaseStatus
    decision: PolicyDecision | None = None
    approvals: tuple[ApprovalRecord, ...] = ()
    refused: tuple[ApprovalRecord, ...] = ()
    refund: ProviderRefund | None = None
    failure_reason: str | None = None
    postings: tuple[str, ...] = ()
    events_seen: int = 0
    event_ids: tuple[str, ...] = ()
    inbox: tuple[ProviderEvent, ...] = ()
    succeeded_at: datetime | None = None
    lookup_escalated: bool = False
    duplicates: tuple[str, ...] = ()
    mismatched: bool = False
    escalated: str | None = None
    status_before_escalation: CaseStatus = CaseStatus.REQUESTED
    attempt: int = 0
    submit_ended_at: datetime | None = None
    reason: str = ""
    runs: int = 1


RefundWorkflowInput.model_rebuild()


class CaseState(Frozen):
    """The workflow's view of its case, returned by the `state` query."""

    refund_request_id: str
    status: CaseStatus
    amount: int
    currency: str
    provider_refund_id: str | None = None
    provider_status: ProviderRefundStatus | None = None
    failure_reason: str | None = None
    decision: PolicyDecision | None = None
    approvals: tuple[ApprovalRecord, ...] = ()
    refused_approvals: tuple[ApprovalRecord, ...] = ()
    ledger_postings: tuple[str, ...] = ()
    events_seen: int = 0


class CaseEventInput(Frozen):
    """One step of a case for the audit trail, optionally moving its status."""

    refund_request_id: str
    action: str
    actor: str
    status: CaseStatus | None = None
    release_reservation: bool = False
    provider_refund: ProviderRefund | None = None
    detail: dict[str, Any] = Field(default_factory=dict)


class VerifyInput(Frozen):
    request: RefundRequest
    reason: str


class VerifyResult(Frozen):
    refund: ProviderRefund | None
    duplicates: tuple[ProviderRefund, ...] = ()
    """Other refunds carrying the same reference: money moved twice, an incident."""


class LedgerKind(StrEnum):
    """Which journal template to post."""

    REFUND_SETTLED = "refund_settled"
    REFUND_REVERSED = "refund_reversed"
    PAYOUT_REVERSED = "payout_reversed"
    PAYOUT_REISSUED = "payout_reissued"


class LedgerInput(Frozen):
    refund_request_id: str = Field(description="the case id (a refund or a payout exception case)")
    kind: LedgerKind
    amount: int
    currency: str
    provider_refund_id: str = Field(description="the provider object the entry is about (refund or payout)")
    reference: str | None = Field(
        default=None, description="set on a compensating entry: what it resolves (e.g. a break)")

    def posting_key(self) -> str:
        """Posting is idempotent by this key: one entry per case and template (and, for a
        compensating entry, per thing it resolves)."""
        key = self.key_of(self.refund_request_id, self.kind)
        return f"{key}:{self.reference}" if self.reference else key

    @staticmethod
    def key_of(case_id: str, kind: "LedgerKind") -> str:
        """The key of the case's entry of a template (no reference): its workflow's."""
        return f"{case_id}:{kind.value}"


class LedgerResult(Frozen):
    posting_key: str
    entry_id: int
    newly_posted: bool


class RefundOutcome(Frozen):
    """The workflow's result: its final case state."""

    state: CaseState


class ApprovalProgress(Frozen):
    """The answer to an approval update: did it count, and what is still missing."""

    accepted: bool
    reason: str = ""
    status: str = Field(description="the case's status (a refund or a payout exception case)")
    missing_roles: tuple[str, ...] = ()


class NoticeInput(Frozen):
    """A notice for the outbox; `dedup_key` makes it at most once per event and audience."""

    refund_request_id: str
    kind: str
    audience: str
    dedup_key: str
    detail: dict[str, Any] = Field(default_factory=dict)
    dispatch_queue: str | None = None
    """The task queue whose workers' dispatcher delivers it (`workers.outbox`); None: the
    workflow's own courier does, or the sweeper after its grace."""


class CaseWrite(Frozen):
    """One write of a case step: a notice queued or an event recorded (exactly one)."""

    notice: NoticeInput | None = None
    event: CaseEventInput | None = None

    @model_validator(mode="after")
    def _one(self) -> "CaseWrite":
        if (self.notice is None) == (self.event is None):
            raise ValueError("a case write is a notice or an event")
        return self


class CaseWrites(Frozen):
    """A case step's writes, committed in one transaction: the ledger posting first (when
    any), then the notices and events in order (a notice before the status announcing it)."""

    refund_request_id: str
    posting: LedgerInput | None = None
    writes: tuple[CaseWrite, ...] = ()
    unless_submitted: bool = False
    """Write only if no submit began for the case: a submit's `before` that its attempt may
    not have committed (a cancel, a failed attempt; none runs any more) is written so."""


class SubmitInput(Frozen):
    request: RefundRequest
    idempotency_key: str
    started: CaseEventInput | None = None
    """The case event the first submit records with its intent, in one transaction
    (`execution_started`); None on a resubmit and in executions before `fewer-round-trips-1`."""
    before: tuple[CaseWrite, ...] = ()
    """Writes committed in that transaction before `started`: the deciding approval's row and
    its notice (since `approval-with-submit-1`); only the first submit carries them."""

    def intent_writes(self) -> tuple[CaseWrite, ...]:
        """What the submit's intent commits with it, in order: `before`, then `started`."""
        return (*self.before, *((CaseWrite(event=self.started),) if self.started else ()))


class CaseWritten(Frozen):
    """What a case step wrote: the posting and the case actions recorded (the history shows
    them: a local activity's input is not in it)."""

    posting: LedgerResult | None = None
    posted: LedgerKind | None = None
    actions: tuple[str, ...] = ()


class Vetted(Frozen):
    """Validation and, when it passed, the policy's decision (one activity, one transaction)."""

    validation: ValidationResult
    decision: PolicyDecision | None = None
    advised: bool = False
    """Advice was made and stored inside validation (an in-process advisor): the workflow
    asks no advice activity. False in every result recorded before it existed."""


class ApprovalVerdict(Frozen):
    """Why an approval was refused, or `None` reason when it counts."""

    accepted: bool
    reason: str = ""


