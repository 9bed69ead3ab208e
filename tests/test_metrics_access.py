"""`/metrics` (relay and worker) in production needs REFUNDS_METRICS_TOKEN as a bearer token
(compared in constant time; a product API token is not one); without that setting it answers
only on a loopback bind, which is what `refunds dev` and the tests use."""

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from temporalio.client import Client

from adapters.config import Settings
from adapters.db import Store
from starters.dev.stack import TemporalDevServer
from starters.relay import create_app
from tests.harness import Stack, open_stack
from workers.health import health_app

TOKEN, OLD_TOKEN = "metrics-new-3f9a", "metrics-old-77c1"


@pytest.fixture
async def guarded(store: Store, client: Client, temporal_server: TemporalDevServer) -> AsyncIterator[Stack]:
    opened = await open_stack(store, client, temporal_server.address,
                              metrics_token=f"{TOKEN}, {OLD_TOKEN}")
    yield opened
    await opened.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def scrape(base_url: str, headers: dict[str, str] | None = None, app: FastAPI | None = None
                 ) -> httpx.Response:
    transport = httpx.ASGITransport(app=app) if app is not None else None
    async with httpx.AsyncClient(base_url=base_url, transport=transport) as http:
        return await http.get("/metrics", headers=headers or {})


async def test_relay_metrics_refuse_callers_without_the_metrics_token(guarded: Stack) -> None:
    for headers in (None, bearer("wrong"), bearer(guarded.tokens["admin"]), {"Authorization": TOKEN}):
        response = await scrape(guarded.relay_url, headers)
        assert response.status_code == 401, (headers, response.text)
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert "refunds_" not in response.text


async def test_relay_metrics_answer_the_metrics_token_and_its_predecessor(guarded: Stack) -> None:
    for token in (TOKEN, OLD_TOKEN):
        response = await scrape(guarded.relay_url, bearer(token))
        assert response.status_code == 200, response.text
        assert "refunds_cases" in response.text


async def test_worker_metrics_refuse_without_the_token_and_answer_with_it(guarded: Stack) -> None:
    assert guarded.worker is not None
    app = health_app(guarded.worker, guarded.client, guarded.store, guarded.settings)
    assert (await scrape("http://worker", None, app)).status_code == 401
    assert (await scrape("http://worker", bearer("wrong"), app)).status_code == 401
    answered = await scrape("http://worker", bearer(TOKEN), app)
    assert answered.status_code == 200 and "refunds_provider_call" in answered.text
    async with httpx.AsyncClient(base_url="http://worker", transport=httpx.ASGITransport(app=app)) as http:
        assert (await http.get("/healthz")).status_code == 200  # probes stay open


async def test_the_loopback_dev_default_needs_no_token(stack: Stack) -> None:
    assert stack.settings.metrics_token is None and stack.settings.bind_host == "127.0.0.1"
    assert (await scrape(stack.relay_url)).status_code == 200
    assert stack.worker is not None
    app = health_app(stack.worker, stack.client, stack.store, stack.settings)
    assert (await scrape("http://worker", None, app)).status_code == 200


@pytest.mark.parametrize("which", ["relay", "worker"])
async def test_a_non_loopback_bind_without_a_token_refuses_every_scrape(
        stack: Stack, which: str, caplog: pytest.LogCaptureFixture) -> None:
    """A production bind (0.0.0.0, as the images set) with no token configured serves nobody:
    the apps are driven in process (nothing binds beyond loopback here)."""
    settings = Settings(**{**stack.settings.model_dump(), "bind_host": "0.0.0.0"})
    assert stack.worker is not None
    app: Any = (create_app(stack.store, stack.client, stack.providers, settings) if which == "relay"
                else health_app(stack.worker, stack.client, stack.store, settings))
    response = await scrape("http://service", None, app)
    assert response.status_code == 401 and "REFUNDS_METRICS_TOKEN" in response.text
    assert any("REFUNDS_METRICS_TOKEN is unset" in r.getMessage() for r in caplog.records)  # said at start
