"""`refunds worker` as production runs it: probes, metrics (its own and the Temporal SDK's),
JSON logs carrying the case id, and a clean exit 0 on SIGTERM within the grace period."""

import asyncio
import json
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from temporalio.client import Client
from temporalio.worker import Worker

import workers.main
from adapters.config import Settings
from adapters.db import Store
from starters.dev.stack import TemporalDevServer
from starters.ports import free_port
from tests.harness import APPROVAL_KEYS, PAYLOAD_KEYS, open_stack, process_env, wait_until_ready
from workers.main import build_worker, run_worker

GRACE_SECONDS = 3


async def test_worker_serves_probes_and_metrics_logs_json_and_exits_0_on_sigterm(
        store: Store, client: Client, temporal_server: TemporalDevServer, postgres_dsn: str,
        tmp_path: Path) -> None:
    stack = await open_stack(store, client, temporal_server.address, worker=False)
    secret = stack.settings.sandbox_webhook_secret
    assert secret is not None
    health_port, sdk_port = free_port(), free_port()
    env = process_env(
        REFUNDS_DATABASE_URL=postgres_dsn, TEMPORAL_ADDRESS=temporal_server.address,
        REFUNDS_PAYLOAD_KEYS=PAYLOAD_KEYS, REFUNDS_APPROVAL_KEYS=APPROVAL_KEYS,
        REFUNDS_TASK_QUEUE=stack.settings.task_queue,
        REFUNDS_SANDBOX_API_BASE=stack.sandbox_url,
        REFUNDS_SANDBOX_WEBHOOK_SECRET=secret.get_secret_value(),
        REFUNDS_WORKER_HEALTH_PORT=str(health_port), REFUNDS_TEMPORAL_METRICS_PORT=str(sdk_port),
        REFUNDS_GRACEFUL_SHUTDOWN_SECONDS=str(GRACE_SECONDS))
    log_file = tmp_path / "worker.log"
    with log_file.open("wb") as log:
        worker = subprocess.Popen([str(Path(sys.executable).parent / "refunds"), "worker"], env=env,
                                  stdout=log, stderr=subprocess.STDOUT)
    health = f"http://127.0.0.1:{health_port}"
    try:
        await wait_until_ready(health, worker)
        charge = await stack.charge(10_000)
        async with stack.sandbox() as sb:  # one unknown outcome makes the workflow log a warning
            await sb.post("/_sandbox/faults", json={"mode": "error_before"})
        body = stack.refund_body(charge, 1_500)
        async with stack.api("alice") as api:
            assert (await api.post("/v1/refund-requests", json=body)).status_code == 202
        await stack.wait_for_status(body["refund_request_id"], "succeeded")

        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{health}/healthz")).status_code == 200
            own = (await http.get(f"{health}/metrics")).text
            sdk = (await http.get(f"http://127.0.0.1:{sdk_port}/metrics")).text
        assert 'refunds_provider_call_seconds_count{operation="create_refund",provider="sandbox"} 2.0' in own
        assert 'refunds_provider_call_errors_total{error="ProviderOutcomeUnknown",operation="create_refund"' \
               ',provider="sandbox"} 1.0' in own
        # verify-state after the unknown outcome, then the submit's look-before-resubmit
        assert 'refunds_verify_state_total{outcome="not_found",provider="sandbox"} 2.0' in own
        assert "temporal_worker_task_slots_available" in sdk
        assert "refunds_ledger_pending" not in own  # the relay reports database gauges

        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=GRACE_SECONDS + 30) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
        await stack.close()

    lines = [json.loads(line) for line in log_file.read_text().splitlines() if line.startswith("{")]
    about_case = [r for r in lines if r.get("refund_request_id") == body["refund_request_id"]]
    [from_workflow] = [r for r in about_case if r["logger"] == "temporalio.workflow"]
    assert "submit attempt 1 outcome unknown" in from_workflow["message"]
    [from_activity] = [r for r in about_case if r["logger"] == "temporalio.activity"]
    assert from_activity["level"] == "WARNING"
    # Its lifelong startup objects are out of the collector's walk (each full collection
    # walked them all, about 110 ms with the event loop stopped).
    [settled] = [r for r in lines if r["logger"] == "refunds.heap"]
    assert int(settled["message"].split(": ")[1].split()[0]) > 50_000, settled


async def test_a_stopping_worker_stops_polling_before_its_background_loops_end(
        store: Store, temporal_server: TemporalDevServer, postgres_dsn: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A pass of the outbox or case sweep can take long (a slow channel, many idle cases);
    while it ends, the stopping worker must not take new tasks the deployment's grace
    period will then cut off."""
    built: list[Worker] = []
    release = asyncio.Event()

    def capturing_build(*args: Any, **kwargs: Any) -> Worker:
        built.append(build_worker(*args, **kwargs))
        return built[0]

    async def slow_last_pass(*_: Any, **__: Any) -> None:
        await release.wait()

    monkeypatch.setattr(workers.main, "build_worker", capturing_build)
    monkeypatch.setattr(workers.main, "sweep_outbox", slow_last_pass)
    settings = Settings(temporal_address=temporal_server.address, payload_keys=PAYLOAD_KEYS,
                        task_queue=f"tq-{uuid.uuid4().hex[:10]}", worker_health_port=0,
                        temporal_metrics_port=0, outbox_sweep_seconds=1, case_sweep_seconds=0,
                        webhook_prune_interval_seconds=0, reconciliation_interval_seconds=0)
    stop = asyncio.Event()
    running = asyncio.create_task(run_worker(settings, postgres_dsn, stop))
    try:
        async with asyncio.timeout(60):  # guards against a hang, not a measured wait
            while not (built and built[0].is_running):
                await asyncio.sleep(0.05)
        stop.set()
        async with asyncio.timeout(30):
            while not built[0].is_shutdown:
                await asyncio.sleep(0.05)
        assert not running.done()  # the sweep's pass still ends before the process does
    finally:
        release.set()
        await running


async def test_a_worker_that_fails_stops_its_loops_before_closing_the_database(
        temporal_server: TemporalDevServer, postgres_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Temporal worker fails (a fatal poll error): the process closed the database while
    its outbox sweeper still ran, and a send cut off there stays `sending`, then `uncertain`,
    never sent again (reproduced: the sweeper was still running when the worker's run
    ended). Its loops are told to stop and are awaited first."""
    ended = asyncio.Event()

    async def sweeper(_outbox: Any, _delivery: Any, stop: asyncio.Event, **_: Any) -> None:
        await stop.wait()
        await asyncio.sleep(0.2)  # the send in hand finishes
        ended.set()

    class FailingWorker:
        async def __aenter__(self) -> None:
            raise RuntimeError("worker failed: a fatal poll error")

        async def __aexit__(self, *_: object) -> None:
            return None

    monkeypatch.setattr(workers.main, "build_worker", lambda *_, **__: FailingWorker())
    monkeypatch.setattr(workers.main, "sweep_outbox", sweeper)
    settings = Settings(temporal_address=temporal_server.address, payload_keys=PAYLOAD_KEYS,
                        task_queue=f"tq-{uuid.uuid4().hex[:10]}", worker_health_port=0,
                        temporal_metrics_port=0, outbox_sweep_seconds=1, case_sweep_seconds=0,
                        webhook_prune_interval_seconds=0, reconciliation_interval_seconds=0)
    with pytest.raises(RuntimeError, match="fatal poll error"):
        await run_worker(settings, postgres_dsn, asyncio.Event())
    assert ended.is_set()
