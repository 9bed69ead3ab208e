"""What makes any delivery storable as a webhook receipt (`adapters.db.receipts` stores it)."""

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel


def storable(text: str) -> str:
    """Text as PostgreSQL keeps it: `text` and `jsonb` refuse NUL and UTF-8 refuses lone
    surrogates, so a refused delivery's path, headers and error are stored with those
    characters replaced instead of being lost to a failed insert (a 500, no receipt)."""
    return text.encode("utf-8", "replace").decode().replace("\x00", "\ufffd")


CREDENTIAL_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})
"""Never kept with a receipt (a ServiceNow outbound REST call commonly carries Basic auth)."""
INTEGRATION_SENDERS = frozenset({"slack", "servicenow"})
"""Receipts of integration calls (not provider webhooks): the webhook path cannot replay
them (each was taken as `unknown_provider`); their sender sends a call again itself."""


def storable_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers a receipt keeps: all but the credentials, as PostgreSQL can store them."""
    return {storable(k): storable(v) for k, v in headers.items() if k.lower() not in CREDENTIAL_HEADERS}


def unstorable(model: BaseModel) -> bool:
    """Whether a parsed delivery holds text PostgreSQL cannot keep (NUL, a lone surrogate).
    Such a delivery is refused as malformed rather than stored altered: its ids are dedup
    keys, and the cases and audit rows it would write could never be written. Read from
    the values, not their JSON: text that spells `\\u0000` is text."""
    return _holds_unstorable(model.model_dump())


def _holds_unstorable(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return "\x00" in value
    if isinstance(value, Mapping):
        return any(_holds_unstorable(k) or _holds_unstorable(v) for k, v in value.items())
    if isinstance(value, list | tuple | set | frozenset):
        return any(_holds_unstorable(item) for item in value)
    return False
