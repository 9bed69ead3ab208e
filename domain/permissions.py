"""Who may do what: the one table from each guarded action to the roles that may take it.

The relay's API, the ops console and the CLI read it; no front end names a role set of its
own. A person holding any one of an action's roles may take it; who is behind a case
(segregation of duties) is checked apart, by the case rules. `tests/test_permissions.py`
walks every guarded route and page against this table, so a route without an entry fails.
"""

import re
from collections.abc import Iterable, Mapping
from enum import StrEnum
from types import MappingProxyType

from domain.models import APPROVER_ROLES


class Permission(StrEnum):
    REQUEST_REFUND = "request_refund"
    READ_CASE = "read_case"
    """A refund case and its audit trail; without READ_EVERY_CASE only one's own requests."""
    READ_EVERY_CASE = "read_every_case"
    APPROVE_REFUND = "approve_refund"
    REISSUE_REFUND = "reissue_refund"
    CONFIRM_MANUAL_REFUND = "confirm_manual_refund"
    RESOLVE_PROVIDER_WAIT = "resolve_provider_wait"
    READ_WEBHOOKS = "read_webhooks"
    """Stored receipts and coverage (and, in the console, the links to the ops pages)."""
    REPLAY_WEBHOOKS = "replay_webhooks"
    """Replay and re-drive stored receipts."""
    REGISTER_PAYOUT = "register_payout"
    READ_PAYOUTS = "read_payouts"
    APPROVE_PAYOUT_EXCEPTION = "approve_payout_exception"
    REISSUE_PAYOUT = "reissue_payout"
    RELEASE_BENEFICIARY_HOLD = "release_beneficiary_hold"
    START_RECONCILIATION = "start_reconciliation"
    READ_RECONCILIATION_RUNS = "read_reconciliation_runs"
    READ_RECONCILIATION_BREAKS = "read_reconciliation_breaks"
    APPROVE_RECONCILIATION_BREAK = "approve_reconciliation_break"
    REOPEN_RECONCILIATION_BREAK = "reopen_reconciliation_break"
    DECODE_PAYLOADS = "decode_payloads"
    """Read decrypted workflow history (the Temporal UI's codec)."""
    ENCODE_PAYLOADS = "encode_payloads"
    """Encode a payload a workflow would accept as ours."""


_REQUESTERS = frozenset({"requester", "admin"})
_OPS = frozenset({"ops", "admin"})
"""Those who move money by hand or start work: reissue, confirm a transfer, replay, register."""
_READERS = _OPS | {"auditor"}
"""Ops and the auditor, who only reads."""

PERMISSIONS: Mapping[Permission, frozenset[str]] = MappingProxyType({
    Permission.REQUEST_REFUND: _REQUESTERS,
    Permission.READ_CASE: _REQUESTERS | APPROVER_ROLES | _READERS,  # approvers see what they sign
    Permission.READ_EVERY_CASE: APPROVER_ROLES | _READERS,
    Permission.APPROVE_REFUND: APPROVER_ROLES,
    Permission.REISSUE_REFUND: _OPS,
    Permission.CONFIRM_MANUAL_REFUND: _OPS,
    Permission.RESOLVE_PROVIDER_WAIT: _OPS,
    Permission.READ_WEBHOOKS: _READERS,
    Permission.REPLAY_WEBHOOKS: _OPS,
    Permission.REGISTER_PAYOUT: _OPS,
    Permission.READ_PAYOUTS: APPROVER_ROLES | _READERS,
    Permission.APPROVE_PAYOUT_EXCEPTION: APPROVER_ROLES,
    Permission.REISSUE_PAYOUT: _OPS,
    Permission.RELEASE_BENEFICIARY_HOLD: _OPS,
    Permission.START_RECONCILIATION: _OPS,
    Permission.READ_RECONCILIATION_RUNS: _READERS,
    Permission.READ_RECONCILIATION_BREAKS: _READERS | APPROVER_ROLES,  # approvers decide breaks
    Permission.APPROVE_RECONCILIATION_BREAK: APPROVER_ROLES,
    Permission.REOPEN_RECONCILIATION_BREAK: _OPS,
    Permission.DECODE_PAYLOADS: _READERS,
    Permission.ENCODE_PAYLOADS: _OPS,
})

ROLES: frozenset[str] = frozenset[str]().union(*PERMISSIONS.values())
"""Every role the table names: the roles a token may carry."""


def roles_for(permission: Permission) -> frozenset[str]:
    return PERMISSIONS[permission]


def may(roles: Iterable[str], permission: Permission) -> bool:
    """Whether someone holding `roles` may take the action."""
    return not PERMISSIONS[permission].isdisjoint(roles)


def unknown_roles(roles: Iterable[str]) -> list[str]:
    """The roles no entry of the table names (a token with them could do nothing)."""
    return sorted(set(roles) - ROLES)


USER_NAME = re.compile(r"[a-z0-9](?:[a-z0-9._@+-]{0,126}[a-z0-9])?")
"""A person's one spelling: lower-case ASCII letters and digits, with `. _ @ + -` inside."""
SYSTEM_ACTORS = frozenset({"workflow", "system", "temporal", "ops", "reconciliation", "ledger", "policy",
                           "case-sweep", "advisor", "servicenow", "slack", "relay", "chain"})
"""Names the product itself acts under in the audit trail: no person's."""


def user_name_refusal(user: str) -> str | None:
    """Why `user` cannot name a person, None when it can. Approvals compare names exactly
    (the requester may not approve, one person counts once), so one person must have one
    spelling: `Alice`, `alice ` or a look-alike letter would be a second identity of alice."""
    if not USER_NAME.fullmatch(user):
        return (f"user name {user!r} is not one spelling: use lower-case letters and digits, "
                "with . _ @ + - inside (at most 128)")
    if user in SYSTEM_ACTORS:
        return f"user name {user!r} is the product's own in the audit trail"
    return None
