"""Session-wide real Temporal dev server and PostgreSQL (both from wheels); each test
gets its own task queue, sandbox provider, relay and worker through `stack`."""

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from temporalio.client import Client

from adapters.config import Settings
from adapters.db import Store
from adapters.telemetry import configure_tracing
from adapters.temporal_client import connect
from starters.dev.stack import EmbeddedPostgres, TemporalDevServer
from starters.ports import free_port
from tests.harness import APPROVAL_KEYS, PAYLOAD_KEYS, Stack, open_stack


@pytest.fixture(scope="session")
async def temporal_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TemporalDevServer]:
    folder: Path = tmp_path_factory.mktemp("temporal")
    server = TemporalDevServer(folder / "temporal.db", port=free_port(), ui_port=None)
    await server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def spans() -> InMemorySpanExporter:
    """Every span the session's relays, clients and workers finish, kept in memory."""
    exporter = InMemorySpanExporter()
    configure_tracing("refunds-tests", exporter)
    return exporter


@pytest.fixture(scope="session")
async def client(temporal_server: TemporalDevServer, spans: InMemorySpanExporter) -> Client:
    """The product's own client (encrypting codec, tracing, provider news sealed), as worker
    and relay build it."""
    return await connect(Settings(temporal_address=temporal_server.address, payload_keys=PAYLOAD_KEYS,
                                  approval_keys=APPROVAL_KEYS))


@pytest.fixture(scope="session")
def postgres_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pg = EmbeddedPostgres(tmp_path_factory.mktemp("pg") / "data", delete_on_stop=True)
    dsn = pg.start()
    yield dsn
    pg.stop()


@pytest.fixture(scope="session")
async def store(postgres_dsn: str, spans: InMemorySpanExporter) -> AsyncIterator[Store]:
    """After tracing is set up, as the servers do it: a connection decides when it opens
    whether its statements get spans (`trace_connection`)."""
    opened = await Store.open(postgres_dsn, max_size=20)
    await opened.database.migrate()
    yield opened
    await opened.close()


@pytest.fixture
async def stack(store: Store, client: Client, temporal_server: TemporalDevServer) -> AsyncIterator[Stack]:
    opened = await open_stack(store, client, temporal_server.address)
    yield opened
    await opened.close()


@pytest.fixture
async def patient(store: Store, client: Client, temporal_server: TemporalDevServer) -> AsyncIterator[Stack]:
    """A stack whose status poll and late-failure window are two minutes: webhooks, not
    verify-state, move its cases, and a settled case's workflow stays open."""
    opened = await open_stack(store, client, temporal_server.address,
                              status_poll_interval_seconds=120, late_failure_window_seconds=120)
    yield opened
    await opened.close()


@pytest.fixture(scope="session")
def localstripe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The third-party localstripe server (a Stripe API fake) with the fields of Stripe's
    API it lacks added (see `tests.localstripe_server`)."""
    yield from _localstripe(tmp_path_factory)


@pytest.fixture(scope="session")
def stock_localstripe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """localstripe as released: what an outside tester points the product at."""
    yield from _localstripe(tmp_path_factory, "--stock")


def _localstripe(tmp_path_factory: pytest.TempPathFactory, *options: str) -> Iterator[str]:
    """localstripe on a loopback port; a start that loses its port to another process is
    retried on a fresh one."""
    import subprocess
    import sys
    import time

    import httpx

    log = tmp_path_factory.mktemp("localstripe") / "localstripe.log"
    for _ in range(3):
        port = free_port()
        with log.open("ab") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "tests.localstripe_server", str(port), *options],
                stdout=out, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while process.poll() is None and time.monotonic() < deadline:
            try:
                httpx.get(f"{url}/v1/charges", auth=("sk_test_fixture", ""), timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        else:  # exited (its port was taken) or never answered: try a fresh port
            process.kill()
            process.wait()
            continue
        break
    else:
        raise RuntimeError(f"localstripe did not start:\n{log.read_text()[-2000:]}")
    try:
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)
