"""Bad input gets a clear 4xx, is recorded where it should be, and never touches money:
no case is created or moved, no workflow starts, no refund reaches the provider."""

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from temporalio.service import RPCError, RPCStatusCode

from adapters.db.rows import ReceiptRow
from adapters.providers.sandbox import sign
from domain.models import RefundOutcome
from domain.payouts import payout_case_id
from tests.harness import Stack
from tests.payouts_kit import paid_payout

Delivery = tuple[bytes, dict[str, str]]


def event_body(event_type: str, obj: dict[str, Any], event_id: str | None = None,
               **extra: Any) -> bytes:
    """A sandbox event as the provider would send it (extra top-level keys pad it)."""
    return json.dumps({"id": event_id or f"evt_{uuid.uuid4().hex[:16]}", "object": "event",
                       "type": event_type, "created": int(time.time()),
                       "data": {"object": obj}, **extra}).encode()


def request_object(charge_id: str, rrq: str, amount: int = 1000) -> dict[str, Any]:
    return {"id": rrq, "object": "refund_request", "charge": charge_id, "amount": amount,
            "currency": "usd", "merchant_account": "acct_1", "reason": "requested_by_customer",
            "evidence": {"order_id": "o-1"}}


def sandbox_secret(stack: Stack) -> str:
    """The secret the stack's sandbox provider signs its webhooks with."""
    secret = stack.settings.sandbox_webhook_secret
    assert secret is not None
    return secret.get_secret_value()


def signed(secret: str, body: bytes, at: int | None = None) -> dict[str, str]:
    return {"Content-Type": "application/json",
            "Sandbox-Signature": sign(secret, body, int(time.time()) if at is None else at)}


async def workflow_exists(stack: Stack, workflow_id: str) -> bool:
    try:
        await stack.client.get_workflow_handle(workflow_id).describe()
    except RPCError as exc:
        if exc.status is RPCStatusCode.NOT_FOUND:
            return False
        raise
    return True


async def assert_untouched(stack: Stack, case_id: str, charge_id: str) -> None:
    """Nothing about money happened for this would-be case."""
    assert await stack.store.cases.get(case_id) is None
    assert not await workflow_exists(stack, case_id)
    assert await stack.provider_refunds(charge_id) == []
    assert not [e for e in await stack.store.audit.trail(case_id) if e["action"] == "request_received"]


async def receipt(stack: Stack, provider: str, receipt_id: int) -> ReceiptRow:
    rows = [r for r in await stack.store.receipts.find(provider) if r["id"] == receipt_id]
    assert len(rows) == 1, f"no receipt {receipt_id} for {provider}"
    return rows[0]


# -- webhooks ------------------------------------------------------------------------------

def tampered(secret: str, body: bytes) -> Delivery:
    headers = signed(secret, body)
    at = body.index(b'"amount": ') + len(b'"amount": ')
    forged = body[:at] + (b"8" if body[at:at + 1] == b"9" else b"9") + body[at + 1:]
    assert len(forged) == len(body) and sum(a != b for a, b in zip(forged, body, strict=True)) == 1
    return forged, headers


def wrong_secret(secret: str, body: bytes) -> Delivery:
    return body, signed("not-" + secret, body)


def missing_signature(secret: str, body: bytes) -> Delivery:
    return body, {"Content-Type": "application/json"}


def stale(secret: str, body: bytes) -> Delivery:
    return body, signed(secret, body, at=int(time.time()) - 600)


def malformed_json(secret: str, body: bytes) -> Delivery:
    broken = body[: len(body) // 2]
    return broken, signed(secret, broken)


def unknown_type(secret: str, body: bytes) -> Delivery:
    renamed = body.replace(b'"refund.requested"', b'"refund.teleported"')
    return renamed, signed(secret, renamed)


def negative_amount(secret: str, body: bytes) -> Delivery:
    changed = re.sub(rb'"amount": \d+', b'"amount": -1000', body, count=1)
    return changed, signed(secret, changed)


def wrong_currency(secret: str, body: bytes) -> Delivery:
    changed = body.replace(b'"currency": "usd"', b'"currency": "xyz"', 1)
    return changed, signed(secret, changed)


WEBHOOK_CASES: dict[str, tuple[Callable[[str, bytes], Delivery], int, str]] = {
    "tampered_byte": (tampered, 401, "bad_signature"),
    "wrong_secret": (wrong_secret, 401, "bad_signature"),
    "missing_signature": (missing_signature, 401, "bad_signature"),
    "stale_timestamp": (stale, 401, "stale"),
    "malformed_json": (malformed_json, 400, "malformed"),
    "unknown_event_type": (unknown_type, 202, "unknown_type"),
    # signed, so kept like every signed receipt: an amount no rule reads (the adapter's), and
    # a request our rules refuse (an unknown currency; it was `malformed`, pruned after 30
    # days with the forged traffic)
    "negative_amount": (negative_amount, 400, "unreadable"),
    "wrong_currency": (wrong_currency, 400, "invalid_request"),
}


@pytest.mark.parametrize("case", list(WEBHOOK_CASES))
async def test_rejected_webhook_is_recorded_and_moves_no_money(stack: Stack, case: str) -> None:
    build, status, verdict = WEBHOOK_CASES[case]
    charge = await stack.charge(10_000)
    rrq = f"rrq_{uuid.uuid4().hex[:12]}"
    secret = sandbox_secret(stack)
    content, headers = build(secret,
                             event_body("refund.requested", request_object(charge, rrq)))
    async with httpx.AsyncClient(base_url=stack.relay_url, timeout=30) as http:
        response = await http.post("/webhooks/sandbox", content=content, headers=headers)
    assert response.status_code == status, response.text
    answer = response.json()
    assert answer["verdict"] == verdict and answer["detail"]
    row = await receipt(stack, "sandbox", answer["receipt_id"])
    assert row["verdict"] == verdict and row["error"]
    assert row["processed_at"] is None and row["workflow_id"] is None
    if verdict == "unknown_type":
        assert row["event_type"] == "refund.teleported" and row["event_id"].startswith("evt_")
    await assert_untouched(stack, f"sandbox-{rrq}", charge)


@pytest.mark.parametrize("chunked", [False, True], ids=["content_length", "chunked"])
async def test_oversize_webhook_is_refused_with_413(stack: Stack, chunked: bool) -> None:
    charge = await stack.charge(10_000)
    rrq = f"rrq_{uuid.uuid4().hex[:12]}"
    secret = sandbox_secret(stack)
    limit = stack.settings.webhook_max_body_bytes
    body = event_body("refund.requested", request_object(charge, rrq), padding="x" * (limit + 1024))
    assert len(body) > limit
    headers = signed(secret, body)

    async def stream() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 16 * 1024):
            yield body[start:start + 16 * 1024]

    async with httpx.AsyncClient(base_url=stack.relay_url, timeout=30) as http:
        response = await http.post("/webhooks/sandbox", content=stream() if chunked else body,
                                   headers=headers)
    sent = response.request.headers
    assert ("content-length" not in sent) if chunked else (sent["content-length"] == str(len(body)))
    assert response.status_code == 413, response.text
    assert response.json()["verdict"] == "too_large"
    row = await receipt(stack, "sandbox", response.json()["receipt_id"])
    assert row["verdict"] == "too_large" and row["event_id"] is None
    await assert_untouched(stack, f"sandbox-{rrq}", charge)


async def test_webhook_for_unknown_provider_is_404_and_recorded(stack: Stack) -> None:
    charge = await stack.charge(10_000)
    rrq = f"rrq_{uuid.uuid4().hex[:12]}"
    name = f"nopay{uuid.uuid4().hex[:8]}"
    secret = sandbox_secret(stack)
    body = event_body("refund.requested", request_object(charge, rrq))
    async with httpx.AsyncClient(base_url=stack.relay_url, timeout=30) as http:
        response = await http.post(f"/webhooks/{name}", content=body,
                                   headers=signed(secret, body))
    assert response.status_code == 404, response.text
    assert response.json()["verdict"] == "unknown_provider"
    rows = await stack.store.receipts.find(name)
    assert [r["verdict"] for r in rows] == ["unknown_provider"]
    assert rows[0]["id"] == response.json()["receipt_id"]
    await assert_untouched(stack, f"{name}-{rrq}", charge)
    await assert_untouched(stack, f"sandbox-{rrq}", charge)


async def test_the_receipts_list_is_read_a_page_at_a_time(stack: Stack) -> None:
    """Receipts that moved something are kept for good, and anyone may add refused ones: the
    list read every receipt of a provider into memory on each call. It answers pages (at
    most 500, after the receipt id given), oldest first."""
    name = f"nopay{uuid.uuid4().hex[:8]}"
    async with httpx.AsyncClient(base_url=stack.relay_url, timeout=30) as http:
        ids = [(await http.post(f"/webhooks/{name}", content=b"{}")).json()["receipt_id"] for _ in range(3)]
    async with stack.api("olga") as api:
        async def page(**params: int) -> list[int]:
            answer = await api.get("/v1/webhook-receipts", params={"provider": name, **params})
            assert answer.status_code == 200, answer.text
            return [r["id"] for r in answer.json()]
        assert await page(limit=2) == ids[:2]
        assert await page(limit=2, after=ids[1]) == ids[2:]
        assert await page(limit=-5) == ids[:1]
        assert await page() == ids


async def test_forged_late_failure_does_not_move_a_succeeded_case(stack: Stack) -> None:
    charge = await stack.charge(10_000)
    body = stack.refund_body(charge, 3_000)
    case_id = body["refund_request_id"]
    async with stack.api("alice") as api:
        assert (await api.post("/v1/refund-requests", json=body)).status_code == 202
    before = await stack.wait_for_status(case_id, "succeeded")
    [refund] = await stack.provider_refunds(charge)
    failed = {**refund, "status": "failed", "failure_reason": "expired_or_canceled_card"}
    secret = sandbox_secret(stack)
    verdicts: list[str] = []
    async with httpx.AsyncClient(base_url=stack.relay_url, timeout=30) as http:
        for build in (tampered, wrong_secret, missing_signature, stale):
            event_id = f"evt_{uuid.uuid4().hex[:16]}"
            raw = event_body("refund.failed", failed, event_id=event_id)
            content, headers = build(secret, raw)
            response = await http.post("/webhooks/sandbox", content=content, headers=headers)
            assert response.status_code == 401, response.text
            verdicts.append((await receipt(stack, "sandbox", response.json()["receipt_id"]))["verdict"])
            assert not [e for e in await stack.store.audit.trail(case_id)
                        if event_id in json.dumps(e["detail"])]
    assert verdicts == ["bad_signature", "bad_signature", "bad_signature", "stale"]
    after = await stack.store.cases.get(case_id)
    assert after is not None
    for column in ("status", "provider_status", "reserved_amount", "failure_reason"):
        assert after[column] == before[column], column
    templates = {line["template"] for line in await stack.store.ledger.entries(case_id)}
    assert templates == {"refund_settled"}
    assert [r["status"] for r in await stack.provider_refunds(charge)] == ["succeeded"]


async def test_duplicate_deliveries_make_one_case_and_one_refund(stack: Stack) -> None:
    charge = await stack.charge(10_000)
    rrq = f"rrq_{uuid.uuid4().hex[:12]}"
    event_id = f"evt_{uuid.uuid4().hex[:16]}"
    secret = sandbox_secret(stack)
    body = event_body("refund.requested", request_object(charge, rrq), event_id=event_id)
    async with httpx.AsyncClient(base_url=stack.relay_url, timeout=30) as http:
        first = await http.post("/webhooks/sandbox", content=body,
                                headers=signed(secret, body))
        rest = await asyncio.gather(*(
            http.post("/webhooks/sandbox", content=body, headers=signed(secret, body))
            for _ in range(11)))
    assert first.status_code == 200, first.text
    assert first.json()["verdict"] == "accepted"
    assert [r.status_code for r in rest] == [200] * 11
    assert sorted(r.json()["verdict"] for r in rest) == ["duplicate"] * 11
    case_id = f"sandbox-{rrq}"
    row = await stack.wait_for_status(case_id, "succeeded")
    assert row["requester"] == "provider:sandbox" and row["source"] == "webhook"
    receipts = await stack.store.receipts.find("sandbox", event_id)
    assert len(receipts) == 12
    assert sorted(r["verdict"] for r in receipts) == ["accepted"] + ["duplicate"] * 11
    [accepted] = [r for r in receipts if r["verdict"] == "accepted"]
    assert accepted["workflow_id"] == case_id and accepted["processed_at"] is not None
    refunds = await stack.provider_refunds(charge)
    assert [(r["amount"], r["status"]) for r in refunds] == [(1000, "succeeded")]
    received = [e for e in await stack.store.audit.trail(case_id) if e["action"] == "request_received"]
    assert len(received) == 1


async def test_a_duplicate_delivery_writes_no_log_line(
        stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    """A provider's retries are kept as receipts (verdict, first receipt) and counted by a
    metric; a log line per duplicate repeated both in a retry storm, for a tenth of the
    relay's work per duplicate."""
    secret = sandbox_secret(stack)
    body = event_body("refund.requested", request_object(await stack.charge(10_000),
                                                         f"rrq_{uuid.uuid4().hex[:12]}"))
    async with httpx.AsyncClient(base_url=stack.relay_url, timeout=30) as http:
        first = await http.post("/webhooks/sandbox", content=body, headers=signed(secret, body))
        assert first.json()["verdict"] == "accepted", first.text
        with caplog.at_level(logging.INFO, logger="relay"):
            again = await http.post("/webhooks/sandbox", content=body, headers=signed(secret, body))
    assert again.json()["verdict"] == "duplicate"
    assert [r.getMessage() for r in caplog.records if r.name == "relay"] == []
    await stack.wait_for_status(first.json()["workflow_id"], "succeeded")


# -- refund requests -----------------------------------------------------------------------

def without(field: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda body: {k: v for k, v in body.items() if k != field}


def setting(field: str, value: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda body: {**body, field: value}


BAD_BODIES: dict[str, tuple[Callable[[dict[str, Any]], dict[str, Any]], str]] = {
    "negative_amount": (setting("amount", -3000), "amount"),
    "zero_amount": (setting("amount", 0), "amount"),
    "float_amount": (setting("amount", 30.5), "amount"),
    "unknown_currency": (setting("currency", "XYZ"), "currency"),
    "missing_charge_id": (without("charge_id"), "charge_id"),
    "requester_in_body": (setting("requester", "bob"), "requester"),
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
async def test_invalid_refund_request_is_422_and_creates_nothing(stack: Stack, case: str) -> None:
    mutate, field = BAD_BODIES[case]
    charge = await stack.charge(10_000)
    body = mutate(stack.refund_body(charge, 3_000))
    async with stack.api("alice") as api:
        response = await api.post("/v1/refund-requests", json=body)
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    assert any(e["loc"][-1] == field for e in errors), errors
    await assert_untouched(stack, body["refund_request_id"], charge)


@pytest.mark.parametrize("amount", [30.0, "3000", True],
                         ids=["whole_float", "numeric_string", "boolean"])
async def test_non_integer_amount_is_refused(stack: Stack, amount: Any) -> None:
    charge = await stack.charge(10_000)
    body = stack.refund_body(charge, amount)
    async with stack.api("alice") as api:
        response = await api.post("/v1/refund-requests", json=body)
    assert response.status_code == 422, response.text
    await assert_untouched(stack, body["refund_request_id"], charge)


@pytest.mark.parametrize("token", [None, "t-nobody-0000"], ids=["no_token", "bad_token"])
async def test_refund_request_without_valid_token_is_401(stack: Stack, token: str | None) -> None:
    charge = await stack.charge(10_000)
    body = stack.refund_body(charge, 3_000)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(base_url=stack.relay_url, timeout=30, headers=headers) as http:
        response = await http.post("/v1/refund-requests", json=body)
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    await assert_untouched(stack, body["refund_request_id"], charge)


async def test_auditor_cannot_request_a_refund(stack: Stack) -> None:
    charge = await stack.charge(10_000)
    body = stack.refund_body(charge, 3_000)
    async with stack.api("dave") as api:
        response = await api.post("/v1/refund-requests", json=body)
    assert response.status_code == 403, response.text
    # no case, so no trail of it begins: the global trail names the id it asked for
    assert await stack.store.audit.trail(body["refund_request_id"]) == []
    [refused] = [e for e in await stack.store.audit.trail("") if e["action"] == "access_refused"
                 and e["detail"].get("case_id") == body["refund_request_id"]]
    assert (refused["actor"], refused["detail"]["has"]) == ("dave", ["auditor"])
    await assert_untouched(stack, body["refund_request_id"], charge)


async def test_currency_other_than_the_charges_is_rejected_by_the_workflow(stack: Stack) -> None:
    charge = await stack.charge(10_000, currency="USD")
    body = stack.refund_body(charge, 3_000, currency="EUR")
    async with stack.api("alice") as api:
        response = await api.post("/v1/refund-requests", json=body)
    assert response.status_code == 202, response.text
    row = await stack.wait_for_status(body["refund_request_id"], "rejected")
    assert row["reserved_amount"] == 0 and row["provider_refund_id"] is None
    handle = stack.client.get_workflow_handle(body["refund_request_id"], result_type=RefundOutcome)
    outcome = await handle.result()
    assert outcome.state.status == "rejected" and "currency" in (outcome.state.failure_reason or "")
    trail = [e["action"] for e in await stack.store.audit.trail(body["refund_request_id"])]
    assert "validation_rejected" in trail and "provider_submit_started" not in trail
    assert await stack.provider_refunds(charge) == []
    assert await stack.store.ledger.entries(body["refund_request_id"]) == []


@pytest.mark.parametrize("amount", [-500, 0, 2**63])
async def test_a_payout_event_with_an_impossible_amount_is_unreadable_and_starts_nothing(
        stack: Stack, amount: int) -> None:
    """Refund and payment events refuse an amount no money has (zero, negative, past 64
    bits) as unreadable; a payout event took it and opened an exception case for it."""
    payout = await paid_payout(stack, 5_000)
    body = event_body("payout.failed", {"id": payout.provider_payout_id, "object": "payout",
                                        "amount": amount, "currency": "usd", "status": "failed",
                                        "failure_code": "account_closed", "metadata": {}})
    async with httpx.AsyncClient(base_url=stack.relay_url, timeout=30) as http:
        response = await http.post("/webhooks/sandbox", content=body,
                                   headers=signed(sandbox_secret(stack), body))
    assert response.status_code == 400, response.text
    assert response.json()["verdict"] == "unreadable"
    assert not await workflow_exists(stack, payout_case_id("sandbox", payout.provider_payout_id))
