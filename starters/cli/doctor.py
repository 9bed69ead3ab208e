"""`refunds doctor`: checks the configuration and every dependency a worker or relay needs,
and says exactly what is wrong. Exit status 0 when everything is fine, 1 otherwise.

It starts nothing: with no REFUNDS_DATABASE_URL it reports that, rather than starting the
embedded PostgreSQL the way `refunds dev` would.
"""

import asyncio
from dataclasses import dataclass
from datetime import timedelta

from adapters.approval_seal import approval_keys
from adapters.codec import CodecError
from adapters.config import Settings, comma_list
from adapters.db import Store
from adapters.health import database_problem, temporal_problem
from adapters.providers.registry import build_providers, close_providers
from adapters.temporal_client import connect, connect_options, payload_codec

CONNECT_TIMEOUT = timedelta(seconds=5)


@dataclass(frozen=True)
class Finding:
    """One check's verdict, printed as a line."""

    check: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'}  {self.check:<10} {self.detail}"


def check_timeouts(settings: Settings) -> Finding:
    problem = settings.timeout_problem()
    return Finding("timeouts", problem is None, problem or (
        f"submit {settings.submit_timeout_seconds:g}s > provider HTTP "
        f"{settings.provider_http_timeout_seconds:g}s; resubmit after "
        f"{settings.timings().provider_horizon.total_seconds():g}s"))


def check_payload_keys(settings: Settings) -> Finding:
    try:
        codec = payload_codec(settings)
    except CodecError as exc:
        return Finding("payloads", False, str(exc))
    return Finding("payloads", True, f"encrypting with key {codec.sealing_key_id!r}")


def check_approval_keys(settings: Settings) -> Finding:
    """A relay and worker without keys start (with a warning) and then no approval ever
    counts: cases that need a person wait until they expire."""
    try:
        keys = approval_keys(settings)
    except ValueError as exc:
        return Finding("approvals", False, f"REFUNDS_APPROVAL_KEYS: {exc}")
    if keys is None:
        return Finding("approvals", False, "REFUNDS_APPROVAL_KEYS is not set: the relay seals no approval "
                       "and the worker counts none, so no case that needs a person can proceed")
    return Finding("approvals", True, f"sealing with 1 key, verifying with {keys.count}")


async def check_temporal(settings: Settings) -> Finding:
    try:
        target = connect_options(settings)["target_host"]
    except OSError as exc:
        return Finding("temporal", False, f"TLS file unreadable: {exc}")
    try:
        client = await connect(settings, connect_timeout=CONNECT_TIMEOUT)
    except CodecError:
        return Finding("temporal", False, f"not checked at {target}: payload keys are missing")
    except Exception as exc:  # the SDK raises RuntimeError/RPCError with the transport's words
        return Finding("temporal", False, f"cannot reach Temporal at {target}: {exc}")
    problem = await temporal_problem(client)
    if problem is not None:
        return Finding("temporal", False, problem)
    return Finding("temporal", True, f"{target}, namespace {client.namespace!r}")


async def check_database(settings: Settings) -> Finding:
    if settings.database_url is None:
        return Finding("postgres", False, "REFUNDS_DATABASE_URL is not set")
    try:
        store = await asyncio.wait_for(
            Store.open(settings.database_url.get_secret_value(), max_size=1), timeout=15)
    except Exception as exc:  # psycopg's pool reports a refused or failed login this way
        return Finding("postgres", False, f"cannot connect: {exc or type(exc).__name__}")
    try:
        problem = await database_problem(store)
    finally:
        await store.close()
    return Finding("postgres", problem is None, problem or "reachable, migrations applied")


async def check_providers(settings: Settings) -> Finding:
    try:
        providers = build_providers(settings)
    except ValueError as exc:  # a setting the adapters cannot read (names itself)
        return Finding("providers", False, f"cannot be built: {exc}")
    await close_providers(providers)
    if not providers:
        return Finding("providers", False, "no payment provider is configured (set "
                       "REFUNDS_SANDBOX_WEBHOOK_SECRET or another provider's secrets)")
    unscoped = [f"{name} acts for {whom} ({variable} unset)"
                for name, variable, whom, scope in UNSCOPED
                if name in providers and not comma_list(getattr(settings, scope))]
    return Finding("providers", True, "; ".join(["configured: " + ", ".join(sorted(providers)), *unscoped]))


UNSCOPED = (
    ("adyen", "REFUNDS_ADYEN_MERCHANT_ACCOUNTS", "every merchant account its HMAC key signs",
     "adyen_merchant_accounts"),
    ("rainforest", "REFUNDS_RAINFOREST_MERCHANT_IDS", "every merchant on the platform",
     "rainforest_merchant_ids"))
"""Providers whose one key covers many merchants: unset, their filter lets every merchant's
events move our books, which is a choice an operator should see made."""


async def run_doctor(settings: Settings) -> list[Finding]:
    """Every check, in the order an operator would fix them."""
    return [check_timeouts(settings), check_payload_keys(settings), check_approval_keys(settings),
            await check_temporal(settings),
            await check_database(settings), await check_providers(settings)]
