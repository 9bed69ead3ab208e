"""Payout reversals: the canonical payout event, internal payout states, the admission rule
that says what one event does to a payout's exception case, and the case's models.

A payout we hold as paid can come back failed, settlement-failed or reversed at the
provider days later. Each payout has at most one exception case, whose id derives from
provider + payout id; each event acts at most once, by `provider_event_id + payout_id`.
Kept apart from `models.py` so the payout path can grow without reshaping refunds.
"""

import hashlib
import re
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any

from pydantic import AfterValidator, Field, ValidationInfo, field_validator

from domain.models import (
    CASE_ID_MAX,
    REISSUE_SUFFIX,
    ApprovalRecord,
    EventTime,
    Frozen,
    Identifier,
    MinorAmount,
    NoticeInput,
    PolicyDecision,
    RefundTimings,
)
from domain.money import format_minor, normalise_currency


class ProviderPayoutStatus(StrEnum):
    """Every provider's payout states map onto these five."""

    PENDING = "pending"
    PAID = "paid"
    FAILED = "failed"
    CANCELED = "canceled"
    REVERSED = "reversed"


EXCEPTION_STATUSES = frozenset(
    {ProviderPayoutStatus.FAILED, ProviderPayoutStatus.CANCELED, ProviderPayoutStatus.REVERSED})


class PayoutStatus(StrEnum):
    """A payout's status in our own books (the `payouts` table)."""

    PAID = "paid"
    FAILED = "failed"
    REVERSED = "reversed"
    ON_HOLD = "on_hold"


class ProviderPayout(Frozen):
    """A payout as the provider reports it."""

    provider: str
    payout_id: str
    amount: MinorAmount  # zero, negative or past 64 bits: no payout's (unreadable, as for refunds)
    currency: str
    status: ProviderPayoutStatus
    raw_status: str
    failure_code: str | None = None
    failure_message: str | None = None
    reference: str | None = Field(default=None, description="our payout id, on payouts we made")


class FoundPayout(ProviderPayout):
    """A payout a lookup by our reference returned, with where it pays (when the provider
    says). Only the reissue reads it: never carried in an event or a workflow's history,
    so a worker from before the field reads every event a relay sends it."""

    destination: str | None = None


class PayoutEvent(Frozen):
    """A verified, normalised payout webhook (the canonical payout event)."""

    provider: str
    event_id: str
    event_type: str
    body_sha256: str
    occurred_at: EventTime
    payout: ProviderPayout

    def idempotency_key(self) -> str:
        """`provider_event_id + payout_id`: a retried delivery computes the same key."""
        return f"{self.event_id}:{self.payout.payout_id}"

    def is_exception(self) -> bool:
        return self.payout.status in EXCEPTION_STATUSES


class PayoutOrder(Frozen):
    """A payout we ask a provider to make (a reissue); `reference` is our payout id."""

    reference: str
    beneficiary_id: str
    amount: int = Field(gt=0, strict=True)
    currency: str


def payout_case_id(provider: str, payout_id: str) -> str:
    """The exception case (and workflow) id of a payout: no personal data in it."""
    return f"{provider}-payout-{payout_id}"


class Admission(StrEnum):
    """What one event does to a payout's exception case."""

    OPEN = "open"
    JOIN = "join"
    ALREADY_HANDLED = "already_handled"
    STALE = "stale"
    SAME = "same"
    MISMATCH = "mismatch"
    """A failure that would open the case, for another amount or currency than our books:
    the case opens in ops review (a break, payments ops told), never to a reversal."""


def admit(internal: PayoutStatus, reported: ProviderPayoutStatus, *, case_open: bool) -> Admission:
    """The internal-state gate. A failure of a payout we hold as paid opens the case; a
    later failure joins it; a payout already failed, reversed or held elsewhere needs no
    second remediation; `paid` (or pending) after a failure never re-marks it paid."""
    if reported in EXCEPTION_STATUSES:
        if case_open:
            return Admission.JOIN
        return Admission.OPEN if internal is PayoutStatus.PAID else Admission.ALREADY_HANDLED
    if case_open or internal is not PayoutStatus.PAID:
        return Admission.STALE
    return Admission.SAME


def final_status(reported: ProviderPayoutStatus) -> PayoutStatus:
    """The internal status a payout ends in once the provider's failure is settled."""
    return PayoutStatus.REVERSED if reported is ProviderPayoutStatus.REVERSED else PayoutStatus.FAILED


class PayoutSnapshot(Frozen):
    """An internal payout as our books hold it."""

    id: str
    provider: str
    provider_payout_id: str
    beneficiary_id: str
    amount: int = Field(gt=0, strict=True, description="integer minor units of `currency`")
    currency: str
    status: PayoutStatus
    held_from_status: PayoutStatus | None = None
    reissue_of: str | None = None

    def reissue_id(self) -> str:
        """Our id of this payout's one reissue; its uniqueness is what makes it once."""
        return f"{self.id}-r1"

    def reissue_key(self) -> str:
        """The provider idempotency key of the reissue: derived, never random."""
        digest = hashlib.sha256(f"payout-reissue:{self.reissue_id()}".encode()).hexdigest()
        return f"rfo_{digest[:40]}"


REISSUE_ID_FORM = re.compile(REISSUE_SUFFIX)
"""How a reissue's id ends (`PayoutSnapshot.reissue_id`): reserved, so no registration
takes a reissue's id first."""


def _not_a_reissue_id(value: str) -> str:
    if REISSUE_ID_FORM.search(value):
        raise ValueError("payout ids ending -r<n> are reserved for reissues")
    return value


class PayoutRegistration(Frozen):
    """A payout the internal payments system made, registered so a later failure at the
    provider finds it (`POST /v1/payouts`, `refunds payouts register`). Always paid: our
    books learn of every later change from the provider, through a case."""

    id: Annotated[Identifier, AfterValidator(_not_a_reissue_id)]
    provider: Identifier
    provider_payout_id: Identifier
    beneficiary_id: Identifier
    amount: MinorAmount
    currency: str = Field(min_length=3, max_length=3)

    @field_validator("currency")
    @classmethod
    def _known_currency(cls, value: str) -> str:
        return normalise_currency(value)

    @field_validator("provider_payout_id")
    @classmethod
    def _case_id_fits(cls, value: str, info: ValidationInfo) -> str:
        """The exception case its failure opens is named after it: a case id past the limit
        would fail that case's start when the failure comes (a 500, the payout never
        reversed), so the payout is refused now."""
        provider = info.data.get("provider")
        if provider is not None and len(payout_case_id(provider, value)) > CASE_ID_MAX:
            raise ValueError(f"too long: its exception case id would pass {CASE_ID_MAX} characters")
        return value

    def snapshot(self) -> PayoutSnapshot:
        return PayoutSnapshot(**self.model_dump(), status=PayoutStatus.PAID)

    def matches(self, payout: PayoutSnapshot) -> bool:
        """Whether a booked payout is this registration (whatever its status since)."""
        return self.model_dump() == payout.model_dump(include=set(type(self).model_fields))


class PayoutCaseStatus(StrEnum):
    """The payout exception case (see the architecture notes)."""

    OPENING = "opening"
    NO_ACTION = "no_action"
    AWAITING_APPROVAL = "awaiting_approval"
    DENIED = "denied"
    EXPIRED = "expired"
    EXECUTING = "executing"
    REMEDIATED = "remediated"
    LEDGER_FAILED = "ledger_failed"
    ROLLED_BACK = "rolled_back"
    AWAITING_REISSUE_APPROVAL = "awaiting_reissue_approval"
    REISSUE_DENIED = "reissue_denied"
    REISSUE_EXPIRED = "reissue_expired"
    REISSUING = "reissuing"
    REISSUED = "reissued"
    REISSUE_FAILED = "reissue_failed"
    OPS_REVIEW = "ops_review"
    """Ops decide: its workflow ended while the case was open (the closed-workflow sweep), its
    reissue attempts are spent, or the approved reversal found the payout not failed at the
    provider (nothing held or booked)."""


APPROVAL_STATUSES = frozenset(
    {PayoutCaseStatus.AWAITING_APPROVAL, PayoutCaseStatus.AWAITING_REISSUE_APPROVAL})

OPEN_STATUSES = frozenset(
    {PayoutCaseStatus.OPENING, PayoutCaseStatus.AWAITING_APPROVAL, PayoutCaseStatus.EXECUTING,
     PayoutCaseStatus.REMEDIATED, PayoutCaseStatus.AWAITING_REISSUE_APPROVAL, PayoutCaseStatus.REISSUING})
"""Statuses only the case's workflow moves on from (what the closed-workflow sweep looks at)."""
PAID_AFTER_REVERSAL = "payout_paid_after_reversal"
PAID_AFTER_FAILURE = "payout_paid_after_failure"
PAID_REPORTS = (PAID_AFTER_REVERSAL, PAID_AFTER_FAILURE)
PAID_REPORT_FIELDS = ("event_id", "payout_id", "amount", "currency", "occurred_at")
"""What a paid report's notice and audit row say of its event (`paid_report`): when it was
paid (the provider's clock) too, so a later failure or return is not read as paid."""


def paid_since(trail: list[dict[str, Any]], since: datetime | None) -> bool:
    """Whether a payout case's trail holds a signed report of the payout paid at or after
    `since` (a failure's or return's time by the provider's clock, which stamps to the
    second; None: any report). One older (paid, then failed or returned again) says
    nothing of the money now. One recorded without its time (before reports kept it) is
    read as paid: the safe side, where ops decide (ignored, a reversal booked back money
    that had left)."""
    floor = since.replace(microsecond=0) if since is not None else None
    return any(e["action"] in PAID_REPORTS and (
        floor is None or not e["detail"].get("occurred_at")
        or datetime.fromisoformat(e["detail"]["occurred_at"]) >= floor) for e in trail)


def latest_at(trail: list[dict[str, Any]], actions: tuple[str, ...]) -> datetime | None:
    """When, by the provider's clock (`occurred_at`), the latest of a trail's `actions`
    happened; None when none recorded it."""
    return max((datetime.fromisoformat(e["detail"]["occurred_at"]) for e in trail
                if e["action"] in actions and e["detail"].get("occurred_at")), default=None)


WITHOUT_OPEN_CASE = "payout_event_without_open_case"
"""An event no open case took, kept on the case's chain (a paid one with its status and
time: the failure that opens the case later reads it)."""


def paid_report_notice(case_id: str, kind: str, detail: dict[str, Any]) -> NoticeInput:
    """Ops' notice of a payout reported paid after its failure (`kind`: one of
    `PAID_REPORTS`), once per case."""
    return NoticeInput(refund_request_id=case_id, kind=kind, audience="ops",
                       dedup_key=f"{case_id}:{kind}", detail=detail)
"""What the relay records on a payout's case when the provider reports it paid after the
failure the case opened for (a bank's correction; the case itself reads the report as stale):
the provider's signed word, which a reissue reads whatever a later lookup shows."""

ENDED_UNREVERSED = frozenset(
    {PayoutCaseStatus.DENIED, PayoutCaseStatus.EXPIRED, PayoutCaseStatus.ROLLED_BACK,
     PayoutCaseStatus.OPS_REVIEW})
"""Cases whose workflow may have ended leaving the payout as it was: a reconciliation break
handed to one and found again (so the payout is still paid in our books: an ops-review case
that held or reversed it is never found again) is raised again for its own approval."""
ABNORMAL_ENDS = frozenset({"TERMINATED", "FAILED", "TIMED_OUT", "CANCELED"})


def left_open(status: PayoutCaseStatus, workflow_status: str) -> bool:
    """Whether a case whose workflow ended (Temporal's status name; NOT_FOUND when gone) was
    left open. A remediated case's workflow completes when its reissue window closes, so
    only an abnormal end leaves that one open."""
    if status is PayoutCaseStatus.REMEDIATED:
        return workflow_status in ABNORMAL_ENDS
    return status in OPEN_STATUSES


class PayoutCaseInput(Frozen):
    """Start input of PayoutReversalWorkflow (workflow id == case_id)."""

    case_id: Identifier
    provider: str
    payout_id: str = Field(description="the provider's payout id")
    timings: RefundTimings = RefundTimings()
    reissue_window: timedelta = Field(
        default=timedelta(days=30), description="how long a remediated case accepts a reissue request")
    carried: "PayoutCarry | None" = None
    """Set when the workflow continues as new: the case and the wait it was in."""


class AdmitInput(Frozen):
    case_id: str
    event: PayoutEvent
    case_open: bool


class AdmitResult(Frozen):
    admission: Admission
    payout: PayoutSnapshot | None


class TriageInput(Frozen):
    """What the advisor may look at: the payout and the case's events so far."""

    case_id: str
    payout: PayoutSnapshot
    events: tuple[PayoutEvent, ...]


class TriageReceipt(Frozen):
    """Whether a recommendation was stored, never what it says: its content cannot reach a
    decision by construction."""

    recorded: bool
    source: str


class PayoutPolicyInput(Frozen):
    case_id: str
    payout: PayoutSnapshot


class PayoutDecision(Frozen):
    """The tier that must approve, and the runbook's policy switches."""

    decision: PolicyDecision
    hold_beneficiary_payouts: bool
    rollback_hold_on_ledger_failure: bool


class HoldInput(Frozen):
    case_id: str
    payout_id: str
    hold_beneficiary: bool


class HoldResult(Frozen):
    held_from: PayoutStatus
    newly_held: bool
    beneficiary_held: bool


class ReversalInput(Frozen):
    case_id: str
    payout: PayoutSnapshot


class PayoutAtProvider(Frozen):
    """A payout as its provider shows it now, read before the runbook holds it: `status`
    None when it could not be read (`unread` says why: none held, our key refused, a status
    we do not map); `lookup` False for a provider with no payout lookup that has said
    nothing since the failure (its signed webhook is all there is)."""

    status: ProviderPayoutStatus | None = None
    unread: str | None = None
    lookup: bool = True

    def confirmed_failed(self) -> bool:
        """Whether the provider shows the money back (failed, canceled, reversed)."""
        return self.status in EXCEPTION_STATUSES

    def shown(self) -> str:
        """What the provider showed, for ops: its status, or why none was read."""
        return self.status.value if self.status is not None else self.unread or "unread"


class ReleaseResult(Frozen):
    """`rolled_back` False with `posted` True: the reversal landed after all (the hold stays)."""

    rolled_back: bool
    posted: bool
    restored: PayoutStatus | None = None


class TicketInput(Frozen):
    case_id: str
    occasion: str
    priority: str = Field(pattern=r"^(normal|high)$")
    detail: dict[str, object] = Field(default_factory=dict)


class TicketResult(Frozen):
    ticket_ref: str
    newly_queued: bool
    notice_key: str | None = Field(default=None, description="the outbox notice that files the ticket")


class LinkTicketInput(Frozen):
    case_id: str
    occasion: str


class LinkedTicket(Frozen):
    """The case's ticket reference once the ticketing systems answered (the placeholder
    while none is configured or none has answered yet)."""

    ticket_ref: str
    filed: bool


class PayoutCaseEventInput(Frozen):
    """One step of a payout case for the audit trail, optionally moving its status."""

    case_id: str
    action: str
    actor: str = "workflow"
    status: PayoutCaseStatus | None = None
    detail: dict[str, object] = Field(default_factory=dict)


class ReissueAsk(Frozen):
    """An explicit request to reissue the payout; identity comes from the relay's auth."""

    requester: str
    roles: tuple[str, ...]
    reason: str = ""


class ReissueInput(Frozen):
    case_id: str
    original: PayoutSnapshot
    final_status: PayoutStatus
    lookup_only: bool = False
    """Only look the reissue up (booking it when found): after the last attempt, past the horizon."""
    approvers: tuple[str, ...] = ()
    """Who approved the reissue: none of them may have released a hold it checks."""


class PayoutCaseState(Frozen):
    """The workflow's view of its case, returned by the `state` query and as its result."""

    case_id: str
    status: PayoutCaseStatus
    payout: PayoutSnapshot | None = None
    decision: PolicyDecision | None = None
    approvals: tuple[ApprovalRecord, ...] = ()
    refused_approvals: tuple[ApprovalRecord, ...] = ()
    missing_roles: tuple[str, ...] = ()
    runbook: tuple[str, ...] = ()
    events_seen: int = 0
    reissue_payout_id: str | None = None


class PayoutCarry(Frozen):
    """What a payout case's workflow takes across continue-as-new: the case, and the wait it
    was in (`phase`: the reissue window until `deadline`, or the reissue loop)."""

    phase: str
    status: PayoutCaseStatus
    payout: PayoutSnapshot
    decision: PayoutDecision
    reissue_round: bool = Field(description="whether the round carried is the reissue's")
    requester: str
    approvals: tuple[ApprovalRecord, ...] = ()
    refused: tuple[ApprovalRecord, ...] = ()
    runbook: tuple[str, ...] = ()
    timeline: tuple[PayoutEvent, ...] = ()
    keys: tuple[str, ...] = ()
    inbox: tuple[PayoutEvent, ...] = ()
    events_seen: int = 0
    deadline: datetime | None = None
    reissue_ask: ReissueAsk | None = None
    reissue_refused: bool = False
    held_by: tuple[str, ...] = Field(default=(), description=(
        "the cases holding the beneficiary whose hold ops were told the reissue waits for"))
    unknown_attempts: int = 0
    reissued: PayoutSnapshot | None = None
    runs: int = 1
    verdict_ids: tuple[str, ...] = Field(default=(), description=(
        "the sealed verdicts' ids the case has seen: a seal replayed into the next run (its "
        "nonces are per run) is a resend, never an approval of the round open then"))


PayoutCaseInput.model_rebuild()


def not_the_reissue(original: PayoutSnapshot, found: FoundPayout) -> str | None:
    """Why a payout the lookup returned for the reissue's reference is not the reissue (None
    when it is): one carrying another reference (a provider or emulator that ignored the
    filter) would be booked as paid while the beneficiary never was; so would one paying
    elsewhere (made under our reference by someone else at the provider)."""
    if found.reference != original.reissue_id():
        return (f"the payout {found.payout_id} the provider returned for {original.reissue_id()} carries "
                f"the reference {found.reference!r}: it is not the reissue; nothing is booked; ops decide")
    if found.destination is not None and found.destination != original.beneficiary_id:
        return (f"the payout {found.payout_id} under the reissue's reference {original.reissue_id()} pays "
                f"{found.destination!r}, not beneficiary {original.beneficiary_id!r}: it is not the "
                "reissue; nothing is booked; ops decide")
    return None


def reissue_problem(original: PayoutSnapshot, made: ProviderPayout) -> str | None:
    """Why the payout the provider holds under the reissue's reference cannot be booked as
    the reissue paid (None when it can): it failed, was canceled or reversed since (an
    earlier attempt's create that landed late), or is for another amount or currency."""
    if made.status in EXCEPTION_STATUSES:
        return (f"the reissue {made.payout_id} at {made.provider} is {made.status.value}: nothing "
                "is booked as paid; ops decide")
    if (made.amount, made.currency) != (original.amount, original.currency):
        asked = format_minor(original.amount, original.currency)
        return (f"the reissue {made.payout_id} at {made.provider} is for "
                f"{format_minor(made.amount, made.currency)}, not {asked}: nothing is booked as paid; "
                "ops decide")
    return None



def paid_report(event: PayoutEvent) -> dict[str, Any]:
    """What a paid report's notice and audit row say of its event."""
    return dict(zip(PAID_REPORT_FIELDS, (event.event_id, event.payout.payout_id, event.payout.amount,
                                         event.payout.currency, event.occurred_at.isoformat()), strict=True))
