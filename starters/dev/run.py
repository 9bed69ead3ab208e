"""`refunds dev` (what `make run` starts): the whole product on the embedded default.

One process tree: Temporal's dev server (SQLite in .data, UI included) and PostgreSQL
(.data/pg) as children, and in this process the worker, the relay and the sandbox
provider. Ctrl-C stops everything; starting again keeps data and in-flight workflows.
"""

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from temporalio.client import Client

from activities.integrations import IntegrationActivities
from adapters.codec import generate_key_spec
from adapters.config import Settings, secret_list
from adapters.db import Store
from adapters.heap import settle_startup_heap
from adapters.http_server import AppServer
from adapters.policy_file import load_policy
from adapters.providers.registry import build_providers, close_providers
from adapters.schedules import ensure_reconciliation_schedules
from adapters.temporal_client import connect
from starters import relay
from starters.dev import sandbox_provider, temporal_ui
from starters.dev.demo import DemoReport, run_demo
from starters.dev.stack import (
    EmbeddedPostgres,
    TemporalDevServer,
    require_embedded_postgres,
    temporal_binary,
)
from starters.ports import ensure_ports_free, free_port
from workers.case_sweep import sweep_closed_cases
from workers.main import build_worker, refuse_bad_settings
from workers.outbox import pool_dispatcher, sweep_outbox

log = logging.getLogger("dev")


@dataclass(frozen=True)
class DevSecrets:
    """Generated once per data folder (mode 0600), never committed, never in history."""

    sandbox_webhook_secret: str
    admin_token: str
    payload_keys: str
    approval_keys: str


def load_dev_secrets(data_dir: Path) -> DevSecrets:
    """Reads the folder's secrets, generating any that are missing (older folders lack some)."""
    path = data_dir / "dev-secrets.json"
    existed = path.exists()
    text = path.read_text() if existed else ""
    values = json.loads(text) if text.strip() else {}  # an empty file (a crash) never held a key
    generators: dict[str, Callable[[], str]] = {
        "sandbox_webhook_secret": lambda: secrets.token_hex(24),
        "admin_token": lambda: f"rfo_admin_{secrets.token_urlsafe(24)}",
        "payload_keys": lambda: generate_key_spec("dev1"),
        "approval_keys": lambda: secrets.token_hex(32)}
    missing = {name: make() for name, make in generators.items() if name not in values}
    if missing:
        _write_whole(path, json.dumps({**values, **missing}), replace=existed)
    return DevSecrets(**json.loads(path.read_text()))


def _write_whole(path: Path, text: str, *, replace: bool) -> None:
    """Writes the file whole or not at all (created then written, a crash between left it
    empty and every later run failed). A first file goes in only if none is there yet: two
    first runs at once each made secrets, and the later write replaced the key the other
    was already encrypting with."""
    made = path.with_name(f".{path.name}.{os.getpid()}")
    made.unlink(missing_ok=True)  # a crashed run's with this pid
    try:
        with os.fdopen(os.open(made, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
            out.write(text)
        if replace:
            os.replace(made, path)
        else:
            with contextlib.suppress(FileExistsError):  # another run's came first: it stands
                _link_or_create(made, path)
    finally:
        made.unlink(missing_ok=True)


def _link_or_create(made: Path, path: Path) -> None:
    """`path` as a hard link to `made`, or where the file system has none (some FUSE and bind
    mounts), created exclusively and written; FileExistsError when there is one already."""
    try:
        os.link(made, path)
    except FileExistsError:
        raise
    except OSError:
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
            out.write(made.read_text())


def dev_settings(settings: Settings) -> tuple[Settings, DevSecrets]:
    """Fills in what the embedded default generates itself (sandbox secret, payload key),
    lets the embedded Temporal UI call the relay's codec endpoint, and lets the console's
    session cookie travel over the dev stack's plain http."""
    data = settings.data_dir.resolve()
    data.mkdir(parents=True, exist_ok=True)
    dev = load_dev_secrets(data)
    update: dict[str, object] = {"data_dir": data}
    if settings.sandbox_webhook_secret is None:
        update["sandbox_webhook_secret"] = SecretStr(dev.sandbox_webhook_secret)
    if settings.payload_keys is None:
        update["payload_keys"] = SecretStr(dev.payload_keys)
    if settings.approval_keys is None:
        update["approval_keys"] = SecretStr(dev.approval_keys)
    if not settings.codec_cors_origins and settings.temporal_address is None:
        update["codec_cors_origins"] = [f"http://{settings.bind_host}:{settings.temporal_ui_port}"]
    if "console_secure_cookie" not in settings.model_fields_set:  # plain http drops Secure cookies
        update["console_secure_cookie"] = False
    return settings.model_copy(update=update), dev


@contextlib.asynccontextmanager
async def embedded_services(settings: Settings) -> AsyncIterator[tuple[str, str | None]]:
    """PostgreSQL and Temporal unless the settings point at real ones; yields (dsn, UI url).
    The UI answers on its port through `temporal_ui`'s proxy, so its codec calls carry the
    console's session cookie. What is missing or taken fails here, before any child process
    starts."""
    ports = {"REFUNDS_RELAY_PORT": settings.relay_port, "REFUNDS_SANDBOX_PORT": settings.sandbox_port}
    if settings.temporal_address is None:
        temporal_binary()
        ports |= {"REFUNDS_TEMPORAL_PORT": settings.temporal_port,
                  "REFUNDS_TEMPORAL_UI_PORT": settings.temporal_ui_port}
    if settings.database_url is None:
        require_embedded_postgres()
    ensure_ports_free(settings.bind_host, ports)
    pg = None
    temporal = None
    ui = None
    try:
        if settings.database_url is not None:
            dsn = settings.database_url.get_secret_value()
        else:
            pg = EmbeddedPostgres(settings.data_dir / "pg")
            dsn = await asyncio.to_thread(pg.start)
        ui_url = settings.temporal_ui_url
        if settings.temporal_address is None:
            temporal = TemporalDevServer(settings.data_dir / "temporal.db", host=settings.bind_host,
                                         port=settings.temporal_port, ui_port=free_port(settings.bind_host),
                                         codec_endpoint=f"{settings.relay_base_url()}/console/codec")
            await temporal.start()
            assert temporal.ui_url is not None
            ui = AppServer(temporal_ui.create_app(temporal.ui_url), settings.bind_host,
                           settings.temporal_ui_port)
            await ui.start()
            ui_url = ui.url
        yield dsn, ui_url
    finally:
        if ui is not None:
            await ui.stop()
        if temporal is not None:
            temporal.stop()
        if pg is not None:
            pg.stop()


async def run_dev(settings: Settings, *, play_demo: bool = True) -> None:
    """Starts the stack, prints where everything is, plays the demo, waits for Ctrl-C. Its
    worker refuses the settings `refunds worker` refuses (they could let money move twice)."""
    refuse_bad_settings(settings)
    settings, dev = dev_settings(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # a closed terminal (SIGHUP) stops the stack as Ctrl-C does: the Temporal dev server runs
    # in its own session and would outlive this process, holding its ports and database
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    async with embedded_services(settings) as (dsn, ui_url):
        settings = settings.model_copy(update={"temporal_ui_url": ui_url})
        store = await Store.open(dsn)
        await store.database.migrate()
        await store.access.create_token("admin", ["admin"], token=dev.admin_token, by="refunds dev")
        client: Client = await connect(settings)
        providers = build_providers(settings, store)
        assert settings.sandbox_webhook_secret is not None
        sandbox = AppServer(
            sandbox_provider.create_app(
                db_path=str(settings.data_dir / "sandbox.db"),
                webhook_url=f"{settings.relay_base_url()}/webhooks/sandbox",
                webhook_secret=secret_list(settings.sandbox_webhook_secret)[0]),
            settings.bind_host, settings.sandbox_port)
        relay_app = relay.create_app(store, client, providers, settings)
        front = AppServer(relay_app, settings.bind_host, settings.relay_port)
        worker = build_worker(client, settings.task_queue, store, providers,
                              load_policy(settings.policy_file),
                              graceful_shutdown=timedelta(seconds=settings.graceful_shutdown_seconds),
                              settings=settings)
        await ensure_reconciliation_schedules(client, settings, providers)
        worker_task = asyncio.create_task(worker.run())
        delivery = IntegrationActivities(store, settings)
        sweeper = asyncio.create_task(sweep_outbox(
            store.outbox, delivery, stop,
            every_seconds=settings.outbox_sweep_seconds or 30,
            older_than_seconds=settings.outbox_sweep_after_seconds))
        case_sweeper = asyncio.create_task(sweep_closed_cases(
            store, client, providers, stop, every_seconds=settings.case_sweep_seconds or 60,
            idle_seconds=settings.case_sweep_after_seconds))
        dispatching = contextlib.AsyncExitStack()
        try:
            await dispatching.enter_async_context(pool_dispatcher(
                store, settings, delivery=delivery, every_seconds=settings.notice_dispatch_seconds or 1,
                stopping=stop))
            await sandbox.start()
            await front.start()
            await relay_app.state.webhooks.redrive()
            settle_startup_heap("dev stack")
            print_banner(settings, front.url, sandbox.url, ui_url, dev.admin_token)
            if play_demo:
                await _demo_unless_stopped(stop, run_demo(
                    front.url, sandbox.url, dev.admin_token,
                    fault_seconds=settings.provider_http_timeout_seconds + 5))
            if not stop.is_set():
                print("\nThe stack is running. Press Ctrl-C to stop.", flush=True)
            await stop.wait()
        finally:
            with contextlib.suppress(OSError):  # a closed terminal (SIGHUP) stops the stack all the same
                print("\nStopping…", flush=True)
            stop.set()
            with contextlib.suppress(Exception):
                await asyncio.gather(sweeper, case_sweeper)
            await dispatching.aclose()
            await worker.shutdown()
            with contextlib.suppress(Exception):
                await worker_task
            await front.stop()
            await sandbox.stop()
            await close_providers(providers)
            await store.close()


async def _demo_unless_stopped(stop: asyncio.Event, demo: Coroutine[Any, Any, DemoReport]) -> None:
    """Plays the demo until it ends or Ctrl-C: stopping ends it where it is (it went on calling
    the relay until its own timeouts, and reported that as the demo failing)."""
    playing = asyncio.create_task(demo)
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait((playing, stopped), return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not playing.done():
        playing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await playing
    elif (failure := playing.exception()) is not None:  # the stack stays up for a look
        log.error("demo failed: %s", failure, exc_info=failure)
    else:
        for problem in playing.result().problems():  # the pattern broken: said, as a failure
            log.error("demo: %s", problem)


def print_banner(settings: Settings, relay_url: str, sandbox_url: str, ui_url: str | None,
                 admin_token: str) -> None:
    namespace = settings.temporal_namespace
    print(f"""
Refund Orchestrator is running (data in {settings.data_dir}):
  relay API        {relay_url}
  ops console      {relay_url}/console  (sign in with a token)
  OpenAPI docs     {relay_url}/docs
  Temporal UI      {ui_url or '(external cluster)'}{f'/namespaces/{namespace}/workflows' if ui_url else ''}
  metrics          {relay_url}/metrics
  sandbox provider {sandbox_url}
  task queue       {settings.task_queue}

Bootstrap admin token (also in {settings.data_dir / 'dev-secrets.json'}):
  export REFUNDS_TOKEN={admin_token}

Payloads in Temporal are encrypted. In the Temporal UI they decode, with no setting to
change, for people signed in to the console (auditor, ops, admin); everyone else sees
binary/encrypted. From the CLI:
  temporal workflow show -w <id> --codec-endpoint {relay_url}/codec --codec-auth "Bearer $REFUNDS_TOKEN"
""", flush=True)

