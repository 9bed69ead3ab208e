"""Pieces every webhook verifier shares: the timestamp window, header lookup, timestamps.

Each provider signs differently, but all of them must be refused the same way: a missing
header or a wrong signature is `bad_signature`, a right signature outside our window is
`stale` (checked after the signature, so a forgery is never reported as merely late).
A header is parsed once and the window is checked on the very timestamp the signature
covered: parsing it a second time, differently, lets a fresh time vouch for an old one.
"""

import re
from collections.abc import Mapping, Sequence
from typing import Protocol

import stripe

from adapters.providers.base import UNDOCUMENTED_MAXIMUM, WebhookRejected, WebhooksOnly
from adapters.providers.units import ISO_UNITS

UNIX_TIME = re.compile(r"[0-9]{1,15}")
"""A timestamp as signers write it: ASCII digits only (`int()` also takes `١٢`, `1_0` and
spaces), and short enough that every later conversion of it stays in range."""


class WebhookVerifier(Protocol):
    """Authenticates one delivery; raises WebhookRejected (bad_signature or stale)."""

    def verify(self, headers: Mapping[str, str], body: bytes, now: float) -> None:
        """Returns only when one configured secret signed this body inside the window."""


class VerifiedWebhooksOnly(WebhooksOnly):
    """Base of the webhooks-only adapters whose provider documents no maximum refund
    (Rainforest, Cashfree): each delivery is checked by the provider's own verifier, or by
    one a caller plugs in."""

    max_amount = UNDOCUMENTED_MAXIMUM
    units = ISO_UNITS

    def __init__(self, *, webhook_secrets: Sequence[str], tolerance_seconds: int = 300,
                 verifier: WebhookVerifier | None = None, name: str | None = None) -> None:
        self.name = name or type(self).name
        self._verifier = verifier or self._own_verifier(webhook_secrets, tolerance_seconds)

    def _own_verifier(self, secrets: Sequence[str], tolerance_seconds: int) -> WebhookVerifier:
        """The provider's signature scheme over these secrets and our window."""
        raise NotImplementedError


def require_header(headers: Mapping[str, str], name: str) -> str:
    """The header's value; a missing or empty one is a bad signature, not a crash."""
    value = headers.get(name)
    if not value:
        raise WebhookRejected("bad_signature", f"missing {name} header")
    return value


def unix_time(text: str, what: str) -> int:
    """A signed timestamp header as an integer; anything but plain digits is a bad signature."""
    if not UNIX_TIME.fullmatch(text):
        raise WebhookRejected("bad_signature", f"{what} is not a unix time in ASCII digits")
    return int(text)


def check_window(timestamp: float, now: float, tolerance_seconds: int) -> None:
    """Refuses a delivery signed too long ago (a replay) or too far ahead (a skewed clock)."""
    if abs(now - timestamp) > tolerance_seconds:
        raise WebhookRejected("stale", f"timestamp is {int(now - timestamp)}s away from now; "
                                       f"tolerance is {tolerance_seconds}s")


def stripe_timestamp(header: str) -> int:
    """The `t` of a Stripe-scheme header exactly as the `stripe` package reads it when it
    checks the signature (its own parser: the first item named `t`, unstripped)."""
    try:
        stamp, _ = stripe.WebhookSignature._get_timestamp_and_signatures(
            header, stripe.WebhookSignature.EXPECTED_SCHEME)
    except (ValueError, IndexError):
        raise WebhookRejected("bad_signature", "unable to extract the timestamp from the header") from None
    return int(stamp)


class StripeSchemeVerifier:
    """`t=<unix>,v1=<hex HMAC-SHA256 of "t.body">` (Stripe's scheme, which the sandbox copies).

    The signature is checked by the `stripe` package (constant-time compare). Its own
    clock check is off because it reads the wall clock and only looks back: a replay is
    verified as of its reception, and a time far ahead is refused too. The window is ours
    (the relay's `now`, our tolerance), applied to the timestamp the package parsed.
    """

    def __init__(self, secrets: Sequence[str], *, tolerance_seconds: int = 300,
                 header: str = "stripe-signature") -> None:
        self._secrets = list(secrets)
        self._tolerance = tolerance_seconds
        self._header = header

    def verify(self, headers: Mapping[str, str], body: bytes, now: float) -> None:
        value = require_header(headers, self._header)
        if not value.isascii():
            raise WebhookRejected("bad_signature", f"{self._header} is not ASCII")
        signed_at = stripe_timestamp(value)
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
        check_window(signed_at, now, self._tolerance)
