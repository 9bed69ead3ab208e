"""Cashfree adapter: refund and auto-refund webhooks verified and normalised; with API
settings, refunds through Cashfree PG's API (`CashfreeApiProvider`).

Without them (`CashfreeProvider`) API calls are refused as unsupported rather than
guessed. Amounts travel in major units (`2.00`), both ways: they are parsed as Decimal
and converted exactly with the currency's ISO 4217 exponent, never through a float.
The signature is Base64(HMAC-SHA256(x-webhook-timestamp + raw body)); the timestamp is
in milliseconds and, since Cashfree documents no window, ours (the relay's tolerance)
applies. Payloads have no event id: a refund's status is its event, so the dedup key is
type + cf_refund_id + status.
"""

import base64
import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any
from urllib.parse import quote

from adapters.providers.base import ProviderDeclined, WebhookRejected
from adapters.providers.http import JsonApi, JsonApiAdapter
from adapters.providers.normalise import (
    MalformedAnswer,
    exact_json,
    load_json,
    major_to_minor,
    map_status,
    minor_to_major,
    normalising,
    refund_event,
    require_known,
    required,
)
from adapters.providers.signing import (
    VerifiedWebhooksOnly,
    WebhookVerifier,
    check_window,
    require_header,
    unix_time,
)
from domain.models import (
    ChargeSnapshot,
    ProviderEvent,
    ProviderRefund,
    ProviderRefundStatus,
    RefundRequest,
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
UNDONE = frozenset({ProviderRefundStatus.FAILED, ProviderRefundStatus.CANCELED})
"""Refunds that hold no money: every other status counts as refunded (the guard's side)."""
PAYLOAD_KEYS = {"REFUND_STATUS_WEBHOOK": "refund", "AUTO_REFUND_STATUS_WEBHOOK": "auto_refund"}
KNOWN_EVENT_TYPES = frozenset(PAYLOAD_KEYS)
API_VERSION = "2025-01-01"


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
        stamp = unix_time(require_header(headers, "x-webhook-timestamp"),
                          "x-webhook-timestamp (epoch milliseconds)")
        if not any(hmac.compare_digest(signature, sign(s, body, stamp).encode())
                   for s in self._secrets):
            raise WebhookRejected("bad_signature", "x-webhook-signature does not match this body")
        check_window(stamp / 1000, now, self._tolerance)


PAYMENTS_NOT_KEPT = ("credit was received for an incomplete payment",
                     "payment made directly to your vpa",
                     "multiple payments were performed against same order",
                     "payment details (amount, bank, etc.) do not match")
"""The auto-refund reasons Cashfree lists that give back a payment its order did not keep."""


def _auto_refunded(obj: Mapping[str, Any]) -> str:
    """The charge an auto-refund's hold is on: the payment it gives back when the order
    did not keep it (`PAYMENTS_NOT_KEPT`), else the order (a dispute's refund is of the
    order's own money, and so is one whose reason is not listed: the guard's side, so our
    refunds of that order see less refundable). Before, a dispute's was held on the payment,
    and a refund of the same order could pay the customer again."""
    reason = str(obj.get("refund_reason") or "").strip().lower()
    if obj.get("order_id") and not reason.startswith(PAYMENTS_NOT_KEPT):
        return str(obj["order_id"])
    return str(obj["cf_payment_id"])


def _refund(provider: str, obj: Mapping[str, Any], *, charge_id: str, ours: bool) -> ProviderRefund:
    """A Cashfree refund entity (webhook or API); `ours` when its refund_id is a
    refund_request_id we chose (merchant-initiated), not Cashfree's auto-refund."""
    status = map_status(provider, STATUSES, obj["refund_status"])
    currency = normalise_currency(str(obj["refund_currency"]))
    failed = status in (ProviderRefundStatus.FAILED, ProviderRefundStatus.CANCELED)
    return ProviderRefund(
        provider=provider, refund_id=str(obj["cf_refund_id"]), charge_id=charge_id,
        amount=major_to_minor(obj["refund_amount"], currency), currency=currency, status=status,
        raw_status=str(obj["refund_status"]),
        failure_reason=str(obj.get("status_description") or obj["refund_status"]) if failed else None,
        reference=str(obj["refund_id"]) if ours else None,
    )


class CashfreeProvider(VerifiedWebhooksOnly):
    """Cashfree refund webhooks only: every API call is refused as unsupported."""

    name = "cashfree"
    event_types = KNOWN_EVENT_TYPES

    def _own_verifier(self, secrets: Sequence[str], tolerance_seconds: int) -> WebhookVerifier:
        return CashfreeVerifier(secrets, tolerance_seconds=tolerance_seconds)

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
            # A merchant-initiated refund's refund_id is the id we gave it, and its charge the
            # order (as our create names it); an auto-refund carries no id of ours, and its
            # charge is the payment it gives back or the order (`_auto_refunded`).
            merchant = event_type == "REFUND_STATUS_WEBHOOK"
            charge_id = str(obj["order_id"]) if merchant else _auto_refunded(obj)
            refund = _refund(self.name, obj, charge_id=charge_id, ours=merchant)
            return refund_event(refund, event_id=event_id,
                                event_type=event_type, body_sha256=hashlib.sha256(body).hexdigest(),
                                occurred_at=datetime.fromisoformat(str(payload["event_time"])))


REFUND_ID = re.compile(r"[A-Za-z0-9_-]{3,40}")
"""The merchant's refund id Cashfree takes (ours: the refund_request_id)."""


class CashfreeApiProvider(JsonApiAdapter, CashfreeProvider):
    """Cashfree PG's refund API (x-api-version 2025-01-01), where a charge is an order.

    - `get_charge`: `GET /orders/{order_id}`; PAID is captured, for the whole order_amount.
      The order carries neither refunds nor disputes: refunded is the sum of `GET
      /orders/{order_id}/refunds` not failed or cancelled, disputes the length of `GET
      /orders/{order_id}/disputes` (an answer without them is malformed, never zero).
    - `create_refund`: `POST /orders/{order_id}/refunds` with `refund_id` = our
      refund_request_id (Cashfree takes the merchant's id, 3-40 characters of letters,
      digits, `-` and `_`; others are a 400, a decline) and `x-idempotency-key`. A refused
      create is looked up first: a refund under our id on the order is the answer (Cashfree
      refuses a refund_id it holds; the earlier create landed unseen), never a decline.
    - `find_refund`: `GET /orders/{order_id}/refunds/{refund_id}`: our reference is
      Cashfree's key, so the lookup is exact; 404 means no refund was made.

    Not a `RefundLister`: Cashfree lists refunds per order only (`GET
    /orders/{order_id}/refunds`); its windowed listing (`POST /recon`) is a settlement
    ledger whose rows carry neither our refund_id nor the refund's own status, so
    reconciliation cannot read it as refunds without guessing. Nor a `PayoutLister`: PG
    settlements are Cashfree paying us, not payouts we made.

    A refund's charge is its order, made here or heard of by its webhook (`order_id`); an
    auto-refund's is the payment it gives back (`cf_payment_id`) when the order never kept
    it, else the order (a dispute's: `_auto_refunded`).
    """

    def reference_refusal(self, reference: str) -> str | None:
        if REFUND_ID.fullmatch(reference):
            return None
        return ("cashfree takes 3 to 40 letters, digits, '-' and '_' as a refund's id, and the "
                "refund_request_id is that id")

    def __init__(self, *, api_base: str, client_id: str, client_secret: str,
                 webhook_secrets: Sequence[str], merchant_account: str | None = None,
                 timeout_seconds: float = 10.0, tolerance_seconds: int = 300,
                 name: str = "cashfree") -> None:
        super().__init__(webhook_secrets=webhook_secrets, tolerance_seconds=tolerance_seconds, name=name)
        self._merchant_account = merchant_account or client_id
        self._api = JsonApi(api_base, timeout_seconds=timeout_seconds, headers={
            "x-client-id": client_id, "x-client-secret": client_secret, "x-api-version": API_VERSION})

    async def get_charge(self, charge_id: str) -> ChargeSnapshot | None:
        order = await self._api.call("GET", f"/orders/{quote(charge_id, safe='')}", missing_ok=True)
        if order is None:
            return None
        currency = normalise_currency(str(order["order_currency"]))
        amount = major_to_minor(order["order_amount"], currency)
        paid = order["order_status"] == "PAID"
        path = f"/orders/{quote(charge_id, safe='')}"
        refunds = await self._list(f"{path}/refunds", "refunds")
        disputes = await self._list(f"{path}/disputes", "disputes")
        refunded = 0
        for refund in refunds:
            what = f"order {charge_id}'s refund {refund.get('cf_refund_id')}"
            if map_status(self.name, STATUSES, required(self.name, refund, "refund_status", str, what)
                          ) not in UNDONE:
                refunded += major_to_minor(
                    required(self.name, refund, "refund_amount", (int, Decimal), what), currency)
        return ChargeSnapshot(provider=self.name, charge_id=str(order["order_id"]), currency=currency,
                              merchant_account=self._merchant_account, amount=amount,
                              amount_captured=amount if paid else 0, captured=paid,
                              amount_refunded=refunded, dispute_count=len(disputes))

    async def _list(self, path: str, what: str) -> list[Any]:
        """A per-order list (Cashfree answers a JSON array); anything else is malformed."""
        answer = await self._api.call("GET", path)
        if not isinstance(answer, list):
            raise MalformedAnswer(f"{self.name}: {path} answered no list of {what}: {str(answer)[:200]}")
        return answer

    async def create_refund(self, request: RefundRequest, idempotency_key: str) -> ProviderRefund:
        body = {"refund_amount": minor_to_major(request.amount, request.currency),
                "refund_id": request.refund_request_id, "refund_note": request.reason.value,
                "refund_speed": "STANDARD"}
        try:
            refund = await self._api.call(
                "POST", f"/orders/{quote(request.charge_id, safe='')}/refunds", content=exact_json(body),
                headers={"x-idempotency-key": idempotency_key, "content-type": "application/json"})
        except ProviderDeclined:
            # Cashfree refuses a refund_id it holds ("Duplicate Merchant Refund Id"), and an
            # amount past what is left: after an earlier create landed unseen, either refusal
            # is about our own refund. Where it stands on the order, it is the answer.
            if (made := await self.find_refund(request)) is not None:
                return made
            raise
        return _refund(self.name, refund, charge_id=request.charge_id, ours=True)

    async def find_refund(self, request: RefundRequest) -> ProviderRefund | None:
        path = (f"/orders/{quote(request.charge_id, safe='')}/refunds/"
                f"{quote(request.refund_request_id, safe='')}")
        refund = await self._api.call("GET", path, missing_ok=True)
        return None if refund is None else _refund(self.name, refund, charge_id=request.charge_id,
                                                   ours=True)
