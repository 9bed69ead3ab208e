"""HMAC request signing for inbound integrations (Slack's `v0=` scheme, our ServiceNow
scheme): the signature covers the timestamp, the compare is constant-time, and a
timestamp outside the window is refused, so a captured request cannot be replayed."""

import hashlib
import hmac
from collections.abc import Sequence

from adapters.providers.base import WebhookRejected
from adapters.providers.signing import check_window, unix_time


def slack_basestring(timestamp: str, body: bytes) -> bytes:
    """What Slack signs: `v0:{timestamp}:{raw body}`."""
    return f"v0:{timestamp}:".encode() + body


def servicenow_basestring(timestamp: str, body: bytes) -> bytes:
    """What our ServiceNow business rule signs: `{timestamp}.{raw body}`."""
    return f"{timestamp}.".encode() + body


SCHEMES = {"slack": ("v0=", slack_basestring), "servicenow": ("sha256=", servicenow_basestring)}


def signature(scheme: str, secret: str, timestamp: str, body: bytes) -> str:
    """The signature header value a sender computes."""
    prefix, basestring = SCHEMES[scheme]
    return prefix + hmac.new(secret.encode(), basestring(timestamp, body), hashlib.sha256).hexdigest()


def verify(scheme: str, *, signature_header: str | None, timestamp_header: str | None, body: bytes,
           secrets: Sequence[str], now: float, tolerance_seconds: int) -> None:
    """Raises WebhookRejected ('bad_signature' or 'stale') unless one secret signed this body."""
    if not signature_header or not timestamp_header:
        raise WebhookRejected("bad_signature", "missing signature or timestamp header")
    sent_at = unix_time(timestamp_header, "the timestamp header")
    expected = [signature(scheme, s, timestamp_header, body) for s in secrets]
    if not any(hmac.compare_digest(signature_header.encode(), e.encode()) for e in expected):
        raise WebhookRejected("bad_signature", "the signature does not match this body")
    check_window(sent_at, now, tolerance_seconds)
