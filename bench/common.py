"""Shared bench plumbing: the embedded stack in a temporary folder, timing, results."""

import asyncio
import json
import os
import platform
import signal
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import psutil
from temporalio.client import Client, WorkflowHandle
from temporalio.worker import Worker

from adapters import event_loop
from adapters.config import Settings
from adapters.db import Store
from adapters.heap import settle_startup_heap
from adapters.telemetry import configure_observability
from adapters.temporal_client import connect
from bench.baseline import BareWorkflow, noop
from starters.dev.stack import EmbeddedPostgres, TemporalDevServer
from starters.ports import free_port
from tests.harness import APPROVAL_KEYS, PAYLOAD_KEYS, Stack, open_stack
from workers.main import worker_tuning, workflow_runner

T = TypeVar("T")

TERMINATED = 128 + signal.SIGTERM
"""A benchmark's exit status when SIGTERM stopped it (after its stack was stopped)."""

RESULTS = Path(os.environ.get("BENCH_RESULTS_DIR") or Path(__file__).parent / "results")
"""Where results go; the smoke tests point it at their own folder."""

PRODUCT_TIMINGS: dict[str, Any] = {
    name: Settings.model_fields[name].default
    for name in ("submit_timeout_seconds", "provider_http_timeout_seconds", "resubmit_margin_seconds",
                 "status_poll_interval_seconds")}
"""The product's own provider timings, for a bench with hundreds of cases in flight: the test
stack's 5 s submit timeout there times out submits that wait for the worker's CPU, and
measures their verification instead."""


def run(main: Coroutine[Any, Any, T]) -> T:
    """`event_loop.run` for a benchmark command: SIGTERM unwinds it as Ctrl-C does, so the
    dev server, PostgreSQL and worker processes it started are stopped and their data
    removed, not left running on a shared machine; then it exits `TERMINATED`."""
    terminated = False

    async def until_terminated() -> T:
        task = asyncio.current_task()
        assert task is not None

        def terminate() -> None:
            nonlocal terminated
            terminated = True
            task.cancel()

        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, terminate)
        return await main

    try:
        return event_loop.run(until_terminated())
    except asyncio.CancelledError:
        if terminated:
            raise SystemExit(TERMINATED) from None
        raise


@dataclass
class Embedded:
    """A private Temporal dev server and PostgreSQL for one bench run (the product's own
    client: encrypting codec and tracing, as production runs it)."""

    temporal: TemporalDevServer
    client: Client
    store: Store
    dsn: str
    postgres: EmbeddedPostgres | None = None

    async def restart_temporal(self) -> None:
        """Kills the Temporal dev server and starts it on the same SQLite file."""
        self.temporal.kill()
        await self.temporal.start()

    async def restart_postgres(self) -> None:
        """Stops and starts PostgreSQL on the same data; the pools reconnect by themselves."""
        assert self.postgres is not None, "only a bench-owned PostgreSQL is restarted"
        await asyncio.to_thread(self.postgres.stop)
        await asyncio.to_thread(self.postgres.start)


@asynccontextmanager
async def embedded_stack() -> AsyncIterator[Embedded]:
    """PostgreSQL and Temporal in a temporary folder, and this process's logs and traces set
    up as `refunds relay` has them: the relay the benchmarks measure runs here."""
    configure_observability(Settings(), "refunds-relay")
    with tempfile.TemporaryDirectory(prefix="refunds-bench-") as folder:
        pg = EmbeddedPostgres(Path(folder) / "pg")
        dsn = pg.start()
        temporal = TemporalDevServer(Path(folder) / "temporal.db", port=free_port(), ui_port=None)
        await temporal.start()
        store = await Store.open(dsn, max_size=20)
        await store.database.migrate()
        client = await connect(Settings(temporal_address=temporal.address, payload_keys=PAYLOAD_KEYS,
                                        approval_keys=APPROVAL_KEYS))  # the worker's: seals its news
        try:
            yield Embedded(temporal, client, store, dsn, pg)
        finally:
            await store.close()
            temporal.stop()
            pg.stop()


async def relay_stack(env: Embedded, **overrides: Any) -> Stack:
    """The sandbox provider and the relay the benchmark measures, in this process, without a
    worker; the heap then settled as `refunds relay` settles it once it serves."""
    stack = await open_stack(env.store, env.client, env.temporal.address, worker=False, **overrides)
    settle_startup_heap("bench relay")
    return stack


def postmasters(env: Embedded) -> list[psutil.Process]:
    """The bench's PostgreSQL server process (found by its data folder; its backends are its
    children)."""
    return [p for p in psutil.process_iter(["name", "cmdline"]) if p.info["name"] == "postgres"
            and str(env.postgres.pgdata if env.postgres else "-") in " ".join(p.info["cmdline"] or [])]


class CpuMeter:
    """CPU seconds (user + system) spent so far by each part of a run: the Temporal dev
    server, PostgreSQL (its server and backends, live and ended), each worker process, and
    this process (load client, relay, sandbox provider). Read around a wave, it says where a
    ratio's difference goes: the workers, the server, the database or the outside world."""

    BENCH = "bench process (load client, relay, sandbox provider)"

    def __init__(self, env: Embedded, workers: dict[str, psutil.Process]) -> None:
        me = psutil.Process()
        self._servers = postmasters(env)
        self._parts: dict[str, list[psutil.Process]] = {
            "temporal dev server": [p for p in me.children(recursive=True) if p.name() == "temporal"],
            **{f"worker: {name}": [p] for name, p in workers.items()}, self.BENCH: [me]}

    def read(self) -> dict[str, float]:
        spent = {part: sum(self._own(p) for p in processes) for part, processes in self._parts.items()}
        return {**spent, "postgresql": sum(self._with_backends(p) for p in self._servers)}

    @staticmethod
    def _own(process: psutil.Process) -> float:
        times = process.cpu_times()
        return float(times.user + times.system)

    @classmethod
    def _with_backends(cls, server: psutil.Process) -> float:
        """The server's CPU and its backends': live ones read directly, ended ones as the
        server's reaped-children times."""
        times = server.cpu_times()
        spent = float(times.user + times.system + times.children_user + times.children_system)
        for backend in server.children(recursive=True):
            try:
                spent += cls._own(backend)
            except psutil.NoSuchProcess:
                continue  # ended between the listing and the read: counted as reaped next time
        return spent


def pin_temporal_apart(env: Embedded) -> str:
    """Gives the Temporal dev server the first core and everything else (this process with
    the relay, the load client it spawns, PostgreSQL) the others, as production runs the relay
    and Temporal on different machines: on a small box the relay's CPU would otherwise come out
    of the Temporal server's share and measure the box, not the relay. Linux only; says what
    it did, for the report."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return "not pinned (one core)"
    temporal, rest = {cores[0]}, set(cores[1:])
    servers = postmasters(env)
    me = psutil.Process()
    for proc in {me, *me.children(recursive=True), *servers,
                 *(child for p in servers for child in p.children(recursive=True))}:
        for thread in proc.threads():  # threads started later inherit their creator's cores
            os.sched_setaffinity(thread.id, temporal if proc.name() == "temporal" else rest)
    return f"Temporal dev server on core {cores[0]}; relay, load client and PostgreSQL on {sorted(rest)}"


async def gather_limited(jobs: list[Callable[[], Awaitable[Any]]], limit: int) -> None:
    """Runs every job, at most `limit` at a time."""
    gate = asyncio.Semaphore(limit)

    async def one(job: Callable[[], Awaitable[Any]]) -> None:
        async with gate:
            await job()

    await asyncio.gather(*(one(j) for j in jobs))


Begin = Callable[[int], Awaitable[WorkflowHandle[Any, Any]]]
"""Starts the i-th workflow of a wave (or signals one that waits) and returns its handle."""


@asynccontextmanager
async def bare_worker(client: Client, settings: Settings, queue: str | None = None) -> AsyncIterator[str]:
    """A worker for bare workflows on its own queue (a new one unless given), kept for the
    whole run (warmed once, as the product's worker is), with the product's sandbox runner
    (passthrough modules) and its cache, slots and sticky timeout from `settings`, so the two
    sides differ only in what their workflows do. Yields the queue."""
    queue = queue or f"bench-bare-{uuid.uuid4().hex[:6]}"
    async with Worker(client, task_queue=queue, workflows=[BareWorkflow], activities=[noop],
                      workflow_runner=workflow_runner(), **worker_tuning(settings)):
        yield queue


def bare_starter(client: Client, queue: str, steps: int, local_steps: int = 0) -> Begin:
    """Starts the i-th bare workflow of `steps` activities and `local_steps` local ones (ids
    unique per call)."""
    tag = uuid.uuid4().hex[:6]

    async def start(i: int) -> WorkflowHandle[Any, Any]:
        return await client.start_workflow(BareWorkflow.run, args=[steps, local_steps], id=f"bare-{tag}-{i}",
                                           task_queue=queue)
    return start


async def timed_wave(begin: Begin, indices: range,
                     concurrency: int, *, hold: bool) -> float:
    """Seconds until every workflow of `indices` ended. `begin` starts one (or signals one
    that waits) and returns its handle. `hold=False`: each start waits for its workflow's end
    inside the concurrency gate (at most `concurrency` in flight); `hold=True`: all of the
    wave are begun `concurrency` at a time and then awaited together (all in flight)."""
    started = time.perf_counter()
    handles: list[WorkflowHandle[Any, Any]] = []

    def job(i: int) -> Callable[[], Awaitable[None]]:
        async def go() -> None:
            handle = await begin(i)
            if hold:
                handles.append(handle)
            else:
                await handle.result()
        return go

    await gather_limited([job(i) for i in indices], concurrency)
    await asyncio.gather(*(h.result() for h in handles))
    return time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) of a non-empty list."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summary(values: list[float]) -> dict[str, float]:
    return {"p50_ms": percentile(values, 50) * 1000, "p99_ms": percentile(values, 99) * 1000,
            "mean_ms": statistics.fmean(values) * 1000}


def announce(name: str, **parameters: Any) -> None:
    """Prints the run's parameters before it starts (a long run is identifiable while it runs;
    the results file repeats them)."""
    print(f"{name}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in parameters.items()), flush=True)


def report(name: str, rows: list[dict[str, Any]], extra: dict[str, Any]) -> Path:
    """Prints a table and writes bench/results/<name>.json (measurements, machine, time)."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    widths = {k: max(len(k), *(len(_fmt(r.get(k))) for r in rows)) for k in keys}
    print("  ".join(k.ljust(widths[k]) for k in keys))
    for row in rows:
        print("  ".join(_fmt(row.get(k)).ljust(widths[k]) for k in keys))
    for key, value in extra.items():
        print(f"{key}: {_fmt(value)}")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                "machine": platform.platform(), "rows": rows, **extra}, indent=2))
    return path


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value if value is not None else "")
