"""Traffic without credentials cannot grow storage without bound: refusals of requests
without a valid token are counted and logged (sampled), not chained per request; refused
webhook receipts are kept for a retention and pruned by the worker; re-drive gives up on
a receipt after a bounded number of tries and says so."""

import asyncio
import hashlib
import logging
import uuid
from datetime import timedelta
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY
from temporalio.client import Client

from adapters.config import Settings
from adapters.db import Store
from adapters.refusals import SampledRefusalLog
from starters.dev.stack import TemporalDevServer
from starters.relay.webhook_desk import WebhookDesk
from tests.harness import Stack, open_stack
from tests.test_provider_webhooks import CASHFREE_SECRET, recorded, sign_cashfree
from workers.retention import prune_expired


def refusals(via: str, refusal: str) -> float:
    return REGISTRY.get_sample_value("refunds_unauthenticated_refusals_total",
                                     {"via": via, "refusal": refusal}) or 0.0


async def global_chain(store: Store) -> tuple[int, int]:
    """The global audit chain's head seq and the anonymous rows anywhere."""
    async with store.database.transaction() as conn:
        head = await (await conn.execute("SELECT seq FROM audit_heads WHERE chain = ''")).fetchone()
        rows = await (await conn.execute(
            "SELECT count(*) AS n FROM audit_events WHERE actor = 'anonymous'")).fetchone()
    assert rows is not None
    return (int(head["seq"]) if head else 0), int(rows["n"])


async def test_requests_without_a_valid_token_are_counted_not_chained(
        stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="relay.refusals")
    before = await global_chain(stack.store)
    missing, invalid = refusals("api", "missing bearer token"), refusals("api", "invalid or revoked token")
    bad_input = refusals("api", "invalid input without a valid token")
    async with httpx.AsyncClient(base_url=stack.relay_url, timeout=30) as http:
        for n in range(10):
            assert (await http.post("/v1/refund-requests", json={})).status_code in (401, 422)
            forged = {"Authorization": f"Bearer forged-{n}-{uuid.uuid4().hex}"}
            assert (await http.get("/v1/webhooks/coverage", headers=forged)).status_code == 401
            assert (await http.get(f"/v1/refund-requests/{stack.new_id()}")).status_code == 401
    assert await global_chain(stack.store) == before
    assert refusals("api", "invalid or revoked token") == invalid + 10
    assert refusals("api", "missing bearer token") + refusals("api", "invalid input without a valid token") \
        == missing + bad_input + 20
    lines = [r for r in caplog.records if r.name == "relay.refusals"]
    assert 1 <= len(lines) < 30


async def test_console_sign_ins_without_a_valid_token_are_counted_not_chained(stack: Stack) -> None:
    before = await global_chain(stack.store)
    invalid = refusals("console", "invalid or revoked token")
    forged = refusals("console", "sign-in form token does not match its cookie")
    no_session = refusals("console", "no live console session")
    async with httpx.AsyncClient(base_url=stack.relay_url, timeout=30) as browser:
        for n in range(5):
            form = await browser.get("/console/sign-in")
            token = form.text.split('name="form_token" value="')[1].split('"')[0]
            bad = await browser.post("/console/sign-in", data={"token": f"t-forged-{n}", "form_token": token})
            assert bad.status_code == 401
            assert (await browser.post("/console/sign-in", data={"token": "x", "form_token": "no"})
                    ).status_code == 403
            assert (await browser.post("/console/sign-out")).status_code == 401
    assert await global_chain(stack.store) == before
    assert refusals("console", "invalid or revoked token") == invalid + 5
    assert refusals("console", "sign-in form token does not match its cookie") == forged + 5
    assert refusals("console", "no live console session") == no_session + 5


def test_the_refusal_log_is_sampled(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="relay.refusals")
    log = SampledRefusalLog(every_seconds=3600)
    before = refusals("test", "missing")
    for _ in range(50):
        log.refused("test", "missing", "GET /x")
    assert refusals("test", "missing") == before + 50
    assert len([r for r in caplog.records if r.name == "relay.refusals"]) == 1


async def refused_receipt(store: Store, provider: str) -> int:
    body = b'{"forged": true}'
    stored = await store.receipts.store(
        provider=provider, event_id=None, event_type=None, body=body,
        body_sha256=hashlib.sha256(body).hexdigest(), headers={}, verdict="bad_signature",
        error="no valid signature")
    return stored.receipt_id


async def backdate(store: Store, receipt_id: int, days: float) -> None:
    async with store.database.transaction() as conn:
        await conn.execute("UPDATE webhook_receipts SET received_at = now() - make_interval(days => %s)"
                           " WHERE id = %s", (days, receipt_id))


async def receipt_row(store: Store, receipt_id: int) -> dict[str, Any] | None:
    async with store.database.transaction() as conn:
        cur = await conn.execute("SELECT * FROM webhook_receipts WHERE id = %s", (receipt_id,))
        return await cur.fetchone()


async def test_refused_receipts_are_pruned_by_the_worker_after_their_retention(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REFUNDS_WEBHOOK_REFUSED_RETENTION_DAYS", "7")
    assert Settings().webhook_refused_retention_days == 7
    monkeypatch.delenv("REFUNDS_WEBHOOK_REFUSED_RETENTION_DAYS")
    assert Settings().webhook_refused_retention_days == 30
    provider = f"p-{uuid.uuid4().hex[:8]}"
    old_forgery = await refused_receipt(store, provider)
    fresh_forgery = await refused_receipt(store, provider)
    body = b'{"type": "refund.teleported"}'
    signed_unknown = (await store.receipts.store(
        provider=provider, event_id="evt_unknown", event_type="refund.teleported", body=body,
        body_sha256=hashlib.sha256(body).hexdigest(), headers={}, verdict="unknown_type",
        error="no handler")).receipt_id
    signed_unreadable = (await store.receipts.store(
        provider=provider, event_id=None, event_type="refund.updated", body=body,
        body_sha256=hashlib.sha256(body).hexdigest(), headers={}, verdict="unreadable",
        error="refund.updated: ValueError: 2.005 INR has more decimals than INR")).receipt_id
    signed_invalid = (await store.receipts.store(
        provider=provider, event_id="evt_invalid", event_type="refund.requested", body=body,
        body_sha256=hashlib.sha256(body).hexdigest(), headers={}, verdict="invalid_request",
        error="invalid refund request: currency XYZ is not an ISO 4217 currency")).receipt_id
    replay = (await store.receipts.store(
        provider=provider, event_id=None, event_type=None, body=body,
        body_sha256=hashlib.sha256(body).hexdigest(), headers={}, verdict="bad_signature",
        error="still forged", replay_of=old_forgery)).receipt_id
    for receipt_id in (old_forgery, signed_unknown, signed_unreadable, signed_invalid):
        await backdate(store, receipt_id, 31)

    stop = asyncio.Event()
    loop = asyncio.create_task(prune_expired(store, stop, every_seconds=0.05, retention=timedelta(days=30),
                                             step_result_retention=timedelta(days=30)))
    try:
        deadline = asyncio.get_running_loop().time() + 30
        while await receipt_row(store, old_forgery) is not None:
            assert asyncio.get_running_loop().time() < deadline, "the pruner never pruned"
            await asyncio.sleep(0.05)
    finally:
        stop.set()
        await loop
    assert await receipt_row(store, fresh_forgery) is not None  # inside its retention
    assert await receipt_row(store, signed_unknown) is not None  # signed: kept for coverage
    assert await receipt_row(store, signed_unreadable) is not None  # the provider's word: kept
    assert await receipt_row(store, signed_invalid) is not None  # a signed request refused: kept
    kept = await receipt_row(store, replay)
    assert kept is not None and kept["replay_of"] is None  # the replay outlives its original


async def test_re_drive_gives_up_on_a_receipt_after_its_bounded_tries(
        store: Store, client: Client, temporal_server: TemporalDevServer,
        caplog: pytest.LogCaptureFixture) -> None:
    """An accepted receipt whose replay can never reach a workflow (here: its signature
    no longer verifies) is tried `webhook_redrive_max_attempts` times, then named once."""
    caplog.set_level(logging.ERROR, logger="relay")
    stack = await open_stack(store, client, temporal_server.address, worker=False,
                             cashfree_webhook_secret=CASHFREE_SECRET, webhook_redrive_after_seconds=0,
                             webhook_redrive_max_attempts=2)
    try:
        body, refund_id = recorded("cashfree")
        stuck = (await store.receipts.store(
            provider="cashfree", event_id=f"AUTO_REFUND_STATUS_WEBHOOK:{refund_id}:SUCCESS",
            event_type="AUTO_REFUND_STATUS_WEBHOOK", body=body, body_sha256=hashlib.sha256(body).hexdigest(),
            headers=sign_cashfree(body, secret="rotated-away"), verdict="accepted", error=None)).receipt_id
        gave_up = REGISTRY.get_sample_value("refunds_webhook_redrive_gave_up_total") or 0.0
        desk = WebhookDesk(store, client, stack.providers, stack.settings)
        for _ in range(4):
            await desk.redrive()
        row = await receipt_row(store, stuck)
        assert row is not None and row["processed_at"] is None and row["redrive_attempts"] == 2
        async with store.database.transaction() as conn:
            replays = await (await conn.execute(
                "SELECT verdict FROM webhook_receipts WHERE replay_of = %s", (stuck,))).fetchall()
        assert [r["verdict"] for r in replays] == ["bad_signature", "bad_signature"]
        # named once; the counter counts each receipt given up once (the session's database may
        # hold another test's stuck receipt, which this re-drive gives up on too)
        named = [r.getMessage() for r in caplog.records if r.getMessage().startswith("GAVE UP re-driving")]
        assert len([m for m in named if f"GAVE UP re-driving receipt {stuck} " in m]) == 1, named
        assert REGISTRY.get_sample_value("refunds_webhook_redrive_gave_up_total") == gave_up + len(named)
    finally:
        await stack.close()
