"""Amounts where they cross to a provider: ours are ISO 4217 minor units, a provider's API
may count a currency in other decimals.

Stripe counts MGA in whole ariary (ISO 4217: two decimals) and ISK in hundredths (ISO: none);
Adyen counts IDR and CVE without decimals and CLP and ISK with two. Passed through unchanged,
500.00 MGA (50,000 of ours) would leave as 50,000 ariary, a hundred times the refund asked
for, and the policy, the reservations and the ledger would all read the wrong figure. So
each adapter declares its exceptions and converts, exactly, both ways; an amount with no
exact equal on the other side is refused with the reason, never rounded.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from domain.money import currency_exponent, format_minor


def minor_units(value: object) -> int:
    """Amounts that arrive as JSON integers of minor units; anything else is malformed."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"amount must be an integer of minor units, got {value!r}")
    return value


def _rescaled(amount: int, finer: bool, factor: int, inexact: Callable[[], str]) -> int:
    """`amount` times `factor` into finer units, else divided by it, exactly; ValueError
    (`inexact()` saying why) when the division leaves a remainder."""
    if finer:
        return amount * factor
    whole, rest = divmod(amount, factor)
    if rest:
        raise ValueError(inexact())
    return whole


@dataclass(frozen=True)
class MinorUnits:
    """How a provider's API counts amounts, where that differs from ISO 4217."""

    decimals: Mapping[str, int] = field(default_factory=dict)
    """The provider's decimals for each currency where they are not ISO 4217's."""
    multiple_of: Mapping[str, int] = field(default_factory=dict)
    """Per currency, what every amount (in the provider's units) must be a multiple of."""
    source: str = "ISO 4217 minor units throughout"

    def provider_decimals(self, currency: str) -> int:
        return self.decimals.get(currency.upper(), currency_exponent(currency.upper()))

    def _shift(self, currency: str) -> tuple[int, int]:
        """How many more decimals the provider counts than ISO 4217 (negative: fewer), and
        the factor between the two units."""
        shift = self.provider_decimals(currency) - currency_exponent(currency.upper())
        return shift, int(10 ** abs(shift))

    def to_provider(self, amount: int, currency: str) -> int:
        """Our minor units in the provider's; ValueError when they have no exact equal there."""
        shift, factor = self._shift(currency)
        return _rescaled(amount, shift >= 0, factor, lambda: (
            f"{format_minor(amount, currency.upper())} is not a whole number of the units the "
            f"provider counts {currency.upper()} in ({self.provider_decimals(currency)} decimals)"))

    def from_provider(self, value: object, currency: str) -> int:
        """A provider's amount (a JSON integer in its units) in ours; ValueError when it is
        not an integer or no ISO 4217 minor-unit amount equals it."""
        amount = minor_units(value)
        shift, factor = self._shift(currency)
        return _rescaled(amount, shift <= 0, factor, lambda: (
            f"{amount} in the provider's units of {currency.upper()} "
            f"({self.provider_decimals(currency)} decimals) is no whole number of "
            f"ISO 4217 minor units ({currency_exponent(currency.upper())} decimals)"))

    def largest_ours(self, limit: int, currency: str) -> int:
        """The largest amount of ours within a limit stated in the provider's units."""
        shift, factor = self._shift(currency)
        return limit // factor if shift >= 0 else limit * factor

    def refusal(self, provider: str, amount: int, currency: str) -> str | None:
        """Why `provider` cannot carry `amount` (our minor units) exactly, or None."""
        try:
            theirs = self.to_provider(amount, currency)
        except ValueError as exc:
            return f"{provider}: {exc}; ask for a whole amount in its units"
        step = self.multiple_of.get(currency.upper(), 1)
        if theirs % step:
            return (f"{provider} takes {currency.upper()} amounts only as a multiple of {step} of its "
                    f"minor units; {format_minor(amount, currency.upper())} is not")
        return None


ISO_UNITS = MinorUnits()
"""A provider whose API counts every currency as ISO 4217 does."""
