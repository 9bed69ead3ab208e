"""The ops console, and the Temporal UI of `refunds dev` beside it, in a real browser:
Debian's chromium driven by playwright-core (tests/browser/*.spec.mjs) against a stack each
test prepares. Screenshots of the main pages land in test-artifacts/console/.

`make test` installs chromium and playwright-core when it can (tests/browser/install.sh);
where it cannot, this test skips and says why, except in CI (CI=true), where it fails."""

import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg.conninfo import make_conninfo
from temporalio.client import Client

from adapters.config import Settings
from adapters.db import Store
from starters.dev.run import run_dev
from starters.ports import free_port
from tests.harness import Stack
from tests.test_reissue import failed_case

BROWSER_DIR = Path(__file__).parent / "browser"
ARTIFACTS = Path(__file__).parent.parent / "test-artifacts" / "console"
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))


def missing_prerequisite() -> str | None:
    if shutil.which("node") is None:
        return "node is not installed"
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is not installed"
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        return "playwright-core is not installed in tests/browser"
    return None


@pytest.fixture
def browser_ready() -> None:
    why = missing_prerequisite()
    if why is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"browser tests cannot run in CI: {why} (tests/browser/install.sh installs it)")
    pytest.skip(f"browser tests skipped: {why}; run `make browser-deps` as root to install it")


async def test_sign_in_refuse_the_requester_approve_and_reissue_in_a_real_browser(
        browser_ready: None, stack: Stack) -> None:
    rita = await stack.store.access.create_token("rita", ["requester", "approver"],
                                                 token=f"t-rita-{uuid.uuid4().hex}", by="test")
    stack.tokens["rita"] = rita
    async with stack.sandbox() as sb:  # a type we have no branch for: coverage must show it
        await sb.post("/_sandbox/events", json={"type": "refund.reversed", "object": {"id": "re_x"}})
    waiting = await stack.request_refund("rita", await stack.charge(30_000), 12_000)
    failed, _ = await failed_case(stack)
    await stack.wait_for_status(waiting, "awaiting_approval")
    if ARTIFACTS.exists():
        shutil.rmtree(ARTIFACTS)
    scenario = {"tokens": {"requester": rita, "approver": stack.tokens["bob"], "ops": stack.tokens["olga"]},
                "approval_case": waiting, "failed_case": failed}
    text = await run_spec("console.spec.mjs", [stack.relay_url, str(ARTIFACTS)], scenario)
    assert "console browser scenario: all steps passed" in text, text
    assert text.count("ok - ") == 7, text

    trail = await stack.store.audit.trail(waiting)
    assert [(e["actor"], e["detail"].get("via")) for e in trail if e["action"] == "approval_refused"] == [
        ("rita", "console")]
    assert [e["actor"] for e in trail if e["action"] == "approval_granted"] == ["bob"]
    children = await stack.store.cases.children(failed)
    assert [(c["refund_request_id"], c["method"], c["requester"]) for c in children] == [
        (f"{failed}-r1", "provider", "olga")]
    for name in ("01-sign-in", "03-case-awaiting-approval", "04-requester-refused", "08-failed-refund-banner",
                 "09-reissued", "10-coverage"):
        assert (ARTIFACTS / f"{name}.png").stat().st_size > 10_000, name


async def run_spec(spec: str, args: list[str], scenario: dict[str, Any]) -> str:
    """Runs a browser scenario (tokens in the environment, not argv) and returns its output
    after checking it passed."""
    process = await asyncio.create_subprocess_exec(
        "node", str(BROWSER_DIR / spec), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "SCENARIO": json.dumps(scenario), "CHROMIUM": str(CHROMIUM)})
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout=240)
    except TimeoutError:
        process.kill()
        raise
    text = output.decode(errors="replace")
    assert process.returncode == 0, text
    assert "not ok" not in text, text
    return text


async def wait_until_ready(url: str, running: asyncio.Task[None], timeout: float = 180) -> None:
    """Polls the relay's /readyz until `refunds dev` answers (or has died)."""
    deadline = asyncio.get_running_loop().time() + timeout
    async with httpx.AsyncClient(timeout=5) as http:
        while True:
            if running.done():
                running.result()
                raise AssertionError("refunds dev stopped while starting")
            with contextlib.suppress(httpx.HTTPError):
                if (await http.get(f"{url}/readyz")).status_code == 200:
                    return
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"refunds dev did not become ready at {url}")
            await asyncio.sleep(0.2)


@dataclass(frozen=True)
class DevStack:
    settings: Settings
    dsn: str
    relay_url: str
    ui_url: str


@pytest.fixture(scope="module")
async def dev_stack(postgres_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[DevStack]:
    """`refunds dev` as `make run` starts it: its own Temporal dev server with the UI, on a
    fresh database of the session's PostgreSQL, no demo."""
    database = f"uicodec_{uuid.uuid4().hex[:8]}"
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as admin:
        await admin.execute(f"CREATE DATABASE {database}")
    dsn = make_conninfo(postgres_dsn, dbname=database)
    settings = Settings(data_dir=tmp_path_factory.mktemp("dev") / "data", database_url=dsn,
                        relay_port=free_port(), sandbox_port=free_port(), temporal_port=free_port(),
                        temporal_ui_port=free_port(), worker_health_port=0, temporal_metrics_port=0)
    relay_url = f"http://127.0.0.1:{settings.relay_port}"
    loop = asyncio.get_running_loop()
    dev = asyncio.create_task(run_dev(settings, play_demo=False))
    try:
        await wait_until_ready(relay_url, dev)
        yield DevStack(settings, dsn, relay_url, f"http://127.0.0.1:{settings.temporal_ui_port}")
    finally:
        dev.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await dev
        for sig in (signal.SIGINT, signal.SIGTERM):  # run_dev's Ctrl-C handlers
            loop.remove_signal_handler(sig)


async def test_the_dev_temporal_ui_sends_credentials_to_the_console_codec(dev_stack: DevStack) -> None:
    """What the browser test relies on, checked without a browser: the UI's settings turn on
    the codec's credentials, and the relay lets the UI's origin send them."""
    async with httpx.AsyncClient(base_url=dev_stack.ui_url, timeout=30) as ui:
        page = await ui.get("/")
        settings = await ui.get("/api/v1/settings")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert settings.status_code == 200, settings.text
    codec = settings.json()["Codec"]
    assert codec["Endpoint"] == f"{dev_stack.relay_url}/console/codec"
    assert codec["IncludeCredentials"] is True and codec["PassAccessToken"] is False
    async with httpx.AsyncClient(base_url=dev_stack.relay_url, timeout=30) as browser:
        preflight = await browser.options("/console/codec/decode", headers={
            "Origin": dev_stack.ui_url, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,x-namespace"})
    assert preflight.status_code == 200, preflight.text
    assert preflight.headers["access-control-allow-origin"] == dev_stack.ui_url
    assert preflight.headers["access-control-allow-credentials"] == "true"


async def test_signed_in_ops_read_a_decoded_history_in_the_dev_temporal_ui_and_visitors_do_not(
        browser_ready: None, dev_stack: DevStack) -> None:
    """No codec setting is touched in the browser."""
    store = await Store.open(dev_stack.dsn, max_size=2)
    try:
        olga = await store.access.create_token("olga", ["ops"], token=f"t-olga-{uuid.uuid4().hex}", by="test")
        alice = await store.access.create_token("alice", ["requester"], token=f"t-alice-{uuid.uuid4().hex}",
                                                by="test")
    finally:
        await store.close()
    canary = f"jane.canary.{uuid.uuid4().hex[:6]}@example.org"
    case_id = f"rr-{uuid.uuid4().hex[:12]}"
    async with httpx.AsyncClient(timeout=30) as http:
        charge = await http.post(f"{dev_stack.settings.sandbox_base_url()}/v1/charges", json={
            "amount": 5_000, "currency": "USD", "merchant_account": "acct_1"})
        charge.raise_for_status()
        requested = await http.post(f"{dev_stack.relay_url}/v1/refund-requests", headers={
            "Authorization": f"Bearer {alice}"}, json={
            "refund_request_id": case_id, "provider": "sandbox", "charge_id": charge.json()["id"],
            "amount": 1_000, "currency": "USD", "merchant_account": "acct_1",
            "reason": "requested_by_customer",
            "evidence": {"order_id": "ord-ui", "customer_email": canary}})
    assert requested.status_code == 202, requested.text
    raw = await Client.connect(dev_stack.settings.temporal_target())  # no codec: what the UI gets
    started = (await raw.get_workflow_handle(case_id).fetch_history()).events[0]
    [payload] = started.workflow_execution_started_event_attributes.input.payloads
    assert payload.metadata["encoding"] == b"binary/encrypted"

    text = await run_spec("temporal-ui.spec.mjs", [dev_stack.relay_url, dev_stack.ui_url, str(ARTIFACTS)], {
        "token": olga, "user": "olga", "case": case_id, "canary": canary,
        "sealed": base64.b64encode(payload.data).decode()[:24]})
    assert "temporal ui browser scenario: all steps passed" in text, text
    assert text.count("ok - ") == 2, text
