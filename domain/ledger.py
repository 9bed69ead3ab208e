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
PROVIDER_ACCOUNT = "provider_clearing"
LEDGER_TEMPLATES: dict[LedgerKind, tuple[str, str]] = {
    LedgerKind.REFUND_SETTLED: ("refunds_contra_revenue", PROVIDER_ACCOUNT),
    LedgerKind.REFUND_REVERSED: (PROVIDER_ACCOUNT, "refunds_contra_revenue"),
    LedgerKind.PAYOUT_REVERSED: (PROVIDER_ACCOUNT, "beneficiary_payable"),
    LedgerKind.PAYOUT_REISSUED: ("beneficiary_payable", PROVIDER_ACCOUNT),
}

REFUNDED_ACCOUNT = LEDGER_TEMPLATES[LedgerKind.REFUND_SETTLED][0]
"""Where a settled refund is booked: what reconciliation compares a provider's refunds with."""
BANK_ACCOUNT = "bank_clearing"
"""Where a refund paid by bank transfer moves cash: our bank, never the provider's balance
(provider clearing stays what the provider's statement shows)."""


@dataclass(frozen=True)
class LedgerLine:
    """One side of an entry, in minor units of `currency`."""

    account: str
    debit: int
    credit: int
    currency: str


def ledger_lines(posting: LedgerInput, *, by_bank: bool = False) -> tuple[LedgerLine, LedgerLine]:
    """The balanced pair a posting makes: its amount debited to one account of its
    template and credited to the other; `by_bank`: the refund was paid by bank transfer,
    so its cash side is the bank's."""
    debit_account, credit_account = (BANK_ACCOUNT if by_bank and account == PROVIDER_ACCOUNT else account
                                     for account in LEDGER_TEMPLATES[posting.kind])
    return (LedgerLine(debit_account, posting.amount, 0, posting.currency),
            LedgerLine(credit_account, 0, posting.amount, posting.currency))
