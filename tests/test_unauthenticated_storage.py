"""Traffic without credentials cannot grow storage without bound: refusals of requests
without a valid token are counted and logged (sampled), not chained per request; refused
webhook receipts are kept for a retention and pruned by the worker; re-drive gives up on
a receipt after a bounded number of tries and says so."""

import hashlib
import logging
import uuid

import httpx
import pytest
from prometheus_client import REGISTRY

from adapters.refusals import SampledRefusalLog
from adapters.store import Store
from tests.harness import Stack


def refusals(via: str, refusal: str) -> float:
    return REGISTRY.get_sample_value("refunds_unauthenticated_refusals_total",
                                     {"via": via, "refusal": refusal}) or 0.0


async def global_chain(store: Store) -> tuple[int, int]:
    """The global audit chain's head seq and the anonymous rows anywhere."""
    async with store.transaction() as conn:
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
    stored = await store.store_receipt(
        provider=provider, event_id=None, event_type=None, body=body,
        body_sha256=hashlib.sha256(body).hexdigest(), headers={}, verdict="bad_signature",
        error="no valid signature")
    return stored.receipt_id
