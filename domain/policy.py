"""Deterministic approval rules, versioned and explainable; AI advice never reaches here.

A policy is data (a TOML file validated by these models, see adapters/policy_file.py):
thresholds per currency, required evidence, high-risk reason codes, and approval tiers
that say how many distinct people of which roles must approve. Payout-reversal tiers
live in the same file.
"""

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, model_validator

from domain.models import (
    APPROVER_ROLES,
    ChargeSnapshot,
    Currency,
    Frozen,
    PolicyContext,
    PolicyDecision,
    RefundMethod,
    RefundReason,
    RefundRequest,
    RoleRequirement,
)
from domain.money import MAX_MINOR_AMOUNT


def _each_currency_once(value: Any) -> Any:
    """`usd` and `USD` both read as USD: a file naming one currency twice is refused, not
    read as whichever came last."""
    if isinstance(value, dict):
        seen: dict[str, str] = {}
        for key in value:
            named = str(key).strip().upper()
            if named in seen:
                raise ValueError(f"{seen[named]!r} and {key!r} name one currency")
            seen[named] = str(key)
    return value


CurrencyAmounts = Annotated[
    dict[Currency, Annotated[int, Field(ge=0, le=MAX_MINOR_AMOUNT, strict=True)]],
    BeforeValidator(_each_currency_once)]
"""Whole minor units per ISO 4217 currency, named in any letter case (a quoted, fractional,
negative or yes/no amount, or an unknown currency, refuses the file)."""


class ApprovalTier(Frozen):
    """Applies up to `max_amount` (minor units per currency; none = every amount)."""

    name: str
    max_amount: CurrencyAmounts | None = None
    approvals: tuple[RoleRequirement, ...] = Field(min_length=1)

    def covers(self, amount: int, currency: str) -> bool:
        if self.max_amount is None:
            return True
        limit = self.max_amount.get(currency)
        return limit is not None and amount <= limit


class HighRiskRule(Frozen):
    """A reason code that always needs a person, optionally only after prior disputes."""

    reason: RefundReason
    with_prior_disputes: bool = False


def _tiers_that_apply(tiers: tuple[ApprovalTier, ...], what: str) -> tuple[ApprovalTier, ...]:
    """The tiers as written, each able to apply: the first covering an amount takes it, so a
    tier after one with no limit, or with a limit at or below an earlier one's in a currency,
    never would; a role no approver can hold is a slot nobody fills (its refunds expire); the
    last tier catches the rest."""
    if not tiers:
        raise ValueError(f"no {what} tiers: at least one, the last with no max_amount (it catches the rest)")
    if tiers[-1].max_amount is not None:
        raise ValueError(f"the last {what} tier must have no max_amount (it catches the rest)")
    for index, tier in enumerate(tiers):
        if tier.max_amount is None and index < len(tiers) - 1:
            raise ValueError(f"{what} tier {tier.name} has no max_amount but is not the last: the tiers "
                             "after it could never apply")
        for before in tiers[:index]:
            assert before.max_amount is not None
            for currency, limit in (tier.max_amount or {}).items():
                if limit <= before.max_amount.get(currency, -1):
                    raise ValueError(f"{what} tier {tier.name}'s {currency} limit {limit} is not above "
                                     f"{before.name}'s: it could never apply for {currency}")
        if unknown := sorted({r.role for r in tier.approvals} - APPROVER_ROLES):
            raise ValueError(f"{what} tier {tier.name} names {', '.join(unknown)}, which no approver holds "
                             f"(approver roles: {', '.join(sorted(APPROVER_ROLES))})")
    return tiers


class RefundRules(Frozen):
    auto_approve_max: CurrencyAmounts = Field(default_factory=dict)
    required_evidence: tuple[str, ...] = ()
    high_risk: tuple[HighRiskRule, ...] = ()
    review_methods: tuple[RefundMethod, ...] = (RefundMethod.BANK_TRANSFER,)
    review_reissues: bool = False
    review_disputed: bool = True
    """A refund of a charge its cardholder disputed goes to people (`charge_disputed`): the
    chargeback may already return the money, and a refund beside it pays twice."""
    tiers: tuple[ApprovalTier, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _tiers_end_with_catch_all(self) -> "RefundRules":
        _tiers_that_apply(self.tiers, "refund")
        return self


class PayoutReversalRules(Frozen):
    """Who approves a payout reversal, and two runbook switches: whether the beneficiary's
    further payouts are held with the payout, and whether a hold may return to the payout's
    previous state when the compensating ledger entry cannot be posted."""

    tiers: tuple[ApprovalTier, ...]
    hold_beneficiary_payouts: bool = True
    rollback_hold_on_ledger_failure: bool = False

    @model_validator(mode="after")
    def _tiers_end_with_catch_all(self) -> "PayoutReversalRules":
        _tiers_that_apply(self.tiers, "payout reversal")
        return self


class Policy(Frozen):
    """A complete, versioned policy."""

    version: str = Field(min_length=1)
    refunds: RefundRules
    payout_reversal: PayoutReversalRules

    def fingerprint(self) -> str:
        """SHA-256 of the validated content: formatting changes do not change it."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class ChargePriors:
    """The charge's other requests as the rules read them: the amounts of the refunds holding
    money on it (reserved, pending or succeeded), how many requests people refused
    (denied, or let expire), and what the provider reports refunded beyond the refunds our
    cases made there (`outside`)."""

    amounts: Sequence[int] = ()
    refusals: int = 0
    outside: int = 0


def tier_for(tiers: tuple[ApprovalTier, ...], amount: int, currency: str) -> ApprovalTier:
    """The first tier that covers the amount (the last one covers everything)."""
    return next(t for t in tiers if t.covers(amount, currency))


def charge_problem(request: RefundRequest, charge: ChargeSnapshot | None) -> str | None:
    """Why the charge cannot take this refund, or None when it can."""
    if charge is None:
        return f"charge {request.charge_id} not found at {request.provider}"
    if charge.charge_id != request.charge_id:  # holds on a charge are counted under one id
        return (f"{request.provider} knows charge {request.charge_id} as {charge.charge_id}: "
                "request the refund under that id")
    if not charge.captured or charge.amount_captured <= 0:
        return "charge is not captured"
    if charge.currency != request.currency:
        return f"currency {request.currency} does not match the charge's {charge.currency}"
    if charge.merchant_account != request.merchant_account:
        return "merchant account does not match the charge"
    return None


def policy_context(request: RefundRequest, amount_captured: int | None, dispute_count: int | None,
                   prior: ChargePriors) -> PolicyContext:
    """The facts the rules read, from the charge's other requests (`ChargePriors`); money
    refunded outside our cases counts as one more prior refund, of that amount."""
    captured = amount_captured or request.amount
    amounts = (*prior.amounts, prior.outside) if prior.outside > 0 else tuple(prior.amounts)
    return PolicyContext(prior_refund_count=len(amounts),
                         prior_partial_refund=any(amount < captured for amount in amounts),
                         is_partial=request.amount < captured, prior_dispute_count=dispute_count,
                         prior_refund_total=sum(amounts), prior_refusal_count=prior.refusals,
                         prior_refunded_outside=prior.outside)


def decide(policy: Policy, request: RefundRequest, context: PolicyContext) -> PolicyDecision:
    """Evaluates every rule; any rule that fires sends the refund to people."""
    rules = policy.refunds
    fired: list[str] = []
    threshold = rules.auto_approve_max.get(request.currency)
    if threshold is None:
        fired.append("no_threshold_for_currency")
    elif request.amount > threshold:
        fired.append("amount_above_threshold")
    if context.prior_refund_count > 0:
        fired.append("prior_refunds_on_charge")
    if context.prior_refunded_outside > 0:
        fired.append("refunded_outside_cases")
    if context.is_partial and context.prior_partial_refund:
        fired.append("repeat_partial_refund")
    if context.prior_refusal_count > 0:
        fired.append("prior_refusal_on_charge")
    missing = [name for name in rules.required_evidence if not request.evidence.get(name)]
    if missing:
        fired.append("missing_evidence:" + ",".join(missing))
    if request.method in rules.review_methods:
        fired.append(f"method_needs_review:{request.method.value}")
    if rules.review_reissues and request.parent_refund_request_id is not None:
        fired.append("reissue_needs_review")
    if rules.review_disputed and context.prior_dispute_count:  # unknown (None) is no reason alone
        fired.append("charge_disputed")
    for rule in rules.high_risk:
        disputed = context.prior_dispute_count is None or context.prior_dispute_count > 0  # unknown: yes
        if request.reason is rule.reason and (not rule.with_prior_disputes or disputed):
            fired.append(f"high_risk_reason:{rule.reason.value}")
    common = {"policy_version": policy.version, "policy_hash": policy.fingerprint(),
              "context": context}
    if not fired:
        return PolicyDecision(auto_approve=True, rules_fired=("auto_approve",), **common)
    # on what leaves the charge: a refund asked in parts needs the approvals of the whole
    tier = tier_for(rules.tiers, request.amount + context.prior_refund_total, request.currency)
    return PolicyDecision(auto_approve=False, rules_fired=tuple(fired), tier=tier.name,
                          requirements=tier.approvals, **common)


def decide_payout_reversal(policy: Policy, amount: int, currency: str) -> PolicyDecision:
    """Every payout reversal needs people; the amount's tier says which. Only the amount
    and currency are read: the advisor's recommendation has no way in."""
    tiers = policy.payout_reversal.tiers
    if not tiers:
        raise ValueError(f"policy {policy.version} has no payout_reversal tiers")
    tier = tier_for(tiers, amount, currency)
    return PolicyDecision(auto_approve=False, rules_fired=(f"payout_reversal_tier:{tier.name}",),
                          policy_version=policy.version, policy_hash=policy.fingerprint(),
                          tier=tier.name, requirements=tier.approvals)
