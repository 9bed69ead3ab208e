"""Triage of a payout exception: a typed recommendation for the people who approve.

Advisory only. The recommendation is stored beside the case and shown to approvers; no
decision reads it (policy takes the amount and currency, approvals take people), so it
cannot turn into execution. `triage_offline` is deterministic rules over what a model
would be shown; an LLM-backed advisor can replace it behind the same activity.
"""

from collections.abc import Sequence
from enum import StrEnum

from pydantic import Field

from domain.models import Frozen
from domain.money import format_minor
from domain.payouts import PayoutEvent, PayoutSnapshot


class RootCause(StrEnum):
    INSUFFICIENT_FUNDS = "insufficient_funds"
    BANK_REJECTION = "bank_rejection"
    COMPLIANCE_HOLD = "compliance_hold"
    ACCOUNT_CLOSED = "account_closed"
    UNKNOWN = "unknown"


class NextStep(StrEnum):
    REISSUE = "reissue"
    HOLD = "hold"
    REQUEST_NEW_BANK_DETAILS = "request_new_bank_details"
    ESCALATE = "escalate"


class PayoutRecommendation(Frozen):
    """What approvers see as a suggestion; there is no field that could ask for an action."""

    summary: str = Field(min_length=1, max_length=4000)
    root_cause: RootCause
    next_step: NextStep
    advice: str = Field(min_length=1, max_length=500)
    source: str


# Failure codes as providers send them (Stripe's payout failure codes, the sandbox's own).
ROOT_CAUSES: dict[str, RootCause] = {
    "insufficient_funds": RootCause.INSUFFICIENT_FUNDS,
    "account_closed": RootCause.ACCOUNT_CLOSED,
    "no_account": RootCause.ACCOUNT_CLOSED,
    "compliance_hold": RootCause.COMPLIANCE_HOLD,
    **{code: RootCause.BANK_REJECTION for code in (
        "bank_rejection", "declined", "could_not_process", "invalid_account_number",
        "incorrect_account_holder_name", "incorrect_account_holder_type", "account_frozen",
        "bank_account_restricted", "bank_ownership_changed", "debit_not_authorized",
        "invalid_currency")},
}

NEXT_STEPS: dict[RootCause, tuple[NextStep, str]] = {
    RootCause.INSUFFICIENT_FUNDS: (
        NextStep.REISSUE, "fund the provider balance, then reissue through an approved reissue request"),
    RootCause.BANK_REJECTION: (
        NextStep.HOLD, "likely bank rejection: do not reissue until the beneficiary's bank details "
                       "are verified"),
    RootCause.ACCOUNT_CLOSED: (
        NextStep.REQUEST_NEW_BANK_DETAILS, "the account is closed: request new bank details from "
                                           "the beneficiary before any reissue"),
    RootCause.COMPLIANCE_HOLD: (
        NextStep.ESCALATE, "escalate to compliance; do not reissue while the hold stands"),
    RootCause.UNKNOWN: (
        NextStep.ESCALATE, "no failure code says why: escalate to payments ops before any reissue"),
}


def triage_offline(payout: PayoutSnapshot, events: Sequence[PayoutEvent]) -> PayoutRecommendation:
    """Timeline summary, likely root cause (the latest failure code that names one) and the
    next step that cause usually calls for."""
    codes = [e.payout.failure_code for e in events if e.is_exception() and e.payout.failure_code]
    cause = next((ROOT_CAUSES[c] for c in reversed(codes) if c in ROOT_CAUSES), RootCause.UNKNOWN)
    step, advice = NEXT_STEPS[cause]
    timeline = "; ".join(
        f"{e.occurred_at.isoformat()} {e.event_type} ({e.payout.raw_status}"
        f"{', ' + e.payout.failure_code if e.payout.failure_code else ''})" for e in events)
    summary = (f"payout {payout.id} ({payout.provider} {payout.provider_payout_id}) of "
               f"{format_minor(payout.amount, payout.currency)} to beneficiary {payout.beneficiary_id}, "
               f"held internally as {payout.status.value}: {timeline}")
    return PayoutRecommendation(summary=summary[:4000], root_cause=cause, next_step=step, advice=advice,
                                source="offline_rules")
