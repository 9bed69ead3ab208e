"""The product against localstripe as released (no fields added), as an outside tester runs
it: its charges carry no `disputed` flag and it has no `GET /v1/account`. A refund still
moves once; an unknown dispute history counts as disputed for the rules that read it; an
account it cannot learn is a configuration incident for ops, never a rejected refund, and
ops can cancel the case while it waits."""

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from temporalio.client import Client

from adapters.db import Store
from adapters.providers.base import RefundLister
from domain.reconciliation import ListedRefund
from starters.dev.stack import TemporalDevServer
from tests.harness import Stack, open_stack
from tests.reconciliation_kit import backfill

API_KEY = "sk_test_stock"
SECRET = "whsec_stock_test_secret"
MERCHANT = "acct_stock"


async def _stack(store: Store, client: Client, temporal_server: TemporalDevServer, url: str,
                 **settings: Any) -> Stack:
    return await open_stack(store, client, temporal_server.address, stripe_api_base=url,
                            stripe_api_key=API_KEY, stripe_webhook_secret=SECRET, **settings)


async def _charge(url: str, amount: int) -> str:
    async with httpx.AsyncClient(base_url=url, auth=(API_KEY, ""), timeout=30) as http:
        response = await http.post("/v1/charges", data={"amount": amount, "currency": "usd",
                                                         "source": "pm_card_visa"})
    response.raise_for_status()
    return str(response.json()["id"])


async def _refunds(url: str, charge: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=url, auth=(API_KEY, ""), timeout=30) as http:
        response = await http.get("/v1/refunds", params={"charge": charge})
    response.raise_for_status()
    return list(response.json()["data"])


@pytest.fixture
async def stock(store: Store, client: Client, temporal_server: TemporalDevServer,
                stock_localstripe: str) -> AsyncIterator[Stack]:
    stack = await _stack(store, client, temporal_server, stock_localstripe, stripe_merchant_account=MERCHANT)
    try:
        yield stack
    finally:
        await stack.close()


async def test_a_refund_at_stock_localstripe_moves_once(stock: Stack, stock_localstripe: str) -> None:
    charge = await _charge(stock_localstripe, 10_000)
    body = stock.refund_body(charge, 2_500, provider="stripe", merchant_account=MERCHANT)
    async with stock.api("alice") as api:
        assert (await api.post("/v1/refund-requests", json=body)).status_code == 202
    row = await stock.wait_for_status(body["refund_request_id"], "succeeded")
    assert row["decision"]["context"]["prior_dispute_count"] is None  # localstripe does not say
    [made] = await _refunds(stock_localstripe, charge)
    assert (made["id"], made["amount"]) == (row["provider_refund_id"], 2_500)


async def test_an_unknown_dispute_history_counts_as_disputed(stock: Stack, stock_localstripe: str) -> None:
    charge = await _charge(stock_localstripe, 10_000)
    body = stock.refund_body(charge, 1_000, provider="stripe", merchant_account=MERCHANT,
                             reason="item_not_received")
    async with stock.api("alice") as api:
        assert (await api.post("/v1/refund-requests", json=body)).status_code == 202
    row = await stock.wait_for_status(body["refund_request_id"], "awaiting_approval")
    assert "high_risk_reason:item_not_received" in row["decision"]["rules_fired"]
    assert await _refunds(stock_localstripe, charge) == []


async def test_an_account_the_provider_cannot_name_is_a_configuration_incident(
        store: Store, client: Client, temporal_server: TemporalDevServer, stock_localstripe: str) -> None:
    stack = await _stack(store, client, temporal_server, stock_localstripe)
    try:
        charge = await _charge(stock_localstripe, 10_000)
        body = stack.refund_body(charge, 1_000, provider="stripe", merchant_account=MERCHANT)
        async with stack.api("alice") as api:
            assert (await api.post("/v1/refund-requests", json=body)).status_code == 202
        case_id = body["refund_request_id"]
        await stack.wait_for_audit(case_id, "provider_configuration_refused")
        row = await stack.wait_for_status(case_id, "ops_review")
        [incident] = [e for e in await stack.store.audit.trail(case_id)
                      if e["action"] == "provider_configuration_refused"]
        assert "REFUNDS_STRIPE_MERCHANT_ACCOUNT" in incident["detail"]["error"]
        assert row["reserved_amount"] == 0 and await _refunds(stock_localstripe, charge) == []
        # ops can end a case whose validation cannot succeed until they fix the configuration
        await stack.client.get_workflow_handle(case_id).cancel()
        row = await stack.wait_for_status(case_id, "canceled_by_ops")
        assert row["reserved_amount"] == 0 and "canceled_by_ops" in await stack.actions(case_id)
    finally:
        await stack.close()


async def test_refunds_are_listed_by_window_though_its_lists_take_no_created_filter(
        store: Store, client: Client, temporal_server: TemporalDevServer, stock_localstripe: str) -> None:
    """Released localstripe answers a list with Stripe's `created` filter with a 500: every
    reconciliation batch failed and was retried for good, finding nothing. The adapter reads
    such a list whole and keeps the window itself; a backfill finds a refund made outside us."""
    stack = await _stack(store, client, temporal_server, stock_localstripe, stripe_merchant_account=MERCHANT,
                         reconciliation_grace_seconds=0)
    try:
        charge = await _charge(stock_localstripe, 10_000)
        async with httpx.AsyncClient(base_url=stock_localstripe, auth=(API_KEY, ""), timeout=30) as http:
            made = await http.post("/v1/refunds", data={"charge": charge, "amount": 1_500})  # the dashboard's
        dashboard = str(made.raise_for_status().json()["id"])
        adapter = stack.providers["stripe"]
        assert isinstance(adapter, RefundLister)
        now = datetime.now(UTC)
        inside = [r async for r in adapter.list_refunds(now - timedelta(hours=1), now + timedelta(hours=1))]
        assert dashboard in [r.refund.refund_id for r in inside if isinstance(r, ListedRefund)]
        later = now + timedelta(hours=1)
        assert [r async for r in adapter.list_refunds(later, later + timedelta(hours=1))] == []
        report = await backfill(stack, provider="stripe", since_days=1)
        assert (dashboard, "unknown_to_us") in {(b["object_id"], b["break_class"]) for b in report["breaks"]}
    finally:
        await stack.close()
