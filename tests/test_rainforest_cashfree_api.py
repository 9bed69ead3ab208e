"""Rainforest and Cashfree refund APIs end to end, on real Temporal and PostgreSQL.

Each API is a loopback fake (tests/rainforest_cashfree_fakes.py) answering in its docs'
shapes and ignoring idempotency, behind a lossy proxy that can swallow an answer after
the fake acted. A refund asked for through our API appears once at the provider, also
when that first answer is lost (verify-state finds it by our reference); the provider's
webhook, signed as it signs them, settles the case; a 4xx is a decline that moves nothing;
Rainforest's refund list pages, resumes, and feeds a reconciliation backfill.
"""

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from temporalio.client import Client
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.refund import RefundActivities
from adapters.config import Settings
from adapters.db import Store
from adapters.http_server import AppServer
from adapters.policy_file import load_policy
from adapters.providers import rainforest
from adapters.providers.base import (
    PayoutLister,
    ProviderDeclined,
    ProviderError,
    ProviderOutcomeUnknown,
    ProviderUnsupported,
    RefundLister,
    UnexpectedProviderStatus,
    WebhookRejected,
)
from adapters.providers.cashfree import CashfreeApiProvider, CashfreeProvider
from adapters.providers.http import send
from adapters.providers.normalise import REFERENCE_KEY, exact_json, minor_to_major
from adapters.providers.rainforest import RainforestApiProvider, RainforestProvider
from adapters.providers.registry import build_providers, close_providers
from domain import errors
from domain.events import tracking_case_id
from domain.models import ProviderEvent, ProviderRefundStatus, RefundReason, RefundRequest, VerifyInput
from domain.reconciliation import ListedRefund
from starters.dev.stack import TemporalDevServer
from tests.harness import Stack, open_stack
from tests.lossy_proxy import LossyProxy
from tests.rainforest_cashfree_fakes import (
    CASHFREE_API_SECRET,
    CASHFREE_ID,
    RAINFOREST_KEY,
    FakeCashfree,
    FakeRainforest,
    days_ago,
)
from tests.reconciliation_kit import backfill, wait_for_breaks
from tests.test_governance import approve
from tests.test_provider_webhooks import (
    CASHFREE_SECRET,
    PAYLOADS,
    RAINFOREST_SECRET,
    sign_cashfree,
    sign_rainforest,
)
from tests.test_reconciliation import decide


@dataclass
class Rig:
    stack: Stack
    rainforest: FakeRainforest
    cashfree: FakeCashfree
    rainforest_proxy: LossyProxy
    cashfree_proxy: LossyProxy

    async def webhook(self, provider: str, body: bytes) -> httpx.Response:
        sign = sign_rainforest if provider == "rainforest" else sign_cashfree
        async with httpx.AsyncClient(base_url=self.stack.relay_url, timeout=30) as http:
            return await http.post(f"/webhooks/{provider}", content=body, headers=sign(body))

    async def cashfree_refund(self, order_id: str, amount: int) -> str:
        return await self.stack.request_refund("alice", order_id, amount, provider="cashfree",
                                               currency="INR", merchant_account=CASHFREE_ID)

    async def rainforest_refund(self, payin_id: str, amount: int) -> str:
        return await self.stack.request_refund("alice", payin_id, amount, provider="rainforest",
                                               merchant_account=self.rainforest.merchant_id)


@pytest.fixture(scope="module")
async def rig(store: Store, client: Client, temporal_server: TemporalDevServer) -> AsyncIterator[Rig]:
    fakes = FakeRainforest(RAINFOREST_KEY), FakeCashfree(CASHFREE_ID, CASHFREE_API_SECRET)
    servers, proxies = [], []
    for fake in fakes:
        server = AppServer(fake.app(), "127.0.0.1", 0)
        await server.start()
        proxy = LossyProxy(server.url)
        proxy_server = AppServer(proxy, "127.0.0.1", 0)
        await proxy_server.start()
        servers += [server, proxy_server]
        proxies.append((proxy, proxy_server.url))
    (rf_proxy, rf_url), (cf_proxy, cf_url) = proxies
    stack = await open_stack(store, client, temporal_server.address,
                             rainforest_webhook_secret=RAINFOREST_SECRET, rainforest_api_base=rf_url,
                             rainforest_api_key=RAINFOREST_KEY, cashfree_webhook_secret=CASHFREE_SECRET,
                             cashfree_api_base=f"{cf_url}/pg", cashfree_client_id=CASHFREE_ID,
                             cashfree_client_secret=CASHFREE_API_SECRET)
    try:
        yield Rig(stack, fakes[0], fakes[1], rf_proxy, cf_proxy)
    finally:
        await stack.close()
        for server in reversed(servers):
            await server.stop()


def cashfree_webhook(made: dict[str, Any], status: str = "SUCCESS") -> bytes:
    """Cashfree's documented REFUND_STATUS_WEBHOOK, about the refund the fake made."""
    doc = json.loads((PAYLOADS / "cashfree_refund_status.json").read_bytes(), parse_float=Decimal)
    doc["data"]["refund"].update({k: made[k] for k in ("cf_refund_id", "cf_payment_id", "refund_id",
                                                        "order_id", "refund_amount")},
                                 refund_status=status)
    return exact_json(doc)


def rainforest_webhook(made: dict[str, Any], status: str = "SUCCEEDED") -> bytes:
    """Rainforest's documented refund webhook (`{data, event_type}`) for the fake's refund."""
    doc = json.loads((PAYLOADS / "rainforest_refund.processing.json").read_bytes())
    doc["data"].update({**made, "status": status})
    doc["event_type"] = f"refund.{status.lower()}"
    return json.dumps(doc).encode()


# -- Cashfree --------------------------------------------------------------------------------

async def test_cashfree_refund_through_the_api_is_made_once_and_settled_by_its_webhook(rig: Rig) -> None:
    order_id = rig.cashfree.order(Decimal("100.00"))
    case_id = await rig.cashfree_refund(order_id, 2550)
    row = await rig.stack.wait_for_status(case_id, "pending")
    [made] = rig.cashfree.refunds_of(order_id)
    assert (made["refund_id"], made["refund_amount"], made["refund_currency"]) == (
        case_id, Decimal("25.50"), "INR")
    assert made["x_idempotency_key"] == RefundRequest(
        refund_request_id=case_id, provider="cashfree", charge_id=order_id, amount=2550, currency="INR",
        merchant_account=CASHFREE_ID, reason="requested_by_customer").idempotency_key()
    assert row["provider_refund_id"] == made["cf_refund_id"]
    answer = await rig.webhook("cashfree", cashfree_webhook(made))
    assert answer.json()["verdict"] == "accepted" and answer.json()["workflow_id"] == case_id
    row = await rig.stack.wait_for_status(case_id, "succeeded")
    lines = await rig.stack.store.ledger.entries(case_id)
    assert [(x["template"], x["debit"], x["credit"], x["currency"]) for x in lines] == [
        ("refund_settled", 2550, 0, "INR"), ("refund_settled", 0, 2550, "INR")]


async def test_cashfree_lost_create_answer_is_verified_not_resent(rig: Rig) -> None:
    order_id = rig.cashfree.order(Decimal("500.00"))
    rig.cashfree_proxy.lose_next("POST", f"/pg/orders/{order_id}/refunds")
    case_id = await rig.cashfree_refund(order_id, 12_345)
    row = await rig.stack.wait_for_status(case_id, "pending")
    [made] = rig.cashfree.refunds_of(order_id)  # the lost answer's refund, and no second one
    assert json.loads(rig.cashfree_proxy.lost[-1])["refund_id"] == case_id
    assert (row["provider_refund_id"], made["refund_amount"]) == (made["cf_refund_id"], Decimal("123.45"))
    assert "provider_outcome_unknown" in await rig.stack.actions(case_id)
    await rig.webhook("cashfree", cashfree_webhook(made))
    await rig.stack.wait_for_status(case_id, "succeeded")
    assert len(rig.cashfree.refunds_of(order_id)) == 1 and rig.cashfree.creates.count(case_id) == 1


async def test_a_cashfree_refusal_of_an_id_it_holds_is_our_refund_not_a_decline(rig: Rig) -> None:
    """The create's answer is lost and the lookups before the resubmit (the verify, the
    submit's own) miss it (a read that lags the write): Cashfree refuses the resubmit as a
    refund_id it holds. That refusal names our refund, made: the case follows it; it is no
    decline with the money gone."""
    order_id = rig.cashfree.order(Decimal("300.00"))
    rig.cashfree_proxy.lose_next("POST", f"/pg/orders/{order_id}/refunds")
    rig.cashfree.lookup_misses = 2
    case_id = await rig.cashfree_refund(order_id, 4_200)
    row = await rig.stack.wait_for_status(case_id, "pending")
    [made] = rig.cashfree.refunds_of(order_id)
    assert rig.cashfree.creates.count(case_id) == 2 and row["provider_refund_id"] == made["cf_refund_id"]
    assert row["reserved_amount"] == 4_200
    await rig.webhook("cashfree", cashfree_webhook(made))
    await rig.stack.wait_for_status(case_id, "succeeded")
    assert "provider_refund_declined" not in await rig.stack.actions(case_id)


async def test_a_cashfree_refund_webhook_names_the_order_our_create_names(rig: Rig) -> None:
    """A charge is an order here: our case, Cashfree's refund webhook and a dashboard
    refund's tracking case hold it under one key, so a wait on the case's charge hears its
    webhook and every hold on the order is counted together (not under `cf_payment_id`)."""
    order_id = rig.cashfree.order(Decimal("90.00"))
    case_id = await rig.cashfree_refund(order_id, 1_000)
    await rig.stack.wait_for_status(case_id, "pending")
    [made] = rig.cashfree.refunds_of(order_id)
    body = cashfree_webhook(made)
    event = rig.stack.providers["cashfree"].parse_webhook(sign_cashfree(body), body, time.time())
    heard = event.as_refund() if isinstance(event, ProviderEvent) else None
    assert heard is not None and (heard.reference, heard.charge_id) == (case_id, order_id)

    dashboard = rig.cashfree.history(order_id, Decimal("15.00"), status="PENDING")
    [theirs] = [r for r in rig.cashfree.refunds_of(order_id) if r["cf_refund_id"] == dashboard]
    answer = await rig.webhook("cashfree", cashfree_webhook(theirs, status="PENDING"))
    assert answer.json()["verdict"] == "accepted", answer.text
    tracking = await rig.stack.wait_for_status(tracking_case_id("cashfree", dashboard), "tracking")
    assert (tracking["charge_id"], tracking["reserved_amount"]) == (order_id, 1_500)


async def test_cashfree_unpaid_or_unknown_order_is_rejected_before_any_call(rig: Rig) -> None:
    unpaid = rig.cashfree.order(Decimal("10.00"), status="ACTIVE")
    for order_id in (unpaid, "order_nobody_made"):
        case_id = await rig.cashfree_refund(order_id, 500)
        row = await rig.stack.wait_for_status(case_id, "rejected")
        assert row["reserved_amount"] == 0
    assert rig.cashfree.refunds_of(unpaid) == []


@pytest.mark.parametrize("refund_request_id", ["acme:ord.2024-0001", "r" * 41],
                         ids=["not-cashfree-characters", "past-40-characters"])
async def test_an_id_cashfree_cannot_take_as_its_refund_id_is_refused_at_once(
        rig: Rig, refund_request_id: str) -> None:
    """Cashfree takes our request id as its refund_id: 3 to 40 letters, digits, `-` and `_`.
    One it cannot take was accepted (202), went through validation and approvals, and was
    declined at the create; it is a 422 naming the field before any case exists."""
    order_id = rig.cashfree.order(Decimal("100.00"))
    body = rig.stack.refund_body(order_id, 2_000, provider="cashfree", currency="INR",
                                 merchant_account=CASHFREE_ID, refund_request_id=refund_request_id)
    async with rig.stack.api("alice") as api:
        refused = await api.post("/v1/refund-requests", json=body)
    assert refused.status_code == 422, refused.text
    assert "refund_request_id" in str(refused.json()["detail"][0]["loc"])
    assert await rig.stack.store.cases.get(refund_request_id) is None


async def test_a_reissue_whose_id_cashfree_cannot_take_is_refused_before_it_exists(rig: Rig) -> None:
    """A reissue's id is its parent's with `-r<n>`: a Cashfree case near the id limit has a
    reissue Cashfree would decline at the create, after its approvals (the case failed,
    the customer still unpaid). It is refused where it enters, nothing written."""
    order_id = rig.cashfree.order(Decimal("100.00"))
    case_id = f"rr-{uuid.uuid4().hex}-0000"  # 39: Cashfree takes 40; its reissue id is 42
    await rig.stack.request_refund("alice", order_id, 2_000, provider="cashfree", currency="INR",
                                   merchant_account=CASHFREE_ID, refund_request_id=case_id)
    await rig.stack.wait_for_status(case_id, "pending")
    [made] = rig.cashfree.refunds_of(order_id)
    assert (await rig.webhook("cashfree", cashfree_webhook(made, "FAILED"))).status_code == 200
    await rig.stack.wait_for_status(case_id, "refund_failed")
    async with rig.stack.api("olga") as api:
        refused = await api.post(f"/v1/refund-requests/{case_id}/reissue",
                                 json={"method": "provider", "reason": "customer asked again"})
        by_transfer = await api.post(f"/v1/refund-requests/{case_id}/reissue",
                                     json={"method": "bank_transfer", "reason": "paid by ops instead"})
    assert refused.status_code == 422 and "cashfree" in refused.json()["detail"], refused.text
    assert by_transfer.status_code == 202, by_transfer.text  # no Cashfree id: ops pay it
    assert [c["method"] for c in await rig.stack.store.cases.children(case_id)] == ["bank_transfer"]
    assert rig.cashfree.creates.count(f"{case_id}-r1") == 0


# -- Rainforest ------------------------------------------------------------------------------

async def test_rainforest_refund_through_the_api_is_made_once_and_settled_by_its_webhook(rig: Rig) -> None:
    payin_id = rig.rainforest.payin(5_000)
    case_id = await rig.rainforest_refund(payin_id, 1_500)
    row = await rig.stack.wait_for_status(case_id, "pending")
    [made] = rig.rainforest.refunds_of(payin_id)
    assert (made["amount"], made["metadata"]) == (1_500, {"refund_request_id": case_id})
    assert made["idempotency_key"].startswith("rfo_") and row["provider_refund_id"] == made["refund_id"]
    answer = await rig.webhook("rainforest", rainforest_webhook(made))
    assert answer.json()["verdict"] == "accepted" and answer.json()["workflow_id"] == case_id
    await rig.stack.wait_for_status(case_id, "succeeded")
    assert [x["debit"] for x in await rig.stack.store.ledger.entries(case_id)] == [1_500, 0]


async def test_rainforest_lost_create_answer_is_verified_not_resent(rig: Rig) -> None:
    payin_id = rig.rainforest.payin(9_000)
    rig.rainforest_proxy.lose_next("POST", f"/v1/payins/{payin_id}/refund")
    case_id = await rig.rainforest_refund(payin_id, 2_000)
    row = await rig.stack.wait_for_status(case_id, "pending")
    [made] = rig.rainforest.refunds_of(payin_id)
    assert json.loads(rig.rainforest_proxy.lost[-1])["data"]["refund_id"] == made["refund_id"]
    assert row["provider_refund_id"] == made["refund_id"]
    await rig.webhook("rainforest", rainforest_webhook(made, "FAILED"))
    row = await rig.stack.wait_for_status(case_id, "refund_failed")
    assert row["reserved_amount"] == 0 and len(rig.rainforest.refunds_of(payin_id)) == 1


# -- declines --------------------------------------------------------------------------------

@pytest.mark.parametrize("provider", ["rainforest", "cashfree"])
async def test_a_4xx_on_create_is_a_decline_and_nothing_moves(rig: Rig, provider: str) -> None:
    if provider == "rainforest":
        charge = rig.rainforest.payin(4_000)
        rig.rainforest.declined.add(charge)
        case_id = await rig.rainforest_refund(charge, 1_000)
    else:
        charge = rig.cashfree.order(Decimal("40.00"))
        rig.cashfree.declined.add(charge)
        case_id = await rig.cashfree_refund(charge, 1_000)
    row = await rig.stack.wait_for_status(case_id, "refund_failed")
    assert row["reserved_amount"] == 0
    [declined] = [e for e in await rig.stack.store.audit.trail(case_id)
                  if e["action"] == "provider_refund_declined"]
    assert "HTTP 400" in declined["detail"]["error"]
    assert await rig.stack.store.ledger.entries(case_id) == []
    made = rig.rainforest.refunds_of(charge) if provider == "rainforest" else rig.cashfree.refunds_of(charge)
    assert made == []


# -- listing and reconciliation --------------------------------------------------------------

async def test_rainforest_lists_a_window_newest_first_page_by_page_and_resumes(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rainforest, "LIST_PAGE", 3)
    payin_id = rig.rainforest.payin(100_000)
    inside = [rig.rainforest.history(payin_id, 100 + i, days_ago(41 + i)) for i in range(7)]
    rig.rainforest.history(payin_id, 1, days_ago(60))
    rig.rainforest.history(payin_id, 2, days_ago(39))
    provider = rig.stack.providers["rainforest"]
    assert isinstance(provider, RefundLister)
    listed = [r async for r in provider.list_refunds(days_ago(50), days_ago(40))
              if isinstance(r, ListedRefund)]
    assert [r.refund.refund_id for r in listed] == inside
    assert [r.refund.amount for r in listed] == [100 + i for i in range(7)]
    assert [r.created for r in listed] == sorted((r.created for r in listed), reverse=True)
    rest = [r.refund.refund_id async for r in provider.list_refunds(days_ago(50), days_ago(40), inside[3])
            if isinstance(r, ListedRefund)]
    assert rest == inside[4:]


async def test_a_rainforest_refund_no_rule_can_read_is_a_break_and_the_run_goes_on(rig: Rig) -> None:
    """A status Rainforest added after our table (or an amount that is no integer): a break
    for ops, as for Stripe; the refunds listed after it are still read. Before, the run
    failed for good on it, and every scheduled run after it for as long as it stayed in
    the window."""
    payin_id = rig.rainforest.payin(50_000)
    fine = rig.rainforest.history(payin_id, 1_100, days_ago(5))
    odd = rig.rainforest.history(payin_id, 1_200, days_ago(4), status="PARTIALLY_RETURNED")
    report = await backfill(rig.stack, provider="rainforest", since_days=30)
    assert report["state"] == "completed", report
    found = {b["object_id"]: b for b in report["breaks"]}
    assert found[odd]["break_class"] == "unmapped_status"
    assert found[odd]["evidence"]["provider"]["raw_status"] == "PARTIALLY_RETURNED"
    assert found[fine]["break_class"] == "unknown_to_us"  # read past the odd one (newer, first)


async def test_a_rainforest_backfill_finds_a_refund_unknown_to_us(rig: Rig) -> None:
    payin_id = rig.rainforest.payin(50_000)
    unknown = rig.rainforest.history(payin_id, 4_200, days_ago(4))
    report = await backfill(rig.stack, provider="rainforest", since_days=30)
    found = {b["object_id"]: b for b in report["breaks"]}
    assert found[unknown]["break_class"] == "unknown_to_us"
    assert found[unknown]["evidence"]["provider"]["status"] == "succeeded"
    again = await backfill(rig.stack, provider="rainforest", since_days=30)
    assert again["new_breaks"] == 0 and unknown in {b["object_id"] for b in again["breaks"]}


async def test_an_approved_rainforest_break_is_read_again_at_rainforest_before_money_moves(rig: Rig) -> None:
    """The settlement reads the refund through its payin (Rainforest lists a payin's refunds):
    a refund found succeeded and failed since posts nothing once approved; ops look."""
    payin_id = rig.rainforest.payin(50_000)
    unknown = rig.rainforest.history(payin_id, 4_200, days_ago(4))
    await backfill(rig.stack, provider="rainforest", since_days=30)
    [found] = await wait_for_breaks(rig.stack, [unknown], "awaiting_approval")
    next(r for r in rig.rainforest.refunds if r["refund_id"] == unknown)["status"] = "FAILED"
    assert (await decide(rig.stack, "carol", found["id"])).status_code == 202
    [settled] = await wait_for_breaks(rig.stack, [unknown], "ops_review", "resolved")
    assert (settled["state"], settled["resolution"]["provider_moved"]) == (
        "ops_review", {"provider_status": "failed", "found_provider_status": "succeeded"})
    assert await rig.stack.store.ledger.entries(found["chain"]) == []


# -- the registry and money conversion, without a stack --------------------------------------

async def test_without_api_settings_both_stay_webhooks_only() -> None:
    providers = build_providers(Settings(rainforest_webhook_secret=RAINFOREST_SECRET,
                                         cashfree_webhook_secret=CASHFREE_SECRET,
                                         rainforest_api_key="key-but-no-base"))
    try:
        request = RefundRequest(refund_request_id="rr-webhooks-only", provider="cashfree", charge_id="o1",
                                amount=100, currency="INR", merchant_account="m", reason="duplicate")
        for name, kind in (("rainforest", RainforestProvider), ("cashfree", CashfreeProvider)):
            provider = providers[name]
            assert type(provider) is kind and not isinstance(provider, RefundLister)
            with pytest.raises(ProviderUnsupported, match="webhooks only"):
                await provider.create_refund(request, request.idempotency_key())
            with pytest.raises(ProviderUnsupported):
                await provider.find_refund(request)
    finally:
        await close_providers(providers)


async def test_with_api_settings_only_rainforest_claims_a_refund_listing() -> None:
    providers = build_providers(Settings(
        rainforest_webhook_secret=RAINFOREST_SECRET, rainforest_api_base="http://127.0.0.1:9",
        rainforest_api_key=RAINFOREST_KEY, cashfree_webhook_secret=CASHFREE_SECRET,
        cashfree_api_base="http://127.0.0.1:9/pg", cashfree_client_id=CASHFREE_ID,
        cashfree_client_secret=CASHFREE_API_SECRET))
    try:
        assert isinstance(providers["rainforest"], RainforestApiProvider)
        assert isinstance(providers["cashfree"], CashfreeApiProvider)
        assert isinstance(providers["rainforest"], RefundLister)
        assert not isinstance(providers["cashfree"], RefundLister)  # per-order lists only: said, not faked
        assert not any(isinstance(p, PayoutLister) for p in providers.values())
    finally:
        await close_providers(providers)


@pytest.mark.parametrize(("amount", "currency", "text"), [
    (12_345, "INR", b"123.45"), (1, "INR", b"0.01"), (500, "JPY", b"500"), (1, "KWD", b"0.001"),
    (10**15 + 7, "INR", b"10000000000000.07")])
def test_major_units_are_written_digit_for_digit(amount: int, currency: str, text: bytes) -> None:
    body = exact_json({"refund_amount": minor_to_major(amount, currency), "refund_id": "rr-1"})
    assert body == b'{"refund_amount": ' + text + b', "refund_id": "rr-1"}'


# -- governance inputs read from the provider --------------------------------------------------

@pytest.mark.parametrize("provider", ["rainforest", "cashfree"])
async def test_a_charge_refunded_outside_us_refuses_an_over_refund_before_any_call(
        rig: Rig, provider: str) -> None:
    if provider == "rainforest":
        charge = rig.rainforest.payin(5_000)
        rig.rainforest.history(charge, 4_000, days_ago(1))  # a dashboard refund: no webhook
        case_id = await rig.rainforest_refund(charge, 2_000)
    else:
        charge = rig.cashfree.order(Decimal("50.00"))
        rig.cashfree.history(charge, Decimal("40.00"))
        case_id = await rig.cashfree_refund(charge, 2_000)
    row = await rig.stack.wait_for_status(case_id, "rejected", "refund_failed", "pending")
    assert (row["status"], row["reserved_amount"]) == ("rejected", 0)
    [rejected] = [e for e in await rig.stack.store.audit.trail(case_id)
                  if e["action"] == "validation_rejected"]
    assert rejected["detail"]["reason"] == "amount 2000 exceeds remaining refundable 1000"
    made = rig.rainforest.refunds_of(charge) if provider == "rainforest" else rig.cashfree.refunds_of(charge)
    assert len(made) == 1  # only the refund made outside us


@pytest.mark.parametrize("provider", ["rainforest", "cashfree"])
async def test_a_disputed_charge_reaches_the_prior_dispute_rule(rig: Rig, provider: str) -> None:
    if provider == "rainforest":
        charge = rig.rainforest.payin(5_000)
        rig.rainforest.chargeback(charge, 5_000)
        case_id = await rig.stack.request_refund(
            "alice", charge, 1_000, provider="rainforest", reason="item_not_received",
            merchant_account=rig.rainforest.merchant_id)
    else:
        charge = rig.cashfree.order(Decimal("50.00"))
        rig.cashfree.dispute(charge)
        case_id = await rig.stack.request_refund(
            "alice", charge, 1_000, provider="cashfree", currency="INR", reason="item_not_received",
            merchant_account=CASHFREE_ID)
    row = await rig.stack.wait_for_status(case_id, "awaiting_approval", "pending")
    assert row["status"] == "awaiting_approval"
    assert {"high_risk_reason:item_not_received", "charge_disputed"} <= set(row["decision"]["rules_fired"])
    assert row["decision"]["context"]["prior_dispute_count"] == 1


async def _serving(routes: dict[str, Any]) -> AppServer:
    """A throwaway API answering fixed JSON per path: a provider answer with a field left out."""
    app = FastAPI()
    for path, body in routes.items():
        app.add_api_route(path, lambda body=body: JSONResponse(body), methods=["GET"])
    server = AppServer(app, "127.0.0.1", 0)
    await server.start()
    return server


RAINFOREST_PAYIN = {"payin_id": "pyi_1", "merchant_id": "mid_1", "amount": 5_000, "currency_code": "USD",
                    "status": "SUCCEEDED", "refundable_amount": 5_000, "refunds": [], "chargebacks": []}


async def test_another_rainforest_merchant_is_not_ours() -> None:
    """A platform's webhooks and API key cover every merchant on it; this deployment serves
    REFUNDS_RAINFOREST_MERCHANT_IDS. Another merchant's signed refund event opened a tracking
    case that held and booked its refund in our ledger: it is `foreign_account`. Its payin is
    no charge of ours (validation refuses it) and a refund on it is never sent."""
    doc = json.loads((PAYLOADS / "rainforest_refund.processing.json").read_bytes())
    payin = {**RAINFOREST_PAYIN, "merchant_id": "mid_other"}
    listed: list[dict[str, Any]] = [
        {"refund_id": f"rfd_{m}", "payin_id": "pyi_1", "merchant_id": m, "amount": 100,
         "currency_code": "USD", "status": "SUCCEEDED", "metadata": {},
         "created_at": "2026-12-01T10:00:00+00:00"}
        for m in ("mid_other", "mid_1")]
    server = await _serving({"/v1/payins/pyi_1": {"status": "SUCCESS", "data": payin},
                             "/v1/refunds": {"status": "SUCCESS", "data": {"results": listed}}})
    adapter = RainforestApiProvider(api_base=server.url, api_key=RAINFOREST_KEY,
                                    webhook_secrets=[RAINFOREST_SECRET], merchant_ids=["mid_1"])
    request = RefundRequest(refund_request_id="rr-other", provider="rainforest", charge_id="pyi_1",
                            amount=100, currency="USD", merchant_account="mid_other", reason="duplicate")
    try:
        for merchant, foreign in (("mid_other", True), ("mid_1", False)):
            doc["data"]["merchant_id"] = merchant
            body = json.dumps(doc).encode()
            if foreign:
                with pytest.raises(WebhookRejected) as refused:
                    adapter.parse_webhook(sign_rainforest(body), body, time.time())
                assert refused.value.verdict == "foreign_account" and "mid_other" in refused.value.message
            else:
                event = adapter.parse_webhook(sign_rainforest(body), body, time.time())
                assert event.merchant_account == "mid_1"
        with pytest.raises(ProviderDeclined, match="mid_other"):
            await adapter.get_charge("pyi_1")
        with pytest.raises(ProviderDeclined, match="nothing was sent"):
            await adapter.create_refund(request, "key-1")
        window = (datetime(2026, 11, 30, tzinfo=UTC), datetime(2026, 12, 2, tzinfo=UTC))
        seen = [item async for item in adapter.list_refunds(*window)]
        assert [i.refund.refund_id for i in seen if isinstance(i, ListedRefund)] == ["rfd_mid_1"]
    finally:
        await adapter.aclose()
        await server.stop()
    doc["data"]["merchant_id"] = ["mid_1"]  # not a merchant id at all: foreign, never a 500
    body = json.dumps(doc).encode()
    with pytest.raises(WebhookRejected, match="not one this deployment serves"):
        adapter.parse_webhook(sign_rainforest(body), body, time.time())
    unset = RainforestProvider(webhook_secrets=[RAINFOREST_SECRET])  # no list: every merchant
    body = json.dumps(doc | {"data": doc["data"] | {"merchant_id": "mid_any"}}).encode()
    assert unset.parse_webhook(sign_rainforest(body), body, time.time()).provider == "rainforest"


def test_a_rainforest_event_naming_only_its_refund_is_read_beside_a_merchant_list() -> None:
    """An event as Rainforest tabulates a status change (no merchant, payin or amount) is
    read, for the case holding its refund; one carrying a whole refund still needs its
    merchant to be served here (it could open a tracking case), and a part of one is not read."""
    adapter = RainforestProvider(webhook_secrets=[RAINFOREST_SECRET], merchant_ids=["mid_1"])
    body = rainforest_status_only("rfd_1", "FAILED")
    event = adapter.parse_webhook(sign_rainforest(body), body, time.time())
    assert (event.refund_id, event.status, event.charge_id, event.amount, event.merchant_account) == (
        "rfd_1", ProviderRefundStatus.FAILED, None, None, None)
    assert event.failure_reason == "account_closed: The card account is closed"
    assert event.as_refund() is None
    doc = json.loads((PAYLOADS / "rainforest_refund.processing.json").read_bytes())
    del doc["data"]["merchant_id"]
    part = {"refund_id": "rfd_2", "status": "SUCCEEDED", "payin_id": "pyi_1", "merchant_id": "mid_1"}
    for data, verdict in ((doc["data"], "foreign_account"), (part, "unreadable")):
        body = json.dumps({"data": data, "event_type": "refund.succeeded"}).encode()
        with pytest.raises(WebhookRejected) as refused:
            adapter.parse_webhook(sign_rainforest(body), body, time.time())
        assert refused.value.verdict == verdict


@pytest.mark.parametrize("missing", ["refunds", "chargebacks"])
async def test_a_rainforest_payin_without_a_governance_field_is_an_error_not_zero(missing: str) -> None:
    payin = {k: v for k, v in RAINFOREST_PAYIN.items() if k != missing}
    server = await _serving({"/v1/payins/pyi_1": {"status": "SUCCESS", "data": payin}})
    adapter = RainforestApiProvider(api_base=server.url, api_key=RAINFOREST_KEY,
                                    webhook_secrets=[RAINFOREST_SECRET])
    request = RefundRequest(refund_request_id="rr-malformed", provider="rainforest", charge_id="pyi_1",
                            amount=100, currency="USD", merchant_account="mid_1", reason="duplicate")
    try:
        with pytest.raises(UnexpectedProviderStatus, match=missing):
            await adapter.get_charge("pyi_1")
        if missing == "refunds":  # not "no refund of ours": that answer would allow a resubmit
            with pytest.raises(UnexpectedProviderStatus, match=missing):
                await adapter.find_refund(request)
    finally:
        await adapter.aclose()
        await server.stop()


CASHFREE_ORDER = {"cf_order_id": "2149460581", "order_id": "order_1", "entity": "order",
                  "order_currency": "INR", "order_amount": 50, "order_status": "PAID"}
CASHFREE_REFUND = {"cf_payment_id": 1, "cf_refund_id": "1553338", "refund_id": "rr-1", "order_id": "order_1",
                   "entity": "refund", "refund_amount": 10, "refund_currency": "INR",
                   "refund_status": "SUCCESS"}


@pytest.mark.parametrize("answers", [
    {"/orders/order_1/refunds": [{k: v for k, v in CASHFREE_REFUND.items() if k != "refund_amount"}],
     "/orders/order_1/disputes": []},
    {"/orders/order_1/refunds": [CASHFREE_REFUND], "/orders/order_1/disputes": {"disputes": None}},
], ids=["refund_amount", "disputes"])
async def test_a_cashfree_order_without_a_governance_field_is_an_error_not_zero(
        answers: dict[str, Any]) -> None:
    server = await _serving({"/orders/order_1": CASHFREE_ORDER, **answers})
    adapter = CashfreeApiProvider(api_base=server.url, client_id=CASHFREE_ID,
                                  client_secret=CASHFREE_API_SECRET, webhook_secrets=[CASHFREE_SECRET])
    try:
        with pytest.raises(UnexpectedProviderStatus, match=r"refund_amount|disputes"):
            await adapter.get_charge("order_1")
    finally:
        await adapter.aclose()
        await server.stop()


@pytest.mark.parametrize(("status", "unknown"), [(200, False), (302, True), (400, False), (404, False),
                                                 (408, True), (409, True), (429, True), (503, True)])
async def test_only_a_2xx_or_a_refusing_4xx_is_an_answer(status: int, unknown: bool) -> None:
    """What `send` hands the adapters: a redirect, a request timeout, a conflicting request
    in flight, a rate limit or a 5xx may hide a refund made (an unknown outcome)."""
    http = httpx.AsyncClient(base_url="http://provider.invalid", transport=httpx.MockTransport(
        lambda request: httpx.Response(status, text="{}")))
    try:
        if unknown:
            with pytest.raises(ProviderOutcomeUnknown):
                await send(http, "POST", "/refunds")
        else:
            assert (await send(http, "POST", "/refunds")).status_code == status
    finally:
        await http.aclose()


async def test_a_rainforest_lookup_reads_only_our_refund_of_the_payin(rig: Rig) -> None:
    """Our refund is found on its payin by our reference; another refund of the payin (a
    dashboard refund) in a status we have no branch for is not ours to read. Mapped before
    the filter, it made every lookup of our refund fail (`unexpected_provider_status`, the
    case in ops review for good after a lost create answer)."""
    payin_id = rig.rainforest.payin(5_000)
    rig.rainforest.history(payin_id, 100, days_ago(1), status="RETURNED")  # a status not mapped
    case_id = f"rr-{uuid.uuid4().hex[:12]}"
    ours = rig.rainforest._refund(payin_id, 1_500, "k-ours", {REFERENCE_KEY: case_id}, days_ago(0))
    adapter = rig.stack.providers["rainforest"]
    assert isinstance(adapter, RainforestApiProvider)
    request = RefundRequest(refund_request_id=case_id, provider="rainforest", charge_id=payin_id,
                            amount=1_500, currency="USD", merchant_account=rig.rainforest.merchant_id,
                            reason="duplicate")
    found = await adapter.find_refund(request)
    assert found is not None and (found.refund_id, found.reference) == (ours["refund_id"], case_id)
    got = await adapter.get_refund(ours["refund_id"], payin_id)
    assert got is not None and got.amount == 1_500
    with pytest.raises(UnexpectedProviderStatus):  # the payin's refunded total is unknown
        await adapter.get_charge(payin_id)


async def test_a_rainforest_lookup_whose_payin_is_not_found_is_no_answer_about_the_refund() -> None:
    """We only look a refund up on a payin validation read and a submit was made against:
    its 404 then says nothing about our refund (an outage, a wrong shard, a key that lost
    the merchant). Read as "no refund", it let a cancelled case release its hold and a
    resubmit go out while the first create could exist; it is a failed lookup instead."""
    server = await _serving({})
    adapter = RainforestApiProvider(api_base=server.url, api_key=RAINFOREST_KEY,
                                    webhook_secrets=[RAINFOREST_SECRET])
    request = RefundRequest(refund_request_id="rr-gone", provider="rainforest", charge_id="pyi_gone",
                            amount=100, currency="USD", merchant_account="mid_1", reason="duplicate")
    try:
        assert await adapter.get_charge("pyi_gone") is None  # validation: no such charge, a rejection
        with pytest.raises(ProviderError, match="pyi_gone"):
            await adapter.find_refund(request)
    finally:
        await adapter.aclose()
        await server.stop()


async def test_a_lookup_answering_another_reference_is_no_answer_about_ours(rig: Rig) -> None:
    """A provider's lookup by our id answers a refund under another one (here a Cashfree that
    matched refund ids without regard to case: `rr-Case-X` for `rr-case-x`). Taken as ours, a
    case was booked succeeded on another case's refund, its customer never paid (reproduced).
    The lookup is no answer: an unknown outcome, asked again."""
    order_id = rig.cashfree.order(Decimal("500.00"))
    theirs = f"rr-Case-{uuid.uuid4().hex[:8]}"
    rig.cashfree._refund(order_id, Decimal("10.00"), theirs, None, None)
    ours = RefundRequest(refund_request_id=theirs.lower(), provider="cashfree", charge_id=order_id,
                         amount=1_000, currency="INR", merchant_account=CASHFREE_ID,
                         reason=RefundReason.DUPLICATE)
    activities = RefundActivities(rig.stack.store, rig.stack.providers, load_policy())
    rig.cashfree.ids_ignore_case = True
    try:
        with pytest.raises(ApplicationError) as unknown:
            await ActivityEnvironment().run(activities.verify_provider_refund,
                                            VerifyInput(request=ours, reason="an earlier attempt"))
    finally:
        rig.cashfree.ids_ignore_case = False
    assert unknown.value.type == errors.OUTCOME_UNKNOWN and theirs in str(unknown.value)


async def test_a_create_refused_as_a_duplicate_of_another_reference_books_nothing(rig: Rig) -> None:
    """The same loose provider refuses our create as a duplicate of `rr-Case-X` and the
    adapter's own look after that refusal answers `rr-Case-X`'s refund: it was recorded as
    created for `rr-case-x` (reproduced). An unknown outcome instead; the case books its own
    refund once the provider takes its id."""
    order_id = rig.cashfree.order(Decimal("500.00"))
    theirs = f"rr-Case-{uuid.uuid4().hex[:8]}"
    made = rig.cashfree._refund(order_id, Decimal("10.00"), theirs, None, None)
    rig.cashfree.ids_ignore_case = True
    try:
        case_id = await rig.stack.request_refund(
            "alice", order_id, 1_000, provider="cashfree", currency="INR", merchant_account=CASHFREE_ID,
            refund_request_id=theirs.lower())
        # the order's other refund is none of our cases': people decide (`refunded_outside_cases`)
        waiting = await rig.stack.wait_for_status(case_id, "awaiting_approval")
        assert "refunded_outside_cases" in waiting["decision"]["rules_fired"]
        assert (await approve(rig.stack, "bob", case_id)).status_code == 202
        await rig.stack.wait_for_audit(case_id, "provider_outcome_unknown")
        row = await rig.stack.store.cases.get(case_id)
        assert row is not None and row["provider_refund_id"] is None
        assert "provider_refund_created" not in await rig.stack.actions(case_id)
    finally:
        rig.cashfree.ids_ignore_case = False
    row = await rig.stack.wait_for_status(case_id, "pending", timeout=90)
    assert row["provider_refund_id"] not in (None, made["cf_refund_id"])


@pytest.mark.parametrize("status", ["SUCCEEDED", "FAILED"])
async def test_a_rainforest_event_with_only_its_documented_fields_moves_the_case_holding_it(
        rig: Rig, status: str) -> None:
    """Rainforest's docs list for refund.succeeded/failed/canceled only refund_id, status,
    updated_at (and the refusal's code and text): no payin, amount or merchant. Such an event
    was unreadable (400, retried until Rainforest gave up) and the case never heard its end.
    The case holding the refund hears it, as of what that case asked for."""
    payin_id = rig.rainforest.payin(6_000)
    case_id = await rig.rainforest_refund(payin_id, 1_700)
    await rig.stack.wait_for_status(case_id, "pending")
    [made] = rig.rainforest.refunds_of(payin_id)
    answer = await rig.webhook("rainforest", rainforest_status_only(made["refund_id"], status))
    assert answer.status_code == 200, answer.text
    assert answer.json()["workflow_id"] == case_id
    if status == "SUCCEEDED":
        await rig.stack.wait_for_status(case_id, "succeeded")
        assert [x["debit"] for x in await rig.stack.store.ledger.entries(case_id)] == [1_700, 0]
    else:
        row = await rig.stack.wait_for_status(case_id, "refund_failed")
        assert row["reserved_amount"] == 0
        assert "account_closed" in json.dumps(await rig.stack.store.audit.trail(case_id), default=str)


async def test_a_rainforest_failure_naming_only_its_refund_after_the_case_closed_is_a_break(rig: Rig) -> None:
    """The refund a closed case shows refunded fails later (a closed card account), and the
    word names only the refund: a break for ops, as a whole failure event opens."""
    payin_id = rig.rainforest.payin(6_000)
    case_id = await rig.rainforest_refund(payin_id, 1_300)
    await rig.stack.wait_for_status(case_id, "pending")
    [made] = rig.rainforest.refunds_of(payin_id)
    await rig.webhook("rainforest", rainforest_webhook(made))
    await rig.stack.wait_for_status(case_id, "succeeded")
    await rig.stack.client.get_workflow_handle(case_id).terminate("its watch long over")
    await rig.webhook("rainforest", rainforest_status_only(made["refund_id"], "FAILED"))
    [found] = await wait_for_breaks(rig.stack, [made["refund_id"]], "awaiting_approval")
    assert (found["break_class"], found["refund_request_id"]) == ("provider_failed_shown_refunded", case_id)


def rainforest_status_only(refund_id: str, status: str) -> bytes:
    """A refund status event with only the fields Rainforest's docs tabulate for it."""
    data = {"refund_id": refund_id, "status": status, "updated_at": "2026-12-07T10:00:00Z"}
    if status == "FAILED":
        data |= {"refusal_code": "account_closed", "refusal_desc": "The card account is closed"}
    return json.dumps({"data": data, "event_type": f"refund.{status.lower()}"}).encode()
