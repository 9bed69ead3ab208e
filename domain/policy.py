"""Deterministic refund approval rules; AI advice never reaches this module.

The built-in rules follow the refund-orchestration pattern: auto-approve small, first,
well-evidenced refunds; ask people for everything else.
"""

from pydantic import Field

from domain.models import Frozen, PolicyDecision, RefundReason, RefundRequest

BUILTIN_POLICY_VERSION = "builtin-1"


class RefundPolicy(Frozen):
    """Thresholds per currency in minor units; a currency without one always needs a person."""

    version: str = BUILTIN_POLICY_VERSION
    auto_approve_max: dict[str, int] = Field(
        default_factory=lambda: {"USD": 5_000, "EUR": 5_000, "GBP": 4_000, "JPY": 7_000,
                                 "KWD": 15_000, "INR": 400_000}
    )
    required_evidence: tuple[str, ...] = ("order_id",)
    high_risk_reasons: tuple[RefundReason, ...] = (RefundReason.ITEM_NOT_RECEIVED,
                                                  RefundReason.FRAUDULENT)
    approvals_needed: int = 1


class PolicyContext(Frozen):
    """Facts about the charge that the rules read, gathered by the activity."""

    prior_refund_count: int
    prior_partial_refund: bool
    is_partial: bool


def decide(policy: RefundPolicy, request: RefundRequest, context: PolicyContext) -> PolicyDecision:
    """Evaluates every rule and lists the ones that require a person."""
    fired: list[str] = []
    threshold = policy.auto_approve_max.get(request.currency)
    if threshold is None:
        fired.append("no_threshold_for_currency")
    elif request.amount > threshold:
        fired.append("amount_above_threshold")
    if context.prior_refund_count > 0:
        fired.append("prior_refunds_on_charge")
    if context.is_partial and context.prior_partial_refund:
        fired.append("repeat_partial_refund")
    missing = [name for name in policy.required_evidence if not request.evidence.get(name)]
    if missing:
        fired.append("missing_evidence:" + ",".join(missing))
    if request.reason in policy.high_risk_reasons:
        fired.append(f"high_risk_reason:{request.reason.value}")
    auto = not fired
    return PolicyDecision(
        auto_approve=auto,
        rules_fired=tuple(fired) if fired else ("auto_approve",),
        required_approvals=0 if auto else policy.approvals_needed,
        policy_version=policy.version,
    )
