"""Payments as a provider's notifications report them, for providers with no payment
lookup (Adyen): the canonical payment event and the rule that turns what was recorded
about one payment into the charge snapshot validation reads.

Kept apart from `models.py` (refunds) and `payouts.py`: these events never start or move
a case; they only tell validation what was captured and what was refunded already.
"""

from collections.abc import Sequence
from enum import StrEnum
from typing import Annotated

from pydantic import Field

from domain.models import ChargeSnapshot, EventTime, Frozen
from domain.money import MAX_MINOR_AMOUNT


class PaymentStatus(StrEnum):
    """What one notification says happened to a payment's money: to the payment (or a
    capture of it), or, for refund notifications recorded beside them, to a refund of it."""

    AUTHORISED = "authorised"
    REFUSED = "refused"
    CAPTURED = "captured"
    CAPTURE_FAILED = "capture_failed"
    CANCELLED = "cancelled"
    CANCEL_FAILED = "cancel_failed"
    REFUNDED = "refunded"
    REFUND_PENDING = "refund_pending"
    REFUND_FAILED = "refund_failed"
    DISPUTED = "disputed"
    """A dispute event about the payment (its psp_reference is the dispute's, the same for
    every event of one dispute)."""


NotifiedAmount = Annotated[int, Field(ge=0, le=MAX_MINOR_AMOUNT, strict=True)]
"""A payment notification's amount in minor units: zero for a card check's authorisation,
never negative nor past PostgreSQL's bigint (such a signed body is malformed, not a 500)."""


class PaymentEvent(Frozen):
    """A verified payment notification. `psp_reference` is the notification's own object
    (the payment for an authorisation, else the capture or cancellation); `payment_id` is
    the payment it is about, the id refund requests name as `charge_id`."""

    provider: str
    event_id: str
    event_type: str
    body_sha256: str
    occurred_at: EventTime
    payment_id: str
    psp_reference: str
    status: PaymentStatus
    amount: NotifiedAmount
    currency: str
    merchant_account: str


class RecordedNotification(Frozen):
    """One stored notification about a payment (or a capture or refund of it), as
    `payment_notifications` keeps it."""

    psp_reference: str
    status: PaymentStatus
    amount: int
    currency: str
    merchant_account: str


def _standing(notes: Sequence[RecordedNotification], done: PaymentStatus,
              undone: PaymentStatus) -> int:
    """The sum of the objects (captures, refunds) reported `done` and never `undone`."""
    undone_refs = {n.psp_reference for n in notes if n.status is undone}
    return sum(n.amount for n in notes if n.status is done and n.psp_reference not in undone_refs)


def charge_from_notifications(provider: str, payment_id: str, notes: Sequence[RecordedNotification],
                              *, auto_capture: bool) -> ChargeSnapshot | None:
    """The charge as the recorded notifications describe it, or None when none reported the
    payment itself (authorisation or capture). Captured = captures not failed since; with
    automatic capture (no CAPTURE notification by default), a successful authorisation
    counts as captured. A cancelled payment has nothing captured. Refunded = refunds
    reported successful and not failed or reversed since. Disputes = distinct disputes
    reported (a dispute's events share its psp_reference), whatever their outcome."""
    payment = [n for n in notes if n.status in (PaymentStatus.AUTHORISED, PaymentStatus.REFUSED,
                                                  PaymentStatus.CAPTURED, PaymentStatus.CAPTURE_FAILED)]
    if not payment:
        return None
    first = payment[0]
    authorised = max((n.amount for n in notes if n.status is PaymentStatus.AUTHORISED), default=0)
    if any(n.status is PaymentStatus.CANCELLED for n in notes):
        captured = 0
    elif any(n.status in (PaymentStatus.CAPTURED, PaymentStatus.CAPTURE_FAILED) for n in notes):
        captured = _standing(notes, PaymentStatus.CAPTURED, PaymentStatus.CAPTURE_FAILED)
    else:
        captured = authorised if auto_capture else 0
    return ChargeSnapshot(
        provider=provider, charge_id=payment_id, currency=first.currency,
        merchant_account=first.merchant_account, amount=max(authorised, captured),
        amount_captured=captured, captured=captured > 0,
        amount_refunded=_standing(notes, PaymentStatus.REFUNDED, PaymentStatus.REFUND_FAILED),
        refunded_counts_pending=False,
        dispute_count=len({n.psp_reference for n in notes if n.status is PaymentStatus.DISPUTED}))
