"""Incidents a refund case can raise about money that moved outside its own path: kept
apart from `models.py` so the workflow's input types stay as recorded histories know them.
"""

from pydantic import AwareDatetime

from domain.models import Frozen, ProviderRefund
from domain.money import format_minor

DUPLICATE_REPORTED = "duplicate_provider_refund"
"""The case's action (and its ops notice's kind) reporting a duplicate refund: once per
duplicate, so a report a cancel interrupted and made again writes it once."""


class DuplicateRefundInput(Frozen):
    """A second provider refund carrying a case's reference: the case already follows
    `followed_refund_id`, so `duplicate` moved money a second time."""

    case_id: str
    followed_refund_id: str
    duplicate: ProviderRefund
    source: str


class ProviderWordInput(Frozen):
    """The provider's own word on a refund its case holds that the case cannot apply: a
    success for a refund the case ended failed on ops' reading of a wait. Reconciled as the
    relay reconciles an event after a case closed (an incident run, a break for approval)."""

    event_id: str
    refund: ProviderRefund
    occurred_at: AwareDatetime


def duplicate_detail(followed_refund_id: str, duplicate: ProviderRefund, source: str) -> dict[str, str]:
    """What ops are told of a duplicate refund (its notice and the case's audit row)."""
    return {"duplicate_refund_id": duplicate.refund_id,
            "duplicate_amount": format_minor(duplicate.amount, duplicate.currency),
            "duplicate_status": duplicate.status.value, "provider_refund_id": followed_refund_id,
            "source": source}
