"""Refunds paid outside a provider (bank transfer): an instruction in PostgreSQL that
ops carry out and confirm. It answers like a provider so the workflow treats it the same:
created pending, looked up by our reference, succeeded or failed on confirmation."""

from adapters.db import Store
from adapters.db.rows import ManualRefundRow
from domain.models import ProviderRefund, ProviderRefundStatus, RefundRequest

MANUAL = "manual"


def manual_refund(row: ManualRefundRow) -> ProviderRefund:
    """The instruction, answered as a provider answers for its refund."""
    return ProviderRefund(provider=MANUAL, refund_id=row.id, charge_id=row.charge_id, amount=row.amount,
                          currency=row.currency, status=ProviderRefundStatus(row.status),
                          raw_status=row.status, failure_reason=row.failure_reason,
                          reference=row.refund_request_id)


class ManualRefunds:
    """The executor for `RefundMethod.BANK_TRANSFER`."""

    name = MANUAL

    def __init__(self, store: Store) -> None:
        self._store = store

    async def create_refund(self, request: RefundRequest, idempotency_key: str) -> ProviderRefund:
        return manual_refund(await self._store.manual_refunds.create(request))

    async def find_refund(self, request: RefundRequest) -> ProviderRefund | None:
        row = await self._store.manual_refunds.get(request.refund_request_id)
        return manual_refund(row) if row else None
