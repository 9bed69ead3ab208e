"""Adapter for the project's own sandbox provider (Stripe-shaped JSON API and webhooks).

Webhooks are signed like Stripe's: header `Sandbox-Signature: t=<unix>,v1=<hex>` where
v1 = HMAC-SHA256(secret, "<t>.<raw body>"); several secrets are accepted during rotation.
"""

import hashlib
import hmac
from collections.abc import AsyncGenerator, Mapping, Sequence
from datetime import datetime
from typing import Any

import httpx

from adapters.providers.base import (
    UNDOCUMENTED_MAXIMUM,
    ProviderDeclined,
    ProviderOutcomeUnknown,
    only_refund,
)
from adapters.providers.http import provider_client, raise_for_refusal, send
from adapters.providers.normalise import (
    IDENTITY_STATUSES,
    PAYOUT_REFERENCE_KEY,
    listed,
    normalising,
    payout_event,
    refund_event,
    stripe_envelope,
    stripe_shaped_found_payout,
    stripe_shaped_payout,
    stripe_shaped_refund,
    unix_bound,
)
from adapters.providers.signing import StripeSchemeVerifier
from adapters.providers.units import ISO_UNITS, minor_units
from domain.models import (
    ChargeSnapshot,
    EventKind,
    ProviderEvent,
    ProviderRefund,
    RefundReason,
    RefundRequest,
)
from domain.payouts import FoundPayout, PayoutEvent, PayoutOrder, ProviderPayout, ProviderPayoutStatus
from domain.reconciliation import ListedPayout, ListedRefund, UnmappedListing

SIGNATURE_HEADER = "sandbox-signature"
REFUND_STATUS_EVENTS = frozenset({"refund.created", "refund.updated", "refund.failed"})
REQUEST_EVENTS = frozenset({"refund.requested"})
PAYOUT_EVENTS = frozenset({"payout.paid", "payout.failed", "payout.settlement_failed", "payout.reversed"})
KNOWN_EVENT_TYPES = REFUND_STATUS_EVENTS | REQUEST_EVENTS | PAYOUT_EVENTS
# A settlement failure is a failure that comes after the payout showed paid.
PAYOUT_STATUSES = {"paid": ProviderPayoutStatus.PAID, "failed": ProviderPayoutStatus.FAILED,
                   "settlement_failed": ProviderPayoutStatus.FAILED,
                   "reversed": ProviderPayoutStatus.REVERSED}
LIST_PAGE = 100


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The signature header value for a body sent at `timestamp`."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def refund_from_object(provider: str, obj: Mapping[str, Any]) -> ProviderRefund:
    """Maps a sandbox refund object (Stripe-shaped, with all six canonical statuses)."""
    return stripe_shaped_refund(provider, obj, IDENTITY_STATUSES, ISO_UNITS)


class SandboxProvider:
    """Client of the sandbox provider's HTTP API."""

    event_types = KNOWN_EVENT_TYPES
    max_amount = UNDOCUMENTED_MAXIMUM
    units = ISO_UNITS

    def __init__(self, base_url: str, *, webhook_secrets: Sequence[str], api_key: str | None = None,
                 timeout_seconds: float = 10.0, tolerance_seconds: int = 300,
                 name: str = "sandbox") -> None:
        self.name = name
        self._verifier = StripeSchemeVerifier(webhook_secrets, tolerance_seconds=tolerance_seconds,
                                              header=SIGNATURE_HEADER)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = provider_client(base_url=base_url, timeout=timeout_seconds, headers=headers)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return await send(self._http, method, path, **kwargs)

    async def get_charge(self, charge_id: str) -> ChargeSnapshot | None:
        response = await self._call("GET", f"/v1/charges/{charge_id}")
        if response.status_code == 404:
            return None
        raise_for_refusal(response)
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
        raise_for_refusal(response)
        return refund_from_object(self.name, response.json())

    async def find_refund(self, request: RefundRequest) -> ProviderRefund | None:
        """Ours by the reference in metadata, oldest first."""
        found = [refund for o in await self._every_page("/v1/refunds", {
                     "charge": request.charge_id, "reference": request.refund_request_id})
                 if (refund := refund_from_object(self.name, o)).reference == request.refund_request_id]
        return only_refund(self.name, request.refund_request_id, found[::-1])

    async def _every_page(self, path: str, params: dict[str, str]) -> list[dict[str, Any]]:
        """Every object of a filtered lookup, page after page: a Stripe-shaped server may
        ignore the filter and list everything, so the caller matches. "More" after an empty
        page is no answer (what was read is not all there is)."""
        objects: list[dict[str, Any]] = []
        while True:
            response = await self._call("GET", path, params=params)
            raise_for_refusal(response)
            page = response.json()
            objects += page["data"]
            if not page.get("has_more") or not page["data"]:  # "more" after an empty page: no last id
                return objects
            params = {**params, "starting_after": str(page["data"][-1]["id"])}

    async def get_refund(self, refund_id: str, charge_id: str) -> ProviderRefund | None:
        response = await self._call("GET", f"/v1/refunds/{refund_id}")
        if response.status_code == 404:
            return None
        raise_for_refusal(response)
        return refund_from_object(self.name, response.json())

    async def list_refunds(self, since: datetime, until: datetime,
                           starting_after: str | None = None,
                           ) -> AsyncGenerator[ListedRefund | UnmappedListing]:
        """Pages through GET /v1/refunds, one page in memory at a time."""
        async for obj in self._list("/v1/refunds", since, until, starting_after):
            yield listed(self.name, obj, ISO_UNITS, lambda o, created: ListedRefund(
                refund=refund_from_object(self.name, o), created=created))

    async def list_payouts(self, since: datetime, until: datetime,
                           starting_after: str | None = None,
                           ) -> AsyncGenerator[ListedPayout | UnmappedListing]:
        """Pages through GET /v1/payouts, one page in memory at a time."""
        async for obj in self._list("/v1/payouts", since, until, starting_after):
            yield listed(self.name, obj, ISO_UNITS, lambda o, created: ListedPayout(
                payout=stripe_shaped_payout(self.name, o, PAYOUT_STATUSES, ISO_UNITS), created=created))

    async def _list(self, path: str, since: datetime, until: datetime,
                    starting_after: str | None) -> AsyncGenerator[dict[str, Any]]:
        """Stripe's list paging (cursor and `created` filters), newest first."""
        params: dict[str, Any] = {"created[gte]": unix_bound(since), "created[lt]": unix_bound(until),
                                  "limit": LIST_PAGE}
        cursor = starting_after
        while True:
            response = await self._call("GET", path,
                                        params={**params, **({"starting_after": cursor} if cursor else {})})
            if response.status_code >= 400:
                raise ProviderDeclined(f"listing {path}: HTTP {response.status_code} {response.text[:300]}")
            page = response.json()
            for obj in page["data"]:
                yield obj
            if not page["has_more"] or not page["data"]:
                return
            cursor = str(page["data"][-1]["id"])

    async def create_payout(self, order: PayoutOrder, idempotency_key: str) -> ProviderPayout:
        response = await self._call(
            "POST", "/v1/payouts", headers={"Idempotency-Key": idempotency_key},
            json={"amount": order.amount, "currency": order.currency.lower(),
                  "destination": order.beneficiary_id,
                  "metadata": {PAYOUT_REFERENCE_KEY: order.reference}})
        raise_for_refusal(response)
        return stripe_shaped_payout(self.name, response.json(), PAYOUT_STATUSES, ISO_UNITS)

    async def find_payout(self, reference: str) -> FoundPayout | None:
        """The payout with our reference; two are no answer (one debt paid twice: ops)."""
        found = [payout for o in await self._every_page("/v1/payouts", {"reference": reference})
                 if (payout := stripe_shaped_found_payout(self.name, o, PAYOUT_STATUSES, ISO_UNITS)).reference
                 == reference]
        if len(found) > 1:
            raise ProviderOutcomeUnknown(f"{len(found)} payouts carry the reference {reference}: "
                                         f"{', '.join(p.payout_id for p in found)}")
        return found[0] if found else None

    async def get_payout(self, payout_id: str) -> ProviderPayout | None:
        response = await self._call("GET", f"/v1/payouts/{payout_id}")
        if response.status_code == 404:
            return None
        raise_for_refusal(response)
        return stripe_shaped_payout(self.name, response.json(), PAYOUT_STATUSES, ISO_UNITS)

    def parse_webhook(self, headers: Mapping[str, str], body: bytes,
                      now: float) -> ProviderEvent | PayoutEvent:
        self._verifier.verify(headers, body, now)
        env = stripe_envelope(body, KNOWN_EVENT_TYPES)
        obj = env.obj
        with normalising(env.event_id, env.event_type):
            if env.event_type in PAYOUT_EVENTS:
                return payout_event(stripe_shaped_payout(self.name, obj, PAYOUT_STATUSES, ISO_UNITS), env)
            if env.event_type in REQUEST_EVENTS:
                return ProviderEvent(
                    provider=self.name, event_id=env.event_id, event_type=env.event_type,
                    kind=EventKind.REFUND_REQUESTED, body_sha256=env.body_sha256,
                    occurred_at=env.occurred_at, request_object_id=str(obj["id"]),
                    charge_id=str(obj["charge"]), amount=minor_units(obj["amount"]),
                    currency=str(obj["currency"]).upper(), merchant_account=str(obj["merchant_account"]),
                    reason=RefundReason(obj.get("reason") or "requested_by_customer"),
                    evidence={str(k): str(v) for k, v in (obj.get("evidence") or {}).items()},
                )
            return refund_event(refund_from_object(self.name, obj), event_id=env.event_id,
                                event_type=env.event_type, body_sha256=env.body_sha256,
                                occurred_at=env.occurred_at)
