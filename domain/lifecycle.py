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
)

APPROVER_ROLES = frozenset({"approver", "admin"})

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


def check_approval(
    signal: ApprovalSignal, requester: str, already_approved: frozenset[str]
) -> ApprovalVerdict:
    """Segregation of duties: approvers need a role, never approve their own request,
    and count once."""
    if not APPROVER_ROLES.intersection(signal.roles):
        return ApprovalVerdict(accepted=False, reason="approver role required")
    if signal.approver == requester:
        return ApprovalVerdict(accepted=False, reason="the requester cannot approve their own refund")
    if signal.decision is Decision.APPROVE and signal.approver in already_approved:
        return ApprovalVerdict(accepted=False, reason="this approver has already approved")
    return ApprovalVerdict(accepted=True)
