"""Adyen through the relay and the workflow, on real Temporal and PostgreSQL.

Notifications are the recorded payloads in tests/payloads/adyen_*.json (Adyen's documented
examples, signed with TEST_KEY), re-signed after their references are made unique. The
Checkout API is a loopback fake behind a lossy proxy; Adyen has no status lookup, so a lost
create answer must end in a wait for the notification, an escalation, and one refund.
"""

import contextlib
import copy
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import httpx
import pytest
from temporalio.client import Client

from adapters.config import Settings, comma_list
from adapters.db import Store
from adapters.http_server import AppServer
from adapters.providers import adyen
from adapters.providers.adyen import AdyenProvider
from adapters.providers.base import (
    ProviderDeclined,
    ProviderLookupUnsupported,
    ProviderUnsupported,
    WebhookRejected,
)
from adapters.providers.registry import build_providers, close_providers
from domain.events import tracking_case_id
from domain.models import ProviderEvent, RefundRequest
from domain.payments import PaymentEvent
from domain.payouts import PayoutEvent, PayoutSnapshot, PayoutStatus, payout_case_id
from starters.dev.stack import TemporalDevServer
from starters.relay.webhook_desk import WebhookDesk
from tests.adyen_fake import FakeAdyen
from tests.harness import Stack, open_stack
from tests.lossy_proxy import LossyProxy
from tests.payouts_kit import add_payout_approvers, decide, wait_for_actions, wait_for_case
from tests.test_bad_input import receipt, workflow_exists

PAYLOADS = Path(__file__).parent / "payloads"
TEST_KEY = "6F2C8A1D4B9E3F70A5C2D8E1B4F7A0C3D6E9F2A5B8C1D4E7F0A3B6C9D2E5F801"
OLD_KEY = "00112233445566778899AABBCCDDEEFF00112233445566778899AABBCCDDEEFF"
API_KEY = "adyen-test-api-key"
MERCHANT = "YOUR_MERCHANT_ACCOUNT"


def item_of(name: str) -> dict[str, Any]:
    doc = json.loads((PAYLOADS / f"adyen_{name}.json").read_text())
    return dict(doc["notificationItems"][0]["NotificationRequestItem"])


def notification(name: str, *, key: str = TEST_KEY, **fields: Any) -> bytes:
    """A recorded notification with `fields` replaced, signed again with `key`."""
    item = copy.deepcopy(item_of(name))
    item.update(copy.deepcopy(fields))
    item["additionalData"]["hmacSignature"] = adyen.sign(key, item)
    return json.dumps({"live": "false", "notificationItems": [{"NotificationRequestItem": item}]},
                      indent=2).encode()


def unique_psp() -> str:
    return secrets.token_hex(8).upper()


class AdyenRig:
    def __init__(self, stack: Stack, fake: FakeAdyen, proxy: LossyProxy) -> None:
        self.stack, self.fake, self.proxy = stack, fake, proxy

    async def post(self, body: bytes) -> httpx.Response:
        return await post_notification(self.stack, body)

    async def request(self, amount: int = 2500) -> tuple[str, str]:
        """A payment at the fake and a refund of it requested through our API."""
        psp = self.fake.payment(10_000, "EUR", MERCHANT)
        case_id = await self.stack.request_refund("alice", psp, amount, provider="adyen",
                                                  currency="EUR", merchant_account=MERCHANT)
        return case_id, psp


async def post_notification(stack: Stack, body: bytes) -> httpx.Response:
    async with httpx.AsyncClient(base_url=stack.relay_url, timeout=30) as http:
        return await http.post("/webhooks/adyen", content=body, headers={"content-type": "application/json"})


@contextlib.asynccontextmanager
async def adyen_rig(store: Store, client: Client, temporal_server: TemporalDevServer, *,
                    charges_from_fake: bool, late_failure_window_seconds: float = 600,
                    merchant_accounts: str | None = None) -> AsyncIterator[AdyenRig]:
    """A stack with Adyen's Checkout API faked behind a lossy proxy. Its charges come from
    the fake's payments, or (production wiring) from the notifications the relay records."""
    fake = FakeAdyen(API_KEY)
    fake_server = AppServer(fake.app(), "127.0.0.1", 0)
    await fake_server.start()
    proxy = LossyProxy(fake_server.url)
    proxy_server = AppServer(proxy, "127.0.0.1", 0)
    await proxy_server.start()
    stack = await open_stack(store, client, temporal_server.address, worker=False,
                             adyen_hmac_keys=f"{TEST_KEY},{OLD_KEY}", adyen_api_base=proxy_server.url,
                             adyen_api_key=API_KEY, late_failure_window_seconds=late_failure_window_seconds,
                             adyen_merchant_accounts=merchant_accounts)
    if charges_from_fake:
        built = stack.providers["adyen"]
        assert isinstance(built, AdyenProvider)
        await built.aclose()
        # The relay and the worker share this mapping; the charge record is the fake's.
        stack.providers["adyen"] = AdyenProvider(
            hmac_keys=[TEST_KEY, OLD_KEY], api_base=proxy_server.url, api_key=API_KEY,
            timeout_seconds=stack.settings.provider_http_timeout_seconds, charges=fake.charge,
            merchant_accounts=comma_list(merchant_accounts))
    await stack.start_worker()
    try:
        yield AdyenRig(stack, fake, proxy)
    finally:
        await stack.close()
        await proxy_server.stop()
        await fake_server.stop()


@pytest.fixture(scope="module")
async def rig(store: Store, client: Client, temporal_server: TemporalDevServer) -> AsyncIterator[AdyenRig]:
    async with adyen_rig(store, client, temporal_server, charges_from_fake=True,
                         merchant_accounts=f"{MERCHANT}, OUR_OTHER_ACCOUNT") as rigged:
        yield rigged


# -- the relay -----------------------------------------------------------------------------

async def test_accepted_notification_answers_accepted_and_is_tracked(rig: AdyenRig) -> None:
    psp = unique_psp()
    response = await rig.post(notification("REFUND", pspReference=psp))
    assert (response.status_code, response.text) == (200, "[accepted]")
    assert response.headers["x-webhook-verdict"] == "accepted"
    row = await receipt(rig.stack, "adyen", int(response.headers["x-receipt-id"]))
    assert (row["verdict"], row["event_id"], row["event_type"]) == (
        "accepted", f"REFUND:{psp}:true", "REFUND")
    case = await rig.stack.wait_for_status(tracking_case_id("adyen", psp), "succeeded")
    assert (case["amount"], case["currency"], case["charge_id"]) == (1000, "EUR", "V4HZ4RBFJGXXGN82")


async def test_duplicate_is_accepted_again_and_acts_once(rig: AdyenRig) -> None:
    psp = unique_psp()
    body = notification("REFUND", pspReference=psp)
    first, again = await rig.post(body), await rig.post(body)
    assert (again.status_code, again.text) == (200, "[accepted]")
    assert again.headers["x-webhook-verdict"] == "duplicate"
    assert again.headers["x-receipt-id"] != first.headers["x-receipt-id"]
    case_id = tracking_case_id("adyen", psp)
    await rig.stack.wait_for_status(case_id, "succeeded")
    assert len(await rig.stack.store.ledger.entries(case_id)) == 2
    # A different outcome for the same pspReference is another event, not a duplicate.
    failed = await rig.post(notification("REFUND", pspReference=psp, success="false"))
    assert failed.headers["x-webhook-verdict"] == "accepted"


async def test_unknown_event_code_is_stored_loudly_and_still_acknowledged(rig: AdyenRig) -> None:
    psp = unique_psp()
    response = await rig.post(notification("REFUND", pspReference=psp, eventCode="SECOND_CHARGEBACK"))
    assert (response.status_code, response.text) == (202, "[accepted]")  # else Adyen retries 30 days
    row = await receipt(rig.stack, "adyen", int(response.headers["x-receipt-id"]))
    assert (row["verdict"], row["event_type"]) == ("unknown_type", "SECOND_CHARGEBACK")
    assert not await workflow_exists(rig.stack, tracking_case_id("adyen", psp))


async def test_a_notification_of_a_merchant_account_we_do_not_serve_acts_on_nothing(rig: AdyenRig) -> None:
    """One HMAC key signs every merchant account of a company-level webhook: a refund made
    on another account must not open a tracking case and book its money in our ledger, and
    that account's payments must not become charges our API key refunds. Acknowledged (else
    Adyen retries for 30 days), stored loudly, acts on nothing."""
    psp, payment = unique_psp(), unique_psp()
    refund = await rig.post(notification("REFUND", pspReference=psp, merchantAccountCode="NOT_OURS"))
    paid = await rig.post(notification("AUTHORISATION", pspReference=payment, merchantAccountCode="NOT_OURS"))
    for response in (refund, paid):
        assert (response.status_code, response.text) == (202, "[accepted]"), response.text
        row = await receipt(rig.stack, "adyen", int(response.headers["x-receipt-id"]))
        assert row["verdict"] == "foreign_account" and row["processed_at"] is None
    assert await rig.stack.store.cases.get(tracking_case_id("adyen", psp)) is None
    assert not await workflow_exists(rig.stack, tracking_case_id("adyen", psp))
    assert await rig.stack.store.ledger.entries(tracking_case_id("adyen", psp)) == []
    ours = await rig.post(notification("REFUND", pspReference=unique_psp(),
                                       merchantAccountCode="OUR_OTHER_ACCOUNT"))
    assert ours.headers["x-webhook-verdict"] == "accepted", ours.text


@pytest.mark.parametrize(("code", "like", "success", "currency"), [
    ("REFUND_WITH_DATA", "REFUND", "true", "EUR"), ("REFUND_WITH_DATA", "REFUND", "false", "GBP"),
    ("REFUNDED_REVERSED", "REFUNDED_REVERSED", "true", "EUR"),
    ("AUTHORISATION", "AUTHORISATION", "true", "GBP"),
    ("PAYOUT_THIRDPARTY", "REFUND", "false", "EUR"), ("REPORT_AVAILABLE", "REFUND", "true", "EUR")])
async def test_adyen_s_webhook_test_is_acknowledged_and_acts_on_nothing(
        rig: AdyenRig, code: str, like: str, success: str, currency: str) -> None:
    """Adyen's "test webhook" (Customer Area, or the Management API's `…/webhooks/{id}/test`)
    sends sample notifications signed with the webhook's real key for a real merchant account,
    pspReference `test_<eventCode>_<n>`: it passes when answered `[accepted]`. They were taken
    for the provider's word: a sample refund opened a tracking case that booked money that
    never moved, a sample failure told ops, a sample authorisation became a charge we could
    refund (reproduced). Stored as `sample`, acknowledged, acting on nothing."""
    psp = f"test_{code}_{secrets.randbelow(4) + 1}"
    body = notification(like, eventCode=code, pspReference=psp, merchantReference="testMerchantRef1",
                        success=success, amount={"currency": currency, "value": 10_100})
    response = await rig.post(body)
    assert (response.status_code, response.text) == (202, "[accepted]"), response.text
    row = await receipt(rig.stack, "adyen", int(response.headers["x-receipt-id"]))
    assert (row["verdict"], row["processed_at"]) == ("sample", None), row
    case_id = tracking_case_id("adyen", psp)
    assert await rig.stack.store.cases.get(case_id) is None
    assert not await workflow_exists(rig.stack, case_id)
    assert await rig.stack.store.database.fetch_all(
        "SELECT 1 FROM payment_notifications WHERE provider = 'adyen' AND payment_id = %s", (psp,)) == []
    assert await rig.stack.store.payouts.payout_at_provider("adyen", psp) is None


async def test_a_refund_on_a_merchant_account_we_do_not_serve_is_never_sent(rig: AdyenRig) -> None:
    psp = rig.fake.payment(10_000, "EUR", "NOT_OURS")
    case_id = await rig.stack.request_refund("alice", psp, 2_500, provider="adyen", currency="EUR",
                                             merchant_account="NOT_OURS")
    await rig.stack.wait_for_status(case_id, "rejected")
    [rejected] = [e for e in await rig.stack.store.audit.trail(case_id)
                  if e["action"] == "validation_rejected"]
    assert "'NOT_OURS' is not one this deployment serves" in rejected["detail"]["reason"], rejected
    assert rig.fake.refunds_of(psp) == []


async def test_a_refund_validated_before_its_account_was_left_out_is_still_not_sent() -> None:
    """A case validated before the list left its account out reaches the create: refused
    there too, before any connection (the API base here answers nothing)."""
    provider = AdyenProvider(hmac_keys=[TEST_KEY], api_base="http://127.0.0.1:9", api_key=API_KEY,
                             merchant_accounts=[MERCHANT])
    request = RefundRequest(refund_request_id="rr-adyen-2", provider="adyen", charge_id="PSP1",
                            amount=100, currency="EUR", merchant_account="NOT_OURS",
                            reason="requested_by_customer")
    try:
        with pytest.raises(ProviderDeclined, match="not one this deployment serves"):
            await provider.create_refund(request, request.idempotency_key())
    finally:
        await provider.aclose()


def tampered(psp: str) -> bytes:
    return notification("REFUND", pspReference=psp).replace(b'"value": 1000', b'"value": 9000')


def wrong_key(psp: str) -> bytes:
    return notification("REFUND", pspReference=psp, key="AB" * 32)


def missing_signature(psp: str) -> bytes:
    doc = json.loads(notification("REFUND", pspReference=psp))
    del doc["notificationItems"][0]["NotificationRequestItem"]["additionalData"]["hmacSignature"]
    return json.dumps(doc).encode()


def surrogate_signature(psp: str) -> bytes:
    """JSON may escape half a surrogate pair, which no UTF-8 text (and no signature) holds."""
    signature = b'"hmacSignature": "'
    return notification("REFUND", pspReference=psp).replace(signature, signature + b"\\ud800")


def surrogate_reference(psp: str) -> bytes:
    return notification("REFUND", pspReference=psp).replace(psp.encode(), psp.encode() + b"\\udc00", 1)


REFUSALS: dict[str, tuple[Callable[[str], bytes], int, str, str]] = {
    "tampered_field": (tampered, 401, "bad_signature", "does not match"),
    "wrong_key": (wrong_key, 401, "bad_signature", "does not match"),
    "missing_signature": (missing_signature, 401, "bad_signature", "missing"),
    "surrogate_signature": (surrogate_signature, 401, "bad_signature", "does not match"),
    "surrogate_reference": (surrogate_reference, 401, "bad_signature", "does not match"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
async def test_refused_notification_has_a_receipt_and_touches_nothing(rig: AdyenRig, case: str) -> None:
    build, status, verdict, says = REFUSALS[case]
    psp = unique_psp()
    response = await rig.post(build(psp))
    assert response.status_code == status, response.text
    assert response.text != "[accepted]"  # Adyen retries anything else: nothing is lost
    assert response.json()["verdict"] == verdict and says in response.json()["detail"]
    row = await receipt(rig.stack, "adyen", response.json()["receipt_id"])
    assert row["verdict"] == verdict and row["processed_at"] is None
    case_id = tracking_case_id("adyen", psp)
    assert await rig.stack.store.cases.get(case_id) is None
    assert not await workflow_exists(rig.stack, case_id)


def batch(*bodies: bytes) -> bytes:
    """One request carrying the items of single-item notifications, as Adyen may batch them."""
    items = [json.loads(b)["notificationItems"][0] for b in bodies]
    return json.dumps({"live": "false", "notificationItems": items}).encode()


async def test_each_item_of_a_batch_is_its_own_event_acted_on_once(rig: AdyenRig) -> None:
    """Adyen's notification is a list of items, each signed on its own. Before, a request
    with two was refused whole as malformed: Adyen retried it for days and neither refund
    reached the books."""
    first, second = unique_psp(), unique_psp()
    body = batch(notification("REFUND", pspReference=first),
                 notification("REFUND", pspReference=second, amount={"currency": "EUR", "value": 700}))
    response = await rig.post(body)
    assert (response.status_code, response.text) == (200, "[accepted]")
    for psp, amount in ((first, 1000), (second, 700)):
        [row] = await rig.stack.store.receipts.find("adyen", f"REFUND:{psp}:true")
        assert row["verdict"] == "accepted"
        case = await rig.stack.wait_for_status(tracking_case_id("adyen", psp), "succeeded")
        assert case["amount"] == amount
    again = await rig.post(body)  # Adyen's retry of the whole request
    assert (again.status_code, again.text) == (200, "[accepted]")
    for psp in (first, second):
        rows = await rig.stack.store.receipts.find("adyen", f"REFUND:{psp}:true")
        assert [r["verdict"] for r in rows] == ["accepted", "duplicate"]
        assert len(await rig.stack.store.ledger.entries(tracking_case_id("adyen", psp))) == 2


async def test_a_batch_with_one_bad_item_is_retried_and_its_good_items_act_once(rig: AdyenRig) -> None:
    """A refused item is not acknowledged (Adyen sends the request again, so it is not
    lost); the items that verified act now, and once however often the request comes."""
    good, bad = unique_psp(), unique_psp()
    body = batch(notification("REFUND", pspReference=good), tampered(bad))
    for _ in range(2):
        response = await rig.post(body)
        assert response.status_code == 401 and response.text != "[accepted]"
        assert response.json()["verdict"] == "bad_signature"
        [refused] = [r for r in await rig.stack.store.receipts.find("adyen")
                     if r["id"] == response.json()["receipt_id"]]
        assert refused["verdict"] == "bad_signature" and refused["processed_at"] is None
    rows = await rig.stack.store.receipts.find("adyen", f"REFUND:{good}:true")
    assert [r["verdict"] for r in rows] == ["accepted", "duplicate"]
    await rig.stack.wait_for_status(tracking_case_id("adyen", good), "succeeded")
    assert len(await rig.stack.store.ledger.entries(tracking_case_id("adyen", good))) == 2
    assert await rig.stack.store.cases.get(tracking_case_id("adyen", bad)) is None


async def test_each_item_of_a_batch_is_stored_with_only_what_adyen_sends_beside_it(rig: AdyenRig) -> None:
    """Each item became a notification of its own carrying every other top-level field of
    the request: a captured signed item sent many times in one request padded with an
    unsigned field stored that field once per item (a 256 KB request, 25 MB of receipts,
    for good: duplicates are kept). A part carries the item and `live`, as Adyen sends it."""
    first, second = unique_psp(), unique_psp()
    padded = dict(json.loads(batch(notification("REFUND", pspReference=first),
                                   notification("REFUND", pspReference=second))), pad="x" * 100_000)
    response = await rig.post(json.dumps(padded).encode())
    assert (response.status_code, response.text) == (200, "[accepted]")
    rows = await rig.stack.store.database.fetch_all(
        "SELECT body FROM webhook_receipts WHERE provider = 'adyen' AND event_id = ANY(%s)",
        ([f"REFUND:{first}:true", f"REFUND:{second}:true"],))
    assert len(rows) == 2 and all(set(json.loads(r["body"])) == {"live", "notificationItems"} for r in rows)


async def test_a_batch_from_a_source_not_allowed_is_one_refusal(rig: AdyenRig) -> None:
    """Split only what may be read: a stranger's request of many items is one receipt."""
    walled = rig.stack.settings.model_copy(update={"webhook_allowed_sources": {
        "adyen": [ip_network("10.0.0.0/8")]}})
    desk = WebhookDesk(rig.stack.store, rig.stack.client, rig.stack.providers, walled)
    psps = [unique_psp() for _ in range(3)]
    before = await rig.stack.store.receipts.find("adyen")
    result = await desk.ingest("adyen", {"content-type": "application/json"},
                               batch(*(notification("REFUND", pspReference=p) for p in psps)),
                               now=time.time(), peer="127.0.0.1")
    assert (result.status_code, result.verdict) == (403, "forbidden_source")
    after = await rig.stack.store.receipts.find("adyen", after=before[-1]["id"] if before else 0)
    assert [r["id"] for r in after] == [result.receipt_id]


async def test_a_batch_none_of_whose_items_adyen_signed_is_one_refusal(rig: AdyenRig) -> None:
    """Split before any signature was checked, a stranger's 100 unsigned items were 100
    refusals stored (and logged) for one request; only a batch with a signed item is split."""
    before = await rig.stack.store.receipts.find("adyen")
    response = await rig.post(batch(*(tampered(unique_psp()) for _ in range(5))))
    assert response.status_code == 400 and response.json()["verdict"] == "malformed"
    after = await rig.stack.store.receipts.find("adyen", after=before[-1]["id"] if before else 0)
    assert [r["id"] for r in after] == [response.json()["receipt_id"]]


# -- refunds through our API -----------------------------------------------------------------

async def test_refund_requested_through_api_succeeds_on_its_notification(rig: AdyenRig) -> None:
    case_id, psp = await rig.request(2500)
    row = await rig.stack.wait_for_status(case_id, "pending")
    [made] = rig.fake.refunds_of(psp)
    assert (made["reference"], made["amount"], made["merchantAccount"]) == (
        case_id, {"value": 2500, "currency": "EUR"}, MERCHANT)
    assert made["idempotencyKey"] and made["idempotencyKey"].startswith("rfo_")
    assert row["provider_refund_id"] == made["pspReference"]
    body = notification("REFUND", pspReference=made["pspReference"], originalReference=psp,
                        merchantReference=case_id, amount={"currency": "EUR", "value": 2500})
    answer = await rig.post(body)
    assert (answer.text, answer.headers["x-webhook-verdict"]) == ("[accepted]", "accepted")
    row = await rig.stack.wait_for_status(case_id, "succeeded")
    assert row["reserved_amount"] == 2500
    lines = await rig.stack.store.ledger.entries(case_id)
    assert [(x["template"], x["debit"], x["credit"], x["currency"]) for x in lines] == [
        ("refund_settled", 2500, 0, "EUR"), ("refund_settled", 0, 2500, "EUR")]


async def test_lost_create_answer_waits_escalates_and_refunds_once(rig: AdyenRig) -> None:
    psp = rig.fake.payment(10_000, "EUR", MERCHANT)
    rig.proxy.lose_next("POST", f"/v71/payments/{psp}/refunds")
    case_id = await rig.stack.request_refund("alice", psp, 1800, provider="adyen", currency="EUR",
                                             merchant_account=MERCHANT)
    actions = await rig.stack.wait_for_audit(case_id, "no_status_lookup_escalated")
    assert "provider_outcome_unknown" in actions and "awaiting_provider_notification" in actions
    notices = [n["kind"] for n in await rig.stack.store.outbox.notices(case_id)]
    assert notices.count("no_status_lookup_escalation") == 1
    case = await rig.stack.store.cases.get(case_id)
    assert case is not None and case.status == "ops_review"  # waits for ops
    [made] = rig.fake.refunds_of(psp)  # the lost answer's refund, and no resend
    assert json.loads(rig.proxy.lost[-1])["pspReference"] == made["pspReference"]

    body = notification("REFUND", pspReference=made["pspReference"], originalReference=psp,
                        merchantReference=case_id, amount={"currency": "EUR", "value": 1800})
    assert (await rig.post(body)).text == "[accepted]"
    row = await rig.stack.wait_for_status(case_id, "succeeded")
    assert row["provider_refund_id"] == made["pspReference"]
    assert len(rig.fake.refunds_of(psp)) == 1
    assert "provider_notification_received" in await rig.stack.actions(case_id)
    assert [n["kind"] for n in await rig.stack.store.outbox.notices(case_id)].count(
        "no_status_lookup_escalation") == 1


async def refunded(rig: AdyenRig, amount: int) -> tuple[str, dict[str, Any]]:
    """A refund requested through our API, made at the fake and notified as succeeded:
    (case id, the notification fields that name it)."""
    case_id, psp = await rig.request(amount)
    await rig.stack.wait_for_status(case_id, "pending")
    [made] = rig.fake.refunds_of(psp)
    fields = {"pspReference": made["pspReference"], "originalReference": psp,
              "merchantReference": case_id, "amount": {"currency": "EUR", "value": amount}}
    assert (await rig.post(notification("REFUND", **fields))).text == "[accepted]"
    await rig.stack.wait_for_status(case_id, "succeeded")
    return case_id, fields


async def test_refunded_reversed_after_success_is_a_late_failure_with_its_entry(rig: AdyenRig) -> None:
    case_id, fields = await refunded(rig, 1200)
    assert (await rig.post(notification("REFUNDED_REVERSED", **fields))).text == "[accepted]"
    row = await rig.stack.wait_for_status(case_id, "refund_failed")
    assert row["failure_reason"] == "REFUNDED_REVERSED: Account closed"
    lines = await rig.stack.store.ledger.entries(case_id)
    assert {x["template"] for x in lines} == {"refund_settled", "refund_reversed"}
    reversed_lines = [(x["debit"], x["credit"]) for x in lines if x["template"] == "refund_reversed"]
    assert sorted(reversed_lines) == [(0, 1200), (1200, 0)]


# -- normalisation and the adapter, without a stack ------------------------------------------

ADAPTER = AdyenProvider(hmac_keys=[TEST_KEY])


def parse(body: bytes) -> ProviderEvent | PayoutEvent | PaymentEvent:
    return ADAPTER.parse_webhook({}, body, time.time())


@pytest.mark.parametrize(("api_base", "live", "ours"), [
    ("https://checkout-test.adyen.com", "false", True), ("https://checkout-test.adyen.com", "true", False),
    ("https://1797a841fbb37ca7-AdyenDemo-checkout-live.adyenpayments.com/checkout", "true", True),
    ("https://1797a841fbb37ca7-AdyenDemo-checkout-live.adyenpayments.com/checkout", "false", False),
    ("https://1797a841fbb37ca7-AdyenDemo-checkout-live-us.adyenpayments.com/checkout", "false", False),
    ("https://1797a841fbb37ca7-AdyenDemo-checkout-live-apse.adyenpayments.com/checkout", "true", True),
    ("http://127.0.0.1:9", "true", True), (None, "true", True)])
def test_a_notification_of_the_other_environment_than_the_api_s_is_foreign(
        api_base: str | None, live: str, ours: bool) -> None:
    """A test webhook's notification at a live deployment (its HMAC key kept beside the live
    one) opened a tracking case that held and booked a test refund in the live ledger. One
    whose `live` is not the environment of the Checkout API we call (Adyen's live or test
    host) is `foreign_account`; another API base (an emulator's), or none, says nothing."""
    body = json.loads(notification("REFUND", pspReference=unique_psp()))
    body["live"] = live
    adapter = AdyenProvider(hmac_keys=[TEST_KEY], api_base=api_base, api_key=API_KEY if api_base else None)
    raw = json.dumps(body).encode()
    if ours:
        assert isinstance(adapter.parse_webhook({}, raw, time.time()), ProviderEvent)
        return
    with pytest.raises(WebhookRejected) as refused:
        adapter.parse_webhook({}, raw, time.time())
    assert refused.value.verdict == "foreign_account" and "environment" in refused.value.message


def test_recorded_payloads_verify_as_stored() -> None:
    for name in ("REFUND", "REFUND_FAILED", "REFUNDED_REVERSED", "CANCEL_OR_REFUND", "PAIDOUT_REVERSED",
                 "AUTHORISATION", "CAPTURE", "CAPTURE_FAILED", "CANCELLATION",
                 "NOTIFICATION_OF_CHARGEBACK"):
        event = parse((PAYLOADS / f"adyen_{name}.json").read_bytes())
        assert event.event_type == name and event.event_id.startswith(f"{name}:")


def test_signing_string_is_adyens_field_order() -> None:
    assert adyen.signing_string(item_of("REFUND")) == (
        "KHQC5N7G84BLNK43:V4HZ4RBFJGXXGN82:YOUR_MERCHANT_ACCOUNT:YOUR_REFUND_REFERENCE:1000:EUR:"
        "REFUND:true")


@pytest.mark.parametrize(("name", "fields", "status", "failure"), [
    ("REFUND", {}, "succeeded", None),
    ("REFUND", {"success": "false", "reason": "Transaction not permitted"}, "failed",
     "REFUND: Transaction not permitted"),
    ("REFUND_FAILED", {}, "failed", "REFUND_FAILED: Insufficient balance on payment"),
    ("REFUNDED_REVERSED", {}, "failed", "REFUNDED_REVERSED: Account closed"),
    ("CANCEL_OR_REFUND", {}, "succeeded", None),
    ("CANCEL_OR_REFUND", {"additionalData": {"modification.action": "cancel"}}, "canceled", None),
    ("CANCEL_OR_REFUND", {"success": "false", "reason": "Modification in different currency"},
     "failed", "CANCEL_OR_REFUND: Modification in different currency"),
    ("REFUND", {"eventCode": "REFUND_WITH_DATA", "originalReference": None}, "succeeded", None),
])
def test_each_refund_event_maps_to_its_status(name: str, fields: dict[str, Any], status: str,
                                              failure: str | None) -> None:
    event = parse(notification(name, **fields))
    assert isinstance(event, ProviderEvent)
    assert (event.status, event.failure_reason) == (status, failure)
    assert (event.amount, event.currency) == (1000, "EUR")
    assert event.refund_id == "KHQC5N7G84BLNK43" and event.merchant_account == MERCHANT
    assert event.charge_id == (fields.get("originalReference", "V4HZ4RBFJGXXGN82") or "KHQC5N7G84BLNK43")


def test_cancel_or_refund_without_its_action_is_refused_not_defaulted() -> None:
    with pytest.raises(WebhookRejected) as refused:
        parse(notification("CANCEL_OR_REFUND", additionalData={}))
    assert refused.value.verdict == "unexpected_status" and "CANCEL_OR_REFUND:true" in refused.value.message


def test_unknown_event_code_is_stored_as_unknown_type() -> None:
    with pytest.raises(WebhookRejected) as refused:
        parse(notification("REFUND", eventCode="SECOND_CHARGEBACK"))
    assert (refused.value.verdict, refused.value.event_type) == ("unknown_type", "SECOND_CHARGEBACK")


def test_amount_must_be_integer_minor_units() -> None:
    with pytest.raises(WebhookRejected) as refused:
        parse(notification("REFUND", amount={"currency": "EUR", "value": 10.5}))
    assert refused.value.verdict == "unreadable" and "minor units" in refused.value.message


@pytest.mark.parametrize(("code", "fields", "payout_id", "status"), [
    ("PAYOUT_THIRDPARTY", {}, "8816178952380553", "paid"),
    ("PAYOUT_THIRDPARTY", {"success": "false"}, "8816178952380553", "failed"),
    ("PAYOUT_DECLINE", {}, "8816178914025441", "canceled"),
    ("PAYOUT_EXPIRE", {}, "8816178914025441", "canceled"),  # not confirmed in time: never paid
    ("PAIDOUT_REVERSED", {}, "8816178914025441", "reversed"),
])
def test_payout_events_become_payout_events(code: str, fields: dict[str, Any], payout_id: str,
                                            status: str) -> None:
    event = parse(notification("PAIDOUT_REVERSED", eventCode=code, **fields))
    assert isinstance(event, PayoutEvent)
    assert (event.payout.payout_id, event.payout.status, event.payout.amount) == (payout_id, status, 1000)
    assert event.payout.reference == "YOUR_PAYOUT_REFERENCE"


async def paid_adyen_payout(rig: AdyenRig) -> tuple[PayoutSnapshot, str]:
    """An Adyen payout of 10.00 EUR our books show paid, and its case id."""
    payout = PayoutSnapshot(id=f"P-{uuid.uuid4().hex[:10]}", provider="adyen",
                            provider_payout_id=unique_psp(), beneficiary_id=f"ben-{uuid.uuid4().hex[:8]}",
                            amount=1000, currency="EUR", status=PayoutStatus.PAID)
    assert await rig.stack.store.payouts.record_payout(payout)
    return payout, payout_case_id("adyen", payout.provider_payout_id)


@pytest.mark.parametrize("paid_heard_first", [False, True])
async def test_a_reversal_of_a_payout_adyen_reported_paid_after_its_failure_books_nothing(
        rig: AdyenRig, paid_heard_first: bool) -> None:
    """Adyen has no payout lookup, so the read before runbook step A answered "no lookup" and
    the signed failure stood: an approval held the payout and booked it back although Adyen
    had since reported it paid (recorded on the case, ops told). Reproduced. That signed
    report is the provider's word: the approved reversal holds and books nothing (ops review).
    Also when the paid report is delivered before the failure (Adyen's notifications come in
    any order): it found no case and was kept on the timeline only, the case the failure
    opened next never read it, and the reversal was booked (reproduced)."""
    await add_payout_approvers(rig.stack)
    payout, case_id = await paid_adyen_payout(rig)
    psp = payout.provider_payout_id
    now = datetime.now(UTC)

    def reported(success: str, minutes_ago: int) -> bytes:
        return notification("PAIDOUT_REVERSED", eventCode="PAYOUT_THIRDPARTY", pspReference=psp,
                            success=success, eventDate=(now - timedelta(minutes=minutes_ago)).isoformat())

    if paid_heard_first:
        assert (await rig.post(reported("true", 5))).text == "[accepted]"
    assert (await rig.post(reported("false", 10))).text == "[accepted]"
    await wait_for_case(rig.stack, case_id, "awaiting_approval")
    if not paid_heard_first:
        assert (await rig.post(reported("true", 5))).text == "[accepted]"
    await wait_for_actions(rig.stack, case_id, "payout_paid_after_failure")
    assert [n["kind"] for n in await rig.stack.store.outbox.notices(case_id)].count(
        "payout_paid_after_failure") == 1
    assert (await decide(rig.stack, "lena", case_id)).status_code == 202
    row = await wait_for_case(rig.stack, case_id, "ops_review", "remediated")
    actions = [e["action"] for e in await rig.stack.store.audit.trail(case_id)]
    assert row["status"] == "ops_review" and "payout_held" not in actions, actions
    assert await rig.stack.store.ledger.entries(case_id) == []
    assert (await rig.stack.store.payouts.payout(payout.id)).status is PayoutStatus.PAID  # type: ignore[union-attr]


async def test_a_payout_returned_after_adyen_reported_it_paid_is_booked_back(rig: AdyenRig) -> None:
    """Failed, corrected to paid (Adyen's report, recorded on the case), then returned again:
    the money is back with us. The read before runbook step A took any paid report as the
    provider's word, the older one too, and the approved reversal held and booked nothing
    (reproduced: ops review, the books showing a payout the beneficiary no longer has). A
    paid report counts only when no failure or return the case took came after it."""
    await add_payout_approvers(rig.stack)
    payout, case_id = await paid_adyen_payout(rig)
    psp = payout.provider_payout_id
    now = datetime.now(UTC)
    for code, success, minutes_ago in (("PAYOUT_THIRDPARTY", "false", 10), ("PAYOUT_THIRDPARTY", "true", 5),
                                       ("PAIDOUT_REVERSED", "true", 2)):
        named = {"pspReference": psp} if code == "PAYOUT_THIRDPARTY" else {
            "pspReference": unique_psp(), "originalReference": psp}  # a reversal names its payout so
        assert (await rig.post(notification(
            "PAIDOUT_REVERSED", eventCode=code, success=success,
            eventDate=(now - timedelta(minutes=minutes_ago)).isoformat(), **named))).text == "[accepted]"
        if minutes_ago == 10:
            await wait_for_case(rig.stack, case_id, "awaiting_approval")
    await wait_for_actions(rig.stack, case_id, "payout_paid_after_failure")
    await wait_for_actions(rig.stack, case_id, "payout_event_joined")
    assert (await decide(rig.stack, "lena", case_id)).status_code == 202
    row = await wait_for_case(rig.stack, case_id, "ops_review", "remediated")
    assert row["status"] == "remediated", [e["action"] for e in await rig.stack.store.audit.trail(case_id)]
    assert [e.template for e in await rig.stack.store.ledger.entries(case_id)] == ["payout_reversed"] * 2


async def test_an_adyen_payout_s_own_paid_heard_before_its_failure_is_no_news(rig: AdyenRig) -> None:
    """The payout's paid from before its failure, delivered first: older than the failure,
    it says nothing of the money since, and the case the failure opens reads no paid report."""
    payout, case_id = await paid_adyen_payout(rig)
    psp = payout.provider_payout_id
    now = datetime.now(UTC)
    for success, minutes_ago in (("true", 20), ("false", 10)):
        assert (await rig.post(notification(
            "PAIDOUT_REVERSED", eventCode="PAYOUT_THIRDPARTY", pspReference=psp, success=success,
            eventDate=(now - timedelta(minutes=minutes_ago)).isoformat()))).text == "[accepted]"
    actions = [e["action"] for e in await wait_for_actions(rig.stack, case_id, "approval_requested")]
    assert "payout_event_without_open_case" in actions and "payout_paid_after_failure" not in actions
    notices = await rig.stack.store.outbox.notices(case_id)
    assert "payout_paid_after_failure" not in [n["kind"] for n in notices]


def test_rotated_out_key_still_verifies_and_a_non_hex_key_fails_at_start() -> None:
    rotating = AdyenProvider(hmac_keys=["AB" * 32, TEST_KEY])
    assert rotating.parse_webhook({}, notification("REFUND"), 0).event_type == "REFUND"
    with pytest.raises(ValueError):
        AdyenProvider(hmac_keys=["not-hex"])


async def test_registry_builds_adyen_from_the_environment_and_it_never_pretends() -> None:
    providers = build_providers(Settings(adyen_hmac_keys=f" {TEST_KEY} , {OLD_KEY}"))
    try:
        provider = providers["adyen"]
        request = RefundRequest(refund_request_id="rr-adyen-1", provider="adyen", charge_id="PSP1",
                                amount=100, currency="EUR", merchant_account=MERCHANT,
                                reason="requested_by_customer")
        with pytest.raises(ProviderLookupUnsupported):
            await provider.find_refund(request)
        with pytest.raises(ProviderUnsupported, match="REFUNDS_ADYEN_API_BASE"):
            await provider.create_refund(request, request.idempotency_key())
        with pytest.raises(ProviderUnsupported, match="no payment lookup"):
            await provider.get_charge("PSP1")
        assert provider.parse_webhook({}, notification("REFUND", key=OLD_KEY), 0).event_type == "REFUND"
    finally:
        await close_providers(providers)


async def test_a_signed_item_whose_fields_are_split_again_is_refused(rig: AdyenRig) -> None:
    """Adyen signs its fields joined with ':' unescaped, and our case ids (its
    merchantReference) may hold a ':'. A copied notification for case `ab:cd`, its fields
    split again at another ':', keeps its signature but names a new pspReference, so it
    passed as a new event: a refund that never happened tracked (and booked) against
    another charge. Adyen's own identifiers never hold a ':': such an item is refused."""
    psp = unique_psp()
    genuine = json.loads(notification("REFUND", pspReference=psp, originalReference="PAY1",
                                      merchantAccountCode=MERCHANT, merchantReference="ab:cd"))
    item = genuine["notificationItems"][0]["NotificationRequestItem"]
    moved = {**item, "pspReference": f"{psp}:PAY1", "originalReference": MERCHANT,
             "merchantAccountCode": "ab", "merchantReference": "cd"}
    assert adyen.signing_string(moved) == adyen.signing_string(item)  # the same signature holds
    response = await rig.post(json.dumps(
        {"live": "false", "notificationItems": [{"NotificationRequestItem": moved}]}).encode())
    assert response.status_code in (400, 401) and response.text != "[accepted]", response.text
    assert "':'" in response.json()["detail"]
    row = await receipt(rig.stack, "adyen", response.json()["receipt_id"])
    assert row["verdict"] == response.json()["verdict"] and row["processed_at"] is None
    forged_case = tracking_case_id("adyen", f"{psp}:PAY1")
    assert await rig.stack.store.cases.get(forged_case) is None
    assert not await workflow_exists(rig.stack, forged_case)


async def test_a_case_waiting_for_its_notification_takes_no_other_payment_s_refund(rig: AdyenRig) -> None:
    """The create's answer was lost and the case waits for Adyen's notification. A refund of
    another payment carrying the case's reference (same amount and currency) arrives first:
    it is not this case's refund (the customer's payment was never refunded by it), so the
    case keeps waiting and takes its own when it comes. The other moved that payment's money:
    it is followed as that payment's own refund (a tracking case), never booked as the case's,
    nor an incident of the case's (which held the case in ops review and refused every
    reissue of its request)."""
    psp, other = rig.fake.payment(10_000, "EUR", MERCHANT), rig.fake.payment(10_000, "EUR", MERCHANT)
    rig.proxy.lose_next("POST", f"/v71/payments/{psp}/refunds")
    case_id = await rig.stack.request_refund("alice", psp, 1800, provider="adyen", currency="EUR",
                                             merchant_account=MERCHANT)
    await rig.stack.wait_for_audit(case_id, "awaiting_provider_notification")
    [made] = rig.fake.refunds_of(psp)
    stranger = unique_psp()
    foreign = notification("REFUND", pspReference=stranger, originalReference=other,
                           merchantReference=case_id, amount={"currency": "EUR", "value": 1800})
    assert (await rig.post(foreign)).text == "[accepted]"
    tracked = await rig.stack.wait_for_status(tracking_case_id("adyen", stranger), "succeeded")
    assert (tracked["charge_id"], tracked["amount"]) == (other, 1800)
    await rig.stack.wait_for_audit(case_id, "no_status_lookup_escalated")
    case = await rig.stack.store.cases.get(case_id)
    assert case is not None and case.status == "ops_review", case  # still waiting, not succeeded
    assert await rig.stack.store.ledger.entries(case_id) == []

    own = notification("REFUND", pspReference=made["pspReference"], originalReference=psp,
                       merchantReference=case_id, amount={"currency": "EUR", "value": 1800})
    assert (await rig.post(own)).text == "[accepted]"
    row = await rig.stack.wait_for_status(case_id, "succeeded")
    assert (row["provider_refund_id"], row["provider_status"]) == (made["pspReference"], "succeeded")
    assert "duplicate_provider_refund" not in await rig.stack.actions(case_id)
    lines = await rig.stack.store.ledger.entries(case_id)
    assert [(x["template"], x["debit"]) for x in lines] == [("refund_settled", 1800), ("refund_settled", 0)]


async def other_refund_while_following(stack: Stack, fake: FakeAdyen, amount: int) -> tuple[str, str, str]:
    """A case following its refund (Adyen answered the create: pending) waits at its poll for
    the refund's notification (Adyen has no lookup) and hears first of another refund of the
    payment carrying its reference, failed: (case, its refund, the other refund)."""
    psp = fake.payment(10_000, "EUR", MERCHANT)
    case_id = await stack.request_refund("alice", psp, amount, provider="adyen", currency="EUR",
                                         merchant_account=MERCHANT)
    await stack.wait_for_audit(case_id, "awaiting_provider_notification")
    [made] = fake.refunds_of(psp)
    stranger = unique_psp()
    other = notification("REFUND", success="false", reason="Transaction not permitted",
                         pspReference=stranger, originalReference=psp, merchantReference=case_id,
                         amount={"currency": "EUR", "value": amount})
    assert (await post_notification(stack, other)).text == "[accepted]"
    await stack.wait_for_audit(case_id, "duplicate_provider_refund")
    return case_id, made["pspReference"], stranger


async def test_a_case_following_its_refund_takes_no_other_refund_s_word_for_it(rig: AdyenRig) -> None:
    """Adyen answered the create (the case follows that refund, pending) and has no lookup:
    at the poll the case waits for the refund's notification. A failure of another refund of
    the same payment carrying the case's reference arrives first. It is not the followed
    refund's word: the case does not fail (its reservation kept while its refund may still
    pay), the other refund is raised as one carrying the case's reference, and the followed
    refund's success is booked when it comes."""
    case_id, followed, stranger = await other_refund_while_following(rig.stack, rig.fake, 1_600)
    row = await rig.stack.store.cases.get(case_id)
    assert row is not None
    assert (row["status"], row["provider_refund_id"], row["reserved_amount"]) == (
        "ops_review", followed, 1_600)
    [incident] = [e for e in await rig.stack.store.audit.trail(case_id)
                  if e["action"] == "duplicate_provider_refund"]
    assert (incident["detail"]["duplicate_refund_id"], incident["detail"]["duplicate_status"]) == (
        stranger, "failed")

    own = notification("REFUND", pspReference=followed, originalReference=row["charge_id"],
                       merchantReference=case_id, amount={"currency": "EUR", "value": 1_600})
    assert (await rig.post(own)).text == "[accepted]"
    await rig.stack.wait_for_audit(case_id, "refund_succeeded")
    row = await rig.stack.store.cases.get(case_id)
    assert row is not None and (row["provider_refund_id"], row["provider_status"]) == (
        followed, "succeeded")
    lines = await rig.stack.store.ledger.entries(case_id)
    assert [(x["template"], x["debit"]) for x in lines] == [("refund_settled", 1_600), ("refund_settled", 0)]
