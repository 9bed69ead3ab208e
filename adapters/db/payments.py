"""What a provider's notifications said about payments, for providers with no payment
lookup (Adyen): the relay records each verified payment or refund notification, and the
worker's validation reads a charge back from them (`domain.payments`).

Each notification is one row keyed by `(provider, event_id)`, so a duplicate, replay or
re-drive records nothing twice.
"""

from adapters.db.database import Database
from domain.models import ChargeSnapshot, ProviderEvent, ProviderRefundStatus
from domain.payments import (
    PaymentEvent,
    PaymentStatus,
    RecordedNotification,
    charge_from_notifications,
)

REFUND_EFFECT = {
    ProviderRefundStatus.SUCCEEDED: PaymentStatus.REFUNDED,
    ProviderRefundStatus.FAILED: PaymentStatus.REFUND_FAILED,
    ProviderRefundStatus.CANCELED: PaymentStatus.REFUND_FAILED,
}
"""A refund notification's effect on its payment; any other status leaves it pending."""
CANCELLED_INSTEAD = "CANCEL_OR_REFUND:true:cancel"
"""Adyen's raw status of a cancel-or-refund it carried out as a cancel (`adapters.providers
.adyen`): the payment was never captured, so it is the payment's cancellation, not a failed
refund (with automatic capture the authorisation would read captured still)."""


class PaymentNotificationRepository:
    """One provider's recorded payment notifications and the charges they describe."""

    def __init__(self, database: Database, provider: str, *, auto_capture: bool) -> None:
        self._db = database
        self._provider = provider
        self._auto_capture = auto_capture

    async def record(self, event: PaymentEvent | ProviderEvent) -> None:
        """Keeps a payment notification, or a refund notification that names its payment;
        anything else (a charge-level notice without a refund) tells validation nothing."""
        if isinstance(event, PaymentEvent):
            payment_id, reference, status = event.payment_id, event.psp_reference, event.status
        elif event.refund_id is not None and event.charge_id is not None and event.status is not None:
            payment_id, reference = event.charge_id, event.refund_id
            status = (PaymentStatus.CANCELLED if event.raw_status == CANCELLED_INSTEAD
                      else REFUND_EFFECT.get(event.status, PaymentStatus.REFUND_PENDING))
        else:
            return
        await self._db.execute(
            "INSERT INTO payment_notifications (provider, event_id, event_type, payment_id,"
            " psp_reference, status, amount, currency, merchant_account, occurred_at)"
            " VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s) ON CONFLICT (provider, event_id) DO NOTHING",
            (self._provider, event.event_id, event.event_type, payment_id, reference, status.value,
             event.amount or 0, event.currency or "", event.merchant_account or "",
             event.occurred_at))

    async def charge(self, payment_id: str) -> ChargeSnapshot | None:
        """The charge as recorded (None when no notification reported the payment)."""
        rows = await self._db.fetch_all(
            "SELECT psp_reference, status, amount, currency, merchant_account"
            " FROM payment_notifications WHERE provider = %s AND payment_id = %s"
            " ORDER BY occurred_at, recorded_at", (self._provider, payment_id))
        notes = [RecordedNotification(**row) for row in rows]
        return charge_from_notifications(self._provider, payment_id, notes,
                                         auto_capture=self._auto_capture)
