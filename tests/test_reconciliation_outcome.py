"""Reconciliation never hangs: a provider that refuses its payout listing (a key restricted to
refunds, an emulator without payouts) still has its refunds reconciled, with the refusal a
warning in the report; a run that fails is `failed` with its reason in the API, the console
and the metrics, and `refunds reconcile` exits non-zero with it or when its --timeout passes.
The refusals are Stripe-shaped HTTP answers from a proxy in front of the sandbox."""

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from starlette.types import Receive, Scope, Send
from temporalio.client import Client

from adapters.db import Store
from adapters.http_server import AppServer, reserve_port
from starters.dev.stack import TemporalDevServer
from tests.harness import Stack, open_stack
from tests.lossy_proxy import LossyProxy
from tests.reconciliation_kit import backfill, history, seed_provider
from tests.test_console import console

REFUNDS = str(Path(sys.executable).parent / "refunds")
RESTRICTED = {"error": {"type": "invalid_request_error", "code": "secret_key_required",
                        "message": "The provided key 'rk_test_***' does not have the required "
                                   "permissions for this endpoint on account 'acct_1'."}}


class RefusingProxy(LossyProxy):
    """Forwards to the sandbox, except the list calls it is told to answer with `status`."""

    def __init__(self) -> None:
        super().__init__(target="")
        self.refusing: dict[str, int] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        status = self.refusing.get(scope["path"]) if scope["method"] == "GET" else None
        if status is None:
            await super().__call__(scope, receive, send)
            return
        body = httpx.Response(status, json=RESTRICTED if status < 500 else {"error": {"type": "api_error"}})
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body.content})


@pytest.fixture
async def refusing(store: Store, client: Client, temporal_server: TemporalDevServer
                   ) -> AsyncIterator[tuple[Stack, RefusingProxy]]:
    """A stack whose workers reach the sandbox through the refusing proxy."""
    proxy = RefusingProxy()
    sock = reserve_port("127.0.0.1")
    server = AppServer(proxy, "127.0.0.1", 0, sock=sock)
    await server.start()
    stack = await open_stack(store, client, temporal_server.address, sandbox_api_base=server.url)
    proxy.target = stack.sandbox_url
    try:
        yield stack, proxy
    finally:
        await stack.close()
        await server.stop()


async def reconcile_cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REFUNDS_RELAY_URL": stack.relay_url, "REFUNDS_TOKEN": stack.tokens["olga"]}
    return await asyncio.to_thread(subprocess.run, [REFUNDS, "reconcile", "--provider", "sandbox",
                                                    "--since", "30d", "--no-progress", *args],
                                   capture_output=True, text=True, timeout=120, env=env)


async def test_a_refused_payout_listing_is_a_warning_and_the_refunds_are_reconciled(
        refusing: tuple[Stack, RefusingProxy]) -> None:
    stack, proxy = refusing
    proxy.refusing["/v1/payouts"] = 403
    failed_there = history("ch_w", 1_500, days_ago=2, status="failed", failure_reason="declined")
    await seed_provider(stack, [failed_there])
    report = await backfill(stack, since_days=30)
    assert report["state"] == "completed" and report["failure"] is None
    assert [b["object_id"] for b in report["breaks"]] == [failed_there["id"]]
    [warning] = report["warnings"]
    assert warning.startswith("payouts not reconciled: sandbox refused the listing") and "403" in warning
    shown = await reconcile_cli(stack, "--timeout", "60")
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "WARNING: payouts not reconciled" in shown.stdout


async def refused_run_line(stack: Stack, proxy: RefusingProxy, status: int, *, timeout: str) -> str:
    """Runs `refunds reconcile` while the provider answers its refund listing with `status`;
    the one line the CLI, exiting 1, writes to stderr."""
    proxy.refusing["/v1/refunds"] = status
    done = await reconcile_cli(stack, "--timeout", timeout)
    assert done.returncode == 1, done.stdout + done.stderr
    [line] = done.stderr.splitlines()
    return line


async def test_a_failed_run_is_failed_with_its_reason_everywhere_and_the_cli_exits_1(
        refusing: tuple[Stack, RefusingProxy]) -> None:
    stack, proxy = refusing
    line = await refused_run_line(stack, proxy, 403, timeout="60")
    assert " failed: ProviderDeclined: listing /v1/refunds: HTTP 403" in line, line
    async with stack.api("olga") as api:
        [run] = [r for r in (await api.get("/v1/reconciliation/runs")).json() if r["requested_by"] == "olga"
                 and r["run_id"] in line]
        assert run["state"] == "failed" and "secret_key_required" in run["failure"]
        metrics = (await api.get("/metrics")).text
    assert 'refunds_reconciliation_runs{provider="sandbox",state="failed"}' in metrics
    browser = await console(stack, "olga")
    try:
        page = (await browser.get("/console/reconciliation")).text
    finally:
        await browser.aclose()
    assert 'data-testid="run-failure">ProviderDeclined: listing /v1/refunds: HTTP 403' in page


async def test_reconcile_stops_following_at_its_timeout_and_says_the_run_goes_on(
        refusing: tuple[Stack, RefusingProxy]) -> None:
    """A provider answering 503 is retried without end (it may come back): the run stays
    running, and the CLI gives up following it at --timeout instead of waiting forever."""
    stack, proxy = refusing
    line = await refused_run_line(stack, proxy, 503, timeout="2")
    assert "has not ended after 2 s; it goes on" in line, line
    run_id = line.split("run ")[1].split()[0]
    await stack.client.get_workflow_handle(run_id).terminate("test over")
