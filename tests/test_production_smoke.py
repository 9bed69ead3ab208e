"""The production path end to end: `refunds migrate` as the schema owner, then `refunds relay`
and `refunds worker` as separate processes on the runtime role, configured only by
environment (the variables of deploy/env.example), against the session's Temporal and
PostgreSQL. A refund that needs an approval goes through the relay's HTTP API, `refunds
doctor` says ready, and a worker stopped by SIGTERM while the case waits for approval loses
nothing: a new worker process takes the approval and finishes the case with one provider
refund and the ledger posted."""

import secrets
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from temporalio.client import Client

from adapters.config import Settings
from adapters.http_server import AppServer, reserve_port
from adapters.store import Store
from starters import sandbox_provider
from starters.stack import TemporalDevServer, free_port
from tests.harness import PAYLOAD_KEYS, Stack, create_database_roles, process_env, wait_until_ready
from tests.test_approvals import decide
from tests.test_cli import REFUNDS, run

pytestmark = pytest.mark.slow

GRACE_SECONDS = 3


@contextmanager
def started(command: str, env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`refunds <command>` with its output in `log`; killed if the test leaves it running
    (the test itself stops each one with SIGTERM and asserts how it exited)."""
    with log.open("wb") as out:
        process = subprocess.Popen([REFUNDS, command], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def stopped(process: subprocess.Popen[bytes], log: Path) -> None:
    """SIGTERM, as an orchestrator stops a pod; it must exit 0 (which also catches a crash
    of temporalio's native runtime at interpreter exit, sdk-python #300)."""
    process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=GRACE_SECONDS + 30)
    assert code == 0, log.read_text()[-3000:]


async def test_relay_and_worker_processes_carry_an_approved_refund_across_a_worker_restart(
        postgres_dsn: str, client: Client, temporal_server: TemporalDevServer, tmp_path: Path) -> None:
    owner_dsn, runtime_dsn = await create_database_roles(postgres_dsn)
    migrated = await run("migrate", env=process_env(REFUNDS_MIGRATION_DATABASE_URL=owner_dsn,
                                                     REFUNDS_DATABASE_URL=runtime_dsn))
    assert migrated.returncode == 0, migrated.stderr

    task_queue = f"tq-{secrets.token_hex(5)}"
    webhook_secret = secrets.token_hex(16)
    relay_port, health_port = free_port(), free_port()
    relay_url = f"http://127.0.0.1:{relay_port}"
    sandbox_sock = reserve_port("127.0.0.1")
    sandbox = AppServer(sandbox_provider.create_app(webhook_url=f"{relay_url}/webhooks/sandbox",
                                                    webhook_secret=webhook_secret),
                        "127.0.0.1", sandbox_sock.getsockname()[1], sock=sandbox_sock)
    await sandbox.start()
    env = process_env(
        REFUNDS_DATABASE_URL=runtime_dsn, TEMPORAL_ADDRESS=temporal_server.address,
        REFUNDS_PAYLOAD_KEYS=PAYLOAD_KEYS, REFUNDS_TASK_QUEUE=task_queue,
        REFUNDS_SANDBOX_API_BASE=sandbox.url, REFUNDS_SANDBOX_WEBHOOK_SECRET=webhook_secret,
        REFUNDS_RELAY_PORT=str(relay_port), REFUNDS_WORKER_HEALTH_PORT=str(health_port),
        REFUNDS_TEMPORAL_METRICS_PORT="0", REFUNDS_GRACEFUL_SHUTDOWN_SECONDS=str(GRACE_SECONDS),
        # the case's watch after success, short as in every test stack (production: 10 days)
        REFUNDS_LATE_FAILURE_WINDOW_SECONDS="2", REFUNDS_STATUS_POLL_INTERVAL_SECONDS="2",
        # no schedules left behind on the session's shared Temporal server
        REFUNDS_RECONCILIATION_INTERVAL_SECONDS="0")
    doctor = await run("doctor", env=env)
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr

    store = await Store.open(runtime_dsn, max_size=4)  # what the test reads, as the runtime role
    health = f"http://127.0.0.1:{health_port}"
    relay_log, first_log, second_log = (tmp_path / f"{name}.log" for name in ("relay", "worker1", "worker2"))
    try:
        tokens = {user: await store.create_token(user, [role], by="test")
                  for user, role in {"alice": "requester", "bob": "approver"}.items()}
        stack = Stack(settings=Settings(temporal_address=temporal_server.address, payload_keys=PAYLOAD_KEYS,
                                        task_queue=task_queue),
                      store=store, client=client, relay_url=relay_url, sandbox_url=sandbox.url,
                      tokens=tokens, providers={})
        with started("relay", env, relay_log) as relay, started("worker", env, first_log) as first:
            await wait_until_ready(relay_url, relay)
            await wait_until_ready(health, first)
            charge = await stack.charge(20_000)
            case_id = await stack.request_refund("alice", charge, 9_000)  # above auto-approval
            await stack.wait_for_status(case_id, "awaiting_approval")
            stopped(first, first_log)

            with started("worker", env, second_log) as second:
                await wait_until_ready(health, second)
                approved = await decide(stack, "bob", case_id, "approve", "customer called")
                assert approved.status_code == 202, approved.text
                await stack.wait_for_status(case_id, "succeeded")
                stopped(second, second_log)
            stopped(relay, relay_log)

        [refund] = await stack.provider_refunds(charge)
        assert (refund["amount"], refund["status"]) == (9_000, "succeeded")
        assert sorted((line["debit"], line["credit"]) for line in await store.ledger_entries(case_id)) \
            == [(0, 9_000), (9_000, 0)]
        assert "approval_granted" in await stack.actions(case_id)
    finally:
        await store.close()
        await sandbox.stop()
