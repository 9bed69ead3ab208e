"""Rainforest adapter: refund webhooks verified Standard-Webhooks style and normalised;
with API settings, refunds on payins through Rainforest's API (`RainforestApiProvider`).

Without them (`RainforestProvider`) creating and looking up refunds is refused as
unsupported (a case naming this provider is rejected, nothing moves) rather than guessed.
Its webhooks, `{data, event_type}` with `refund.<status>` types, are fully handled.
The verifier is pluggable; the default is the Svix / Standard Webhooks scheme its
deliveries use (`svix-id`, `svix-timestamp`, `svix-signature`).
"""

import hashlib
import hmac
from collections.abc import AsyncGenerator, Callable, Collection, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from svix.webhooks import Webhook as SvixWebhook

from adapters.providers.base import (
    ProviderDeclined,
    ProviderError,
    ProviderOutcomeUnknown,
    WebhookRejected,
    not_served,
    only_refund,
)
from adapters.providers.http import JsonApi, JsonApiAdapter
from adapters.providers.normalise import (
    REFERENCE_KEY,
    UNREADABLE,
    MalformedAnswer,
    load_json,
    map_status,
    normalising,
    refund_event,
    require_known,
    required,
    unreadable,
)
from adapters.providers.signing import (
    VerifiedWebhooksOnly,
    WebhookVerifier,
    check_window,
    require_header,
    unix_time,
)
from adapters.providers.units import ISO_UNITS, minor_units
from domain.models import (
    ChargeSnapshot,
    EventKind,
    ProviderEvent,
    ProviderRefund,
    ProviderRefundStatus,
    RefundRequest,
)
from domain.money import normalise_currency
from domain.reconciliation import ListedRefund, UnmappedListing

STATUSES = {
    "CREATED": ProviderRefundStatus.PENDING,  # created, waiting for Rainforest's approval
    "PROCESSING": ProviderRefundStatus.PENDING,
    "IN_REVIEW": ProviderRefundStatus.IN_REVIEW,
    "SUCCEEDED": ProviderRefundStatus.SUCCEEDED,
    "FAILED": ProviderRefundStatus.FAILED,
    "CANCELED": ProviderRefundStatus.CANCELED,
}
KNOWN_EVENT_TYPES = frozenset(f"refund.{s.lower()}" for s in STATUSES)
WHOLE_REFUND = ("payin_id", "amount", "currency_code")
"""The fields of a whole refund object (refund.created's table, the API's answers): an event
carrying any of them is read as one, and needs them all."""
UNDONE = frozenset({ProviderRefundStatus.FAILED, ProviderRefundStatus.CANCELED})
"""Refunds that hold no money: every other status counts as refunded (the guard's side)."""
API_VERSION = "2024-10-16"
LIST_PAGE = 100


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
        sent_at = unix_time(stamp, "svix-timestamp")
        try:
            data = body.decode()
            at = datetime.fromtimestamp(sent_at, UTC)
        except (ValueError, OverflowError, OSError):  # not UTF-8; a time past year 9999
            raise WebhookRejected("bad_signature", "timestamp or body cannot be signed") from None
        expected = [s.sign(msg_id, at, data).encode() for s in self._signers]
        offered = [sig.encode() for sig in signatures.split()]
        if not any(hmac.compare_digest(o, e) for o in offered for e in expected):
            raise WebhookRejected("bad_signature", "no valid v1 signature for this body")
        check_window(sent_at, now, self._tolerance)


def _refund(provider: str, data: Mapping[str, Any]) -> ProviderRefund:
    status = map_status(provider, STATUSES, data["status"])
    return ProviderRefund(
        provider=provider, refund_id=str(data["refund_id"]), charge_id=str(data["payin_id"]),
        amount=minor_units(data["amount"]), currency=normalise_currency(str(data["currency_code"])),
        status=status, raw_status=str(data["status"]), failure_reason=_refusal(status, data),
        reference=_reference(data),
    )


def _refusal(status: ProviderRefundStatus, data: Mapping[str, Any]) -> str | None:
    """A failed refund's refusal code and text, as one reason."""
    if status is not ProviderRefundStatus.FAILED:
        return None
    return ": ".join(str(data[k]) for k in ("refusal_code", "refusal_desc") if data.get(k)) or None


def _status_only(provider: str, data: Mapping[str, Any], **envelope: Any) -> ProviderEvent:
    """A status change as Rainforest's docs tabulate refund.processing, .succeeded, .failed,
    .canceled and .in_review: the refund's id and status (a failure's refusal), without its
    payin, amount or currency. Only the case holding that refund can read it (the relay
    completes it from that case); no case is opened from it."""
    status = map_status(provider, STATUSES, data["status"])
    return ProviderEvent(provider=provider, kind=EventKind.REFUND_STATUS, refund_id=str(data["refund_id"]),
                         status=status, raw_status=str(data["status"]), failure_reason=_refusal(status, data),
                         refund_request_id=_reference(data), **envelope)


def _reference(data: Mapping[str, Any]) -> str | None:
    """Our refund_request_id, kept in a refund's metadata when we made it."""
    metadata = data.get("metadata")
    return metadata.get(REFERENCE_KEY) if isinstance(metadata, Mapping) else None


class RainforestProvider(VerifiedWebhooksOnly):
    """Rainforest refund webhooks only: every API call is refused as unsupported."""

    name = "rainforest"
    event_types = KNOWN_EVENT_TYPES

    def __init__(self, *, webhook_secrets: Sequence[str], tolerance_seconds: int = 300,
                 verifier: WebhookVerifier | None = None, name: str | None = None,
                 merchant_ids: Collection[str] = ()) -> None:
        super().__init__(webhook_secrets=webhook_secrets, tolerance_seconds=tolerance_seconds,
                         verifier=verifier, name=name)
        self._merchant_ids = frozenset(merchant_ids)

    def _own_verifier(self, secrets: Sequence[str], tolerance_seconds: int) -> WebhookVerifier:
        return SvixVerifier(secrets, tolerance_seconds=tolerance_seconds)

    def _not_served(self, merchant_id: object) -> str | None:
        """Why `merchant_id` is not one this deployment serves (None when it is, or when no
        list is configured): a platform's webhooks and API key cover every merchant on it."""
        return not_served(self._merchant_ids, merchant_id, "merchant", "REFUNDS_RAINFOREST_MERCHANT_IDS")

    def parse_webhook(self, headers: Mapping[str, str], body: bytes, now: float) -> ProviderEvent:
        self._verifier.verify(headers, body, now)
        event_id = _header(headers, "id")
        payload = load_json(body)
        with normalising(event_id, None):
            event_type, data = str(payload["event_type"]), payload["data"]
        require_known(event_type, KNOWN_EVENT_TYPES, event_id)
        with normalising(event_id, event_type):
            merchant_id = data.get("merchant_id")
            whole = any(key in data for key in WHOLE_REFUND)
        # an event naming only its refund moves only the case holding that refund, one made
        # for a merchant served here: the merchant check is for what could open a case
        if (whole or merchant_id is not None) and (refusal := self._not_served(merchant_id)):
            raise WebhookRejected("foreign_account", refusal, event_id=event_id, event_type=event_type)
        with normalising(event_id, event_type):
            stamp = data.get("updated_at") or data.get("created_at")
            occurred = (datetime.fromisoformat(stamp) if stamp
                        else datetime.fromtimestamp(int(_header(headers, "timestamp")), UTC))
            digest = hashlib.sha256(body).hexdigest()
            if not whole:
                return _status_only(self.name, data, event_id=event_id, event_type=event_type,
                                    body_sha256=digest, occurred_at=occurred, merchant_account=merchant_id)
            return refund_event(_refund(self.name, data), event_id=event_id, event_type=event_type,
                                body_sha256=digest, occurred_at=occurred, merchant_account=merchant_id)


def _data(answer: Any) -> Any:
    """Rainforest answers `{"status": "SUCCESS", "data": ...}`; anything else is not an answer."""
    if not isinstance(answer, dict) or answer.get("status") != "SUCCESS" or "data" not in answer:
        raise ProviderOutcomeUnknown(f"rainforest: unreadable answer {str(answer)[:200]}")
    return answer["data"]


def _listed(provider: str, obj: Mapping[str, Any]) -> ListedRefund | UnmappedListing:
    """One listed refund; one no rule can read is a break for ops, as for Stripe (`listed`)."""
    try:
        created, object_id = datetime.fromisoformat(str(obj["created_at"])), str(obj["refund_id"])
    except (KeyError, ValueError) as exc:
        raise MalformedAnswer(f"{provider}: listed refund {obj.get('refund_id')!r} has no usable "
                              f"'created_at' or 'refund_id' ({type(exc).__name__}: {exc})") from None
    try:
        return ListedRefund(refund=_refund(provider, obj), created=created)
    except UNREADABLE as exc:
        return unreadable(provider, exc, created, ISO_UNITS, object_id=object_id, status=obj.get("status"),
                          amount=obj.get("amount"), currency=obj.get("currency_code"))


class RainforestApiProvider(JsonApiAdapter, RainforestProvider):
    """Rainforest's API (Bearer API key, `Rainforest-Api-Version: 2024-10-16`), where a
    charge is a payin. Amounts are integer minor units, as on the webhooks.

    - `get_charge`: `GET /v1/payins/{payin_id}`; SUCCEEDED is captured, for its amount;
      refunded is the sum of its `refunds` not failed or canceled, and its disputes are its
      `chargebacks` (a payin without either list is a malformed answer, never zero).
    - `create_refund`: `POST /v1/payins/{payin_id}/refund` carrying the idempotency key
      (Rainforest takes it in the body: `idempotency_key`) and our refund_request_id in
      `metadata`, which the refund's webhooks echo.
    - `find_refund`: the payin's refunds (`GET /v1/payins/{payin_id}`, whose refund fields
      the webhooks mirror) whose metadata carries our reference; a payin answered without
      its `refunds` list is an error, not "no refund".
    - `list_refunds`: `GET /v1/refunds` over `created_at` in the window, newest first, a
      page at a time by Rainforest's `next_page_token`.

    The paths and list parameters are read from Rainforest's reference as far as it was
    available here; the object fields are those its webhook documentation shows.
    """

    def __init__(self, *, api_base: str, api_key: str, webhook_secrets: Sequence[str],
                 timeout_seconds: float = 10.0, tolerance_seconds: int = 300,
                 name: str = "rainforest", merchant_ids: Collection[str] = ()) -> None:
        super().__init__(webhook_secrets=webhook_secrets, tolerance_seconds=tolerance_seconds, name=name,
                         merchant_ids=merchant_ids)
        self._api = JsonApi(api_base, timeout_seconds=timeout_seconds, headers={
            "Authorization": f"Bearer {api_key}", "Rainforest-Api-Version": API_VERSION})

    async def _payin(self, payin_id: str) -> dict[str, Any] | None:
        answer = await self._api.call("GET", f"/v1/payins/{quote(payin_id, safe='')}", missing_ok=True)
        return None if answer is None else dict(_data(answer))

    def _refunds_of(self, payin: Mapping[str, Any],
                    which: Callable[[Mapping[str, Any]], bool] = lambda _: True) -> list[ProviderRefund]:
        """The payin's refunds (those `which` picks from the raw entries, before they are
        read: another refund's unmapped status says nothing about ours); a payin without
        its `refunds` list is an unreadable answer."""
        what = f"payin {payin.get('payin_id')}"
        return [_refund(self.name, r) for r in required(self.name, payin, "refunds", list, what)
                if which(r)]

    async def get_charge(self, charge_id: str) -> ChargeSnapshot | None:
        payin = await self._payin(charge_id)
        if payin is None:
            return None
        if refusal := self._not_served(payin.get("merchant_id")):
            raise ProviderDeclined(f"{self.name}: the payin's {refusal}")
        amount = minor_units(payin["amount"])
        captured = payin["status"] == "SUCCEEDED"
        chargebacks = required(self.name, payin, "chargebacks", list, f"payin {charge_id}")
        return ChargeSnapshot(provider=self.name, charge_id=str(payin["payin_id"]),
                              currency=normalise_currency(str(payin["currency_code"])),
                              merchant_account=str(payin["merchant_id"]), amount=amount,
                              amount_captured=amount if captured else 0, captured=captured,
                              amount_refunded=sum(r.amount for r in self._refunds_of(payin)
                                                  if r.status not in UNDONE),
                              dispute_count=len(chargebacks))

    async def create_refund(self, request: RefundRequest, idempotency_key: str) -> ProviderRefund:
        if refusal := self._not_served(request.merchant_account):
            raise ProviderDeclined(f"{self.name}: {refusal}; nothing was sent")
        answer = await self._api.call(
            "POST", f"/v1/payins/{quote(request.charge_id, safe='')}/refund",
            json={"amount": request.amount, "idempotency_key": idempotency_key,
                  "reason": request.reason.value,
                  "metadata": {REFERENCE_KEY: request.refund_request_id}})
        return _refund(self.name, _data(answer))

    async def find_refund(self, request: RefundRequest) -> ProviderRefund | None:
        """Our refund of the payin, found by our reference. The payin was read by validation
        and submitted against, so its 404 says nothing about the refund: a failed lookup
        (outcome unknown), never "no refund", which would allow a resubmit or a release."""
        payin = await self._payin(request.charge_id)
        if payin is None:
            raise ProviderError(f"{self.name}: payin {request.charge_id} not found on lookup; "
                                "the refund's outcome is unknown")
        found = self._refunds_of(payin, lambda r: _reference(r) == request.refund_request_id)
        return only_refund(self.name, request.refund_request_id, found)

    async def get_refund(self, refund_id: str, charge_id: str) -> ProviderRefund | None:
        """Read through its payin, as the payin lists its refunds."""
        payin = await self._payin(charge_id)
        return None if payin is None else next(
            iter(self._refunds_of(payin, lambda r: str(r.get("refund_id")) == refund_id)), None)

    async def list_refunds(self, since: datetime, until: datetime,
                           starting_after: str | None = None,
                           ) -> AsyncGenerator[ListedRefund | UnmappedListing]:
        """Rainforest pages by token, not by object: resuming after `starting_after` reads
        the window from its newest refund and yields only what follows that refund."""
        params: dict[str, Any] = {"created_at_start": since.astimezone(UTC).isoformat(),
                                  "created_at_end": until.astimezone(UTC).isoformat(), "limit": LIST_PAGE}
        skipping = starting_after is not None
        while True:
            page = _data(await self._api.call("GET", "/v1/refunds", params=params))
            for obj in page["results"]:
                if skipping:
                    skipping = str(obj["refund_id"]) != starting_after
                    continue
                if self._not_served(obj.get("merchant_id")) is None:  # the platform lists them all
                    yield _listed(self.name, obj)
            if not page.get("next_page_token") or not page["results"]:
                return
            params["page_token"] = page["next_page_token"]
