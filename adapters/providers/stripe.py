"""Stripe adapter: refunds through the `stripe` package, webhooks verified with its signature
check, everything normalised into the canonical models.

Our refund_request_id rides in the refund's metadata, so `find_refund` can look the refund
up by our reference: Stripe may prune idempotency keys after 24 h, and some Stripe-alikes
(localstripe) ignore them, so lookup-before-resend is what keeps a refund single.
The client never retries on its own (`max_network_retries=0`): after an unknown outcome
only the workflow decides, and it verifies state first.
"""

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

import stripe
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

from adapters.providers.base import (
    AmountLimit,
    ProviderConfigurationRefused,
    ProviderDeclined,
    ProviderError,
    ProviderOutcomeUnknown,
    WebhookRejected,
    only_refund,
)
from adapters.providers.http import outcome_unknown, refusal
from adapters.providers.normalise import (
    REFERENCE_KEY,
    answered_amounts,
    listed,
    normalising,
    outgoing_amount,
    payout_event,
    refund_event,
    required,
    stripe_envelope,
    stripe_shaped_payout,
    stripe_shaped_refund,
    unix_bound,
)
from adapters.providers.signing import StripeSchemeVerifier, WebhookVerifier
from adapters.providers.units import MinorUnits
from domain.models import (
    ChargeSnapshot,
    EventKind,
    ProviderEvent,
    ProviderRefund,
    ProviderRefundStatus,
    RefundRequest,
)
from domain.money import normalise_currency
from domain.payouts import PayoutEvent, ProviderPayout, ProviderPayoutStatus
from domain.reconciliation import ListedPayout, ListedRefund, UnmappedListing

log = logging.getLogger(__name__)

STATUSES = {
    "pending": ProviderRefundStatus.PENDING,
    "requires_action": ProviderRefundStatus.REQUIRES_ACTION,
    "succeeded": ProviderRefundStatus.SUCCEEDED,
    "failed": ProviderRefundStatus.FAILED,
    "canceled": ProviderRefundStatus.CANCELED,
}
REFUND_EVENTS = frozenset({"refund.created", "refund.updated", "refund.failed", "charge.refund.updated"})
CHARGE_EVENTS = frozenset({"charge.refunded"})
"""Charge-level notices: current API versions carry no refund list, so the refund.* events
that accompany them (since API version 2024-10-28 for card refunds too; before it,
`charge.refund.updated` on a refund's later changes) are what moves a case. An account on an
older version announces a dashboard refund by this event alone: reconciliation finds it."""
PAYOUT_EVENTS = frozenset({"payout.paid", "payout.failed", "payout.canceled", "payout.updated"})
"""A Stripe payout may show paid and turn failed up to five business days later."""
PAYOUT_STATUSES = {
    "pending": ProviderPayoutStatus.PENDING,
    "in_transit": ProviderPayoutStatus.PENDING,
    "paid": ProviderPayoutStatus.PAID,
    "failed": ProviderPayoutStatus.FAILED,
    "canceled": ProviderPayoutStatus.CANCELED,
}
KNOWN_EVENT_TYPES = REFUND_EVENTS | CHARGE_EVENTS | PAYOUT_EVENTS
LIST_PAGE = 100
"""Stripe's largest page."""
FILTER_RETRY_SECONDS = 2.0
"""The pause before a list whose `created` filter got a 500 is asked again with it."""
UNITS = MinorUnits(
    decimals={"ISK": 2, "MGA": 0},
    multiple_of={currency: 10 for currency in ("BHD", "JOD", "KWD", "OMR", "TND")},
    source="https://docs.stripe.com/currencies: MGA is zero-decimal; ISK stays two-decimal in "
           "the API (100 is 1 krona; whole kronur only); three-decimal amounts must end in 0")

T = TypeVar("T")


def _server_error(exc: ProviderOutcomeUnknown) -> bool:
    """Whether an unknown outcome was Stripe's (or a server's) own 500."""
    return isinstance(exc.__cause__, stripe.StripeError) and exc.__cause__.http_status == 500


def _stripe_dict(obj: Any) -> dict[str, Any]:
    """A StripeObject (or a webhook's plain dict) as plain JSON values."""
    return obj.to_dict() if hasattr(obj, "to_dict") else dict(obj)


def key_mode(api_key: str) -> bool | None:
    """Whether a Stripe API key is a live-mode one (`sk_live_`, `rk_live_`), a test-mode one
    (`_test_`), or None when its prefix says neither (an emulator's key)."""
    kind, _, rest = api_key.partition("_")
    mode = rest.partition("_")[0]
    if kind not in ("sk", "rk") or mode not in ("live", "test"):
        return None
    return mode == "live"


def _mode(live: bool) -> str:
    return "live" if live else "test"


class StripeProvider:
    """Stripe's refund and charge API, and its webhooks."""

    event_types = KNOWN_EVENT_TYPES
    units = UNITS
    max_amount = AmountLimit(
        99_999_999, "Stripe: an amount supports up to eight digits (99999999, e.g. $999,999.99); "
                    "IDR up to twelve", per_currency={"IDR": 999_999_999_999})

    def __init__(self, api_key: str, *, webhook_secrets: Sequence[str], api_base: str | None = None,
                 merchant_account: str | None = None, timeout_seconds: float = 10.0,
                 tolerance_seconds: int = 300, verifier: WebhookVerifier | None = None,
                 name: str = "stripe") -> None:
        self.name = name
        self._configured_account = self._merchant_account = merchant_account
        self._livemode = key_mode(api_key)
        self._http = stripe.HTTPXClient(timeout=timeout_seconds)
        # stripe builds its own httpx client: traced like every provider client (a span per
        # request, `traceparent` sent), through the one attribute that holds it
        HTTPXClientInstrumentor.instrument_client(self._http._client_async)
        self._client = stripe.StripeClient(
            api_key, base_addresses={"api": api_base} if api_base else None,
            http_client=self._http, max_network_retries=0)
        self._verifier = verifier or StripeSchemeVerifier(webhook_secrets,
                                                          tolerance_seconds=tolerance_seconds)

    async def aclose(self) -> None:
        await self._http.close_async()  # type: ignore[no-untyped-call]  # untyped in stripe 16

    async def _call(self, what: str, call: Awaitable[T]) -> T:
        """Sorts Stripe's errors by what they say about the money."""
        try:
            return await call
        except stripe.APIConnectionError as exc:
            raise ProviderOutcomeUnknown(f"{what}: connection failed or timed out") from exc
        except stripe.IdempotencyError as exc:
            # 400: the key was used before with other parameters; that request may have acted
            raise ProviderOutcomeUnknown(f"{what}: key reused: {exc.user_message or exc}") from exc
        except stripe.RateLimitError as exc:
            # 429, or a legacy 400 `rate_limit`: not acted on, and never a no to the refund
            raise ProviderOutcomeUnknown(f"{what}: rate limited: {exc.user_message or exc}") from exc
        except stripe.StripeError as exc:
            status = exc.http_status
            # Only a refusing 4xx is a no: a 2xx the library could not read or a redirect
            # may hide a refund made (see `outcome_unknown`).
            if status is None or status < 400 or outcome_unknown(status):
                raise ProviderOutcomeUnknown(f"{what}: HTTP {status} {exc.user_message or exc}") from exc
            raise refusal(status, f"{what}: HTTP {status} {exc.user_message or exc}") from exc

    async def _found(self, what: str, call: Awaitable[T]) -> T | None:
        """`_call` reading one object: None when Stripe has no such object (its 404)."""
        try:
            return await self._call(what, call)
        except ProviderDeclined as exc:
            if isinstance(exc.__cause__, stripe.StripeError) and exc.__cause__.http_status == 404:
                return None
            raise

    def _refund(self, obj: Any) -> ProviderRefund:
        return stripe_shaped_refund(self.name, _stripe_dict(obj), STATUSES, UNITS)

    async def _account_id(self) -> str:
        """The account our charges belong to: configured, or Stripe's answer. A server
        without `GET /v1/account` (emulators) leaves it to configuration, so a refusal is
        ours to fix, never a rejection of the refund."""
        if self._merchant_account is None:
            try:
                account = await self._call("GET /v1/account",
                                           self._client.v1.accounts.retrieve_current_async())
            except ProviderDeclined as exc:
                raise ProviderConfigurationRefused(
                    f"{exc}: the account our charges belong to cannot be read at the provider; "
                    "set REFUNDS_STRIPE_MERCHANT_ACCOUNT") from exc
            self._merchant_account = str(account["id"])
        return self._merchant_account

    async def get_charge(self, charge_id: str) -> ChargeSnapshot | None:
        found = await self._found(f"GET /v1/charges/{charge_id}",
                                  self._client.v1.charges.retrieve_async(charge_id))
        if found is None:
            return None
        charge = _stripe_dict(found)
        captured = bool(charge.get("captured"))
        what = f"charge {charge_id}"
        currency = normalise_currency(str(charge["currency"]))
        amount = required(self.name, charge, "amount", int, what)
        # amount_captured exists since API version 2020-08-27; older shapes imply it.
        amount_captured = charge.get("amount_captured")
        if amount_captured is None:
            amount_captured = amount if captured else 0
        ours = answered_amounts(self.name, UNITS, what, currency, {
            "amount": amount, "amount_captured": amount_captured,
            "amount_refunded": required(self.name, charge, "amount_refunded", int, what)})
        return ChargeSnapshot(
            provider=self.name, charge_id=str(charge["id"]), currency=currency,
            merchant_account=str(charge.get("on_behalf_of") or await self._account_id()),
            amount=ours["amount"], amount_captured=ours["amount_captured"], captured=captured,
            amount_refunded=ours["amount_refunded"],
            # A Stripe charge is disputed at most once; `disputed` stays true after it closes.
            # Without it (emulators) the history is unknown, which the rules read as disputed.
            dispute_count=(None if charge.get("disputed") is None
                           else int(required(self.name, charge, "disputed", bool, what))),
        )

    async def create_refund(self, request: RefundRequest, idempotency_key: str) -> ProviderRefund:
        amount = outgoing_amount(self.name, UNITS, request.amount, request.currency)
        # Our reason codes are richer than Stripe's three, so they travel in metadata.
        refund = await self._call("POST /v1/refunds", self._client.v1.refunds.create_async(
            {"charge": request.charge_id, "amount": amount,
             "metadata": {REFERENCE_KEY: request.refund_request_id, "reason": request.reason.value}},
            {"idempotency_key": idempotency_key}))
        return self._refund(refund)

    async def find_refund(self, request: RefundRequest) -> ProviderRefund | None:
        page = await self._call("GET /v1/refunds", self._client.v1.refunds.list_async(
            {"charge": request.charge_id, "limit": 100}))
        found: list[ProviderRefund] = []
        while True:
            refunds = [_stripe_dict(r) for r in page.data]
            found += [self._refund(r) for r in refunds
                      if (r.get("metadata") or {}).get(REFERENCE_KEY) == request.refund_request_id]
            if not page.has_more or not refunds:  # "more" after an empty page: nothing to go on from
                break
            page = await self._call("GET /v1/refunds", self._client.v1.refunds.list_async(
                {"charge": request.charge_id, "limit": 100, "starting_after": refunds[-1]["id"]}))
        return only_refund(self.name, request.refund_request_id, found[::-1])  # oldest first

    async def get_refund(self, refund_id: str, charge_id: str) -> ProviderRefund | None:
        refund = await self._found(f"GET /v1/refunds/{refund_id}",
                                   self._client.v1.refunds.retrieve_async(refund_id))
        return None if refund is None else self._refund(refund)

    async def list_refunds(self, since: datetime, until: datetime,
                           starting_after: str | None = None
                           ) -> AsyncGenerator[ListedRefund | UnmappedListing]:
        """Stripe's refund list over `created` in [since, until), newest first; a status we
        cannot map comes back as an UnmappedListing (a break), not as a stopped run."""
        async for obj in self._in_window("GET /v1/refunds", self._client.v1.refunds.list_async,
                                         since, until, starting_after):
            yield listed(self.name, obj, UNITS, lambda o, created: ListedRefund(refund=self._refund(o),
                                                                         created=created))

    async def list_payouts(self, since: datetime, until: datetime,
                           starting_after: str | None = None
                           ) -> AsyncGenerator[ListedPayout | UnmappedListing]:
        """Stripe's payout list over `created` in [since, until), newest first."""
        async for obj in self._in_window("GET /v1/payouts", self._client.v1.payouts.list_async,
                                         since, until, starting_after):
            yield listed(self.name, obj, UNITS, lambda o, created: ListedPayout(
                payout=stripe_shaped_payout(self.name, o, PAYOUT_STATUSES, UNITS), created=created))

    async def get_payout(self, payout_id: str) -> ProviderPayout | None:
        payout = await self._found(f"GET /v1/payouts/{payout_id}",
                                   self._client.v1.payouts.retrieve_async(payout_id))
        return None if payout is None else stripe_shaped_payout(self.name, _stripe_dict(payout),
                                                                PAYOUT_STATUSES, UNITS)

    async def _in_window(self, what: str, list_call: Callable[[Any], Awaitable[Any]], since: datetime,
                         until: datetime, starting_after: str | None) -> AsyncGenerator[dict[str, Any]]:
        """Every object a list call holds created in [since, until), by Stripe's `created`
        filter. A server whose list answers that filter with a 500 twice while the same list
        without it answers (localstripe as released) is read whole, the window kept here:
        slower, never a run retried for good. Any other failure (a timeout, a 429, a 5xx that
        passes) is the batch's, retried as before."""
        params: dict[str, Any] = {"limit": LIST_PAGE}
        if starting_after is not None:
            params["starting_after"] = starting_after
        window = {"gte": unix_bound(since), "lt": unix_bound(until)}
        refused: ProviderOutcomeUnknown | None = None
        for attempt in range(2):
            if attempt:
                await asyncio.sleep(FILTER_RETRY_SECONDS)  # a burst of 500s passes; a refusal stays
            try:
                first = await self._call(what, list_call({**params, "created": window}))
            except ProviderOutcomeUnknown as exc:
                if not _server_error(exc):
                    raise
                refused = exc
                continue
            async for obj in self._pages(what, first):
                yield obj
            return
        assert refused is not None
        try:
            first = await self._call(f"{what} (no created filter)", list_call(params))
        except ProviderError:
            raise refused from None
        log.warning("%s refused its created filter (%s): the list is read whole", what, refused)
        async for obj in self._pages(what, first):
            if window["gte"] <= required(self.name, obj, "created", int, "a listed object") < window["lt"]:
                yield obj

    async def _pages(self, what: str, first: Any) -> AsyncGenerator[dict[str, Any]]:
        """Every object of a list from its first page, with the library's auto-paging (pages
        are fetched as the caller reads); errors sorted as for any call."""
        if not first.data:  # "more" after an empty page would fail in the library's paging
            return
        objects = first.auto_paging_iter().__aiter__()
        while True:
            try:
                obj = _stripe_dict(await self._call(f"{what} (next page)", objects.__anext__()))
            except StopAsyncIteration:
                return
            yield obj

    def parse_webhook(self, headers: Mapping[str, str], body: bytes,
                      now: float) -> ProviderEvent | PayoutEvent:
        self._verifier.verify(headers, body, now)
        env = stripe_envelope(body, KNOWN_EVENT_TYPES)
        account = env.payload.get("account")
        if account is not None and account != self._configured_account:
            # a Connect endpoint's event of a connected account: refunds there are not ours
            raise WebhookRejected("foreign_account", f"connected account {account!r} is not the account "
                                  "this deployment serves (REFUNDS_STRIPE_MERCHANT_ACCOUNT; the "
                                  "platform's own events name none)", event_id=env.event_id,
                                  event_type=env.event_type)
        livemode = env.payload.get("livemode")
        if isinstance(livemode, bool) and self._livemode is not None and livemode is not self._livemode:
            # a test endpoint's event at a live deployment (or the reverse): not these books
            raise WebhookRejected("foreign_account", f"a {_mode(livemode)}-mode event, and this "
                                  f"deployment's API key is a {_mode(self._livemode)}-mode key",
                                  event_id=env.event_id, event_type=env.event_type)
        with normalising(env.event_id, env.event_type):
            if env.event_type in PAYOUT_EVENTS:
                return payout_event(stripe_shaped_payout(self.name, env.obj, PAYOUT_STATUSES, UNITS), env)
            if env.event_type in CHARGE_EVENTS or env.obj.get("charge", "") is None:
                # a charge's own notice, or a refund of no charge (a customer balance's, sent
                # since API version 2024-10-28): nothing a case of ours holds
                return ProviderEvent(
                    provider=self.name, event_id=env.event_id, event_type=env.event_type,
                    kind=EventKind.REFUND_STATUS, body_sha256=env.body_sha256,
                    occurred_at=env.occurred_at,
                    charge_id=str(env.obj["id"]) if env.event_type in CHARGE_EVENTS else None,
                    currency=normalise_currency(str(env.obj["currency"])), merchant_account=account)
            return refund_event(self._refund(env.obj), event_id=env.event_id, event_type=env.event_type,
                                body_sha256=env.body_sha256, occurred_at=env.occurred_at,
                                merchant_account=account)
