"""Provider-originated refunds (dashboard refunds, auto-refunds): the tracking case's input
and the rule that turns a reported status into a step of a case.

Kept apart from `models.py` so the tracking path can grow without reshaping the refund
request models.
"""

from datetime import datetime

from domain.lifecycle import (
    BACKWARDS,
    FINAL_PROVIDER_STATUSES,
    StatusChange,
    case_status_for,
    classify_status_change,
)
from domain.models import (
    CaseStatus,
    Frozen,
    LedgerKind,
    ProviderEvent,
    ProviderRefund,
    ProviderRefundStatus,
    RefundRequest,
    RefundTimings,
)
from domain.money import format_minor

OPS_RESOLUTION = "ops_resolution"
"""The event type (`ops_resolution.<what ops read>`) of ops resolving a notification wait:
what ops read at the provider, not the provider's own word."""
OPS_READ_PREFIX = "ops:"
"""How the raw status of ops' resolution begins (`ops:<what ops read>`): a refund a case
holds with it is ops' reading of the provider, not the provider's own word."""
NO_REFUND_PREFIX = "none-"
"""How the refund id starts that an ops resolution ("the provider shows no refund") records
for a case that knew none: it names no provider refund, so reconciliation never takes a
refund carrying the case's reference for a second one beside it (a duplicate)."""


def no_refund_id(case_id: str) -> str:
    return f"{NO_REFUND_PREFIX}{case_id}"


def tracking_case_id(provider: str, refund_id: str) -> str:
    """The derived case (and workflow) id of a refund the provider made without us."""
    return f"{provider}-refund-{refund_id}"


class TrackingCarry(Frozen):
    """What a tracking workflow takes across continue-as-new."""

    status: CaseStatus
    refund: ProviderRefund | None = None
    mismatched: bool = False
    postings: tuple[str, ...] = ()
    events_seen: int = 0
    event_ids: tuple[str, ...] = ()
    inbox: tuple[ProviderEvent, ...] = ()
    succeeded_at: datetime | None = None


class TrackingInput(Frozen):
    """Start input of RefundTrackingWorkflow (workflow id == case_id); `carried` when it
    continues as new."""

    case_id: str
    provider: str
    refund_id: str
    currency: str
    timings: RefundTimings = RefundTimings()
    carried: TrackingCarry | None = None


class Observation(Frozen):
    """What one reported status does to a case: audit action, new status, ledger template,
    and whether the reservation is released. `status` None means nothing moves."""

    change: StatusChange
    action: str
    status: CaseStatus | None = None
    ledger: LedgerKind | None = None
    release: bool = False


STATUS_NOTICES: dict[ProviderRefundStatus, tuple[tuple[str, str], ...]] = {
    ProviderRefundStatus.FAILED: (("refund_failed", "operator"),
                                  ("refund_could_not_be_processed", "customer")),
    ProviderRefundStatus.CANCELED: (("refund_canceled", "operator"),),
    ProviderRefundStatus.REQUIRES_ACTION: (("refund_requires_action", "operator"),),
}
"""Who hears of a case reaching a status: (notice kind, audience). `requires_action` waits on
a person (Stripe: the customer's details; Cashfree ONHOLD: the merchant's balance), not on
time, so ops hear of it."""


CONTRADICTED = "provider_status_contradicted"
"""The action and the ops notice of a provider contradicting a refund it reported succeeded."""


def contradicts_booked(held: ProviderRefundStatus | None, reported: ProviderRefund) -> bool:
    """Whether a report says a refund the ledger booked as succeeded never moved money
    (canceled): never applied backwards, never reversed on that word alone; ops read the
    refund at the provider. (A failure after success is real and compensated.)"""
    return held is ProviderRefundStatus.SUCCEEDED and reported.status is ProviderRefundStatus.CANCELED


SETTLED_PROVIDER_STATUSES = FINAL_PROVIDER_STATUSES | {ProviderRefundStatus.SUCCEEDED}
"""Statuses after which an event repeating them changes nothing in a refund workflow: a
final one ends its watch, a success's late-failure window runs from when it was applied."""


def tells_nothing_new(applied_refund_id: str | None, applied_status: str | None,
                      reported: ProviderRefund, booked: tuple[int, str] | None) -> bool:
    """Whether an event about a case's refund would be a no-op for its workflow, judged from
    what the workflow itself applied (`refund_cases.applied_*`, written only by its own steps):
    the same refund in the same settled status for the case's money (`booked`: amount and
    currency; None for a case in ops review, whose money ops already look at: a mismatch
    took it there). Anything else is news: another refund with our reference, a late
    failure, a stale status (the trail records it), a pending one (it ends a wait for any
    event about the refund), other money than the case booked (ops read the refund for the
    case's amount; the provider says another moved)."""
    return (applied_refund_id == reported.refund_id and applied_status == reported.status.value
            and reported.status in SETTLED_PROVIDER_STATUSES
            and (booked is None or (reported.amount, reported.currency) == booked))


def refund_mismatch(request: RefundRequest | ProviderRefund,
                    reported: ProviderRefund) -> dict[str, str] | None:
    """What the provider reports moved against what was asked, or against what it reported
    of the same refund before (None when they agree): a refund under our reference for
    another amount or currency is money moved other than approved, whatever its status says;
    a refund reported for other money than before is one the ledger cannot follow alone."""
    if (reported.amount, reported.currency) == (request.amount, request.currency):
        return None
    return {"requested": format_minor(request.amount, request.currency),
            "reported": format_minor(reported.amount, reported.currency)}


def observe(current: ProviderRefundStatus | None, reported: ProviderRefund) -> Observation:
    """Never backwards; success posts the settlement, a later failure the reversal."""
    change = classify_status_change(current, reported.status)
    if change is StatusChange.SAME or change in BACKWARDS:
        return Observation(change=change, action=f"provider_status_{change.value}_ignored")
    status = case_status_for(reported.status)
    if change is StatusChange.LATE_FAILURE:
        return Observation(change=change, action="refund_failed_after_success", status=status,
                           ledger=LedgerKind.REFUND_REVERSED, release=True)
    if reported.status is ProviderRefundStatus.SUCCEEDED:
        return Observation(change=change, action="refund_succeeded", status=status,
                           ledger=LedgerKind.REFUND_SETTLED)
    if reported.status in FINAL_PROVIDER_STATUSES:
        return Observation(change=change, action=f"refund_{reported.status.value}", status=status,
                           release=True)
    return Observation(change=change, action="provider_status_changed", status=status)
