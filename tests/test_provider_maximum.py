"""An amount beyond what the provider takes in one refund or payout is a 422 naming the
limit, before any case or workflow exists (not only beyond 64 bits): each adapter declares
its maximum per currency (Stripe's documented eight digits, a stated default elsewhere)."""

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from temporalio.client import Client

from adapters.config import Settings
from adapters.db import Store
from adapters.providers.base import AmountLimit
from adapters.providers.registry import build_providers
from domain.money import MAX_MINOR_AMOUNT
from domain.payouts import payout_case_id
from starters.dev.stack import TemporalDevServer
from tests.harness import Stack, open_stack
from tests.test_bad_input import assert_untouched, event_body, request_object, signed, workflow_exists
from tests.test_inbound import person, servicenow, ticket_body
from tests.test_payout_registration import register, registration

PROVIDER_SETTINGS: dict[str, Any] = {
    "stripe_api_key": "sk_test_unused", "stripe_webhook_secret": "whsec_unused",
    "stripe_api_base": "http://127.0.0.1:9", "stripe_merchant_account": "acct_1",
    "adyen_hmac_keys": "00" * 32, "rainforest_webhook_secret": "whsec_dW51c2Vk",
    "cashfree_webhook_secret": "cf-unused",
}
"""Every provider configured; none is ever called (the relay refuses first)."""
PROVIDERS = ("sandbox", "stripe", "adyen", "rainforest", "cashfree")


@pytest.fixture
async def every_provider(store: Store, client: Client,
                         temporal_server: TemporalDevServer) -> AsyncIterator[Stack]:
    opened = await open_stack(store, client, temporal_server.address, worker=False, **PROVIDER_SETTINGS)
    yield opened
    await opened.close()


@pytest.mark.parametrize(("provider", "currency", "documented"), [
    ("stripe", "USD", 99_999_999), ("stripe", "JPY", 99_999_999), ("stripe", "IDR", 999_999_999_999)])
def test_stripe_declares_its_documented_eight_digits(provider: str, currency: str, documented: int) -> None:
    providers = build_providers(Settings(**PROVIDER_SETTINGS))
    limit = providers[provider].max_amount
    assert limit.of(currency) == documented
    assert limit.refusal(provider, documented, currency) is None
    assert f"{documented}" in str(limit.refusal(provider, documented + 1, currency))


@pytest.mark.parametrize("provider", PROVIDERS)
def test_every_adapter_declares_a_maximum_below_64_bits(provider: str) -> None:
    providers = build_providers(Settings(**PROVIDER_SETTINGS, sandbox_webhook_secret="s"))
    limit = providers[provider].max_amount.of("USD")
    assert 0 < limit < MAX_MINOR_AMOUNT
    assert providers[provider].max_amount.refusal(provider, limit, "USD") is None
    assert providers[provider].max_amount.refusal(provider, limit + 1, "USD") is not None


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_a_refund_beyond_the_providers_maximum_is_422_naming_it(
        every_provider: Stack, provider: str) -> None:
    stack = every_provider
    limit = stack.providers[provider].max_amount.of("USD")
    body = stack.refund_body("ch_never_called", limit + 1, provider=provider)
    async with stack.api("alice") as api:
        response = await api.post("/v1/refund-requests", json=body)
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"][-1] == "amount" and str(limit) in error["msg"] and provider in error["msg"]
    assert await stack.store.cases.get(body["refund_request_id"]) is None
    assert not await workflow_exists(stack, body["refund_request_id"])


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_a_payout_beyond_the_providers_maximum_is_422_naming_it(
        every_provider: Stack, provider: str) -> None:
    stack = every_provider
    limit = stack.providers[provider].max_amount.of("USD")
    body = registration(provider=provider, amount=limit + 1)
    response = await register(stack, body)
    assert response.status_code == 422, response.text
    assert str(limit) in response.text and provider in response.text
    async with stack.api("olga") as api:
        assert (await api.get(f"/v1/payouts/{body['id']}")).status_code == 404
    assert not await workflow_exists(stack, payout_case_id(provider, body["provider_payout_id"]))


async def test_a_provider_request_beyond_its_maximum_is_refused_as_invalid(stack: Stack) -> None:
    charge = await stack.charge(10_000)
    limit = stack.providers["sandbox"].max_amount.of("USD")
    rrq = f"rrq_{int(time.time() * 1000)}"
    body = event_body("refund.requested", request_object(charge, rrq, amount=limit + 1))
    assert stack.settings.sandbox_webhook_secret is not None
    secret = stack.settings.sandbox_webhook_secret.get_secret_value()
    async with httpx.AsyncClient(base_url=stack.relay_url) as http:
        response = await http.post("/webhooks/sandbox", content=body, headers=signed(secret, body))
    assert response.status_code == 400, response.text
    assert response.json()["verdict"] == "invalid_request" and str(limit) in response.json()["detail"]
    await assert_untouched(stack, f"sandbox-{rrq}", charge)


async def test_an_amount_at_the_maximum_is_not_refused_for_it(every_provider: Stack) -> None:
    stack = every_provider
    limit = stack.providers["sandbox"].max_amount.of("USD")
    body = stack.refund_body("ch_at_limit", limit)
    async with stack.api("alice") as api:
        response = await api.post("/v1/refund-requests", json=body)
    assert response.status_code == 202, response.text


async def test_a_servicenow_ticket_beyond_the_providers_maximum_is_422_naming_it(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    stack = await open_stack(store, client, temporal_server.address, worker=False,
                             servicenow_inbound_secret="sn-sign")
    try:
        opener = f"jdoe.{uuid.uuid4().hex[:6]}"
        await person(stack, ["requester"], servicenow=opener)
        limit = stack.providers["sandbox"].max_amount.of("USD")
        sys_id = uuid.uuid4().hex
        response = await servicenow(stack, "refund-requests",
                                    ticket_body(sys_id, opener, charge_id="ch_x", amount=limit + 1))
        assert response.status_code == 422, response.text
        assert str(limit) in response.json()["detail"]
        assert await stack.store.cases.get(f"servicenow-{sys_id}") is None
        assert not await workflow_exists(stack, f"servicenow-{sys_id}")
    finally:
        await stack.close()


async def test_a_ticket_sent_again_after_the_maximum_was_lowered_still_names_its_case(
        store: Store, client: Client, temporal_server: TemporalDevServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """ServiceNow sends a ticket again on every work note: once its case is open, the entry
    rules of the day do not judge it again (it was answered 422 and the ticket told "refused"
    while its case went on to refund)."""
    stack = await open_stack(store, client, temporal_server.address, worker=False,
                             servicenow_inbound_secret="sn-sign")
    try:
        opener = f"jdoe.{uuid.uuid4().hex[:6]}"
        requester = await person(stack, ["requester"], servicenow=opener)
        sys_id = uuid.uuid4().hex
        body = ticket_body(sys_id, opener, charge_id="ch_x", amount=5_000)
        first = await servicenow(stack, "refund-requests", body)
        assert first.status_code == 202, first.text
        monkeypatch.setattr(stack.providers["sandbox"], "max_amount", AmountLimit(100, "lowered"))
        resent = await servicenow(stack, "refund-requests", {**body, "sys_updated_on": "2026-11-21 10:06:00"})
        assert resent.status_code == 200, resent.text
        assert resent.json()["refund_request_id"] == f"servicenow-{sys_id}"
        assert not [e for e in await stack.store.audit.trail("")
                    if e["action"] == "action_refused" and e["actor"] == requester]
    finally:
        await stack.close()


@pytest.mark.parametrize(("provider", "currency", "amount", "named"), [
    ("stripe", "MGA", 12_345, "whole"),  # 123.45 MGA: Stripe counts ariary without decimals
    ("stripe", "KWD", 1_234, "multiple of 10"),  # Stripe takes three-decimal amounts ending in 0
    ("stripe", "ISK", 1_000_000, "999999"),  # its eight digits are hundredths of a krona
    ("adyen", "IDR", 12_345, "whole"),  # 123.45 IDR: Adyen counts rupiah without decimals
])
async def test_an_amount_the_provider_cannot_express_is_422_naming_why(
        every_provider: Stack, provider: str, currency: str, amount: int, named: str) -> None:
    """Our amounts are ISO 4217 minor units. One the provider's API cannot carry exactly is
    refused where it enters, before approvals are spent on it, never rounded on the way out."""
    stack = every_provider
    body = stack.refund_body("ch_never_called", amount, provider=provider, currency=currency)
    async with stack.api("alice") as api:
        response = await api.post("/v1/refund-requests", json=body)
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"][-1] == "amount" and named in error["msg"] and provider in error["msg"]
    assert await stack.store.cases.get(body["refund_request_id"]) is None
    assert not await workflow_exists(stack, body["refund_request_id"])


@pytest.mark.parametrize(("provider", "currency", "amount"), [
    ("stripe", "MGA", 12_300), ("stripe", "KWD", 1_230), ("stripe", "ISK", 999_999),
    ("adyen", "IDR", 12_300), ("sandbox", "KWD", 1_234), ("sandbox", "MGA", 12_345)])
async def test_an_amount_the_provider_can_express_is_not_refused_for_it(
        every_provider: Stack, provider: str, currency: str, amount: int) -> None:
    stack = every_provider
    body = stack.refund_body("ch_expressible", amount, provider=provider, currency=currency)
    async with stack.api("alice") as api:
        response = await api.post("/v1/refund-requests", json=body)
    assert response.status_code == 202, response.text


async def test_a_refund_for_a_provider_not_configured_is_422_and_opens_nothing(stack: Stack) -> None:
    """No adapter can take it: refused where it enters, naming the provider, before a case or
    workflow exists (before, 202 and a case rejected later under the caller's id)."""
    body = stack.refund_body("ch_never_called", 1_000, provider="nosuch")
    async with stack.api("alice") as api:
        response = await api.post("/v1/refund-requests", json=body)
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"][-1] == "provider" and "'nosuch' is not configured" in error["msg"]
    assert await stack.store.cases.get(body["refund_request_id"]) is None
    assert not await workflow_exists(stack, body["refund_request_id"])


@pytest.mark.parametrize("change", ["provider_removed", "maximum_lowered"])
async def test_a_repeat_of_an_accepted_request_gets_its_case_whatever_the_entry_rules_say_now(
        every_provider: Stack, monkeypatch: pytest.MonkeyPatch, change: str) -> None:
    """The entry rules judge a request that opens a case, not a repeat of one that did: after
    a deploy removed the provider or lowered its maximum, a client re-sending "to be safe"
    was answered 422 (refused) while its case was open and could still refund: a reason to
    pay the customer by hand a second time."""
    stack = every_provider
    body = stack.refund_body("ch_accepted_before", 5_000, provider="stripe")
    async with stack.api("alice") as api:
        first = await api.post("/v1/refund-requests", json=body)
        assert first.status_code == 202, first.text
        if change == "provider_removed":
            monkeypatch.delitem(stack.providers, "stripe")
        else:
            monkeypatch.setattr(stack.providers["stripe"], "max_amount", AmountLimit(100, "lowered"))
        repeat = await api.post("/v1/refund-requests", json=body)
        assert repeat.status_code == 200, repeat.text
        assert repeat.json()["refund_request_id"] == body["refund_request_id"]
        other = await api.post("/v1/refund-requests", json={**body, "amount": 4_000})
        assert other.status_code == 409, other.text
        fresh = await api.post("/v1/refund-requests", json={
            **body, "refund_request_id": f"{body['refund_request_id']}-new"})
        assert fresh.status_code == 422, fresh.text


async def test_an_id_longer_than_adyen_takes_as_its_reference_is_refused_at_entry(
        every_provider: Stack) -> None:
    """Adyen takes a refund's `reference` (our request id, how its notifications find the case)
    up to 80 characters; ids may be 128. A longer one was accepted, went through approvals
    and met Adyen's refusal at the create: a 422 naming the field before any case exists."""
    stack = every_provider
    stem = f"rr-{uuid.uuid4().hex}-"
    async with stack.api("alice") as api:
        too_long = stack.refund_body("psp_never_called", 1_000, provider="adyen",
                                     refund_request_id=stem.ljust(81, "x"))
        refused = await api.post("/v1/refund-requests", json=too_long)
        assert refused.status_code == 422, refused.text
        [error] = refused.json()["detail"]
        assert error["loc"][-1] == "refund_request_id" and "80" in error["msg"], error
        assert await stack.store.cases.get(too_long["refund_request_id"]) is None
        longest = stack.refund_body("psp_never_called", 1_000, provider="adyen",
                                    refund_request_id=stem.ljust(80, "x"))
        accepted = await api.post("/v1/refund-requests", json=longest)
        assert accepted.status_code == 202, accepted.text
