"""Amounts crossing to a provider keep their value: our ISO 4217 minor units and the units a
provider's API counts (Stripe: MGA whole, ISK in hundredths; Adyen: IDR and CVE whole, CLP and
ISK in hundredths) are converted exactly both ways, and what has no exact equal is refused."""

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from adapters.providers import adyen, stripe
from adapters.providers.base import AmountLimit
from adapters.providers.units import ISO_UNITS, MinorUnits
from domain.money import currency_exponent, format_minor, shown_minor

TABLES = {"stripe": stripe.UNITS, "adyen": adyen.UNITS, "iso": ISO_UNITS}
CURRENCIES = ["USD", "JPY", "KWD", "ISK", "MGA", "CLP", "CVE", "IDR", "HUF", "UGX"]


def major(amount: int, decimals: int) -> Decimal:
    return Decimal(amount).scaleb(-decimals)


@pytest.mark.parametrize("units", TABLES.values(), ids=TABLES.keys())
@pytest.mark.parametrize("currency", CURRENCIES)
@given(amount=st.integers(min_value=0, max_value=10**15))
def test_an_amount_keeps_its_value_both_ways(units: MinorUnits, currency: str, amount: int) -> None:
    iso = currency_exponent(currency)
    try:
        theirs = units.to_provider(amount, currency)
    except ValueError:
        assert units.provider_decimals(currency) < iso and units.refusal("p", amount, currency)
        return
    assert major(theirs, units.provider_decimals(currency)) == major(amount, iso)
    assert units.from_provider(theirs, currency) == amount


@pytest.mark.parametrize("units", TABLES.values(), ids=TABLES.keys())
@pytest.mark.parametrize("currency", CURRENCIES)
@given(theirs=st.integers(min_value=0, max_value=10**15))
def test_a_provider_amount_is_read_exactly_or_refused(units: MinorUnits, currency: str,
                                                      theirs: int) -> None:
    try:
        ours = units.from_provider(theirs, currency)
    except ValueError as exc:
        assert units.provider_decimals(currency) > currency_exponent(currency)
        assert str(theirs) in str(exc) and currency in str(exc)
        return
    assert major(ours, currency_exponent(currency)) == major(theirs, units.provider_decimals(currency))


@pytest.mark.parametrize("units", TABLES.values(), ids=TABLES.keys())
def test_a_table_lists_only_real_exceptions_to_iso_4217(units: MinorUnits) -> None:
    for currency, decimals in units.decimals.items():
        assert decimals != currency_exponent(currency), currency


@pytest.mark.parametrize("value", [10.0, "100", True, None])
def test_a_provider_amount_must_be_a_json_integer(value: object) -> None:
    with pytest.raises(ValueError, match="integer of minor units"):
        stripe.UNITS.from_provider(value, "USD")


def test_a_limit_in_the_providers_units_is_read_in_ours() -> None:
    """Stripe's eight digits are hundredths of a krona: 999,999 ISK is the most it takes."""
    limit = AmountLimit(99_999_999, "eight digits")
    assert limit.refusal("stripe", 999_999, "ISK", stripe.UNITS) is None
    assert "999999" in str(limit.refusal("stripe", 1_000_000, "ISK", stripe.UNITS))
    assert limit.refusal("stripe", 9_999_999_900, "MGA", stripe.UNITS) is None
    assert limit.refusal("stripe", 10_000_000_000, "MGA", stripe.UNITS) is not None


def test_stripes_three_decimal_currencies_take_amounts_ending_in_zero() -> None:
    assert stripe.UNITS.refusal("stripe", 1_230, "KWD") is None
    assert "multiple of 10" in str(stripe.UNITS.refusal("stripe", 1_234, "KWD"))
    assert ISO_UNITS.refusal("sandbox", 1_234, "KWD") is None


def test_an_amount_in_a_currency_iso_no_longer_has_is_shown_as_sent() -> None:
    """A break keeps a provider's old object as sent (a 2022 kuna refund): the console, the
    CLI's run summary and ops' notices show it rather than fail on it; money logic still
    refuses the currency."""
    assert shown_minor(1_500, "HRK") == "1500 HRK (minor units; currency unknown)"
    assert shown_minor(1_500, "KWD") == "1.500 KWD"
    with pytest.raises(ValueError, match="HRK"):
        format_minor(1_500, "HRK")
