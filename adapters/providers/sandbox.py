"""Adapter for the project's own sandbox provider (Stripe-shaped JSON API and webhooks).

Webhooks are signed like Stripe's: header `Sandbox-Signature: t=<unix>,v1=<hex>` where
v1 = HMAC-SHA256(secret, "<t>.<raw body>"); several secrets are accepted during rotation.
"""

import hashlib
import hmac
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import httpx
from pydantic import ValidationError

from adapters.providers.base import (
    ProviderDeclined,
    ProviderOutcomeUnknown,
    UnexpectedProviderStatus,
    WebhookRejected,
)
from domain.models import (
    ChargeSnapshot,
    EventKind,
    ProviderEvent,
    ProviderRefund,
    ProviderRefundStatus,
    RefundReason,
    RefundRequest,
)

SIGNATURE_HEADER = "sandbox-signature"
REFUND_STATUS_EVENTS = frozenset({"refund.created", "refund.updated", "refund.failed"})
REQUEST_EVENTS = frozenset({"refund.requested"})
KNOWN_EVENT_TYPES = REFUND_STATUS_EVENTS | REQUEST_EVENTS

_STATUSES = {s.value: s for s in ProviderRefundStatus}


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The signature header value for a body sent at `timestamp`."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify_signature(header: str | None, body: bytes, secrets: Sequence[str], now: float,
                     tolerance_seconds: int) -> None:
    """Raises WebhookRejected unless one secret signed this body within the tolerance."""
    if not header:
        raise WebhookRejected("bad_signature", f"missing {SIGNATURE_HEADER} header")
    parts: dict[str, list[str]] = {}
    for item in header.split(","):
        key, _, value = item.strip().partition("=")
        parts.setdefault(key, []).append(value)
    try:
        timestamp = int(parts["t"][0])
    except (KeyError, ValueError):
        raise WebhookRejected("bad_signature", "signature header has no valid timestamp") from None
    candidates = parts.get("v1", [])
    expected = [sign(s, body, timestamp).split("v1=", 1)[1] for s in secrets]
    if not any(hmac.compare_digest(c, e) for c in candidates for e in expected):
        raise WebhookRejected("bad_signature", "no valid v1 signature for this body")
    if abs(now - timestamp) > tolerance_seconds:
        raise WebhookRejected("stale", f"timestamp is {int(now - timestamp)}s away from now; "
                                       f"tolerance is {tolerance_seconds}s")


def minor_units(value: object) -> int:
    """Amounts arrive as JSON integers of minor units; anything else is malformed."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"amount must be an integer of minor units, got {value!r}")
    return value


def refund_from_object(provider: str, obj: Mapping[str, Any]) -> ProviderRefund:
    """Maps a sandbox refund object; an unexpected status is an error, never a default."""
    raw = str(obj["status"])
    if raw not in _STATUSES:
        raise UnexpectedProviderStatus(f"unexpected refund status {raw!r} for refund {obj.get('id')}")
    metadata = obj.get("metadata") or {}
    return ProviderRefund(
        provider=provider, refund_id=str(obj["id"]), charge_id=str(obj["charge"]),
        amount=minor_units(obj["amount"]), currency=str(obj["currency"]).upper(), status=_STATUSES[raw],
        raw_status=raw, failure_reason=obj.get("failure_reason"),
        reference=metadata.get("refund_request_id"),
    )


class SandboxProvider:
    """Client of the sandbox provider's HTTP API."""

    event_types = KNOWN_EVENT_TYPES

    def __init__(self, base_url: str, *, webhook_secrets: Sequence[str], api_key: str | None = None,
                 timeout_seconds: float = 10.0, tolerance_seconds: int = 300,
                 name: str = "sandbox") -> None:
        self.name = name
        self._secrets = list(webhook_secrets)
        self._tolerance = tolerance_seconds
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(base_url=base_url, timeout=timeout_seconds, headers=headers)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise ProviderOutcomeUnknown(f"{method} {path}: timed out") from exc
        except httpx.TransportError as exc:
            raise ProviderOutcomeUnknown(f"{method} {path}: {type(exc).__name__}") from exc
        if response.status_code >= 500:
            raise ProviderOutcomeUnknown(f"{method} {path}: HTTP {response.status_code}")
        return response

    async def get_charge(self, charge_id: str) -> ChargeSnapshot | None:
        response = await self._call("GET", f"/v1/charges/{charge_id}")
        if response.status_code == 404:
            return None
        response.raise_for_status()
        obj = response.json()
        return ChargeSnapshot(
            provider=self.name, charge_id=obj["id"], currency=obj["currency"].upper(),
            merchant_account=obj["merchant_account"], amount=obj["amount"],
            amount_captured=obj["amount_captured"], captured=obj["captured"],
            dispute_count=int(obj.get("disputes", 0)),
        )

    async def create_refund(self, request: RefundRequest, idempotency_key: str) -> ProviderRefund:
        response = await self._call(
            "POST", "/v1/refunds", headers={"Idempotency-Key": idempotency_key},
            json={"charge": request.charge_id, "amount": request.amount,
                  "currency": request.currency.lower(), "reason": request.reason.value,
                  "metadata": {"refund_request_id": request.refund_request_id}},
        )
        if response.status_code >= 400:
            raise ProviderDeclined(f"refund refused: HTTP {response.status_code} {response.text[:300]}")
        return refund_from_object(self.name, response.json())

    async def find_refund(self, request: RefundRequest) -> ProviderRefund | None:
        response = await self._call(
            "GET", "/v1/refunds",
            params={"charge": request.charge_id, "reference": request.refund_request_id})
        response.raise_for_status()
        found = [refund_from_object(self.name, o) for o in response.json()["data"]]
        return found[0] if found else None

    def parse_webhook(self, headers: Mapping[str, str], body: bytes, now: float) -> ProviderEvent:
        verify_signature(headers.get(SIGNATURE_HEADER), body, self._secrets, now, self._tolerance)
        body_sha256 = hashlib.sha256(body).hexdigest()
        try:
            payload = json.loads(body)
            event_id, event_type = str(payload["id"]), str(payload["type"])
            obj = payload["data"]["object"]
            occurred = datetime.fromtimestamp(int(payload["created"]), UTC)
        except (ValueError, KeyError, TypeError) as exc:
            raise WebhookRejected("malformed", f"not a sandbox event: {exc!s}") from None
        if event_type not in KNOWN_EVENT_TYPES:
            raise WebhookRejected("unknown_type", f"no handler for event type {event_type!r}",
                                  event_id=event_id, event_type=event_type)
        try:
            if event_type in REQUEST_EVENTS:
                return ProviderEvent(
                    provider=self.name, event_id=event_id, event_type=event_type,
                    kind=EventKind.REFUND_REQUESTED, body_sha256=body_sha256, occurred_at=occurred,
                    request_object_id=str(obj["id"]), charge_id=str(obj["charge"]),
                    amount=minor_units(obj["amount"]), currency=str(obj["currency"]).upper(),
                    merchant_account=str(obj["merchant_account"]),
                    reason=RefundReason(obj.get("reason") or "requested_by_customer"),
                    evidence={str(k): str(v) for k, v in (obj.get("evidence") or {}).items()},
                )
            refund = refund_from_object(self.name, obj)
        except (ValueError, KeyError, TypeError, ValidationError) as exc:
            raise WebhookRejected("malformed", f"{event_type}: {exc!s}"[:500],
                                  event_id=event_id, event_type=event_type) from None
        return ProviderEvent(
            provider=self.name, event_id=event_id, event_type=event_type,
            kind=EventKind.REFUND_STATUS, body_sha256=body_sha256, occurred_at=occurred,
            refund_id=refund.refund_id, charge_id=refund.charge_id, amount=refund.amount,
            currency=refund.currency, status=refund.status, raw_status=refund.raw_status,
            failure_reason=refund.failure_reason, refund_request_id=refund.reference,
        )
