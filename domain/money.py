"""Money as integer minor units plus an ISO 4217 code; never floats.

The exponent (0 for JPY, 2 for USD, 3 for KWD) comes from the `iso4217` data package, so
formatting and parsing of major-unit strings are exact for every currency.
"""

import re
from decimal import Decimal

from iso4217 import Currency

MAX_MINOR_AMOUNT = 2**63 - 1
"""PostgreSQL's bigint: no amount we store, in any currency, can be larger."""
PLAIN_AMOUNT = re.compile(r"[0-9]{1,20}(?:\.[0-9]{1,8})?")
"""Digits with an optional fraction: no exponent, sign, Infinity or NaN, never a
million-digit number, and within Decimal's 28 digits, so nothing is rounded away."""


class UnknownCurrencyError(ValueError):
    """The code is not an ISO 4217 currency that has minor units."""


def currency_exponent(code: str) -> int:
    """Number of minor-unit digits, e.g. 2 for USD; raises for unknown or unit-less codes."""
    try:
        exponent = Currency(code).exponent
    except ValueError as exc:
        raise UnknownCurrencyError(f"unknown ISO 4217 currency {code!r}") from exc
    if exponent is None:  # XAU, XDR and friends are not money we refund
        raise UnknownCurrencyError(f"currency {code!r} has no minor unit")
    return int(exponent)


def normalise_currency(code: str) -> str:
    """Upper-cases and validates a currency code."""
    upper = code.strip().upper()
    currency_exponent(upper)
    return upper


def format_minor(amount_minor: int, currency: str) -> str:
    """`format_minor(3000, "USD") == "30.00 USD"`; exact for every exponent."""
    exponent = currency_exponent(currency)
    major = Decimal(amount_minor).scaleb(-exponent)
    return f"{major:.{exponent}f} {currency}"


def shown_minor(amount_minor: int, currency: str) -> str:
    """`format_minor` for display only: an amount in a currency ISO 4217 no longer has (a
    provider's old object, kept as a break for ops) is shown as sent, in minor units,
    instead of failing the page or the report that shows it."""
    try:
        return format_minor(amount_minor, currency)
    except UnknownCurrencyError:
        return f"{amount_minor} {currency} (minor units; currency unknown)"


def parse_major(text: str, currency: str) -> int:
    """Parses "30.00" into minor units of `currency`; refuses more digits than it has."""
    exponent = currency_exponent(currency)
    if not PLAIN_AMOUNT.fullmatch(text.strip()):
        raise ValueError(f"not an amount: {text!r} (digits, optionally a '.' and decimals)")
    minor = Decimal(text.strip()).scaleb(exponent)
    if minor != minor.to_integral_value():
        raise ValueError(f"{text!r} has more than {exponent} decimals for {currency}")
    if minor > MAX_MINOR_AMOUNT:
        raise ValueError(f"amount {text!r} is larger than any we can hold")
    return int(minor)
