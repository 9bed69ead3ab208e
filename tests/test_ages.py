"""Ages as the CLI and the console read them."""

from datetime import timedelta

import pytest

from starters.ages import parse_age


def test_an_age_is_digits_and_a_unit() -> None:
    assert parse_age("90d") == timedelta(days=90)
    assert parse_age("12h") == timedelta(hours=12)
    assert parse_age("30m") == timedelta(minutes=30)


@pytest.mark.parametrize("text", ["\u00b2d", "1.5h", "-3m", "10", "9999999d", "", "d"])
def test_anything_else_is_refused_with_the_form(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_age(text)
