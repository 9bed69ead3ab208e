"""Reconciliation vocabulary: the classes of difference between a provider's truth, our
cases and our ledger, the inputs and results of a run, and the rules that decide how a
break is resolved.

The classification itself is set-based SQL (adapters/reconciliation.py); the status sets
it reads are defined here, once, so the rule and its tests share them.
"""

import hashlib
from datetime import datetime, timedelta
from enum import StrEnum

from pydantic import Field

from domain.lifecycle import StatusChange, case_status_for, classify_status_change
from domain.models import (
    CaseStatus,
    EventKind,
    Frozen,
    LedgerKind,
    ProviderEvent,
    ProviderRefund,
    ProviderRefundStatus,
    RefundTimings,
    RoleRequirement,
)
from domain.payouts import PayoutEvent, ProviderPayout
from domain.policy import Policy, decide_payout_reversal, tier_for


class BreakClass(StrEnum):
    """One kind of difference; a break is unique per (provider, object id, class)."""

    PROVIDER_FAILED_SHOWN_REFUNDED = "provider_failed_shown_refunded"
    PROVIDER_SUCCEEDED_SHOWN_PENDING = "provider_succeeded_shown_pending"
    PROVIDER_SUCCEEDED_SHOWN_FAILED = "provider_succeeded_shown_failed"
    UNKNOWN_TO_US = "unknown_to_us"
    AMOUNT_MISMATCH = "amount_mismatch"
    CURRENCY_MISMATCH = "currency_mismatch"
    STUCK_NON_TERMINAL = "stuck_non_terminal"
    LEDGER_MISSING = "ledger_missing"
    LEDGER_DOUBLED = "ledger_doubled"
    PAYOUT_FAILED_SHOWN_PAID = "payout_failed_shown_paid"
    PAYOUT_PAID_SHOWN_FAILED = "payout_paid_shown_failed"
    """The provider paid a payout our books reversed (a bank's correction after a failure):
    for ops, who undo the reversal or recover a reissue's second payment."""
    UNMAPPED_STATUS = "unmapped_status"
    DUPLICATE_REFUND = "duplicate_refund"
    """A second provider refund carrying a case's reference (raised by the case, for ops)."""
    WORKFLOW_CLOSED = "workflow_closed"
    """The case's workflow ended (terminated, failed, timed out) while the case was open."""


UNMAPPED = "unmapped"
"""The staged status of an object whose provider status no adapter table maps."""


STATUS_CLASSES = frozenset({BreakClass.PROVIDER_FAILED_SHOWN_REFUNDED,
                            BreakClass.PROVIDER_SUCCEEDED_SHOWN_PENDING,
                            BreakClass.PROVIDER_SUCCEEDED_SHOWN_FAILED,
                            BreakClass.STUCK_NON_TERMINAL, BreakClass.UNKNOWN_TO_US})
"""Breaks fixed by taking the provider's state: the case's status follows it."""

RAISED_AGAIN = STATUS_CLASSES | {BreakClass.LEDGER_MISSING, BreakClass.LEDGER_DOUBLED}
"""Classes a resolved break removes (the case follows the provider, the ledger is brought to
it): found again later, the difference is new, or what its approval could not cover (a
compensation capped at the amount approved), and is raised again for its own approval.
Amount and currency breaks persist until people fix their cause: never raised again."""

LOOK_AGAIN = ("provider_moved", "case_moved", "approval_unmet", "approval_revoked", "overtaken_by")
"""What a settlement that went to ops review found (its resolution's keys): the provider or
the case moved since the approval, or the approvals do not meet the break as stored (or one
was given with a token revoked since). Nothing
acts on a break in ops review, so a run finding it again raises it again for its own
approval, as for a resolved one (`RAISED_AGAIN`); before, its money stayed unbooked for good."""

SHOWN_REFUNDED = frozenset({CaseStatus.SUCCEEDED, CaseStatus.EXECUTED_LEDGER_PENDING})
SHOWN_FAILED = frozenset({CaseStatus.REFUND_FAILED, CaseStatus.REFUND_CANCELED, CaseStatus.REJECTED,
                          CaseStatus.DENIED, CaseStatus.EXPIRED})
SHOWN_PENDING = frozenset(CaseStatus) - SHOWN_REFUNDED - SHOWN_FAILED
NON_TERMINAL_PROVIDER = frozenset({ProviderRefundStatus.PENDING, ProviderRefundStatus.REQUIRES_ACTION,
                                   ProviderRefundStatus.IN_REVIEW})


class RunKind(StrEnum):
    SCHEDULED = "scheduled"
    BACKFILL = "backfill"


class BreakState(StrEnum):
    """Where an exception case stands. Only `resolved` moved money, and only after approval."""

    NEW = "new"
    HANDED_TO_CASE = "handed_to_case"
    AWAITING_APPROVAL = "awaiting_approval"
    RESOLVED = "resolved"
    DISMISSED = "dismissed"
    EXPIRED = "expired"
    OPS_REVIEW = "ops_review"


REOPENABLE = frozenset({BreakState.DISMISSED, BreakState.EXPIRED})
"""Breaks people may send back to approval: the ones that ended without moving money."""


class ListedRefund(Frozen):
    """A refund from a provider's list call, with the creation time the window filters on."""

    refund: ProviderRefund
    created: datetime


class ListedPayout(Frozen):
    """A payout from a provider's list call, with the creation time the window filters on."""

    payout: ProviderPayout
    created: datetime


class UnmappedListing(Frozen):
    """An object a list call returned with a status no mapping table knows: never guessed
    into a status, it becomes an `unmapped_status` break and the run goes on."""

    object_id: str
    raw_status: str
    amount: int
    currency: str
    created: datetime
    error: str


class ReconcileOptions(Frozen):
    """Knobs of a run, from the settings of whoever started it (schedule or backfill)."""

    batch_size: int = Field(default=500, ge=1, le=10_000)
    batches_per_run: int = Field(default=200, ge=1, description="continue-as-new after this many batches")
    window: timedelta = Field(default=timedelta(days=14), description="a scheduled run's trailing window")
    stuck_after: timedelta = Field(default=timedelta(days=3),
                                   description="a refund non-terminal for longer is stuck")
    grace: timedelta = Field(default=timedelta(minutes=15),
                             description="objects younger than this are left to in-flight webhooks")


class ReconcileInput(Frozen):
    """Start input of ReconciliationWorkflow. A schedule leaves run_id and the window unset
    (the run is the workflow id, the window trails workflow time); a backfill sets them.
    Continue-as-new passes the completed input on, so every run of the chain is one run."""

    provider: str
    kind: RunKind = RunKind.SCHEDULED
    run_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    requested_by: str = "schedule"
    options: ReconcileOptions = ReconcileOptions()


class RunWindow(Frozen):
    """What the run row records; opening it twice is a no-op."""

    run_id: str
    provider: str
    kind: RunKind
    since: datetime
    until: datetime
    requested_by: str


class BatchInput(Frozen):
    run_id: str
    provider: str
    options: ReconcileOptions


class BatchResult(Frozen):
    """One batch: objects read after the stored cursor, breaks new to us, and whether the
    provider may have more (a full batch)."""

    objects: int
    new_breaks: int
    has_more: bool


class RunFailure(Frozen):
    """Why a run ended without its report (the provider refused its refund listing, say)."""

    run_id: str
    reason: str


class RunSummary(Frozen):
    run_id: str
    provider: str
    objects_seen: int
    new_breaks: int
    known_breaks: int
    report_files: tuple[str, ...] = ()


class BreakCase(Frozen):
    """Start input of ReconciliationBreakWorkflow (id `recon-break-<break_id>`): the break,
    the provider's truth and what our case held when it was found."""

    break_id: int
    break_class: BreakClass
    provider: str
    object_id: str
    chain: str = Field(description="the audit chain: the case id, or the tracking id it would get")
    case_id: str | None
    case_holds_refund: bool = Field(description="the case's provider_refund_id is this object")
    case_holds_no_refund: bool = Field(default=False, description="the case knew no provider refund")
    case_provider_status: ProviderRefundStatus | None
    truth: ProviderRefund | ProviderPayout = Field(description="the provider's object: a refund or a payout")
    ledger_delta: int | None = Field(description="minor units that bring the ledger to the truth")
    conflicted: tuple[str, ...] = Field(default=(), description="people who may not approve")
    timings: RefundTimings = RefundTimings()
    reopened: int = Field(default=0, description="how often people reopened the break")


class BreakApproval(Frozen):
    """Who must approve the break's resolution (the refund tier for its amount)."""

    tier: str
    requirements: tuple[RoleRequirement, ...]


class BreakSettlement(Frozen):
    """How an exception case ends; `approvers` only when it was approved."""

    break_id: int
    state: BreakState
    approvers: tuple[str, ...] = ()
    reason: str = ""
    round: int | None = Field(default=None, description="the round (`reopened`) the exception case ran "
                              "for; None from cases started before it was carried")


class BreakOutcome(Frozen):
    break_id: int
    state: BreakState
    posting_key: str | None = None
    case_status: CaseStatus | None = None


SYNTHETIC_EVENT_TYPE = "reconciliation.provider_state"


def break_workflow_id(break_id: int) -> str:
    return f"recon-break-{break_id}"


def expected_net(truth: ProviderRefund) -> int:
    """What our ledger should hold as refunded for a provider refund: its amount once it
    succeeded, nothing otherwise (we post only what the provider confirmed)."""
    return truth.amount if truth.status is ProviderRefundStatus.SUCCEEDED else 0


def lifecycle_takes(truth: ProviderRefund | ProviderPayout, case_id: str | None, *, holds_refund: bool,
                    holds_no_refund: bool, held_status: ProviderRefundStatus | None) -> bool:
    """Whether a refund case's own workflow would take the provider's word for this refund
    (its rules post and notify): the case holds this very refund and the lifecycle accepts
    the move, or it holds no refund at all and this one carries its reference and did not
    fail (a submit whose answer was lost: the case adopts it)."""
    if not isinstance(truth, ProviderRefund) or case_id is None:
        return False
    if holds_refund:
        return classify_status_change(held_status, truth.status) in (StatusChange.ADVANCE,
                                                                      StatusChange.LATE_FAILURE)
    return (holds_no_refund and truth.reference == case_id
            and truth.status not in (ProviderRefundStatus.FAILED, ProviderRefundStatus.CANCELED))


def lifecycle_can_fix(case: BreakCase) -> bool:
    """A status break about the refund the case holds, a move its lifecycle accepts: the case
    workflow takes the provider's truth itself; anything else needs an approved exception."""
    return (case.break_class in STATUS_CLASSES and case.case_holds_refund
            and lifecycle_takes(case.truth, case.case_id, holds_refund=True, holds_no_refund=False,
                                held_status=case.case_provider_status))


def case_can_take(case: BreakCase) -> bool:
    """A status break about a refund carrying the case's reference while the case knows no
    refund at all (the case in ops review still looking): the case's own workflow adopts it;
    approving a compensation beside it would post the refund twice once the case's lookup
    finds it."""
    return (case.break_class in STATUS_CLASSES and case.case_holds_no_refund
            and lifecycle_takes(case.truth, case.case_id, holds_refund=False, holds_no_refund=True,
                                held_status=case.case_provider_status))


def synthetic_event_id(break_id: int) -> str:
    """The event id of a break's synthetic provider event: one per break, so it acts once
    however often it is sent."""
    return f"reconciliation:{break_id}"


def truth_event(case: BreakCase, at: datetime) -> ProviderEvent:
    """The synthetic provider event that tells a running case workflow the provider's state."""
    truth = case.truth
    assert isinstance(truth, ProviderRefund), "only refund breaks are handed to a refund case"
    return ProviderEvent(
        provider=case.provider, event_id=synthetic_event_id(case.break_id),
        event_type=SYNTHETIC_EVENT_TYPE, kind=EventKind.REFUND_STATUS,
        body_sha256=hashlib.sha256(truth.model_dump_json().encode()).hexdigest(), occurred_at=at,
        refund_id=truth.refund_id, charge_id=truth.charge_id, refund_request_id=case.case_id,
        amount=truth.amount, currency=truth.currency, status=truth.status,
        raw_status=truth.raw_status, failure_reason=truth.failure_reason)


def payout_truth_event(case: BreakCase, at: datetime) -> PayoutEvent:
    """The same for a payout break: what the relay would hand the payout's exception case
    had the provider's webhook arrived."""
    truth = case.truth
    assert isinstance(truth, ProviderPayout), "only payout breaks are handed to a payout case"
    return PayoutEvent(provider=case.provider, event_id=synthetic_event_id(case.break_id),
                       event_type=SYNTHETIC_EVENT_TYPE, occurred_at=at, payout=truth,
                       body_sha256=hashlib.sha256(truth.model_dump_json().encode()).hexdigest())


def compensation(delta: int) -> tuple[LedgerKind, int] | None:
    """The journal template and amount that move the ledger by `delta` minor units."""
    if delta == 0:
        return None
    return (LedgerKind.REFUND_SETTLED, delta) if delta > 0 else (LedgerKind.REFUND_REVERSED, -delta)


def corrected_status(break_class: BreakClass, truth: ProviderRefundStatus) -> CaseStatus | None:
    """The case status a resolved break leaves: the provider's, for breaks about status;
    unchanged for amount, currency and ledger breaks (people fix the cause)."""
    return case_status_for(truth) if break_class in STATUS_CLASSES else None


def amount_at_stake(ledger_delta: int | None, amount: int) -> int:
    """The amount whose tier decides who approves a break, and the most its approval
    covers: the ledger move found, else the provider object's amount."""
    return abs(ledger_delta) if ledger_delta else amount


def approval_amount(case: BreakCase) -> int:
    """The amount at stake of a break's case, for its tier."""
    return amount_at_stake(case.ledger_delta, case.truth.amount)


def break_approval(policy: Policy, case: BreakCase) -> BreakApproval:
    """Who must approve a break's resolution: a payout's reversal tier for the payout's
    amount, else the refund tier for the amount at stake (`approval_amount`)."""
    if isinstance(case.truth, ProviderPayout):
        decided = decide_payout_reversal(policy, case.truth.amount, case.truth.currency)
        assert decided.tier is not None
        return BreakApproval(tier=decided.tier, requirements=decided.requirements)
    tier = tier_for(policy.refunds.tiers, approval_amount(case), case.truth.currency)
    return BreakApproval(tier=tier.name, requirements=tier.approvals)
