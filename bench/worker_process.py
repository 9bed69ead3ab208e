"""A benchmark's worker in a process of its own, as production runs it: the product's worker
(`build_worker`, the same one `refunds worker` runs, with its notice dispatcher, which
delivers the refunds' notices; without the sweepers and probes a benchmark would only
measure; its logs and traces set up as `refunds worker` sets them) or, with `--bare QUEUE`,
the bare baseline worker. So each side has its own interpreter lock, and the worker's memory
is its own process's, not the load client's, the relay's and the sandbox provider's as well.

    python -m bench.worker_process DSN [--bare QUEUE | --default-sandbox]

The settings arrive as JSON in `BENCH_WORKER_SETTINGS` (the bench's throwaway keys). Prints
`ready` once it polls, runs until SIGTERM and exits 0."""

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import psutil
from pydantic import SecretStr
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner

from adapters import event_loop
from adapters.config import Settings
from adapters.db import Store
from adapters.heap import settle_startup_heap
from adapters.policy_file import load_policy
from adapters.providers.registry import build_providers, close_providers
from adapters.telemetry import configure_observability, shutdown_tracing
from adapters.temporal_client import connect
from bench.common import bare_worker
from workers.main import build_worker
from workers.outbox import pool_dispatcher

SETTINGS_VARIABLE = "BENCH_WORKER_SETTINGS"


def settings_json(settings: Settings) -> str:
    """Every setting as JSON, secrets revealed (only ever the bench's own)."""
    return json.dumps({name: value.get_secret_value() if isinstance(value, SecretStr) else value
                       for name, value in settings}, default=str)


async def serve(dsn: str, bare_queue: str | None, default_sandbox: bool) -> None:
    settings = Settings.model_validate(json.loads(os.environ[SETTINGS_VARIABLE]))
    configure_observability(settings, "refunds-worker")  # as `refunds worker` has them
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    client = await connect(settings)
    async with AsyncExitStack() as running:
        if bare_queue is not None:
            await running.enter_async_context(bare_worker(client, settings, bare_queue))
        else:
            store = await Store.open(dsn, max_size=20)
            running.push_async_callback(store.close)
            providers = build_providers(settings, store)
            running.push_async_callback(close_providers, providers)
            await running.enter_async_context(build_worker(
                client, settings.task_queue, store, providers, load_policy(settings.policy_file),
                settings=settings, runner=SandboxedWorkflowRunner() if default_sandbox else None))
            await running.enter_async_context(pool_dispatcher(store, settings))
        settle_startup_heap("bench worker")  # as `refunds worker` does once it polls
        print("ready", flush=True)
        await stop.wait()


@asynccontextmanager
async def worker_process(settings: Settings, dsn: str, *, bare_queue: str | None = None,
                         default_sandbox: bool = False,
                         ready_within: float = 120) -> AsyncIterator[psutil.Process]:
    """Starts one worker process and yields it once it polls; SIGTERM and a clean exit after.
    `default_sandbox`: the product's worker with the SDK's default sandbox (nothing of ours
    passed through), for the sandbox comparison."""
    args = [sys.executable, "-m", "bench.worker_process", dsn]
    args += ["--bare", bare_queue] if bare_queue else []
    args += ["--default-sandbox"] if default_sandbox else []
    process = await asyncio.create_subprocess_exec(
        *args, stdout=subprocess.PIPE, env={**os.environ, SETTINGS_VARIABLE: settings_json(settings)})
    assert process.stdout is not None
    output = process.stdout
    forwarding: asyncio.Task[None] | None = None
    try:
        line = await asyncio.wait_for(output.readline(), ready_within)
        if line.strip() != b"ready":
            raise RuntimeError(f"bench worker {args[4:]} did not start: exit {await process.wait()}")
        forwarding = asyncio.create_task(_forward(output))
        yield psutil.Process(process.pid)
    finally:
        stopped = process.returncode is None
        if stopped:
            process.send_signal(signal.SIGTERM)
        code = await process.wait()
        if forwarding is not None:
            await forwarding
        # killed by our SIGTERM: it was stopped while starting (the bench itself was stopped)
        if code != 0 and not (stopped and code == -signal.SIGTERM):
            raise RuntimeError(f"bench worker exited {code}")


async def _forward(output: asyncio.StreamReader) -> None:
    """Copies what the worker writes after `ready` (the SDK core logs to stdout) to stderr:
    a pipe nobody reads fills at 64 KiB and blocks the writer, and the core's poller with it
    (a 1,500-case run stalled so, its worker polling nothing)."""
    while line := await output.readline():
        sys.stderr.buffer.write(line)
        sys.stderr.flush()


def peak_rss_mib(process: psutil.Process) -> float:
    """The process's highest RSS so far as the kernel recorded it (VmHWM; raised lazily, so a
    sample taken earlier can be a few pages above it)."""
    with open(f"/proc/{process.pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/<pid>/status")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dsn")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--bare", metavar="QUEUE", help="run the bare baseline worker on QUEUE")
    group.add_argument("--default-sandbox", action="store_true",
                       help="the product's worker with the SDK's default workflow sandbox")
    args = parser.parse_args(argv)
    try:
        event_loop.run(serve(args.dsn, args.bare, args.default_sandbox))
    finally:
        shutdown_tracing()


if __name__ == "__main__":
    main()
