"""Inputs and results of the integration activities the refund workflow calls.

The advisor's result tells the workflow only whether advice exists, never what it says:
its content cannot reach a decision by construction.
"""

from domain.models import Frozen, RefundRequest, ValidationResult


class DeliverNoticeInput(Frozen):
    """Deliver the outbox notice with this dedup key to every configured channel."""

    dedup_key: str


class DeliverNoticesInput(Frozen):
    """Deliver these outbox notices in order (a courier's batch: one activity for all)."""

    dedup_keys: tuple[str, ...]


class AdviseInput(Frozen):
    request: RefundRequest
    validation: ValidationResult


class AdviceReceipt(Frozen):
    """Whether advice was stored for the case, and by which advisor."""

    available: bool
    source: str


TICKETING_AUDIENCE = "ticketing"
"""The audience of a notice that files or updates a ticket and nothing else (a payout
case's runbook step C): only the ticketing systems take it; people hear through the
case's own notices."""


def ticket_purpose(message_ticket: str, kind: str) -> str:
    """Which of a case's tickets a notice belongs in: the case's request ticket, or one
    incident per notice kind."""
    return f"incident:{kind}" if message_ticket == "incident" else "request"
