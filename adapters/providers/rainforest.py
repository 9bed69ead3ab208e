"""Rainforest adapter: refund webhooks verified Standard-Webhooks style and normalised.

Rainforest's refund API is not reachable from here, so creating and looking up refunds is
refused as unsupported (a case naming this provider is rejected, nothing moves) rather
than guessed. Its webhooks, `{data, event_type}` with `refund.<status>` types, are fully
handled. The verifier is pluggable; the default is the Svix / Standard Webhooks scheme its
deliveries use (`svix-id`, `svix-timestamp`, `svix-signature`).
"""

import hashlib
import hmac
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from svix.webhooks import Webhook as SvixWebhook

from adapters.providers.base import WebhookRejected, WebhooksOnly
from adapters.providers.normalise import (
    REFERENCE_KEY,
    load_json,
    map_status,
    minor_units,
    normalising,
    refund_event,
    require_known,
)
from adapters.providers.signing import WebhookVerifier, check_window, require_header
from domain.models import (
    ProviderEvent,
    ProviderRefund,
    ProviderRefundStatus,
)
from domain.money import normalise_currency

STATUSES = {
    "CREATED": ProviderRefundStatus.PENDING,  # created, waiting for Rainforest's approval
    "PROCESSING": ProviderRefundStatus.PENDING,
    "IN_REVIEW": ProviderRefundStatus.IN_REVIEW,
    "SUCCEEDED": ProviderRefundStatus.SUCCEEDED,
    "FAILED": ProviderRefundStatus.FAILED,
    "CANCELED": ProviderRefundStatus.CANCELED,
}
KNOWN_EVENT_TYPES = frozenset(f"refund.{s.lower()}" for s in STATUSES)


def _header(headers: Mapping[str, str], name: str) -> str:
    """Svix names its headers `svix-*`; Standard Webhooks calls the same ones `webhook-*`."""
    return headers.get(f"svix-{name}") or require_header(headers, f"webhook-{name}")


class SvixVerifier:
    """Standard Webhooks signatures, computed by the `svix` package.

    svix's own `verify()` checks a fixed 5-minute wall-clock window before the signature;
    we sign with svix and compare in constant time, then apply our window, so a forgery
    is reported as a bad signature and the tolerance and clock are the relay's.
    """

    def __init__(self, secrets: Sequence[str], *, tolerance_seconds: int = 300) -> None:
        self._signers = [SvixWebhook(s) for s in secrets]
        self._tolerance = tolerance_seconds

    def verify(self, headers: Mapping[str, str], body: bytes, now: float) -> None:
        msg_id, stamp, signatures = (_header(headers, n) for n in ("id", "timestamp", "signature"))
        try:
            sent_at = int(stamp)
            data = body.decode()
        except (ValueError, UnicodeDecodeError):
            raise WebhookRejected("bad_signature", "timestamp or body cannot be signed") from None
        at = datetime.fromtimestamp(sent_at, UTC)
        expected = [s.sign(msg_id, at, data).encode() for s in self._signers]
        offered = [sig.encode() for sig in signatures.split()]
        if not any(hmac.compare_digest(o, e) for o in offered for e in expected):
            raise WebhookRejected("bad_signature", "no valid v1 signature for this body")
        check_window(sent_at, now, self._tolerance)


def _refund(provider: str, data: Mapping[str, Any]) -> ProviderRefund:
    status = map_status(provider, STATUSES, data["status"])
    failure = None
    if status is ProviderRefundStatus.FAILED:
        failure = ": ".join(str(data[k]) for k in ("refusal_code", "refusal_desc") if data.get(k))
    return ProviderRefund(
        provider=provider, refund_id=str(data["refund_id"]), charge_id=str(data["payin_id"]),
        amount=minor_units(data["amount"]), currency=normalise_currency(str(data["currency_code"])),
        status=status, raw_status=str(data["status"]), failure_reason=failure or None,
        reference=(data.get("metadata") or {}).get(REFERENCE_KEY),
    )


class RainforestProvider(WebhooksOnly):
    """Rainforest refund webhooks (the refund API itself is not supported here)."""

    event_types = KNOWN_EVENT_TYPES

    def __init__(self, *, webhook_secrets: Sequence[str], tolerance_seconds: int = 300,
                 verifier: WebhookVerifier | None = None, name: str = "rainforest") -> None:
        self.name = name
        self._verifier = verifier or SvixVerifier(webhook_secrets, tolerance_seconds=tolerance_seconds)

    def parse_webhook(self, headers: Mapping[str, str], body: bytes, now: float) -> ProviderEvent:
        self._verifier.verify(headers, body, now)
        event_id = _header(headers, "id")
        payload = load_json(body)
        with normalising(event_id, None):
            event_type, data = str(payload["event_type"]), payload["data"]
        require_known(event_type, KNOWN_EVENT_TYPES, event_id)
        with normalising(event_id, event_type):
            stamp = data.get("updated_at") or data.get("created_at")
            occurred = (datetime.fromisoformat(stamp) if stamp
                        else datetime.fromtimestamp(int(_header(headers, "timestamp")), UTC))
            return refund_event(_refund(self.name, data), event_id=event_id, event_type=event_type,
                                body_sha256=hashlib.sha256(body).hexdigest(), occurred_at=occurred,
                                merchant_account=data.get("merchant_id"))
