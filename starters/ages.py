"""Ages as people type them ('90d', '12h', '30m'): one parser for the CLI and the console,
kept apart from both so neither front end imports the other."""

import re
from datetime import timedelta

AGE = re.compile(r"([0-9]{1,6})([dhm])")
"""ASCII digits only (`str.isdigit` passes superscripts, which `int()` then refuses), few
enough that the result stays in timedelta's range."""
UNITS = {"d": "days", "h": "hours", "m": "minutes"}


LONGEST = timedelta(days=36_500)
"""An age is subtracted from now: longer than this leaves the calendar (year 1)."""


def parse_age(text: str) -> timedelta:
    """'90d', '12h' or '30m' as a duration of at most `LONGEST`; anything else is a
    ValueError naming the form."""
    match = AGE.fullmatch(text)
    if match is None:
        raise ValueError(f"not a duration like 90d, 12h or 30m: {text!r}")
    age = timedelta(**{UNITS[match[2]]: int(match[1])})
    if age > LONGEST:
        raise ValueError(f"{text!r} is longer than {LONGEST.days}d ago")
    return age
