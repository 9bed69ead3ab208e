"""Adyen adapter: refund and payout notifications verified by their HMAC and normalised;
refunds created through the Checkout API.

Adyen signs each notification item, not the request: HMAC-SHA256 with a hex key over
pspReference:originalReference:merchantAccountCode:merchantReference:value:currency:
eventCode:success, base64 in `additionalData.hmacSignature`. The signature carries no
time, so there is no `stale` verdict: the dedup key (eventCode + pspReference + success,
kept forever in `webhook_events`) is what stops a replay from acting twice.

A request may carry several items (`notificationItems` is a list, each item signed on its
own): `split_batch` gives the relay one single-item notification per item (when one of them
at least is Adyen's), each then its own delivery with its own receipt, verdict and dedup
key. The relay answers `[accepted]`, which Adyen requires, only when every item got a 2xx;
otherwise Adyen sends the whole request again, and the items that acted already are
duplicates.

Adyen has no refund-status lookup: `find_refund` raises `ProviderLookupUnsupported` and
the workflow waits for the notification (escalating on a timer to ops review, where ops
can resolve it) instead of resubmitting. Only a create that certainly never reached Adyen
(the connection was never made) is sent again, with the same Idempotency-Key, a bounded
number of times; when none connects, nothing exists and the create is refused
(`ProviderNotReached`).
Adyen has no payment lookup either, so a charge snapshot comes only from a `ChargeSource`:
in production the `payment_notifications` table (`adapters.db.payments`), which the relay
fills from AUTHORISATION, CAPTURE, CAPTURE_FAILED and CANCELLATION notifications, the
dispute ones (the prior-disputes rule's count) and the refund ones (`record_notification`).
Payment notifications never start a workflow. Without a source (no store), requests are
rejected at validation.
"""

import asyncio
import base64
import hashlib
import hmac
import json
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import httpx

from adapters.providers.base import (
    UNDOCUMENTED_MAXIMUM,
    ProviderDeclined,
    ProviderLookupUnsupported,
    ProviderOutcomeUnknown,
    ProviderUnsupported,
    WebhookRejected,
    not_served,
)
from adapters.providers.http import provider_client, raise_for_refusal, send
from adapters.providers.normalise import (
    load_json,
    map_status,
    normalising,
    outgoing_amount,
    refund_event,
    require_known,
)
from adapters.providers.units import MinorUnits
from domain.models import (
    ChargeSnapshot,
    ProviderEvent,
    ProviderRefund,
    ProviderRefundStatus,
    RefundRequest,
)
from domain.money import normalise_currency
from domain.payments import PaymentEvent, PaymentStatus
from domain.payouts import PayoutEvent, ProviderPayout, ProviderPayoutStatus

ACKNOWLEDGEMENT = "[accepted]"
SIGNED_FIELDS = ("pspReference", "originalReference", "merchantAccountCode", "merchantReference")
UNSPLIT_FIELDS = SIGNED_FIELDS[:3]
"""Adyen's own identifiers, which never hold a ':'. The signing string joins the signed fields
with ':' unescaped and our case ids (the merchantReference) may hold one: a copied item split
again at it keeps its signature under another pspReference (a new event). With a ':' allowed
only in the merchantReference, no split but Adyen's own passes."""
MAX_BATCH_ITEMS = 100
"""The most items one request is split into: each is a receipt and a transaction of its own,
and a stranger's body of thousands of tiny items should cost one refusal, not thousands."""
API_VERSION = "v71"
SAMPLE_PREFIX = "test_"
"""How the pspReference of Adyen's sample notifications (its webhook test) begins; Adyen's
own are 16 letters and digits."""

# Raw status = eventCode:success[:modification.action]. A combination outside the table
# (e.g. CANCEL_OR_REFUND without its action) is refused loudly, never defaulted.
STATUSES = {
    "REFUND:true": ProviderRefundStatus.SUCCEEDED,
    "REFUND:false": ProviderRefundStatus.FAILED,
    "REFUND_FAILED:true": ProviderRefundStatus.FAILED,
    "REFUNDED_REVERSED:true": ProviderRefundStatus.FAILED,  # after success: a late failure
    "REFUND_WITH_DATA:true": ProviderRefundStatus.SUCCEEDED,
    "REFUND_WITH_DATA:false": ProviderRefundStatus.FAILED,
    "CANCEL_OR_REFUND:true:refund": ProviderRefundStatus.SUCCEEDED,
    "CANCEL_OR_REFUND:true:cancel": ProviderRefundStatus.CANCELED,
    "CANCEL_OR_REFUND:false": ProviderRefundStatus.FAILED,
}
CREATE_STATUSES = {"received": ProviderRefundStatus.PENDING}
"""The Checkout API only acknowledges a refund; its outcome arrives as a notification."""
PAYOUT_STATUSES = {
    "PAYOUT_THIRDPARTY:true": ProviderPayoutStatus.PAID,
    "PAYOUT_THIRDPARTY:false": ProviderPayoutStatus.FAILED,
    "PAYOUT_DECLINE:true": ProviderPayoutStatus.CANCELED,  # declined in review: never paid
    "PAYOUT_EXPIRE:true": ProviderPayoutStatus.CANCELED,  # not confirmed in time: never paid
    "PAIDOUT_REVERSED:true": ProviderPayoutStatus.REVERSED,
}
PAYMENT_STATUSES = {
    "AUTHORISATION:true": PaymentStatus.AUTHORISED,
    "AUTHORISATION:false": PaymentStatus.REFUSED,
    "CAPTURE:true": PaymentStatus.CAPTURED,
    "CAPTURE:false": PaymentStatus.CAPTURE_FAILED,
    "CAPTURE_FAILED:true": PaymentStatus.CAPTURE_FAILED,  # the scheme rejected a capture reported done
    "CANCELLATION:true": PaymentStatus.CANCELLED,
    "CANCELLATION:false": PaymentStatus.CANCEL_FAILED,
    # Dispute events: pspReference is the dispute's, originalReference the disputed payment.
    "NOTIFICATION_OF_CHARGEBACK:true": PaymentStatus.DISPUTED,
    "REQUEST_FOR_INFORMATION:true": PaymentStatus.DISPUTED,
    "CHARGEBACK:true": PaymentStatus.DISPUTED,
    "DISPUTE_OPENED_WITH_CHARGEBACK:true": PaymentStatus.DISPUTED,
}
REFUND_EVENTS = frozenset(s.split(":")[0] for s in STATUSES)
PAYOUT_EVENTS = frozenset(s.split(":")[0] for s in PAYOUT_STATUSES)
PAYMENT_EVENTS = frozenset(s.split(":")[0] for s in PAYMENT_STATUSES)
KNOWN_EVENT_TYPES = REFUND_EVENTS | PAYOUT_EVENTS | PAYMENT_EVENTS

UNITS = MinorUnits(
    decimals={"CLP": 2, "CVE": 0, "IDR": 0, "ISK": 2},
    source="https://docs.adyen.com/development-resources/currency-codes: the currencies marked "
           "'differs from standard'")
NEVER_SENT = (httpx.ConnectError, httpx.ConnectTimeout)
"""Transport errors raised before a connection existed: no byte of the request left us."""


class ProviderNotReached(ProviderDeclined):
    """Every attempt failed to connect, so no request reached Adyen and no refund exists:
    a definite no (the case fails and can be reissued), not an outcome to wait for."""


ChargeSource = Callable[[str], Awaitable[ChargeSnapshot | None]]
"""Where a deployment keeps what Adyen told it about a payment (by pspReference)."""
NotificationSink = Callable[[PaymentEvent | ProviderEvent], Awaitable[None]]
"""Where the relay keeps what each payment or refund notification said (feeds a ChargeSource)."""


def signing_string(item: Mapping[str, Any]) -> str:
    """Adyen's documented field order, joined with ':' (absent fields are empty)."""
    amount = item.get("amount")
    amount = amount if isinstance(amount, dict) else {}
    values = [item.get(k) for k in SIGNED_FIELDS]
    values += [amount.get("value"), amount.get("currency"), item.get("eventCode"), item.get("success")]
    return ":".join("" if v is None else str(v) for v in values)


def sign(hex_key: str, item: Mapping[str, Any]) -> str:
    """The `hmacSignature` Adyen puts on this item for a hex HMAC key. Half a surrogate pair
    (JSON can escape one; no text Adyen signs holds one) is kept as its bytes, so it fails
    the comparison rather than the encoding."""
    mac = hmac.new(bytes.fromhex(hex_key), signing_string(item).encode("utf-8", "surrogatepass"),
                   hashlib.sha256).digest()
    return base64.b64encode(mac).decode()


class AdyenHmacVerifier:
    """Adyen's per-item HMAC with any of the configured keys (rotation), compared in
    constant time. Unlike the header schemes it reads the signature from the item."""

    def __init__(self, hex_keys: Sequence[str]) -> None:
        for key in hex_keys:  # a key that is not hex is a startup error, not a refusal later
            try:
                bytes.fromhex(key)
            except ValueError:
                raise ValueError("REFUNDS_ADYEN_HMAC_KEYS: each key must be hexadecimal, as Adyen's "
                                 "Customer Area shows it") from None
        self._keys = list(hex_keys)

    def verify_item(self, item: Mapping[str, Any]) -> None:
        for field in UNSPLIT_FIELDS:  # see UNSPLIT_FIELDS: the signature cannot tell them apart
            if ":" in str(item.get(field) or ""):
                raise WebhookRejected("malformed", f"{field} holds a ':', which no Adyen identifier "
                                      "does and Adyen's signing string cannot tell apart")
        additional = item.get("additionalData")
        if not isinstance(additional, dict):
            raise WebhookRejected("bad_signature", "additionalData (with the hmacSignature) is not an object")
        offered = str(additional.get("hmacSignature") or "")
        if not offered:
            raise WebhookRejected("bad_signature", "missing additionalData.hmacSignature")
        if not any(hmac.compare_digest(offered.encode("utf-8", "surrogatepass"),
                                       sign(k, item).encode()) for k in self._keys):
            raise WebhookRejected("bad_signature", "hmacSignature does not match this notification item")


LIVE_HOST = re.compile(r"-checkout-live(-[a-z]+)?\.adyenpayments\.com$")
"""Adyen's live Checkout hosts: `<prefix>-checkout-live.adyenpayments.com`, and the regional
ones (`-checkout-live-us`, `-au`, `-apse`, `-in`, `-nea`)."""


def api_environment(api_base: str | None) -> bool | None:
    """Whether a Checkout API base is one of Adyen's live hosts, its test one
    (`checkout-test.adyen.com`), or None for another (an emulator's)."""
    host = urlsplit(api_base).hostname if api_base else None
    if host is None:
        return None
    if LIVE_HOST.search(host):
        return True
    return False if host == "checkout-test.adyen.com" else None


def only_item(payload: Any) -> dict[str, Any]:
    """The notification's single item (the relay splits a batch first, see
    `AdyenProvider.split_batch`). Read before its signature is checked (the HMAC is inside
    the item): `malformed`."""
    with normalising(None, None, signed=False):
        items = payload["notificationItems"]
        if not isinstance(items, list) or not items:
            raise ValueError("notificationItems is empty")
        if len(items) > 1:
            raise ValueError(f"{len(items)} notification items in one request; one is expected")
        item = items[0]["NotificationRequestItem"]
        if not isinstance(item, dict):
            raise TypeError("NotificationRequestItem is not an object")
        return item


def _raw_status(item: Mapping[str, Any]) -> str:
    raw = f"{item['eventCode']}:{item['success']}"
    if item["eventCode"] == "CANCEL_OR_REFUND" and item["success"] == "true":
        action = (item.get("additionalData") or {}).get("modification.action")
        raw += f":{action}" if action else ""
    return raw


def _amount(item: Mapping[str, Any]) -> tuple[int, str]:
    """A notification's `amount` ({value, currency}, value in Adyen's units) in our minor
    units, with its currency."""
    currency = normalise_currency(str(item["amount"]["currency"]))
    return UNITS.from_provider(item["amount"]["value"], currency), currency


def _refund(provider: str, item: Mapping[str, Any]) -> ProviderRefund:
    raw = _raw_status(item)
    status = map_status(provider, STATUSES, raw)
    failure = None
    if status is ProviderRefundStatus.FAILED:
        failure = f"{item['eventCode']}: {item.get('reason') or 'no reason given'}"
    amount, currency = _amount(item)
    return ProviderRefund(
        provider=provider, refund_id=str(item["pspReference"]),
        # A referenced refund's payment is its originalReference; REFUND_WITH_DATA has none.
        charge_id=str(item.get("originalReference") or item["pspReference"]),
        amount=amount, currency=currency, status=status, raw_status=raw, failure_reason=failure,
        reference=item.get("merchantReference") or None,
    )


def _payout(provider: str, item: Mapping[str, Any]) -> ProviderPayout:
    raw = _raw_status(item)
    status = map_status(provider, PAYOUT_STATUSES, raw, "payout")
    # A decline or reversal modifies the payout named by originalReference.
    payout_id = item.get("originalReference") if item["eventCode"] != "PAYOUT_THIRDPARTY" else None
    failed = status is not ProviderPayoutStatus.PAID
    amount, currency = _amount(item)
    return ProviderPayout(
        provider=provider, payout_id=str(payout_id or item["pspReference"]),
        amount=amount, currency=currency, status=status, raw_status=raw,
        failure_code=str(item["eventCode"]) if failed else None,
        failure_message=(item.get("reason") or None) if failed else None,
        reference=item.get("merchantReference") or None,
    )


def _payment(provider: str, item: Mapping[str, Any], **envelope: Any) -> PaymentEvent:
    status = map_status(provider, PAYMENT_STATUSES, _raw_status(item), "payment")
    psp = str(item["pspReference"])
    # A capture, cancellation or dispute is about the payment named by originalReference.
    payment_id = psp if item["eventCode"] == "AUTHORISATION" else str(item["originalReference"])
    amount, currency = _amount(item)
    return PaymentEvent(
        provider=provider, payment_id=payment_id, psp_reference=psp, status=status,
        amount=amount, currency=currency, merchant_account=str(item["merchantAccountCode"]), **envelope)


BATCH_FIELDS = ("live",)
"""A notification's top-level fields besides its items (Adyen's webhook reference)."""
REFERENCE_MAX = 80
"""Adyen's maximum for a refund's `reference` (Checkout API, PaymentRefundRequest)."""


class AdyenProvider:
    """Adyen notifications, and refunds through the Checkout API (`POST /payments/{psp}/refunds`)."""

    event_types = KNOWN_EVENT_TYPES
    max_amount = UNDOCUMENTED_MAXIMUM
    units = UNITS
    acknowledgement = ACKNOWLEDGEMENT

    def split_batch(self, body: bytes) -> list[bytes] | None:
        """Each item of a notification that carries several, as a notification of its own (with
        the request's `live`, nothing else of it); None for any other body, which
        `parse_webhook` reads or refuses whole: one of more than MAX_BATCH_ITEMS items, or
        none of whose items Adyen signed (a stranger's batch is one refusal, not one per
        item). An item's signature covers its fields, not the bytes, so it verifies as sent."""
        try:
            payload = json.loads(body)
            items = payload["notificationItems"]
            if not isinstance(items, list) or not 1 < len(items) <= MAX_BATCH_ITEMS:
                return None
            if not any(self._signed(item) for item in items):
                return None
            # only what Adyen sends beside its items: an unsigned field copied into each part
            # was stored once per item (a padded request of one captured item, many times)
            beside = {key: payload[key] for key in BATCH_FIELDS if key in payload}
            return [json.dumps({**beside, "notificationItems": [item]}, allow_nan=False).encode()
                    for item in items]
        except (ValueError, TypeError, KeyError, RecursionError):
            return None

    def _signed(self, wrapped: Any) -> bool:
        """Whether a batch's item carries Adyen's signature under one of our keys."""
        item = wrapped.get("NotificationRequestItem") if isinstance(wrapped, dict) else None
        if not isinstance(item, dict):
            return False
        try:
            self._verifier.verify_item(item)
        except WebhookRejected:
            return False
        return True

    def reference_refusal(self, reference: str) -> str | None:
        """Adyen takes a refund's `reference` (our request id: how its notifications find the
        case) up to 80 characters; a longer one would meet its refusal after the approvals."""
        if len(reference) <= REFERENCE_MAX:
            return None
        return (f"adyen takes at most {REFERENCE_MAX} characters as a refund's reference, and "
                "the refund_request_id is that reference")

    def __init__(self, *, hmac_keys: Sequence[str], api_base: str | None = None,
                 api_key: str | None = None, timeout_seconds: float = 10.0,
                 charges: ChargeSource | None = None, record: NotificationSink | None = None,
                 connect_attempts: int = 3, connect_backoff_seconds: float = 0.5,
                 merchant_accounts: Sequence[str] = (), submit_deadline_seconds: float | None = None,
                 name: str = "adyen") -> None:
        self.name = name
        self._timeout = timeout_seconds
        self._submit_deadline = submit_deadline_seconds
        self._merchant_accounts = frozenset(merchant_accounts)
        self._live = api_environment(api_base)
        self._connect_attempts = max(1, connect_attempts)
        self._connect_backoff = connect_backoff_seconds
        self._verifier = AdyenHmacVerifier(hmac_keys)
        self._charges = charges
        self._record = record
        self._http = (provider_client(base_url=api_base, timeout=timeout_seconds,
                                       headers={"X-API-Key": api_key})
                      if api_base and api_key else None)

    def _other_environment(self, payload: Mapping[str, Any]) -> str | None:
        """Why a notification is of the other environment than the API we call (a test
        webhook's at a live deployment, or the reverse), or None. `live` is outside the
        HMAC: this catches a misconfigured key, not a forger holding a test key."""
        live = payload.get("live")
        if self._live is None or live not in ("true", "false") or (live == "true") is self._live:
            return None
        return (f"a {'live' if live == 'true' else 'test'} environment's notification, and this "
                f"deployment calls Adyen's {'live' if self._live else 'test'} Checkout API")

    def _time_for_another(self, started: float, backoff: float) -> bool:
        """Whether one more try, after `backoff`, ends within the submit attempt's time: a try
        that connects after it would create a refund the case has stopped waiting for."""
        if self._submit_deadline is None:
            return True
        ends = asyncio.get_running_loop().time() - started + backoff + self._timeout
        return ends < self._submit_deadline

    def _not_served(self, account: object) -> str | None:
        """Why `account` is not one this deployment serves (None when it is, or when no
        list is configured): one HMAC key signs every account of a company-level webhook."""
        return not_served(self._merchant_accounts, account, "merchant account",
                          "REFUNDS_ADYEN_MERCHANT_ACCOUNTS")

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()

    async def get_charge(self, charge_id: str) -> ChargeSnapshot | None:
        if self._charges is None:
            raise ProviderUnsupported(f"{self.name}: Adyen has no payment lookup and no charge "
                                      "source is configured")
        charge = await self._charges(charge_id)
        if charge is not None and (refusal := self._not_served(charge.merchant_account)):
            raise ProviderDeclined(f"{self.name}: the payment's {refusal}")
        return charge

    async def record_notification(self, event: PaymentEvent | ProviderEvent) -> None:
        """Keeps what a verified notification said about a payment: the only source
        `get_charge` has. The relay calls it before routing, so a re-drive records again
        (idempotently) what a crash interrupted."""
        if self._record is not None:
            await self._record(event)

    async def create_refund(self, request: RefundRequest, idempotency_key: str) -> ProviderRefund:
        if self._http is None:
            raise ProviderUnsupported(f"{self.name}: creating a refund needs REFUNDS_ADYEN_API_BASE "
                                      "and REFUNDS_ADYEN_API_KEY")
        if refusal := self._not_served(request.merchant_account):
            raise ProviderDeclined(f"{self.name}: {refusal}; nothing was sent")
        path = f"/{API_VERSION}/payments/{request.charge_id}/refunds"
        body = {"merchantAccount": request.merchant_account,
                "amount": {"value": outgoing_amount(self.name, UNITS, request.amount, request.currency),
                           "currency": request.currency},
                # Comes back as merchantReference on the notifications: how they find the case.
                "reference": request.refund_request_id}
        started = asyncio.get_running_loop().time()
        for attempt in range(1, self._connect_attempts + 1):
            try:
                response = await send(self._http, "POST", path,
                                      headers={"Idempotency-Key": idempotency_key}, json=body)
                break
            except ProviderOutcomeUnknown as exc:
                # Adyen has no lookup: an unknown outcome means waiting for its notification.
                # A connection never made sent nothing, so the same request goes again.
                if not isinstance(exc.__cause__, NEVER_SENT):
                    raise
                backoff = self._connect_backoff * 2 ** (attempt - 1)
                if attempt == self._connect_attempts or not self._time_for_another(started, backoff):
                    raise ProviderNotReached(f"POST {path}: Adyen not reached in {attempt} attempts "
                                             f"({type(exc.__cause__).__name__}); nothing was sent") from exc
                await asyncio.sleep(backoff)
        raise_for_refusal(response)
        body = response.json()
        return ProviderRefund(
            provider=self.name, refund_id=str(body["pspReference"]), charge_id=request.charge_id,
            amount=request.amount, currency=request.currency,
            status=map_status(self.name, CREATE_STATUSES, body["status"]),
            raw_status=str(body["status"]), reference=request.refund_request_id)

    async def find_refund(self, request: RefundRequest) -> ProviderRefund | None:
        raise ProviderLookupUnsupported(f"{self.name}: Adyen has no refund-status lookup; the "
                                        "outcome arrives as a notification")

    def parse_webhook(self, headers: Mapping[str, str], body: bytes,
                      now: float) -> ProviderEvent | PayoutEvent | PaymentEvent:
        payload = load_json(body)
        item = only_item(payload)
        self._verifier.verify_item(item)
        with normalising(None, None):
            event_type = str(item["eventCode"])
            event_id = f"{event_type}:{item['pspReference']}:{item['success']}"
        if str(item["pspReference"]).startswith(SAMPLE_PREFIX):
            raise WebhookRejected("sample", "a sample notification (Adyen's webhook test): acknowledged, "
                                  "acts on nothing", event_id=event_id, event_type=event_type)
        require_known(event_type, KNOWN_EVENT_TYPES, event_id)
        if refusal := self._not_served(item.get("merchantAccountCode")) or self._other_environment(payload):
            raise WebhookRejected("foreign_account", refusal, event_id=event_id, event_type=event_type)
        digest = hashlib.sha256(body).hexdigest()
        with normalising(event_id, event_type):
            occurred = datetime.fromisoformat(str(item["eventDate"]))
            if event_type in PAYMENT_EVENTS:
                return _payment(self.name, item, event_id=event_id, event_type=event_type,
                                body_sha256=digest, occurred_at=occurred)
            if event_type in PAYOUT_EVENTS:
                return PayoutEvent(provider=self.name, event_id=event_id, event_type=event_type,
                                   body_sha256=digest, occurred_at=occurred,
                                   payout=_payout(self.name, item))
            return refund_event(_refund(self.name, item), event_id=event_id, event_type=event_type,
                                body_sha256=digest, occurred_at=occurred,
                                merchant_account=item.get("merchantAccountCode"))
