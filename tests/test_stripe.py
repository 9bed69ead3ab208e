"""Stripe end to end against the third-party localstripe server, which ignores idempotency
keys: a refund requested through our API appears once there, through a storm of identical
requests and when the provider's answer is lost on the way back (so verify-state, not
Stripe's dedup, is what keeps it single). Webhooks: Stripe-signed, rotated secrets."""

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import stripe
from fastapi import FastAPI, Response
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from temporalio.client import Client

from adapters.db import Store
from adapters.db.rows import CaseRow
from adapters.http_server import AppServer
from adapters.providers import stripe as stripe_adapter
from adapters.providers.base import (
    PayoutLister,
    ProviderOutcomeUnknown,
    RefundLister,
    UnexpectedProviderStatus,
    WebhookRejected,
)
from adapters.providers.stripe import StripeProvider
from domain.models import ProviderEvent, ProviderRefundStatus, RefundReason, RefundRequest
from domain.reconciliation import ListedPayout, ListedRefund, UnmappedListing
from starters.dev.stack import TemporalDevServer
from starters.ports import free_port
from tests.harness import Stack, open_stack
from tests.lossy_proxy import LossyProxy
from tests.reconciliation_kit import backfill
from tests.test_governance import approve
from tests.test_observability import _flushed
from tests.test_tracing_instrumentation import url

API_KEY = "sk_test_orchestrator"
SECRETS = ("whsec_new_test_secret", "whsec_old_test_secret")
MERCHANT = "acct_localstripe"
PAYLOADS = Path(__file__).parent / "payloads"


class StripeRig:
    """A stack whose Stripe API base is a lossy proxy in front of localstripe."""

    def __init__(self, stack: Stack, proxy: LossyProxy, localstripe: str) -> None:
        self.stack = stack
        self.proxy = proxy
        self.localstripe = localstripe

    def http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.localstripe, auth=(API_KEY, ""), timeout=30)

    async def charge(self, amount: int, source: str = "pm_card_visa", currency: str = "usd") -> str:
        """A charge at localstripe of `amount` in Stripe's own units of `currency`."""
        async with self.http() as http:
            response = await http.post("/v1/charges", data={"amount": amount, "currency": currency,
                                                             "source": source})
        response.raise_for_status()
        return str(response.json()["id"])

    async def refunds(self, charge: str) -> list[dict[str, Any]]:
        async with self.http() as http:
            response = await http.get("/v1/refunds", params={"charge": charge, "limit": 100})
        response.raise_for_status()
        return list(response.json()["data"])

    def body(self, charge: str, amount: int) -> dict[str, Any]:
        return self.stack.refund_body(charge, amount, provider="stripe", merchant_account=MERCHANT)

    async def refunded(self, amount: int) -> tuple[str, dict[str, Any], CaseRow]:
        """A refund requested through our API until its case succeeded: (charge, body, case)."""
        charge = await self.charge(10_000)
        body = self.body(charge, amount)
        async with self.stack.api("alice") as api:
            assert (await api.post("/v1/refund-requests", json=body)).status_code == 202
        return charge, body, await self.stack.wait_for_status(body["refund_request_id"], "succeeded")


@pytest.fixture
async def rig(store: Store, client: Client, temporal_server: TemporalDevServer,
              localstripe: str) -> AsyncIterator[StripeRig]:
    proxy = LossyProxy(localstripe)
    server = AppServer(proxy, "127.0.0.1", free_port())
    await server.start()
    stack = await open_stack(store, client, temporal_server.address, stripe_api_base=server.url,
                             stripe_api_key=API_KEY, stripe_webhook_secret=",".join(SECRETS),
                             stripe_merchant_account=MERCHANT)
    try:
        yield StripeRig(stack, proxy, localstripe)
    finally:
        await stack.close()
        await server.stop()


async def test_storm_of_identical_requests_makes_one_stripe_refund(rig: StripeRig) -> None:
    charge = await rig.charge(10_000)
    body = rig.body(charge, 3_000)
    async with rig.stack.api("alice") as api:
        answers = await asyncio.gather(*(api.post("/v1/refund-requests", json=body) for _ in range(12)))
    assert sorted(a.status_code for a in answers) == [200] * 11 + [202]
    row = await rig.stack.wait_for_status(body["refund_request_id"], "succeeded")
    [refund] = await rig.refunds(charge)
    assert refund["id"] == row["provider_refund_id"] and refund["amount"] == 3_000
    assert refund["metadata"]["refund_request_id"] == body["refund_request_id"]
    lines = await rig.stack.store.ledger.entries(body["refund_request_id"])
    assert [(x["account"], x["debit"], x["credit"]) for x in lines] == [
        ("refunds_contra_revenue", 3_000, 0), ("provider_clearing", 0, 3_000)]


@pytest.mark.parametrize(("currency", "charged", "asked", "at_stripe"), [
    ("MGA", 50_000, 1_000_000, 10_000),  # whole ariary at Stripe, two decimals in ISO 4217
    ("ISK", 500_000, 1_000, 100_000),  # hundredths of a krona at Stripe, none in ISO 4217
    ("JPY", 100_000, 80_000, 80_000),  # the same decimals on both sides: unchanged
])
async def test_a_currency_stripe_counts_in_other_decimals_refunds_the_amount_asked(
        rig: StripeRig, currency: str, charged: int, asked: int, at_stripe: int) -> None:
    """Our amounts are ISO 4217 minor units; Stripe's API counts MGA in whole ariary and ISK in
    hundredths. 10,000.00 MGA must leave as 10,000 ariary (not be refused as more than the
    50,000-ariary charge, nor a 500.00 MGA request leave as 50,000), 1,000 ISK as 100,000."""
    charge = await rig.charge(charged, currency=currency.lower())
    body = rig.body(charge, asked) | {"currency": currency}
    async with rig.stack.api("alice") as api:
        assert (await api.post("/v1/refund-requests", json=body)).status_code == 202
    case_id = body["refund_request_id"]
    await rig.stack.wait_for_status(case_id, "awaiting_approval")
    for approver in ("bob", "frank"):
        answer = await approve(rig.stack, approver, case_id)
        assert answer.status_code == 202, answer.text
    row = await rig.stack.wait_for_status(case_id, "succeeded")
    [refund] = await rig.refunds(charge)
    assert (refund["amount"], refund["id"]) == (at_stripe, row["provider_refund_id"])
    assert row["amount"] == asked
    lines = await rig.stack.store.ledger.entries(case_id)
    assert [(x["debit"], x["credit"], x["currency"]) for x in lines] == [
        (asked, 0, currency), (0, asked, currency)]
    stripe_provider = rig.stack.providers["stripe"]
    snapshot = await stripe_provider.get_charge(charge)
    assert snapshot is not None
    assert (snapshot.amount, snapshot.amount_refunded) == (charged * asked // at_stripe, asked)
    assert isinstance(stripe_provider, RefundLister)
    listed = [item async for item in stripe_provider.list_refunds(
        datetime.now(UTC) - timedelta(hours=1), datetime.now(UTC) + timedelta(minutes=1))]
    [mine] = [x for x in listed if isinstance(x, ListedRefund) and x.refund.charge_id == charge]
    assert (mine.refund.amount, mine.refund.currency) == (asked, currency)


async def test_stripe_calls_are_httpx_client_spans_under_the_business_span(
        rig: StripeRig, spans: InMemorySpanExporter) -> None:
    """stripe's own httpx client is instrumented like the other providers' clients."""
    charge = await rig.charge(10_000)
    body = rig.body(charge, 1_000)
    async with rig.stack.api("alice") as api:
        assert (await api.post("/v1/refund-requests", json=body)).status_code == 202
    await rig.stack.wait_for_status(body["refund_request_id"], "succeeded")
    finished = _flushed(spans)
    [create] = [s for s in finished if s.name == "provider.create_refund"
                and dict(s.attributes or {}).get("refund_request_id") == body["refund_request_id"]]
    assert create.context is not None
    children = [s for s in finished if s.kind is SpanKind.CLIENT and s.parent is not None
                and s.parent.span_id == create.context.span_id and url(s).endswith("/v1/refunds")]
    assert len(children) == 1


async def test_lost_response_is_verified_at_stripe_not_resubmitted(rig: StripeRig) -> None:
    charge = await rig.charge(10_000)
    body = rig.body(charge, 4_000)
    rig.proxy.lose_next("POST", "/v1/refunds")
    async with rig.stack.api("alice") as api:
        assert (await api.post("/v1/refund-requests", json=body)).status_code == 202
    row = await rig.stack.wait_for_status(body["refund_request_id"], "succeeded")
    [lost] = [json.loads(b) for b in rig.proxy.lost]
    [refund] = await rig.refunds(charge)
    assert refund["id"] == lost["id"] == row["provider_refund_id"]
    trail = [e["action"] for e in await rig.stack.store.audit.trail(body["refund_request_id"])]
    assert trail.count("provider_submit_started") == 1
    assert "provider_outcome_unknown" in trail and "verify_state" in trail


@pytest.mark.parametrize(("error_type", "code"), [("idempotency_error", None),
                                                   ("invalid_request_error", "rate_limit")],
                         ids=["idempotency_error", "legacy_rate_limit"])
async def test_an_idempotency_error_is_no_decline_the_case_verifies_and_refunds_once(
        rig: StripeRig, error_type: str, code: str | None) -> None:
    """Stripe answers 400 `idempotency_error` when the key was used before with other
    parameters: that earlier request may have made the refund, so it is an outcome to
    verify, never "nothing was created" (a failed case someone would reissue). A 400 coded
    `rate_limit` (how Stripe once answered a rate limit) is no decline either."""
    charge = await rig.charge(10_000)
    body = rig.body(charge, 2_000)
    rig.proxy.refuse_next("POST", "/v1/refunds", 400, error_type=error_type, code=code)
    async with rig.stack.api("alice") as api:
        assert (await api.post("/v1/refund-requests", json=body)).status_code == 202
    row = await rig.stack.wait_for_status(body["refund_request_id"], "succeeded", "refund_failed")
    assert (row["status"], row["failure_reason"]) == ("succeeded", None)
    assert rig.proxy.refused == [("POST", "/v1/refunds", 400)]
    assert [r["amount"] for r in await rig.refunds(charge)] == [2_000]
    actions = await rig.stack.actions(body["refund_request_id"])
    assert "provider_outcome_unknown" in actions and "provider_refund_declined" not in actions


async def test_failure_webhook_after_success_reverses_the_ledger(rig: StripeRig) -> None:
    charge, body, row = await rig.refunded(2_500)
    event = json.loads((PAYLOADS / "stripe_charge.refund.updated.json").read_bytes())
    event["id"] = f"evt_{row['provider_refund_id']}"
    event["data"]["object"].update(id=row["provider_refund_id"], charge=charge, amount=2_500,
                                   metadata={"refund_request_id": body["refund_request_id"]})
    raw = json.dumps(event).encode()
    signature = stripe.WebhookSignature.generate_signature_header(raw.decode(), SECRETS[1])
    async with httpx.AsyncClient(base_url=rig.stack.relay_url, timeout=30) as http:
        response = await http.post("/webhooks/stripe", content=raw, headers={
            "Stripe-Signature": signature, "Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    assert response.json() == {"receipt_id": response.json()["receipt_id"], "verdict": "accepted",
                               "workflow_id": body["refund_request_id"]}
    failed = await rig.stack.wait_for_status(body["refund_request_id"], "refund_failed")
    assert failed["failure_reason"] == "expired_or_canceled_card" and failed["reserved_amount"] == 0
    templates = {x["template"] for x in await rig.stack.store.ledger.entries(body["refund_request_id"])}
    assert templates == {"refund_settled", "refund_reversed"}


# -- normalisation, without a stack ---------------------------------------------------------

def _adapter() -> StripeProvider:
    return StripeProvider(API_KEY, webhook_secrets=SECRETS, api_base="http://127.0.0.1:9")


def _refund_event(headers: dict[str, str], raw: bytes) -> ProviderEvent:
    event = _adapter().parse_webhook(headers, raw, time.time())
    assert isinstance(event, ProviderEvent)
    return event


def _signed_event(event_type: str, **refund: Any) -> tuple[dict[str, str], bytes]:
    event = json.loads((PAYLOADS / "stripe_charge.refund.updated.json").read_bytes())
    event["type"] = event_type
    event["data"]["object"].update(refund)
    raw = json.dumps(event).encode()
    return {"stripe-signature": stripe.WebhookSignature.generate_signature_header(
        raw.decode(), SECRETS[0])}, raw


@pytest.mark.parametrize("reason", ["charge_for_pending_refund_disputed", "declined",
                                    "expired_or_canceled_card", "insufficient_funds",
                                    "lost_or_stolen_card", "merchant_request", "unknown"])
def test_every_documented_failure_reason_passes_through(reason: str) -> None:
    headers, raw = _signed_event("refund.failed", status="failed", failure_reason=reason)
    event = _refund_event(headers, raw)
    assert (event.status, event.failure_reason, event.amount) == ("failed", reason, 1000)


@pytest.mark.parametrize("event_type", ["refund.created", "refund.updated", "charge.refund.updated"])
@pytest.mark.parametrize("status", ["pending", "requires_action", "succeeded", "canceled"])
def test_each_stripe_status_maps_to_its_own_state(event_type: str, status: str) -> None:
    headers, raw = _signed_event(event_type, status=status, failure_reason=None)
    event = _refund_event(headers, raw)
    assert event.status == status and event.raw_status == status and event.refund_id


@pytest.mark.parametrize(("currency", "at_stripe", "ours"), [
    ("isk", 100_000, 1_000), ("mga", 10_000, 1_000_000), ("kwd", 1_230, 1_230), ("usd", 1_000, 1_000)])
def test_a_webhook_amount_is_read_in_iso_minor_units(currency: str, at_stripe: int, ours: int) -> None:
    headers, raw = _signed_event("refund.updated", amount=at_stripe, currency=currency)
    event = _refund_event(headers, raw)
    assert (event.amount, event.currency) == (ours, currency.upper())


def test_a_webhook_amount_no_iso_minor_unit_can_hold_is_refused_as_unreadable() -> None:
    """40.10 ISK (fractional krona, which Stripe stopped taking in 2023) has no ISO 4217
    minor-unit amount: refused and named, never rounded into a different refund."""
    headers, raw = _signed_event("refund.updated", amount=4_010, currency="isk")
    with pytest.raises(WebhookRejected) as refused:
        _adapter().parse_webhook(headers, raw, time.time())
    assert refused.value.verdict == "unreadable"
    assert "4010" in refused.value.message and "ISK" in refused.value.message


@pytest.mark.parametrize("event_type", ["refund.created", "refund.updated"])
def test_a_refund_of_no_charge_is_a_notice_about_nothing_we_hold(event_type: str) -> None:
    """Since API version 2024-10-28 refund.* events also come for refunds of no charge (a
    customer balance's): nothing of ours, so accepted and acted on by nobody. It was refused
    as malformed, and Stripe retried it for three days."""
    headers, raw = _signed_event(event_type, charge=None, payment_intent=None)
    event = _refund_event(headers, raw)
    assert (event.refund_id, event.charge_id, event.as_refund()) == (None, None, None)


def test_an_event_of_another_connected_account_is_foreign() -> None:
    """A Connect endpoint sends events of the platform's connected accounts (the `account`
    field); this deployment's adapter makes and reads refunds on its own account only. Such
    an event opened a tracking case that held and booked another account's refund in our
    ledger: it is `foreign_account` (acknowledged, acts on nothing). The platform's own
    events carry no `account`; one naming the configured account is ours."""
    event = json.loads((PAYLOADS / "stripe_charge.refund.updated.json").read_bytes())
    for account, foreign in (("acct_connected", True), ("acct_ours", False), (None, False)):
        event["account"] = account
        raw = json.dumps(event).encode()
        headers = {"stripe-signature": stripe.WebhookSignature.generate_signature_header(
            raw.decode(), SECRETS[0])}
        adapter = StripeProvider(API_KEY, webhook_secrets=SECRETS, api_base="http://127.0.0.1:9",
                                 merchant_account="acct_ours")
        if foreign:
            with pytest.raises(WebhookRejected) as refused:
                adapter.parse_webhook(headers, raw, time.time())
            assert refused.value.verdict == "foreign_account" and "acct_connected" in refused.value.message
        else:
            assert isinstance(adapter.parse_webhook(headers, raw, time.time()), ProviderEvent)
    event["account"] = "acct_connected"  # no account configured: the platform's own events only
    raw = json.dumps(event).encode()
    with pytest.raises(WebhookRejected, match="acct_connected"):
        _adapter().parse_webhook({"stripe-signature": stripe.WebhookSignature.generate_signature_header(
            raw.decode(), SECRETS[0])}, raw, time.time())


@pytest.mark.parametrize(("api_key", "livemode", "ours"), [
    ("sk_test_a", False, True), ("sk_test_a", True, False), ("sk_live_a", True, True),
    ("sk_live_a", False, False), ("rk_live_a", False, False), ("rk_test_a", True, False),
    ("emulator-key", True, True), ("sk_test_a", None, True)])
def test_an_event_of_the_other_mode_than_the_key_s_is_foreign(api_key: str, livemode: bool | None,
                                                              ours: bool) -> None:
    """A test-mode event reaching a live deployment (a test endpoint's secret kept beside the
    live one, a shared URL) opened a tracking case that held and booked a test dashboard's
    refund in the live ledger. An event of the other mode than the API key's (`sk_live_`,
    `rk_live_`: live; `_test_`: test) is `foreign_account`; a key naming no mode (an
    emulator's) or an event without `livemode` is read as before."""
    event = json.loads((PAYLOADS / "stripe_charge.refund.updated.json").read_bytes())
    if livemode is None:
        del event["livemode"]
    else:
        event["livemode"] = livemode
    raw = json.dumps(event).encode()
    headers = {"stripe-signature": stripe.WebhookSignature.generate_signature_header(raw.decode(),
                                                                                     SECRETS[0])}
    adapter = StripeProvider(api_key, webhook_secrets=SECRETS, api_base="http://127.0.0.1:9")
    if ours:
        assert isinstance(adapter.parse_webhook(headers, raw, time.time()), ProviderEvent)
        return
    with pytest.raises(WebhookRejected) as refused:
        adapter.parse_webhook(headers, raw, time.time())
    assert refused.value.verdict == "foreign_account" and "mode" in refused.value.message


def test_unexpected_status_is_refused_loudly_not_defaulted() -> None:
    headers, raw = _signed_event("refund.updated", status="teleported")
    with pytest.raises(WebhookRejected) as refused:
        _adapter().parse_webhook(headers, raw, time.time())
    assert refused.value.verdict == "unexpected_status" and "teleported" in refused.value.message
    assert refused.value.event_type == "refund.updated"


def test_charge_refunded_is_a_charge_level_notice() -> None:
    event = json.loads((PAYLOADS / "stripe_charge.refund.updated.json").read_bytes())
    event.update(type="charge.refunded")
    event["data"]["object"] = {"id": "ch_1", "object": "charge", "amount": 1000, "currency": "usd",
                               "amount_refunded": 1000, "refunded": True}
    raw = json.dumps(event).encode()
    headers = {"stripe-signature": stripe.WebhookSignature.generate_signature_header(raw.decode(),
                                                                                     SECRETS[1])}
    parsed = _refund_event(headers, raw)
    assert (parsed.charge_id, parsed.refund_id, parsed.status) == ("ch_1", None, None)


# -- reconciliation against localstripe ------------------------------------------------------

async def age_at_stripe(rig: StripeRig, refund_id: str, days: float, **changes: str) -> None:
    """Moves a refund's creation back (and its status, say) at localstripe, with no webhook."""
    created = str(int((datetime.now(UTC) - timedelta(days=days)).timestamp()))
    async with rig.http() as http:
        response = await http.post(f"/v1/refunds/{refund_id}", data={"created": created, **changes})
    response.raise_for_status()


async def stripe_refund(rig: StripeRig, charge: str, amount: int) -> str:
    async with rig.http() as http:
        response = await http.post("/v1/refunds", data={"charge": charge, "amount": amount})
    response.raise_for_status()
    return str(response.json()["id"])


async def test_a_stripe_refund_is_read_by_its_id_as_it_stands_and_an_unknown_id_is_none(
        rig: StripeRig) -> None:
    """What an approved break reads again before it moves money."""
    charge = await rig.charge(5_000)
    refund_id = await stripe_refund(rig, charge, 1_500)
    # aged out of every listing window the module's other tests read (their localstripe is ours)
    await age_at_stripe(rig, refund_id, 100, status="failed")
    provider = StripeProvider(API_KEY, webhook_secrets=SECRETS, api_base=rig.localstripe,
                              merchant_account=MERCHANT)
    try:
        read = await provider.get_refund(refund_id, charge)
        assert read is not None
        assert (read.refund_id, read.amount, read.status) == (refund_id, 1_500, ProviderRefundStatus.FAILED)
        assert await provider.get_refund("re_nothing_here", charge) is None
    finally:
        await provider.aclose()


async def test_a_refund_in_fractional_krona_is_a_break_for_ops_not_a_stalled_run(rig: StripeRig) -> None:
    """40.10 ISK (Stripe took fractional krona until 2023) has no ISO 4217 amount: listed,
    it is an unmapped object (a break for ops, its amount rounded down) and the list reads
    on, never an error a run retries for ever."""
    charge = await rig.charge(10_000, currency="isk")
    odd = await stripe_refund(rig, charge, 4_010)
    adapter = rig.stack.providers["stripe"]
    assert isinstance(adapter, RefundLister)
    listed = [item async for item in adapter.list_refunds(
        datetime.now(UTC) - timedelta(hours=1), datetime.now(UTC) + timedelta(minutes=1))]
    [unmapped] = [x for x in listed if isinstance(x, UnmappedListing) and x.object_id == odd]
    assert (unmapped.amount, unmapped.currency, unmapped.raw_status) == (40, "ISK", "succeeded")
    assert "4010" in unmapped.error


async def test_stripe_lists_a_window_newest_first_across_pages(
        rig: StripeRig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stripe_adapter, "LIST_PAGE", 4)
    charge = await rig.charge(100_000)
    made = [await stripe_refund(rig, charge, 100 + i) for i in range(11)]
    for i, refund_id in enumerate(made):
        await age_at_stripe(rig, refund_id, 60 + i / 100)
    await age_at_stripe(rig, await stripe_refund(rig, charge, 1), 70)
    adapter = rig.stack.providers["stripe"]
    assert isinstance(adapter, RefundLister)
    since, until = datetime.now(UTC) - timedelta(days=61), datetime.now(UTC) - timedelta(days=59)
    listed = [r async for r in adapter.list_refunds(since, until) if isinstance(r, ListedRefund)]
    assert [r.refund.refund_id for r in listed] == made  # newest first: the least aged first
    assert [r.refund.amount for r in listed] == list(range(100, 111))
    rest = [r.refund.refund_id async for r in adapter.list_refunds(since, until, made[5])
            if isinstance(r, ListedRefund)]
    assert rest == made[6:]


async def stripe_payout(rig: StripeRig, amount: int, status: str, days: float) -> str:
    """A payout made at localstripe (EUR is the one currency it pays out) created `days` ago."""
    created = str(int((datetime.now(UTC) - timedelta(days=days)).timestamp()))
    async with rig.http() as http:
        made = await http.post("/v1/payouts", data={"amount": amount, "currency": "eur",
                                                    "status": status})
        made.raise_for_status()
        payout_id = str(made.json()["id"])
        (await http.post(f"/v1/payouts/{payout_id}", data={"created": created})).raise_for_status()
    return payout_id


async def test_stripe_lists_payouts_in_a_window_newest_first_across_pages(
        rig: StripeRig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stripe_adapter, "LIST_PAGE", 3)
    statuses = ["paid", "failed", "pending", "paid", "paid", "failed", "paid"]
    made = [await stripe_payout(rig, 500 + i, status, 80 + i / 100) for i, status in enumerate(statuses)]
    await stripe_payout(rig, 1, "paid", 90)  # outside the window
    adapter = rig.stack.providers["stripe"]
    assert isinstance(adapter, PayoutLister)
    since, until = datetime.now(UTC) - timedelta(days=81), datetime.now(UTC) - timedelta(days=79)
    listed = [p async for p in adapter.list_payouts(since, until) if isinstance(p, ListedPayout)]
    assert [p.payout.payout_id for p in listed] == made  # newest first: the least aged first
    assert [(p.payout.amount, p.payout.currency, p.payout.status.value) for p in listed] == [
        (500 + i, "EUR", status) for i, status in enumerate(statuses)]
    assert [p.payout.failure_code for p in listed if p.payout.status == "failed"] == [
        "could_not_process"] * 2
    assert all(since <= p.created < until for p in listed)
    rest = [p.payout.payout_id async for p in adapter.list_payouts(since, until, made[3])
            if isinstance(p, ListedPayout)]
    assert rest == made[4:]


async def test_a_stripe_backfill_finds_a_silent_failure_and_a_dashboard_refund(rig: StripeRig) -> None:
    _, body, row = await rig.refunded(2_000)
    await rig.stack.client.get_workflow_handle(body["refund_request_id"]).result()  # the case is closed
    await age_at_stripe(rig, row["provider_refund_id"], 3, status="failed")
    dashboard = await stripe_refund(rig, await rig.charge(5_000), 1_500)
    await age_at_stripe(rig, dashboard, 2)
    await age_at_stripe(rig, await stripe_refund(rig, await rig.charge(5_000), 700), 40, status="failed")

    report = await backfill(rig.stack, provider="stripe", since_days=10)
    assert {(b["object_id"], b["break_class"], b["case_id"]) for b in report["breaks"]} == {
        (row["provider_refund_id"], "provider_failed_shown_refunded", body["refund_request_id"]),
        (dashboard, "unknown_to_us", None)}
    assert {b["ledger_delta"] for b in report["breaks"]} == {-2_000, 1_500}


async def test_a_list_that_fails_for_a_moment_is_never_read_whole(
        rig: StripeRig, caplog: pytest.LogCaptureFixture) -> None:
    """Only a server that answers the `created` filter with a 500 twice, while the same list
    without it answers, has its list read whole (localstripe as released): a 429 or a timeout
    is the batch's failure (retried, backing off), and one 500 is asked again with the
    window; reading a large account's whole history on a passing error would page it all."""
    made = await stripe_refund(rig, await rig.charge(5_000), 700)
    adapter = rig.stack.providers["stripe"]
    assert isinstance(adapter, RefundLister)
    now = datetime.now(UTC)
    since, until = now - timedelta(hours=1), now + timedelta(hours=1)
    rig.proxy.refuse_next("GET", "/v1/refunds", 429)
    with pytest.raises(ProviderOutcomeUnknown):
        [r async for r in adapter.list_refunds(since, until)]
    rig.proxy.refuse_next("GET", "/v1/refunds", 500)
    listed = [r async for r in adapter.list_refunds(since, until)]
    assert made in [r.refund.refund_id for r in listed if isinstance(r, ListedRefund)]
    assert "read whole" not in caplog.text


async def test_a_stripe_payout_is_read_back_by_its_id(rig: StripeRig) -> None:
    """An approved payout break reads its payout at the provider before it reverses anything
    (approvals take days; a bank may correct a failure to paid meanwhile). Stripe's adapter
    could not read one, so the approval posted the reversal on the stored word alone."""
    made = await stripe_payout(rig, 700, "failed", 1)
    adapter = rig.stack.providers["stripe"]
    assert isinstance(adapter, PayoutLister)
    found = await adapter.get_payout(made)
    assert found is not None and (found.payout_id, found.status.value, found.amount) == (made, "failed", 700)
    assert await adapter.get_payout(f"po_{uuid.uuid4().hex[:14]}") is None


async def test_a_payout_status_we_cannot_map_is_listed_as_unmapped_and_the_list_reads_on(
        rig: StripeRig, monkeypatch: pytest.MonkeyPatch) -> None:
    # localstripe only makes documented statuses: forget one, as if Stripe had added a new one.
    monkeypatch.delitem(stripe_adapter.PAYOUT_STATUSES, "pending")
    odd = await stripe_payout(rig, 700, "pending", 70)
    fine = await stripe_payout(rig, 701, "paid", 70.01)
    adapter = rig.stack.providers["stripe"]
    assert isinstance(adapter, PayoutLister)
    since, until = datetime.now(UTC) - timedelta(days=71), datetime.now(UTC) - timedelta(days=69)
    listed = [p async for p in adapter.list_payouts(since, until)]
    assert [type(p).__name__ for p in listed] == ["UnmappedListing", "ListedPayout"]
    unmapped, paid = listed
    assert isinstance(unmapped, UnmappedListing) and isinstance(paid, ListedPayout)
    assert (unmapped.object_id, unmapped.raw_status, unmapped.amount) == (odd, "pending", 700)
    assert paid.payout.payout_id == fine


# -- governance inputs read from the charge ---------------------------------------------------

async def test_a_charge_refunded_at_stripe_outside_us_refuses_an_over_refund(rig: StripeRig) -> None:
    charge = await rig.charge(10_000)
    await stripe_refund(rig, charge, 8_000)  # a dashboard refund: no webhook, no case of ours
    case_id = await rig.stack.request_refund("alice", charge, 3_000, provider="stripe",
                                             merchant_account=MERCHANT)
    row = await rig.stack.wait_for_status(case_id, "rejected", "succeeded")
    assert (row["status"], row["reserved_amount"]) == ("rejected", 0)
    [rejected] = [e for e in await rig.stack.store.audit.trail(case_id)
                  if e["action"] == "validation_rejected"]
    assert rejected["detail"]["reason"] == "amount 3000 exceeds remaining refundable 2000"
    assert [r["amount"] for r in await rig.refunds(charge)] == [8_000]


async def test_a_refund_made_at_stripe_outside_us_sends_the_next_request_to_people(rig: StripeRig) -> None:
    """The reference's incident: support refunds in the dashboard (its webhook lost, or
    from before we ran), then the CRM asks for the same refund. The charge's refunded
    amount said so, but the rules counted only our cases: the small request was
    auto-approved and the customer refunded twice (reproduced). What Stripe reports beyond
    our own refunds is a prior refund, named as made outside us; ours are counted once."""
    charge = await rig.charge(10_000)
    await stripe_refund(rig, charge, 2_000)  # a dashboard refund: no webhook, no case of ours
    case_id = await rig.stack.request_refund("alice", charge, 500, provider="stripe",
                                             merchant_account=MERCHANT)
    row = await rig.stack.wait_for_status(case_id, "awaiting_approval", "succeeded")
    assert row["status"] == "awaiting_approval"
    assert row["decision"]["rules_fired"] == [
        "prior_refunds_on_charge", "refunded_outside_cases", "repeat_partial_refund"]
    assert (row["decision"]["context"]["prior_refund_count"],
            row["decision"]["context"]["prior_refund_total"]) == (1, 2_000)
    assert [r["amount"] for r in await rig.refunds(charge)] == [2_000]

    assert (await approve(rig.stack, "bob", case_id)).status_code == 202
    await rig.stack.wait_for_status(case_id, "succeeded")
    later = await rig.stack.request_refund("alice", charge, 300, provider="stripe",
                                           merchant_account=MERCHANT)
    row = await rig.stack.wait_for_status(later, "awaiting_approval", "succeeded")
    assert "refunded_outside_cases" in row["decision"]["rules_fired"]  # Stripe's 2,500 holds our 500
    assert (row["decision"]["context"]["prior_refund_count"],
            row["decision"]["context"]["prior_refund_total"]) == (2, 2_500)


async def test_a_disputed_stripe_charge_reaches_the_prior_dispute_rule(rig: StripeRig) -> None:
    # Stripe's documented test card for a charge that gets disputed.
    charge = await rig.charge(10_000, source="pm_card_createDispute")
    case_id = await rig.stack.request_refund("alice", charge, 1_000, provider="stripe",
                                             merchant_account=MERCHANT, reason="item_not_received")
    row = await rig.stack.wait_for_status(case_id, "awaiting_approval", "succeeded")
    assert row["status"] == "awaiting_approval"
    assert "high_risk_reason:item_not_received" in row["decision"]["rules_fired"]
    assert row["decision"]["context"]["prior_dispute_count"] == 1
    assert await rig.refunds(charge) == []


@asynccontextmanager
async def stripe_at(app: FastAPI) -> AsyncIterator[StripeProvider]:
    """The Stripe adapter pointed at `app` (a server answering as an emulator might), both
    closed after."""
    server = AppServer(app, "127.0.0.1", 0)
    await server.start()
    adapter = StripeProvider(API_KEY, webhook_secrets=SECRETS, api_base=server.url,
                             merchant_account=MERCHANT)
    try:
        yield adapter
    finally:
        await adapter.aclose()
        await server.stop()


STRIPE_CHARGE = {  # Stripe's charge object as its API reference shows it (the fields we read)
    "id": "ch_3MmlLrLkdIwHu7ix0snN0B15", "object": "charge", "amount": 1099, "amount_captured": 1099,
    "amount_refunded": 0, "captured": True, "currency": "usd", "disputed": False,
    "on_behalf_of": None, "paid": True, "refunded": False, "status": "succeeded",
}


@pytest.mark.parametrize(("changed", "disputes"), [
    ({"amount_refunded": None}, UnexpectedProviderStatus), ({"disputed": "no"}, UnexpectedProviderStatus),
    ({"disputed": None}, None), ({"disputed": True}, 1)])
async def test_a_stripe_charge_without_its_refunded_amount_is_an_error_and_without_disputed_unknown(
        changed: dict[str, Any], disputes: int | type[Exception] | None) -> None:
    """What has been refunded is never assumed zero; a missing `disputed` (emulators) is an
    unknown history, which the rules read as disputed (test_stripe_stock), never zero."""
    app = FastAPI()

    @app.get("/v1/charges/{charge_id}")
    async def charge(charge_id: str) -> dict[str, Any]:
        return {k: v for k, v in {**STRIPE_CHARGE, **changed}.items() if v is not None}

    async with stripe_at(app) as adapter:
        if isinstance(disputes, type):
            with pytest.raises(disputes, match=next(iter(changed))):
                await adapter.get_charge(str(STRIPE_CHARGE["id"]))
        else:
            snapshot = await adapter.get_charge(str(STRIPE_CHARGE["id"]))
            assert snapshot is not None and snapshot.dispute_count == disputes


def stripe_request(case_id: str) -> RefundRequest:
    """A 5.00 USD refund of charge ch_1 at Stripe, for the adapter's own tests."""
    return RefundRequest(refund_request_id=case_id, provider="stripe", charge_id="ch_1", amount=500,
                         currency="USD", merchant_account=MERCHANT,
                         reason=RefundReason.REQUESTED_BY_CUSTOMER, evidence={"order_id": "o-1"})


@pytest.mark.parametrize("status", [200, 302, 408])
async def test_an_answer_to_a_create_that_says_no_refusal_is_an_unknown_outcome(status: int) -> None:
    """A 2xx the library cannot read (a proxy's page, an emulator's garbage), a redirect or a
    request timeout may hide a refund the provider made: verify-state, never a decline (a
    decline releases the reservation and lets the same money be asked again)."""
    app = FastAPI()

    @app.post("/v1/refunds")
    async def create() -> Response:
        return Response("<html>upstream says hello</html>", status_code=status, media_type="text/html",
                        headers={"Location": "https://elsewhere.invalid/"} if status == 302 else None)

    async with stripe_at(app) as adapter:
        with pytest.raises(ProviderOutcomeUnknown):
            await adapter.create_refund(stripe_request("rr-unread"), "idem-1")


async def test_a_refund_list_that_says_more_but_sends_none_ends_the_lookup() -> None:
    """An emulator answering `has_more: true` with an empty page: the lookup and the listing
    end with what they found, instead of failing on a page with no last id (an unknown
    outcome for ever; a reconciliation run that never ends)."""
    app = FastAPI()

    @app.get("/v1/refunds")
    async def refunds() -> dict[str, Any]:
        return {"object": "list", "data": [], "has_more": True, "url": "/v1/refunds"}

    async with stripe_at(app) as adapter:
        assert await adapter.find_refund(stripe_request("rr-empty-page")) is None
        now = datetime.now(UTC)
        listed = [r async for r in adapter.list_refunds(now - timedelta(days=1), now)]
        assert listed == []  # reconciliation's listing, likewise


async def test_a_listed_refund_no_rule_can_read_is_an_unmapped_object_and_the_list_reads_on() -> None:
    """A currency ISO 4217 no longer has (a 2022 kuna refund in a backfill), an amount that
    is no integer, a refund with no charge (Stripe's `charge` is nullable): each is an
    unmapped object for ops, never an error a run retries for ever (which also skips every
    later scheduled run of the provider)."""
    now = int(datetime.now(UTC).timestamp())
    refund = {"object": "refund", "amount": 1_500, "currency": "usd", "status": "succeeded",
              "charge": "ch_1", "metadata": {}, "created": now - 60}
    odd = [{**refund, "id": "re_kuna", "currency": "hrk"}, {**refund, "id": "re_decimal", "amount": "12.50"},
           {**refund, "id": "re_chargeless", "charge": None}, {**refund, "id": "re_huge", "amount": 2**63},
           {**refund, "id": "re_fine"}]
    app = FastAPI()

    @app.get("/v1/refunds")
    async def refunds() -> dict[str, Any]:
        return {"object": "list", "data": odd, "has_more": False, "url": "/v1/refunds"}

    async with stripe_at(app) as adapter:
        listed = [r async for r in adapter.list_refunds(datetime.now(UTC) - timedelta(days=1),
                                                        datetime.now(UTC))]
    unmapped = {x.object_id: x for x in listed if isinstance(x, UnmappedListing)}
    assert unmapped.keys() == {"re_kuna", "re_decimal", "re_chargeless", "re_huge"}, listed
    assert unmapped["re_huge"].amount == 0 and str(2**63) in unmapped["re_huge"].error  # a BIGINT holds it
    assert (unmapped["re_kuna"].currency, unmapped["re_kuna"].amount) == ("HRK", 1_500)
    assert "HRK" in unmapped["re_kuna"].error and "12.50" in unmapped["re_decimal"].error
    assert [x.refund.refund_id for x in listed if isinstance(x, ListedRefund)] == ["re_fine"]
    odd.append({**refund, "id": "re_timeless", "created": None})  # cannot be placed in a window
    async with stripe_at(app) as adapter:
        with pytest.raises(UnexpectedProviderStatus, match="re_timeless"):  # a run fails for good
            [r async for r in adapter.list_refunds(datetime.now(UTC) - timedelta(days=1), datetime.now(UTC))]
