"""Rules that live in `domain/` as pure functions: the ledger's templates, who approves a
reconciliation break, which ticket a notice belongs in. No stack: plain calls."""

import pytest

from adapters.policy_file import load_policy
from domain.integrations import ticket_purpose
from domain.ledger import REFUNDED_ACCOUNT, LedgerLine, ledger_lines
from domain.models import LedgerInput, LedgerKind, ProviderRefund, ProviderRefundStatus
from domain.payouts import (
    FoundPayout,
    PayoutSnapshot,
    PayoutStatus,
    ProviderPayout,
    ProviderPayoutStatus,
    not_the_reissue,
)
from domain.reconciliation import BreakCase, BreakClass, break_approval

POLICY = load_policy()


def posting(kind: LedgerKind, amount: int = 2500) -> LedgerInput:
    return LedgerInput(refund_request_id="case-1", kind=kind, amount=amount, currency="EUR",
                       provider_refund_id="re_1")


@pytest.mark.parametrize(("kind", "debit", "credit"), [
    (LedgerKind.REFUND_SETTLED, "refunds_contra_revenue", "provider_clearing"),
    (LedgerKind.REFUND_REVERSED, "provider_clearing", "refunds_contra_revenue"),
    (LedgerKind.PAYOUT_REVERSED, "provider_clearing", "beneficiary_payable"),
    (LedgerKind.PAYOUT_REISSUED, "beneficiary_payable", "provider_clearing"),
])
def test_each_template_is_one_balanced_pair(kind: LedgerKind, debit: str, credit: str) -> None:
    assert ledger_lines(posting(kind)) == (LedgerLine(debit, 2500, 0, "EUR"),
                                           LedgerLine(credit, 0, 2500, "EUR"))


@pytest.mark.parametrize(("kind", "debit", "credit"), [
    (LedgerKind.REFUND_SETTLED, "refunds_contra_revenue", "bank_clearing"),
    (LedgerKind.REFUND_REVERSED, "bank_clearing", "refunds_contra_revenue"),
])
def test_a_refund_paid_by_bank_transfer_moves_the_bank_s_cash_not_the_provider_s(
        kind: LedgerKind, debit: str, credit: str) -> None:
    assert ledger_lines(posting(kind), by_bank=True) == (LedgerLine(debit, 2500, 0, "EUR"),
                                                         LedgerLine(credit, 0, 2500, "EUR"))


def test_a_settled_refund_is_booked_where_reconciliation_reads_it() -> None:
    assert ledger_lines(posting(LedgerKind.REFUND_SETTLED))[0].account == REFUNDED_ACCOUNT


def refund_break(amount: int, ledger_delta: int | None) -> BreakCase:
    truth = ProviderRefund(provider="sandbox", refund_id="re_1", charge_id="ch_1", amount=amount,
                           currency="EUR", status=ProviderRefundStatus.SUCCEEDED, raw_status="succeeded")
    return BreakCase(break_id=1, break_class=BreakClass.AMOUNT_MISMATCH, provider="sandbox",
                     object_id="re_1", chain="case-1", case_id="case-1", case_holds_refund=True,
                     case_provider_status=ProviderRefundStatus.SUCCEEDED, truth=truth,
                     ledger_delta=ledger_delta)


def test_a_refund_break_takes_the_refund_tier_of_the_ledger_move_when_there_is_one() -> None:
    # 900.00 refunded but only 1.00 to move in the ledger: the small move decides
    assert break_approval(POLICY, refund_break(90000, ledger_delta=-100)).tier == "standard"
    # no ledger move: the refund's own amount decides
    large = break_approval(POLICY, refund_break(90000, ledger_delta=None))
    assert large.tier == "large"
    assert {r.role for r in large.requirements} == {"approver", "finance_manager"}


def test_a_payout_break_takes_the_payout_reversal_tier() -> None:
    truth = ProviderPayout(provider="sandbox", payout_id="po_1", amount=600000, currency="EUR",
                           status=ProviderPayoutStatus.FAILED, raw_status="failed")
    case = refund_break(100, ledger_delta=-100).model_copy(update={"truth": truth})
    approval = break_approval(POLICY, case)
    assert approval.tier == "finance_and_compliance"
    assert {r.role for r in approval.requirements} == {"finance_manager", "compliance"}


def test_a_notice_goes_to_the_request_ticket_or_one_incident_per_kind() -> None:
    assert ticket_purpose("request", "approval_needed") == "request"
    assert ticket_purpose("incident", "ops_review") == "incident:ops_review"
    assert ticket_purpose("incident", "ledger_failed") != ticket_purpose("incident", "ops_review")


def test_a_payout_the_lookup_returns_is_the_reissue_only_under_its_reference() -> None:
    """A provider (or emulator) that ignores the lookup's reference filter returns some
    payout: one of the same amount, paid, was booked as the reissue (the beneficiary never
    paid, the case's holds ended). Only a payout carrying the reissue's id is it."""
    original = PayoutSnapshot(id="P-1", provider="sandbox", provider_payout_id="po_1", beneficiary_id="b",
                              amount=5_000, currency="EUR", status=PayoutStatus.ON_HOLD)
    def found(reference: str | None, destination: str | None = None) -> FoundPayout:
        return FoundPayout(provider="sandbox", payout_id="po_x", amount=5_000, currency="EUR",
                           status=ProviderPayoutStatus.PAID, raw_status="paid", reference=reference,
                           destination=destination)
    assert not_the_reissue(original, found("P-1-r1")) is None
    assert not_the_reissue(original, found("P-1-r1", "b")) is None
    for other in (None, "P-2-r1"):
        problem = not_the_reissue(original, found(other))
        assert problem is not None and "P-1-r1" in problem, other
    elsewhere = not_the_reissue(original, found("P-1-r1", "ba_other"))
    assert elsewhere is not None and "ba_other" in elsewhere
