"""Pieces every webhook verifier shares: the timestamp window, header lookup, secret lists.

Each provider signs differently, but all of them must be refused the same way: a missing
header or a wrong signature is `bad_signature`, a right signature outside our window is
`stale` (checked after the signature, so a forgery is never reported as merely late).
"""

from collections.abc import Mapping, Sequence
from typing import Protocol

import stripe
from pydantic import SecretStr

from adapters.providers.base import WebhookRejected


class WebhookVerifier(Protocol):
    """Authenticates one delivery; raises WebhookRejected (bad_signature or stale)."""

    def verify(self, headers: Mapping[str, str], body: bytes, now: float) -> None:
        """Returns only when one configured secret signed this body inside the window."""


def require_header(headers: Mapping[str, str], name: str) -> str:
    """The header's value; a missing or empty one is a bad signature, not a crash."""
    value = headers.get(name)
    if not value:
        raise WebhookRejected("bad_signature", f"missing {name} header")
    return value


def check_window(timestamp: float, now: float, tolerance_seconds: int) -> None:
    """Refuses a delivery signed too long ago (a replay) or too far ahead (a skewed clock)."""
    if abs(now - timestamp) > tolerance_seconds:
        raise WebhookRejected("stale", f"timestamp is {int(now - timestamp)}s away from now; "
                                       f"tolerance is {tolerance_seconds}s")


def secret_list(secret: SecretStr) -> list[str]:
    """Comma-separated secrets: the new one and the old ones during a rotation."""
    values = [s.strip() for s in secret.get_secret_value().split(",") if s.strip()]
    if not values:
        raise ValueError("a webhook secret setting is empty")
    return values


class StripeSchemeVerifier:
    """`t=<unix>,v1=<hex HMAC-SHA256 of "t.body">` (Stripe's scheme, which the sandbox copies).

    The signature is checked by the `stripe` package (constant-time compare) with its own
    clock check off, so that the window is ours: the relay's `now`, our tolerance.
    """

    def __init__(self, secrets: Sequence[str], *, tolerance_seconds: int = 300,
                 header: str = "stripe-signature") -> None:
        self._secrets = list(secrets)
        self._tolerance = tolerance_seconds
        self._header = header

    def verify(self, headers: Mapping[str, str], body: bytes, now: float) -> None:
        value = require_header(headers, self._header)
        failures: list[str] = []
        for secret in self._secrets:
            try:
                stripe.WebhookSignature.verify_header(body, value, secret, tolerance=None)
                break
            except stripe.SignatureVerificationError as exc:
                failures.append(str(exc.user_message or exc))
            except UnicodeDecodeError:
                raise WebhookRejected("bad_signature", "body is not UTF-8") from None
        else:
            raise WebhookRejected("bad_signature", failures[-1] if failures else "no secret configured")
        stamp = next(v for k, _, v in (i.strip().partition("=") for i in value.split(",")) if k == "t")
        check_window(int(stamp), now, self._tolerance)
