"""Ages as the CLI and the console read them."""

from datetime import timedelta

import pytest

from starters.ages import parse_age
from tests.test_cli import run


def test_an_age_is_digits_and_a_unit() -> None:
    assert parse_age("90d") == timedelta(days=90)
    assert parse_age("12h") == timedelta(hours=12)
    assert parse_age("30m") == timedelta(minutes=30)


@pytest.mark.parametrize("text", ["\u00b2d", "1.5h", "-3m", "10", "9999999d", "", "d"])
def test_anything_else_is_refused_with_the_form(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_age(text)


async def test_an_age_past_the_calendar_is_refused_and_the_command_exits_2() -> None:
    """999999d ago is before year 1: a usage error naming the bound, never a traceback out
    of the command (which also skips its clean exit, sdk-python #300)."""
    with pytest.raises(ValueError, match="longer than 36500d"):
        parse_age("999999d")
    assert parse_age("36500d") == timedelta(days=36_500)
    done = await run("reconcile", "--provider", "sandbox", "--since", "999999d",
                     env={"REFUNDS_RELAY_URL": "http://127.0.0.1:9", "REFUNDS_TOKEN": "t"})
    assert done.returncode == 2 and "longer than 36500d" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
