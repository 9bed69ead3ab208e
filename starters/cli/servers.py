"""The commands that start servers: the worker and the relay (production), the doctor's
checks, and the dev stack with its demo (development installs only)."""

import argparse
import asyncio
import contextlib
import sys

from adapters.config import Settings
from adapters.net import is_loopback
from starters.cli.common import (
    EXIT_USAGE,
    CommandFailed,
    api_token,
    needs_dev_install,
    open_database,
)


async def cmd_dev(args: argparse.Namespace, settings: Settings) -> int:
    from adapters.telemetry import configure_observability, shutdown_tracing

    with needs_dev_install("`refunds dev`"):
        from starters.dev.run import run_dev

    if not is_loopback(settings.bind_host) and not args.expose:
        raise CommandFailed(
            f"refunds dev serves Temporal (no auth; reset and terminate on), the sandbox (it signs "
            f"provider webhooks) and the console over plain http: it binds this machine only, not "
            f"REFUNDS_BIND_HOST={settings.bind_host}; pass --expose to serve there anyway", EXIT_USAGE)
    configure_observability(settings, "refunds-dev", text_logs="log_format" not in settings.model_fields_set)
    try:
        await run_dev(settings, play_demo=not args.no_demo)
    finally:
        shutdown_tracing()
    return 0


async def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    with needs_dev_install("`refunds demo`"):
        from starters.dev.demo import run_demo

    report = await run_demo(settings.relay_base_url(), settings.sandbox_base_url(), api_token(args, settings),
                            fault_seconds=settings.provider_http_timeout_seconds + 5)
    problems = report.problems()
    for problem in problems:
        print(f"demo: {problem}", file=sys.stderr, flush=True)
    return 1 if problems else 0


async def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    import signal

    from adapters.telemetry import configure_observability, shutdown_tracing
    from starters.ports import ensure_ports_free
    from workers.main import run_worker

    configure_observability(settings, "refunds-worker")
    ensure_ports_free(settings.bind_host, {"REFUNDS_WORKER_HEALTH_PORT": settings.worker_health_port,
                                           "REFUNDS_TEMPORAL_METRICS_PORT": settings.temporal_metrics_port})
    dsn, pg = await open_database(settings)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    try:
        await run_worker(settings, dsn, stop)
    finally:
        shutdown_tracing()
        if pg is not None:
            pg.stop()
    return 0


async def cmd_relay(args: argparse.Namespace, settings: Settings) -> int:
    import signal

    from adapters.db import Store
    from adapters.health import require_migrated
    from adapters.heap import settle_startup_heap
    from adapters.http_server import AppServer
    from adapters.providers.registry import build_providers, close_providers
    from adapters.telemetry import configure_observability, shutdown_tracing
    from adapters.temporal_client import connect
    from starters.ports import ensure_ports_free
    from starters.relay import create_app

    configure_observability(settings, "refunds-relay")
    ensure_ports_free(settings.bind_host, {"REFUNDS_RELAY_PORT": settings.relay_port})
    # each part is closed however the start ends (Temporal away, a port taken): the embedded
    # PostgreSQL was left running when the relay could not connect
    async with contextlib.AsyncExitStack() as opened:
        opened.callback(shutdown_tracing)
        dsn, pg = await open_database(settings)
        if pg is not None:
            opened.callback(pg.stop)
        store = await Store.open(dsn)
        opened.push_async_callback(store.close)
        await require_migrated(store)
        providers = build_providers(settings, store)
        opened.push_async_callback(close_providers, providers)
        app = create_app(store, await connect(settings), providers, settings)
        server = AppServer(app, settings.bind_host, settings.relay_port,
                           forwarded_allow_ips=args.forwarded_allow_ips)
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await server.start()
        opened.push_async_callback(server.stop)
        print(f"relay on {server.url}", flush=True)
        await app.state.webhooks.redrive()  # heal receipts a crash left between receipt and signal
        settle_startup_heap("relay")
        await stop.wait()
    return 0


async def cmd_doctor(args: argparse.Namespace, settings: Settings) -> int:
    from starters.cli.doctor import run_doctor

    findings = await run_doctor(settings)
    for finding in findings:
        print(finding.line())
    return 0 if all(f.ok for f in findings) else 1
