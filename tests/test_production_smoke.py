"""The production path end to end: `refunds migrate` as the schema owner, then `refunds relay`
and `refunds worker` as separate processes on the runtime role, configured only by
environment (the variables of deploy/env.example), against the session's Temporal and
PostgreSQL. A refund that needs an approval goes through the relay's HTTP API, `refunds
doctor` says ready, and SIGTERM to a worker mid-case loses nothing: stopped while a case waits
for approval, and stopped while the provider holds a create it has already made, a new worker
process finishes each case with exactly one provider refund and the ledger posted."""

import asyncio
import secrets
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from temporalio.client import Client

from adapters.config import Settings
from adapters.db import Store
from adapters.http_server import AppServer, reserve_port
from starters.dev import sandbox_provider
from starters.dev.stack import TemporalDevServer
from starters.ports import free_port
from tests.harness import (
    APPROVAL_KEYS,
    PAYLOAD_KEYS,
    Stack,
    create_database_roles,
    process_env,
    wait_until_ready,
)
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
        REFUNDS_PAYLOAD_KEYS=PAYLOAD_KEYS, REFUNDS_APPROVAL_KEYS=APPROVAL_KEYS, REFUNDS_TASK_QUEUE=task_queue,
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
    relay_log, *worker_logs = (tmp_path / f"{name}.log" for name in ("relay", "worker1", "worker2",
                                                                    "worker3"))
    try:
        tokens = {user: await store.access.create_token(user, [role], by="test")
                  for user, role in {"alice": "requester", "bob": "approver"}.items()}
        stack = Stack(settings=Settings(temporal_address=temporal_server.address, payload_keys=PAYLOAD_KEYS,
                                        task_queue=task_queue),
                      store=store, client=client, relay_url=relay_url, sandbox_url=sandbox.url,
                      tokens=tokens, providers={})
        with started("relay", env, relay_log) as relay:
            await wait_until_ready(relay_url, relay)
            with started("worker", env, worker_logs[0]) as first:
                await wait_until_ready(health, first)
                approval_charge = await stack.charge(20_000)
                approval_case = await stack.request_refund("alice", approval_charge, 9_000)  # > auto
                await stack.wait_for_status(approval_case, "awaiting_approval")
                stopped(first, worker_logs[0])

            with started("worker", env, worker_logs[1]) as second:
                await wait_until_ready(health, second)
                approved = await decide(stack, "bob", approval_case, "approve", "customer called")
                assert approved.status_code == 202, approved.text
                await stack.wait_for_status(approval_case, "succeeded")

                # a create the provider has made but not yet answered when the worker is stopped
                slow_charge = await stack.charge(5_000)
                async with stack.sandbox() as sb:
                    await sb.post("/_sandbox/faults", json={"mode": "timeout_after_success", "seconds": 8,
                                                            "charge": slow_charge})
                    slow_case = await stack.request_refund("alice", slow_charge, 3_000)  # auto-approved
                    while f"create_after_acting:{slow_charge}" not in (
                            await sb.get("/_sandbox/stalled")).json()["stalled"]:
                        assert second.poll() is None
                        await asyncio.sleep(0.05)
                stopped(second, worker_logs[1])

            with started("worker", env, worker_logs[2]) as third:
                await wait_until_ready(health, third)
                await stack.wait_for_status(slow_case, "succeeded")
                stopped(third, worker_logs[2])
            stopped(relay, relay_log)

        for charge, case_id, amount in ((approval_charge, approval_case, 9_000),
                                        (slow_charge, slow_case, 3_000)):
            [refund] = await stack.provider_refunds(charge)  # exactly one provider refund
            assert (refund["amount"], refund["status"]) == (amount, "succeeded")
            assert sorted((line["debit"], line["credit"]) for line in await store.ledger.entries(case_id)) \
                == [(0, amount), (amount, 0)]
        assert "approval_granted" in await stack.actions(approval_case)
        # the interrupted create's outcome was unknown to the new worker: it looked it up first
        assert "verify_state" in await stack.actions(slow_case)
    finally:
        await store.close()
        await sandbox.stop()
