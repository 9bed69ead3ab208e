"""The audit trail's hash chain: each row's hash covers its content and the previous
row's hash, so an edited, inserted or deleted row breaks every hash after it."""

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

GENESIS = "0" * 64


def canonical_detail(detail: dict[str, Any]) -> dict[str, Any]:
    """The JSON form that is both stored and hashed (dates and enums become strings)."""
    result: dict[str, Any] = json.loads(json.dumps(detail, default=str))
    return result


BREAK_GRANTS = ("reconciliation_approval_granted", "reconciliation_approval_approve")
"""The audit actions of an approval a break's round counted (the second: breaks opened
before the approval round)."""

SAID_WHAT_THE_MONEY_DID = ("manual_refund_confirmed", "provider_wait_resolved", *BREAK_GRANTS)
"""A case's actions that say whether its refund's money moved: whoever did one on a failed
refund stands behind its reissue (their word that nothing went is why it goes again). A
break's approval is one: approving a late failure's compensation says the money stayed
(before, that person reissued it alone, or approved another's reissue)."""


APPROVAL_REQUESTED = "approval_requested"
"""The row that opens a case's (or a payout reversal's) approval round: the money gates ask
about the approvals given since it."""

REFUSED_TEXT_LIMIT = 500
"""How much of one text a refusal's row keeps of what a caller sent (an id, a filter, the
refusal quoting it): enough to name it, never a caller-sized row each time it is sent."""


def bounded(value: Any) -> Any:
    """`value` with every text in it clipped to `REFUSED_TEXT_LIMIT`, saying how long it was."""
    if isinstance(value, str) and len(value) > REFUSED_TEXT_LIMIT:
        return f"{value[:REFUSED_TEXT_LIMIT]}… ({len(value)} characters)"
    if isinstance(value, dict):
        return {key: bounded(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [bounded(item) for item in value]
    return value


def chain_hash(prev_hash: str, *, chain: str, seq: int, refund_request_id: str | None,
               occurred_at: datetime, actor: str, action: str, detail: dict[str, Any]) -> str:
    """SHA-256 over the previous hash and a canonical encoding of the row."""
    body = json.dumps(
        {"chain": chain, "seq": seq, "case": refund_request_id,
         "at": occurred_at.astimezone(UTC).isoformat(), "actor": actor, "action": action,
         "detail": detail},
        sort_keys=True, separators=(",", ":"))
    return hashlib.sha256((prev_hash + body).encode()).hexdigest()


def is_approval_step(action: str) -> bool:
    """Whether an audit row is a step of an approval round (asked, granted, denied,
    refused, expired, signalled): those rows are also kept in the approvals projection."""
    return action.startswith("approval_")
