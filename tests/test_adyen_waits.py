"""Adyen waits can end: a create that never reached Adyen goes again with the same
Idempotency-Key; a notification wait escalates to ops review and ops resolve it from the
API or the console ("Adyen shows refunded / not refunded"), with segregation of duties and
an audit row, so the reservation is never held for good. Adyen's API is tests/adyen_fake.py."""

from collections.abc import AsyncIterator

import httpx
import pytest

from adapters.http_server import AppServer
from adapters.providers.adyen import AdyenProvider, ProviderNotReached
from domain.models import RefundReason, RefundRequest
from tests.adyen_fake import FakeAdyen
from tests.test_adyen import API_KEY, MERCHANT, TEST_KEY


class RefuseConnections(httpx.AsyncBaseTransport):
    """The first `times` requests fail to connect (nothing is sent), as a refused or
    unreachable host does; the rest go through."""

    def __init__(self, inner: httpx.AsyncBaseTransport, times: int) -> None:
        self.inner, self.times, self.refused = inner, times, 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.refused < self.times:
            self.refused += 1
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        return await self.inner.handle_async_request(request)


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeAdyen, str]]:
    adyen = FakeAdyen(API_KEY)
    server = AppServer(adyen.app(), "127.0.0.1", 0)
    await server.start()
    yield adyen, server.url
    await server.stop()


def _refusing(url: str, times: int) -> tuple[AdyenProvider, RefuseConnections]:
    provider = AdyenProvider(hmac_keys=[TEST_KEY], api_base=url, api_key=API_KEY,
                             connect_backoff_seconds=0.01)
    assert provider._http is not None
    gate = RefuseConnections(provider._http._transport, times)
    provider._http._transport = gate
    return provider, gate


def _request(psp: str) -> RefundRequest:
    return RefundRequest(refund_request_id="rr-adyen-connect", provider="adyen", charge_id=psp,
                         amount=1_500, currency="EUR", merchant_account=MERCHANT,
                         reason=RefundReason.DUPLICATE)


async def test_a_create_that_never_connected_goes_again_with_the_same_key(
        fake: tuple[FakeAdyen, str]) -> None:
    adyen, url = fake
    psp = adyen.payment(10_000, "EUR", MERCHANT)
    provider, gate = _refusing(url, times=2)
    try:
        refund = await provider.create_refund(_request(psp), "rfo_same_key")
    finally:
        await provider.aclose()
    [made] = adyen.refunds_of(psp)
    assert gate.refused == 2 and made["idempotencyKey"] == "rfo_same_key"
    assert refund.refund_id == made["pspReference"]


async def test_a_create_that_never_connected_at_all_is_a_definite_no(fake: tuple[FakeAdyen, str]) -> None:
    adyen, url = fake
    psp = adyen.payment(10_000, "EUR", MERCHANT)
    provider, gate = _refusing(url, times=3)
    try:
        with pytest.raises(ProviderNotReached, match="nothing was sent"):
            await provider.create_refund(_request(psp), "rfo_same_key")
    finally:
        await provider.aclose()
    assert gate.refused == 3 and adyen.refunds_of(psp) == []
