"""Activities that record incidents a case raises about money moved outside its path."""

from collections.abc import Callable
from typing import Any

from temporalio import activity

from adapters.db import Store
from domain import contracts
from domain.incidents import DuplicateRefundInput


class IncidentActivities:
    """Holds the store the incident activities write to."""

    def __init__(self, store: Store) -> None:
        self._store = store

    @activity.defn(name=contracts.OPEN_DUPLICATE_REFUND_BREAK.name)
    async def open_duplicate_refund_break(self, inp: DuplicateRefundInput) -> bool:
        """Records the duplicate refund as a break for ops; idempotent per refund (False
        when it was recorded already)."""
        return await self._store.reconciliation.open_duplicate_refund_break(inp) is not None

    def all(self) -> list[Callable[..., Any]]:
        return [self.open_duplicate_refund_break]
