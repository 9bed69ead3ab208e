"""Cashfree adapter: refund and auto-refund webhooks verified and normalised.

Cashfree's refund API is not reachable from here, so API calls are refused as unsupported
rather than guessed. Webhooks carry amounts in major units (`2.00`): they are parsed as
Decimal and converted exactly. The signature is Base64(HMAC-SHA256(x-webhook-timestamp +
raw body)); the timestamp is in milliseconds and, since Cashfree documents no window,
ours (the relay's tolerance) applies. Payloads have no event id: a refund's status is
its event, so the dedup key is type + cf_refund_id + status.
"""

import base64
import hashlib
import hmac
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from adapters.providers.base import WebhookRejected, WebhooksOnly
from adapters.providers.normalise import (
    load_json,
    major_to_minor,
    map_status,
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
    "SUCCESS": ProviderRefundStatus.SUCCEEDED,
    "PENDING": ProviderRefundStatus.PENDING,
    "INITIATED": ProviderRefundStatus.PENDING,
    "ONHOLD": ProviderRefundStatus.REQUIRES_ACTION,  # held until the merchant acts (e.g. balance)
    "CANCELLED": ProviderRefundStatus.CANCELED,
    "FAILED": ProviderRefundStatus.FAILED,
}
PAYLOAD_KEYS = {"REFUND_STATUS_WEBHOOK": "refund", "AUTO_REFUND_STATUS_WEBHOOK": "auto_refund"}
KNOWN_EVENT_TYPES = frozenset(PAYLOAD_KEYS)


def sign(secret: str, body: bytes, timestamp_ms: int) -> str:
    """The x-webhook-signature value Cashfree sends for this body and timestamp."""
    mac = hmac.new(secret.encode(), str(timestamp_ms).encode() + body, hashlib.sha256).digest()
    return base64.b64encode(mac).decode()


class CashfreeVerifier:
    """Cashfree's header signature with our own timestamp window."""

    def __init__(self, secrets: Sequence[str], *, tolerance_seconds: int = 300) -> None:
        self._secrets = list(secrets)
        self._tolerance = tolerance_seconds

    def verify(self, headers: Mapping[str, str], body: bytes, now: float) -> None:
        signature = require_header(headers, "x-webhook-signature").encode()
        stamp = require_header(headers, "x-webhook-timestamp")
        if not stamp.isdigit():
            raise WebhookRejected("bad_signature", "x-webhook-timestamp is not epoch milliseconds")
        if not any(hmac.compare_digest(signature, sign(s, body, int(stamp)).encode())
                   for s in self._secrets):
            raise WebhookRejected("bad_signature", "x-webhook-signature does not match this body")
        check_window(int(stamp) / 1000, now, self._tolerance)


def _refund(provider: str, event_type: str, obj: Mapping[str, Any]) -> ProviderRefund:
    status = map_status(provider, STATUSES, obj["refund_status"])
    currency = normalise_currency(str(obj["refund_currency"]))
    failed = status in (ProviderRefundStatus.FAILED, ProviderRefundStatus.CANCELED)
    return ProviderRefund(
        provider=provider, refund_id=str(obj["cf_refund_id"]), charge_id=str(obj["cf_payment_id"]),
        amount=major_to_minor(obj["refund_amount"], currency), currency=currency, status=status,
        raw_status=str(obj["refund_status"]),
        failure_reason=str(obj.get("status_description") or obj["refund_status"]) if failed else None,
        # A merchant-initiated refund's refund_id is the id we gave it; auto-refunds have none.
        reference=str(obj["refund_id"]) if event_type == "REFUND_STATUS_WEBHOOK" else None,
    )


class CashfreeProvider(WebhooksOnly):
    """Cashfree refund webhooks (the refund API itself is not supported here)."""

    event_types = KNOWN_EVENT_TYPES

    def __init__(self, *, webhook_secrets: Sequence[str], tolerance_seconds: int = 300,
                 verifier: WebhookVerifier | None = None, name: str = "cashfree") -> None:
        self.name = name
        self._verifier = verifier or CashfreeVerifier(webhook_secrets, tolerance_seconds=tolerance_seconds)

    def parse_webhook(self, headers: Mapping[str, str], body: bytes, now: float) -> ProviderEvent:
        self._verifier.verify(headers, body, now)
        payload = load_json(body, exact_decimals=True)
        with normalising(None, None):
            event_type = str(payload["type"])
        require_known(event_type, KNOWN_EVENT_TYPES, None)
        with normalising(None, event_type):
            obj = payload["data"][PAYLOAD_KEYS[event_type]]
            event_id = f"{event_type}:{obj['cf_refund_id']}:{obj['refund_status']}"
        with normalising(event_id, event_type):
            return refund_event(_refund(self.name, event_type, obj), event_id=event_id,
                                event_type=event_type, body_sha256=hashlib.sha256(body).hexdigest(),
                                occurred_at=datetime.fromisoformat(str(payload["event_time"])))
