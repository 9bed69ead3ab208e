"""Rules of the refund lifecycle that must hold wherever a case is touched.

Late and out-of-order provider events never move a case backwards; the one real
terminal-to-terminal move (succeeded, then failed) is allowed and compensated.
"""

from enum import StrEnum

from domain.models import (
    ApprovalSignal,
    ApprovalVerdict,
    CaseStatus,
    Decision,
    ProviderRefundStatus,
    RoleRequirement,
)

_RANK = {
    ProviderRefundStatus.PENDING: 1,
    ProviderRefundStatus.REQUIRES_ACTION: 1,
    ProviderRefundStatus.IN_REVIEW: 1,
    ProviderRefundStatus.SUCCEEDED: 2,
    ProviderRefundStatus.FAILED: 3,
    ProviderRefundStatus.CANCELED: 3,
}

FINAL_PROVIDER_STATUSES = frozenset({ProviderRefundStatus.FAILED, ProviderRefundStatus.CANCELED})


class StatusChange(StrEnum):
    """How a reported provider status relates to the one we hold."""

    ADVANCE = "advance"
    SAME = "same"
    STALE = "stale"
    LATE_FAILURE = "late_failure"
    IMPOSSIBLE = "impossible"


BACKWARDS = frozenset({StatusChange.STALE, StatusChange.IMPOSSIBLE})
"""Reports that would move a held refund's status back: never applied."""


def classify_status_change(
    current: ProviderRefundStatus | None, reported: ProviderRefundStatus
) -> StatusChange:
    """Decides whether a reported status moves the case, and how."""
    if current is None:
        return StatusChange.ADVANCE
    if reported == current:
        return StatusChange.SAME
    if current == ProviderRefundStatus.SUCCEEDED:
        if reported == ProviderRefundStatus.FAILED:
            return StatusChange.LATE_FAILURE
        if reported == ProviderRefundStatus.CANCELED:
            return StatusChange.IMPOSSIBLE
    if current in FINAL_PROVIDER_STATUSES:
        return StatusChange.IMPOSSIBLE if _RANK[reported] == 3 else StatusChange.STALE
    if _RANK[reported] < _RANK[current]:
        return StatusChange.STALE
    return StatusChange.ADVANCE


def case_status_for(provider_status: ProviderRefundStatus) -> CaseStatus:
    """The case status that mirrors a provider refund status."""
    return {
        ProviderRefundStatus.PENDING: CaseStatus.PENDING,
        ProviderRefundStatus.REQUIRES_ACTION: CaseStatus.REQUIRES_ACTION,
        ProviderRefundStatus.IN_REVIEW: CaseStatus.IN_REVIEW,
        ProviderRefundStatus.SUCCEEDED: CaseStatus.SUCCEEDED,
        ProviderRefundStatus.FAILED: CaseStatus.REFUND_FAILED,
        ProviderRefundStatus.CANCELED: CaseStatus.REFUND_CANCELED,
    }[provider_status]


def unfilled(requirements: tuple[RoleRequirement, ...],
             approvals: list[tuple[str, frozenset[str]]]) -> list[str]:
    """The roles still missing after matching distinct approvers to the tier's slots
    (each person fills at most one slot; a maximum bipartite matching, so the order in
    which approvals arrive never matters)."""
    slots = [r.role for r in requirements for _ in range(r.count)]
    owner: dict[int, int] = {}

    def place(person: int, seen: set[int]) -> bool:
        for slot, role in enumerate(slots):
            if role in approvals[person][1] and slot not in seen:
                seen.add(slot)
                if slot not in owner or place(owner[slot], seen):
                    owner[slot] = person
                    return True
        return False

    for person in range(len(approvals)):
        place(person, set())
    return [role for slot, role in enumerate(slots) if slot not in owner]


def check_approval(signal: ApprovalSignal, *, requester: str, conflicted: frozenset[str],
                   requirements: tuple[RoleRequirement, ...],
                   approved: list[tuple[str, frozenset[str]]]) -> ApprovalVerdict:
    """Segregation of duties and tier rules: who may decide, and whether an approval
    adds anything the tier still needs."""
    needed_roles = {r.role for r in requirements}
    roles = frozenset(signal.roles)
    if needed_roles.isdisjoint(roles):
        return ApprovalVerdict(accepted=False,
                               reason=f"needs one of the roles {sorted(needed_roles)}")
    if signal.approver == requester:
        return ApprovalVerdict(accepted=False, reason="the requester cannot approve their own refund")
    if signal.approver in conflicted:
        return ApprovalVerdict(accepted=False,
                               reason="an identity behind the triggering event cannot approve")
    if signal.decision is Decision.DENY:
        return ApprovalVerdict(accepted=True)
    if any(person == signal.approver for person, _ in approved):
        return ApprovalVerdict(accepted=False, reason="this approver has already approved")
    before = len(unfilled(requirements, approved))
    after = len(unfilled(requirements, [*approved, (signal.approver, roles)]))
    if after == before:
        return ApprovalVerdict(accepted=False,
                               reason="the tier's slots for these roles are already filled")
    return ApprovalVerdict(accepted=True)
