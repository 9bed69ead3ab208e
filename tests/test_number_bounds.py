"""Numbers are bounded where they enter: an amount beyond 64 bits is a 422 (never a 500
`bigint out of range`), and an amount filter such as 1e999990, Infinity or sNaN is refused
at once instead of stalling the event loop."""

import asyncio
from decimal import Decimal

import pytest

from adapters.providers.normalise import major_to_minor
from domain.money import parse_major
from tests.harness import Stack
from tests.test_bad_input import assert_untouched
from tests.test_console import console
from tests.test_payout_registration import register, registration

HANG = 15.0
"""Only a bound that detects a hang (one such URL took 30 s of the event loop), not a timing."""
BEYOND_64_BITS = 2**63


async def test_a_refund_amount_beyond_64_bits_is_422(stack: Stack) -> None:
    charge = await stack.charge(10_000)
    body = stack.refund_body(charge, BEYOND_64_BITS)
    async with stack.api("alice") as api:
        response = await api.post("/v1/refund-requests", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"][-1] == "amount"
    await assert_untouched(stack, body["refund_request_id"], charge)


async def test_a_payout_amount_beyond_64_bits_is_422(stack: Stack) -> None:
    response = await register(stack, registration(amount=BEYOND_64_BITS))
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"][-1] == "amount"


@pytest.mark.parametrize("amount", ["1e999990", "Infinity", "-Infinity", "sNaN", "NaN", "1e5",
                                   "99999999999999999999999", "-5", "1_000"])
async def test_amount_filters_refuse_what_is_not_a_plain_amount(stack: Stack, amount: str) -> None:
    bob = await console(stack, "bob")
    try:
        response = await asyncio.wait_for(
            bob.get("/console/cases", params={"currency": "USD", "min": amount}), HANG)
    finally:
        await bob.aclose()
    assert response.status_code == 422, response.text
    assert "amount" in response.text


@pytest.mark.parametrize(("text", "minor"), [("30.00", 3_000), ("0.5", 50), ("7", 700),
                                             (" 12.34 ", 1_234)])
def test_plain_amounts_still_parse(text: str, minor: int) -> None:
    assert parse_major(text, "USD") == minor


async def test_an_age_filter_too_large_for_a_duration_is_422(stack: Stack) -> None:
    bob = await console(stack, "bob")
    try:
        response = await bob.get("/console/cases", params={"older_than": "99999999999d"})
    finally:
        await bob.aclose()
    assert response.status_code == 422 and "duration" in response.text


@pytest.mark.parametrize("value", ["100.0000000000000000000000000001", "1E+30", "9223372036854775808"])
def test_a_major_unit_amount_that_cannot_be_held_exactly_is_refused(value: str) -> None:
    """A provider's major-unit amount (Cashfree's rupees) past Decimal's 28 digits was rounded
    to fit and then passed as exact (100.0000…0001 became 100.00); one past 64 bits reached
    the database. Both are refused as what they are: not an amount we can hold."""
    with pytest.raises(ValueError):
        major_to_minor(Decimal(value), "INR")


def test_major_unit_amounts_in_range_still_convert_exactly() -> None:
    assert major_to_minor(Decimal("100.25"), "INR") == 10_025
    assert major_to_minor(Decimal("92233720368547758.07"), "INR") == 2**63 - 1
    assert major_to_minor(7, "KWD") == 7_000
