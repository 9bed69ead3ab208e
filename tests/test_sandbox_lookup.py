"""The sandbox adapter's verify-state lookup (GET /v1/refunds by charge and reference): the
only guard against a second refund after a lost answer, as the sandbox keeps no idempotency
keys by default. It finds ours however many refunds the charge has, and never takes another
request's refund for ours, whether or not the server honours the reference filter."""

import uuid
from typing import Any

import httpx
import pytest

from adapters.providers.base import ProviderOutcomeUnknown
from adapters.providers.sandbox import SandboxProvider
from domain.models import RefundReason, RefundRequest
from tests.harness import Stack


def request_for(charge_id: str, refund_request_id: str) -> RefundRequest:
    return RefundRequest(refund_request_id=refund_request_id, provider="sandbox", charge_id=charge_id,
                         amount=1, currency="USD", merchant_account="acct_1",
                         reason=RefundReason.REQUESTED_BY_CUSTOMER)


async def test_a_refund_below_a_hundred_newer_ones_on_its_charge_is_found(stack: Stack) -> None:
    """The server read the newest hundred refunds of the charge and filtered them: ours, older,
    was "not there", and the workflow's resubmit would have made a second refund."""
    charge = await stack.charge(1_000)
    ours = f"rr-{uuid.uuid4().hex}"
    async with stack.sandbox() as sandbox:
        made = await sandbox.post("/v1/refunds", json={"charge": charge, "amount": 1,
                                                       "metadata": {"refund_request_id": ours}})
        assert made.status_code == 200, made.text
        for n in range(100):
            later = await sandbox.post("/v1/refunds", json={"charge": charge, "amount": 1,
                                                            "metadata": {"refund_request_id": f"{ours}-{n}"}})
            assert later.status_code == 200, later.text
    found = await stack.providers["sandbox"].find_refund(request_for(charge, ours))
    assert found is not None and found.refund_id == made.json()["id"]
    assert len(await stack.provider_refunds(charge)) == 101  # the checker's truth reads every page


def paged(objects: list[dict[str, Any]], per_page: int) -> httpx.MockTransport:
    """A Stripe-shaped list that ignores every filter and pages `per_page` at a time."""
    def answer(request: httpx.Request) -> httpx.Response:
        after = request.url.params.get("starting_after")
        start = 0 if after is None else [o["id"] for o in objects].index(after) + 1
        page = objects[start:start + per_page]
        return httpx.Response(200, json={"object": "list", "data": page,
                                         "has_more": start + per_page < len(objects)})
    return httpx.MockTransport(answer)


def provider_on(transport: httpx.MockTransport) -> SandboxProvider:
    provider = SandboxProvider("http://sandbox.invalid", webhook_secrets=["s"])
    provider._http = httpx.AsyncClient(base_url="http://sandbox.invalid", transport=transport)
    return provider


@pytest.mark.parametrize("pages", [1, 2])
async def test_a_server_ignoring_the_reference_filter_gives_no_other_requests_refund(pages: int) -> None:
    """A Stripe-shaped server that ignores `reference` answers every refund of the charge: the
    other request's was taken for ours (booked succeeded, our customer never refunded)."""
    def refund(n: int, reference: str) -> dict[str, Any]:
        return {"id": f"re_{n}", "object": "refund", "amount": 1, "currency": "usd", "charge": "ch_1",
                "status": "succeeded", "created": 1_700_000_000 - n, "failure_reason": None,
                "metadata": {"refund_request_id": reference}}

    everyone = [refund(n, f"other-{n}") for n in range(3)] + [refund(9, "ours")]
    per_page = len(everyone) if pages == 1 else 2

    provider = provider_on(paged(everyone, per_page))
    try:
        found = await provider.find_refund(request_for("ch_1", "ours"))
        assert found is not None and found.refund_id == "re_9"
        assert await provider.find_refund(request_for("ch_1", "nobody")) is None
    finally:
        await provider._http.aclose()


def payout(n: int, reference: str | None) -> dict[str, Any]:
    return {"id": f"po_{n}", "object": "payout", "amount": 4_000, "currency": "usd", "status": "paid",
            "created": 1_700_000_000 - n, "metadata": {"payout_reference": reference} if reference else {}}


async def test_a_reissue_past_the_first_page_of_a_server_ignoring_the_filter_is_found() -> None:
    """The reissue's lookup before any create read one page: on a server that lists every
    payout, a reissue older than the newest page was "not there", and the next attempt paid
    the beneficiary again (reproduced). Every page is read, and two payouts under one
    reference are never taken for one."""
    payouts = [payout(n, None) for n in range(5)] + [payout(9, "P-1-r1")]
    provider = provider_on(paged(payouts, 2))
    try:
        found = await provider.find_payout("P-1-r1")
        assert found is not None and found.payout_id == "po_9"
        assert await provider.find_payout("P-2-r1") is None
    finally:
        await provider._http.aclose()
    twice = provider_on(paged([payout(1, "P-1-r1"), *payouts[:3], payout(2, "P-1-r1")], 2))
    try:
        with pytest.raises(ProviderOutcomeUnknown, match="2 payouts"):
            await twice.find_payout("P-1-r1")
    finally:
        await twice._http.aclose()
