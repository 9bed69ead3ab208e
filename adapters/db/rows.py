"""Typed rows the repositories hand to the front ends, instead of a column dict."""

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class ApprovalStep:
    """One step of a case's approval rounds, from the approvals projection: asked
    (`approval_requested`), granted with the approver's roles, denied, refused, expired."""

    approver: str
    action: str
    roles: frozenset[str]
    reason: str
    occurred_at: datetime


@dataclass(frozen=True)
class TokenRow:
    """An API token as ops see it: owner, roles, state, and a short hash prefix that tells
    tokens apart (it matches `token_fingerprint` in refusals), never the secret itself."""

    id: int
    user_name: str
    roles: tuple[str, ...]
    created_at: datetime
    revoked_at: datetime | None
    expires_at: datetime | None
    fingerprint: str
