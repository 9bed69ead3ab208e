"""What a parsed delivery may hold to be stored: PostgreSQL refuses NUL and lone surrogates,
and nothing else; text that only spells an escape (a backslash, then `u0000`) is text."""

import pytest
from pydantic import BaseModel

from adapters import receipts


class Note(BaseModel):
    text: str


@pytest.mark.parametrize(("text", "refused"), [
    ("a NUL \x00 here", True),
    ("half a pair \ud800", True),
    ("a literal \\u0000 is text", False),
    ("two backslashes then a NUL \\\\\x00", True),
    ("a backslash and a literal \\\\u0000", False),
    ("a whole pair \U0001f600", False),
])
def test_only_text_postgresql_cannot_store_is_unstorable(text: str, refused: bool) -> None:
    assert receipts.unstorable(Note(text=text)) is refused
