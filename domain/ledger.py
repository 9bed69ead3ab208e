"""The ledger's journal templates: which accounts an entry of each kind moves.

A rule of the books, not of the database: the store posts the lines this module names.
"""

from dataclasses import dataclass

from domain.models import LedgerInput, LedgerKind

# Accounts per template: (debit account, credit account). Refunds reduce revenue and
# the cash held at the provider; a reversal puts both back. A payout (booked by the
# payments system as debit beneficiary_payable, credit provider_clearing) that fails or is
# reversed brings the cash back to the provider balance and makes us owe the beneficiary
# again; a reissue pays that debt a second time.
LEDGER_TEMPLATES: dict[LedgerKind, tuple[str, str]] = {
    LedgerKind.REFUND_SETTLED: ("refunds_contra_revenue", "provider_clearing"),
    LedgerKind.REFUND_REVERSED: ("provider_clearing", "refunds_contra_revenue"),
    LedgerKind.PAYOUT_REVERSED: ("provider_clearing", "beneficiary_payable"),
    LedgerKind.PAYOUT_REISSUED: ("beneficiary_payable", "provider_clearing"),
}

REFUNDED_ACCOUNT = LEDGER_TEMPLATES[LedgerKind.REFUND_SETTLED][0]
"""Where a settled refund is booked: what reconciliation compares a provider's refunds with."""


@dataclass(frozen=True)
class LedgerLine:
    """One side of an entry, in minor units of `currency`."""

    account: str
    debit: int
    credit: int
    currency: str


def ledger_lines(posting: LedgerInput) -> tuple[LedgerLine, LedgerLine]:
    """The balanced pair a posting makes: its amount debited to one account of its
    template and credited to the other."""
    debit_account, credit_account = LEDGER_TEMPLATES[posting.kind]
    return (LedgerLine(debit_account, posting.amount, 0, posting.currency),
            LedgerLine(credit_account, 0, posting.amount, posting.currency))
