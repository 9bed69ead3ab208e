"""`refunds`: the command line. Request, approve and status go through the relay's
HTTP API (same auth, same checks as every other entry point); dev, worker, relay and
sandbox start servers; migrate and token talk to PostgreSQL directly; doctor checks
the configuration and every dependency.

Exit codes: 0 ok, 1 refused by the API (or a check found a problem), 2 usage (bad
arguments or input), 3 the stack cannot be reached or started (relay, PostgreSQL, Temporal,
a port in use, the embedded extra missing, a database without migrations). Results go to
stdout (`--json` on list and show commands for scripts); errors and refusals go to stderr.
Only `refunds migrate` (and `refunds dev`) apply migrations.

Every command ends with os._exit after flushing, because temporalio's native runtime can
crash at interpreter exit in short-lived processes (sdk-python #300).
"""

import argparse
import asyncio
import contextlib
import getpass
import json
import os
import sys
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import psycopg
from psycopg_pool import PoolTimeout

from adapters import event_loop
from adapters.config import Settings
from domain.money import format_minor, normalise_currency, parse_major
from starters.ages import parse_age

if TYPE_CHECKING:
    from adapters.store import Store

Command = Callable[[argparse.Namespace, Settings], Awaitable[int]]

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


class CommandFailed(Exception):
    """Ends a command with a one-line message on stderr and one of the exit codes above."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _token(args: argparse.Namespace, settings: Settings) -> str:
    token = args.token or os.environ.get("REFUNDS_TOKEN")
    if token:
        return str(token)
    secrets_file = Path(settings.data_dir) / "dev-secrets.json"
    if secrets_file.exists():
        return str(json.loads(secrets_file.read_text())["admin_token"])
    raise SystemExit("no token: pass --token or set REFUNDS_TOKEN")


def _api(args: argparse.Namespace, settings: Settings) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=settings.relay_base_url(), timeout=30,
                             headers={"Authorization": f"Bearer {_token(args, settings)}"})


def _show(response: httpx.Response) -> int:
    """The API's answer: JSON on stdout when it succeeded, on stderr (exit 1) when refused."""
    out = sys.stdout if response.is_success else sys.stderr
    try:
        print(json.dumps(response.json(), indent=2), file=out)
    except ValueError:
        print(response.text, file=out)
    return EXIT_OK if response.is_success else EXIT_REFUSED


def _print_json(value: Any) -> int:
    print(json.dumps(value, indent=2, default=str))
    return EXIT_OK


async def _database(settings: Settings) -> tuple[str, Any]:
    """The configured DSN, or the embedded PostgreSQL in the data folder."""
    if settings.database_url is not None:
        return settings.database_url.get_secret_value(), None
    from starters.stack import EmbeddedPostgres

    pg = EmbeddedPostgres(Path(settings.data_dir) / "pg")
    return await asyncio.to_thread(pg.start), pg


def _observability(settings: Settings, service: str, *, text_logs: bool = False) -> None:
    from adapters.telemetry import configure_logging, configure_tracing

    configure_logging(settings, text=text_logs or None)
    configure_tracing(service)


async def cmd_dev(args: argparse.Namespace, settings: Settings) -> int:
    from adapters.telemetry import shutdown_tracing
    from starters.dev import run_dev

    _observability(settings, "refunds-dev", text_logs="log_format" not in settings.model_fields_set)
    try:
        await run_dev(settings, play_demo=not args.no_demo)
    finally:
        shutdown_tracing()
    return 0


async def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from starters.demo import run_demo

    await run_demo(settings.relay_base_url(), settings.sandbox_base_url(), _token(args, settings),
                   fault_seconds=settings.provider_http_timeout_seconds + 5)
    return 0


async def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    import signal

    from adapters.telemetry import shutdown_tracing
    from starters.stack import ensure_ports_free
    from workers.main import run_worker

    _observability(settings, "refunds-worker")
    ensure_ports_free(settings.bind_host, {"REFUNDS_WORKER_HEALTH_PORT": settings.worker_health_port,
                                           "REFUNDS_TEMPORAL_METRICS_PORT": settings.temporal_metrics_port})
    dsn, pg = await _database(settings)
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

    from adapters.http_server import AppServer
    from adapters.providers.registry import build_providers, close_providers
    from adapters.store import Store
    from adapters.telemetry import shutdown_tracing
    from adapters.temporal_client import connect
    from starters.relay import create_app
    from starters.stack import ensure_ports_free

    _observability(settings, "refunds-relay")
    ensure_ports_free(settings.bind_host, {"REFUNDS_RELAY_PORT": settings.relay_port})
    dsn, pg = await _database(settings)
    store = await Store.open(dsn)
    providers = build_providers(settings, store)
    app = create_app(store, await connect(settings), providers, settings)
    server = AppServer(app, settings.bind_host, settings.relay_port,
                       forwarded_allow_ips=args.forwarded_allow_ips)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await server.start()
    print(f"relay on {server.url}", flush=True)
    await app.state.webhooks.redrive()  # heal receipts a crash left between receipt and signal
    try:
        await stop.wait()
    finally:
        await server.stop()
        await close_providers(providers)
        await store.close()
        shutdown_tracing()
        if pg is not None:
            pg.stop()
    return 0


async def cmd_doctor(args: argparse.Namespace, settings: Settings) -> int:
    from starters.doctor import run_doctor

    findings = await run_doctor(settings)
    for finding in findings:
        print(finding.line())
    return 0 if all(f.ok for f in findings) else 1


async def cmd_webhooks_coverage(args: argparse.Namespace, settings: Settings) -> int:
    async with _api(args, settings) as api:
        return _show(await api.get("/v1/webhooks/coverage"))


async def cmd_webhooks_replay(args: argparse.Namespace, settings: Settings) -> int:
    if args.receipt is not None:
        async with _api(args, settings) as api:
            return _show(await api.post("/v1/webhook-receipts/replay", json={"receipt_id": args.receipt}))
    replayed: list[Any] = []
    async with _api(args, settings) as api:
        while True:  # a page a call, so no request outlives its client however long the window
            response = await api.post("/v1/webhook-receipts/replay", json={
                "since": args.since, "after_receipt_id": max((r["replay_of"] for r in replayed), default=0)})
            if not response.is_success or not response.json():
                break
            replayed += response.json()
    return _show(response) if not response.is_success else _print_json(replayed)


async def cmd_webhooks_redrive(args: argparse.Namespace, settings: Settings) -> int:
    async with _api(args, settings) as api:
        return _show(await api.post("/v1/webhook-receipts/redrive"))


async def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    """Migrates as the schema owner (REFUNDS_MIGRATION_DATABASE_URL, else the one DSN) and
    grants the runtime role what relay and worker need."""
    from adapters.store import Store

    if settings.migration_database_url is not None:
        dsn, pg = settings.migration_database_url.get_secret_value(), None
    else:
        dsn, pg = await _database(settings)
    runtime_role = settings.runtime_role_name()
    try:
        store = await Store.open(dsn)
        try:
            applied = await store.migrate(runtime_role)
        except ValueError as refused:
            print(f"refused: {refused}", file=sys.stderr)
            return 1
        finally:
            await store.close()
        print("applied: " + (", ".join(applied) if applied else "nothing (up to date)"))
        if runtime_role is not None:
            print(f"runtime role {runtime_role}: granted")
    finally:
        if pg is not None:
            pg.stop()
    return 0


@contextlib.asynccontextmanager
async def _store(settings: Settings) -> AsyncIterator["Store"]:
    """The store on the configured or embedded PostgreSQL (stopped afterwards). Every command
    but `migrate` refuses a database that lacks migrations instead of changing its schema:
    which database a shell points at is easy to get wrong."""
    from adapters.health import database_problem
    from adapters.store import Store

    dsn, pg = await _database(settings)
    try:
        store = await Store.open(dsn)
        try:
            problem = await database_problem(store)
            if problem is not None:
                raise CommandFailed(problem, EXIT_UNREACHABLE)
            yield store
        finally:
            await store.close()
    finally:
        if pg is not None:
            pg.stop()


async def cmd_token_create(args: argparse.Namespace, settings: Settings) -> int:
    """The audit names who made the token: this machine's user, as `token revoke` does."""
    roles = [r.strip() for r in args.roles.split(",") if r.strip()]
    async with _store(settings) as store:
        token = await store.create_token(args.user, roles, by=f"cli:{getpass.getuser()}",
                                         expires_in=parse_age(args.expires_in) if args.expires_in else None)
    print(token)
    return 0


async def cmd_integrations_link(args: argparse.Namespace, settings: Settings) -> int:
    from adapters.integration_store import IntegrationStore

    links = [(system, external) for system, external in (("slack", args.slack),
                                                         ("servicenow", args.servicenow),
                                                         ("oidc", args.oidc)) if external]
    if not links:
        raise CommandFailed("name at least one identity: --slack USER_ID, --servicenow USER_NAME or "
                            "--oidc VALUE", EXIT_USAGE)
    async with _store(settings) as store:
        for system, external in links:
            await IntegrationStore(store).link_identity(system, external, args.user)
            print(f"{system} {external} -> {args.user}")
    return 0


async def cmd_token_list(args: argparse.Namespace, settings: Settings) -> int:
    async with _store(settings) as store:
        tokens = [t for t in await store.list_tokens() if args.all or t["revoked_at"] is None]
    if args.json:
        return _print_json(tokens)
    print(f"{'id':>5}  {'user':<20} {'roles':<36} {'fingerprint':<12}  {'created':<16}  "
          f"{'revoked':<16}  expires")
    for t in tokens:
        revoked, expires = (f"{t[k]:%Y-%m-%d %H:%M}" if t[k] else "-" for k in ("revoked_at", "expires_at"))
        print(f"{t['id']:>5}  {t['user_name']:<20} {','.join(t['roles']):<36} {t['fingerprint']:<12}  "
              f"{t['created_at']:%Y-%m-%d %H:%M}  {revoked:<16}  {expires}")
    return 0


async def cmd_token_revoke(args: argparse.Namespace, settings: Settings) -> int:
    """Revoked at once: the relay and console look every token up on every request."""
    if (args.id is None) == (args.user is None):
        raise CommandFailed("give a token id or --user, not both", EXIT_USAGE)
    async with _store(settings) as store:
        ids = await store.revoke_tokens(by=f"cli:{getpass.getuser()}", token_id=args.id, user=args.user)
    if not ids:
        print("no active token matched", file=sys.stderr)
        return 1
    print(f"revoked token{'s' if len(ids) > 1 else ''} {', '.join(map(str, ids))}")
    return 0


async def cmd_request(args: argparse.Namespace, settings: Settings) -> int:
    currency = normalise_currency(args.currency)
    evidence = dict(item.split("=", 1) for item in args.evidence)
    body = {"refund_request_id": args.id, "provider": args.provider, "charge_id": args.charge,
            "amount": parse_major(args.amount, currency), "currency": currency,
            "merchant_account": args.merchant, "reason": args.reason, "evidence": evidence}
    async with _api(args, settings) as api:
        return _show(await api.post("/v1/refund-requests", json=body,
                                    headers={"X-Refund-Channel": "cli"}))


async def cmd_payouts_register(args: argparse.Namespace, settings: Settings) -> int:
    """Registers a payout the payments system made (once per id; the same again is a no-op)."""
    currency = normalise_currency(args.currency)
    body = {"id": args.id, "provider": args.provider, "provider_payout_id": args.provider_payout_id,
            "beneficiary_id": args.beneficiary, "amount": parse_major(args.amount, currency),
            "currency": currency}
    async with _api(args, settings) as api:
        return _show(await api.post("/v1/payouts", json=body))


async def cmd_payouts_list(args: argparse.Namespace, settings: Settings) -> int:
    async with _api(args, settings) as api:
        response = await api.get("/v1/payouts", params={"limit": args.limit})
    if not response.is_success or args.json:
        return _show(response)
    for payout in response.json():
        print(f"{payout['id']}  {payout['provider']} {payout['provider_payout_id']}  "
              f"{format_minor(payout['amount'], payout['currency'])}  {payout['status']}  "
              f"{payout['beneficiary_id']}")
    return 0


async def cmd_payouts_show(args: argparse.Namespace, settings: Settings) -> int:
    async with _api(args, settings) as api:
        return _show(await api.get(f"/v1/payouts/{args.id}"))


async def cmd_approve(args: argparse.Namespace, settings: Settings) -> int:
    async with _api(args, settings) as api:
        return _show(await api.post(f"/v1/refund-requests/{args.id}/approvals",
                                    json={"decision": args.decision, "reason": args.reason}))


async def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    async with _api(args, settings) as api:
        return _show(await api.get(f"/v1/refund-requests/{args.id}"))


async def cmd_audit_show(args: argparse.Namespace, settings: Settings) -> int:
    async with _api(args, settings) as api:
        response = await api.get(f"/v1/refund-requests/{args.id}/audit")
    if not response.is_success or args.json:
        return _show(response)
    for entry in response.json():
        detail = json.dumps(entry["detail"], sort_keys=True)
        print(f"{entry['seq']:>4}  {entry['occurred_at'][:23]}  {entry['actor']:<20} "
              f"{entry['action']:<32} {detail[:120]}")
    return 0


async def cmd_audit_verify(args: argparse.Namespace, settings: Settings) -> int:
    from adapters.audit_checkpoints import checkpoint_book

    try:
        book = checkpoint_book(settings.audit_checkpoint_dir, settings.audit_checkpoint_keys)
    except ValueError as missing:
        raise CommandFailed(str(missing), EXIT_USAGE) from None
    if book is not None and not book.folder.is_dir():  # a wrong path must not pass as "no checkpoints"
        raise CommandFailed(f"audit checkpoint folder {book.folder} does not exist", EXIT_USAGE)
    points, problems = book.read() if book is not None else ({}, [])
    async with _store(settings) as store:
        checked, chain_problems = await store.verify_audit(points)
    problems += chain_problems
    for problem in problems:
        print(f"TAMPERED: {problem}")
    if book is None:
        print("no audit checkpoints (REFUNDS_AUDIT_CHECKPOINT_DIR unset): a cut tail with a rewound "
              "head cannot be detected", file=sys.stderr)
    else:
        print(f"checked against {book.count()} checkpoints in {book.folder}")
    print(f"{checked} audit rows checked, {len(problems)} problems")
    return 1 if problems else 0


async def cmd_policy_check(args: argparse.Namespace, settings: Settings) -> int:
    from adapters.policy_file import load_policy

    policy = load_policy(Path(args.file))
    print(f"{args.file}: valid, version {policy.version}, hash {policy.fingerprint()}")
    for tier in policy.refunds.tiers:
        needs = ", ".join(f"{r.count}x {r.role}" for r in tier.approvals)
        print(f"  refund tier {tier.name}: up to {tier.max_amount or 'any amount'}: {needs}")
    return 0


async def cmd_policy_simulate(args: argparse.Namespace, settings: Settings) -> int:
    from adapters.policy_file import load_policy
    from adapters.store import request_from_row
    from domain.models import PolicyDecision
    from domain.policy import decide

    candidate = load_policy(Path(args.file))
    since = datetime.now(UTC) - parse_age(args.since)
    async with _store(settings) as store:
        rows = await store.decisions_since(since)
    changed = 0
    for row in rows:
        before = PolicyDecision.model_validate(row["decision"])
        after = decide(candidate, request_from_row(row), before.context)
        if (before.auto_approve, before.tier) != (after.auto_approve, after.tier):
            changed += 1
            print(f"{row['refund_request_id']}: {before.tier or 'auto'} -> {after.tier or 'auto'}"
                  f"  ({', '.join(after.rules_fired)})")
    print(f"{len(rows)} decisions since {since:%Y-%m-%d %H:%M}, {changed} would change "
          f"under version {candidate.version}")
    return 0


async def cmd_reissue(args: argparse.Namespace, settings: Settings) -> int:
    async with _api(args, settings) as api:
        return _show(await api.post(f"/v1/refund-requests/{args.id}/reissue",
                                    json={"method": args.method, "reason": args.reason}))


async def cmd_reconcile(args: argparse.Namespace, settings: Settings) -> int:
    """Starts (or resumes) a backfill through the relay and follows it to its report."""
    from starters.progress import follow_run

    body: dict[str, Any] = {"provider": args.provider,
                            "since": (datetime.now(UTC) - parse_age(args.since)).isoformat()}
    if args.until:
        body["until"] = args.until
    async with _api(args, settings) as api:
        started = await api.post("/v1/reconciliation/runs", json=body)
        if not started.is_success:
            return _show(started)
        run = started.json()
        print(f"{'resuming' if run['resumed'] else 'started'} {run['run_id']}: {run['provider']} refunds "
              f"created {run['window']['since']} .. {run['window']['until']}", flush=True)
        try:
            async with asyncio.timeout(args.timeout):
                report = await follow_run(api, run["run_id"], show_progress=not args.no_progress)
        except TimeoutError:
            raise CommandFailed(f"run {run['run_id']} has not ended after {args.timeout:g} s; it goes on "
                                f"(GET /v1/reconciliation/runs/{run['run_id']})", EXIT_REFUSED) from None
    if report["state"] == "failed":
        raise CommandFailed(f"run {report['run_id']} failed: {report['failure']}", EXIT_REFUSED)
    print(f"{report['objects_seen']} objects, {report['new_breaks']} new breaks, "
          f"{report['known_breaks']} already known")
    for name, entry in sorted(report["classes"].items()):
        amounts = ", ".join(format_minor(v, c) for c, v in sorted(entry["amounts"].items()))
        print(f"  {name:<36} new {entry['new']:>6}  seen {entry['seen']:>6}  {amounts}")
    unmapped = report["classes"].get("unmapped_status")
    if unmapped:
        print(f"WARNING: {unmapped['seen']} objects carry a status no adapter maps; they wait for ops "
              "(unmapped_status)")
    oldest = report["oldest_break"]
    if oldest:
        print(f"oldest break: {oldest['object_id']} ({oldest['break_class']}, created "
              f"{oldest['object_created_at']})")
    for warning in report["warnings"]:
        print(f"WARNING: {warning}")
    for path in report["report_files"]:
        print(f"report: {path}")
    return 0


def _json_flag(parser: argparse.ArgumentParser) -> None:
    """Every list and show command takes --json (some print JSON anyway: then it is explicit)."""
    parser.add_argument("--json", action="store_true", help="print JSON (for scripts)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refunds", description="Refund Orchestrator")
    parser.add_argument("--token", help="API token (default: $REFUNDS_TOKEN, then the dev admin token)")
    sub = parser.add_subparsers(dest="command", required=True)

    dev = sub.add_parser("dev", help="start the whole stack on the embedded default")
    dev.add_argument("--no-demo", action="store_true", help="do not play the demo at start")
    dev.set_defaults(run=cmd_dev)
    sub.add_parser("demo", help="play the two worked examples against a running stack").set_defaults(
        run=cmd_demo)
    sub.add_parser("worker", help="run a worker (production)").set_defaults(run=cmd_worker)
    relay = sub.add_parser("relay", help="run the relay (production)")
    relay.add_argument("--forwarded-allow-ips", default=None, metavar="ADDRESSES",
                       help="proxies whose X-Forwarded-For/-Proto to trust: comma-separated addresses "
                       "or networks, or '*' (default: $FORWARDED_ALLOW_IPS, else loopback only)")
    relay.set_defaults(run=cmd_relay)
    sub.add_parser("migrate", help="apply schema migrations").set_defaults(run=cmd_migrate)
    sub.add_parser("doctor", help="check configuration and connectivity; exit 0 when healthy").set_defaults(
        run=cmd_doctor)

    token = sub.add_parser("token", help="API tokens").add_subparsers(dest="token_command", required=True)
    create = token.add_parser("create", help="create a token (printed once; stored hashed)")
    create.add_argument("--user", required=True)
    create.add_argument("--roles", required=True, help="comma-separated, e.g. requester,approver")
    create.add_argument("--expires-in", help="lifetime, e.g. 12h or 30d (default: until revoked)")
    create.set_defaults(run=cmd_token_create)
    listing = token.add_parser("list", help="list tokens (never their secrets)")
    listing.add_argument("--all", action="store_true", help="include revoked tokens")
    _json_flag(listing)
    listing.set_defaults(run=cmd_token_list)
    revoke = token.add_parser("revoke", help="revoke a token, or all of a user's; sessions end too")
    revoke.add_argument("id", nargs="?", type=int, help="token id (see token list)")
    revoke.add_argument("--user", help="revoke every token of this user")
    revoke.set_defaults(run=cmd_token_revoke)

    integrations = sub.add_parser("integrations", help="Slack and ServiceNow identities").add_subparsers(
        dest="integrations_command", required=True)
    link = integrations.add_parser(
        "link", help="act as USER for approvals from Slack or ServiceNow (roles come from USER's tokens)")
    link.add_argument("--user", required=True)
    link.add_argument("--slack", help="Slack user id, e.g. U0123ABC")
    link.add_argument("--servicenow", help="ServiceNow user_name")
    link.add_argument("--oidc", help="the Temporal UI's OIDC user claim (REFUNDS_OIDC_USER_CLAIM, e.g. sub)")
    link.set_defaults(run=cmd_integrations_link)

    request = sub.add_parser("request", help="request a refund")
    request.add_argument("--id", required=True, help="refund_request_id (your idempotency key)")
    request.add_argument("--charge", required=True)
    request.add_argument("--amount", required=True, help="major units, e.g. 30.00")
    request.add_argument("--currency", required=True)
    request.add_argument("--merchant", required=True, help="merchant account")
    request.add_argument("--reason", default="requested_by_customer")
    request.add_argument("--provider", default="sandbox")
    request.add_argument("--evidence", action="append", default=[], metavar="KEY=VALUE")
    request.set_defaults(run=cmd_request)

    payouts = sub.add_parser("payouts", help="payouts the payments system made").add_subparsers(
        dest="payouts_command", required=True)
    register = payouts.add_parser("register", help="register a paid payout (idempotent on its id)")
    register.add_argument("--id", required=True, help="our payout id")
    register.add_argument("--provider", required=True)
    register.add_argument("--provider-payout-id", required=True, help="the provider's payout id")
    register.add_argument("--beneficiary", required=True, help="beneficiary id")
    register.add_argument("--amount", required=True, help="major units, e.g. 12500.00")
    register.add_argument("--currency", required=True)
    register.set_defaults(run=cmd_payouts_register)
    payout_list = payouts.add_parser("list", help="the latest booked payouts")
    payout_list.add_argument("--limit", type=int, default=50)
    _json_flag(payout_list)
    payout_list.set_defaults(run=cmd_payouts_list)
    payout_show = payouts.add_parser("show", help="a payout and its exception case")
    payout_show.add_argument("id")
    _json_flag(payout_show)
    payout_show.set_defaults(run=cmd_payouts_show)

    approve = sub.add_parser("approve", help="approve or deny a refund")
    approve.add_argument("id")
    approve.add_argument("--decision", choices=["approve", "deny"], default="approve")
    approve.add_argument("--reason", default="")
    approve.set_defaults(run=cmd_approve)

    hooks = sub.add_parser("webhooks", help="webhook receipts: coverage, replay, re-drive").add_subparsers(
        dest="webhooks_command", required=True)
    coverage = hooks.add_parser("coverage",
                                help="event types per provider: arrived, handled, unknown, refused")
    _json_flag(coverage)
    coverage.set_defaults(run=cmd_webhooks_coverage)
    replay = hooks.add_parser("replay", help="re-feed stored receipts through the webhook path")
    which = replay.add_mutually_exclusive_group(required=True)
    which.add_argument("--receipt", type=int, help="one receipt id")
    which.add_argument("--since", help="every delivery received since, ISO 8601 with offset")
    replay.set_defaults(run=cmd_webhooks_replay)
    hooks.add_parser("redrive", help="re-drive accepted receipts that never reached their workflow"
                     ).set_defaults(run=cmd_webhooks_redrive)

    status = sub.add_parser("status", help="show a refund case")
    status.add_argument("id")
    _json_flag(status)
    status.set_defaults(run=cmd_status)

    reissue = sub.add_parser("reissue", help="reissue a failed or canceled refund (ops)")
    reissue.add_argument("id")
    reissue.add_argument("--method", choices=["provider", "bank_transfer"], default="provider")
    reissue.add_argument("--reason", default="")
    reissue.set_defaults(run=cmd_reissue)

    reconcile = sub.add_parser("reconcile", help="backfill: cross-check a provider's refunds with cases "
                               "and the ledger (resumes an unfinished one)")
    reconcile.add_argument("--provider", required=True)
    reconcile.add_argument("--since", default="90d", help="refunds created this long ago or later, e.g. 90d")
    reconcile.add_argument("--until", help="window end, ISO 8601 with offset (default: now)")
    reconcile.add_argument("--no-progress", action="store_true", help="no progress bar")
    reconcile.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                           help="stop following (exit 1) when the run has not ended by then; it goes on")
    reconcile.set_defaults(run=cmd_reconcile)

    audit = sub.add_parser("audit", help="the audit trail").add_subparsers(dest="audit_command",
                                                                          required=True)
    show = audit.add_parser("show", help="a case's timeline")
    show.add_argument("id")
    _json_flag(show)
    show.set_defaults(run=cmd_audit_show)
    audit.add_parser("verify", help="recompute every hash chain; exit 1 on tampering").set_defaults(
        run=cmd_audit_verify)

    policy = sub.add_parser("policy", help="policy files").add_subparsers(dest="policy_command",
                                                                         required=True)
    check = policy.add_parser("check", help="validate a policy file")
    check.add_argument("file")
    check.set_defaults(run=cmd_policy_check)
    simulate = policy.add_parser("simulate", help="re-decide past cases under a candidate policy")
    simulate.add_argument("file")
    simulate.add_argument("--since", default="90d", help="how far back, e.g. 90d, 12h")
    simulate.set_defaults(run=cmd_policy_simulate)
    return parser


def failure(exc: BaseException, settings: Settings | None) -> tuple[str, int]:
    """The one line and exit code for an exception that ends a command."""
    from starters.stack import StackUnavailable

    if isinstance(exc, CommandFailed):
        return str(exc), exc.code
    if isinstance(exc, StackUnavailable):
        return str(exc), EXIT_UNREACHABLE
    if isinstance(exc, httpx.TransportError):
        relay = settings.relay_base_url() if settings else "the relay"
        return f"cannot reach the relay at {relay} ({exc or type(exc).__name__}): is it running? " \
               "REFUNDS_RELAY_URL points elsewhere", EXIT_UNREACHABLE
    if isinstance(exc, psycopg.OperationalError | PoolTimeout):
        return f"cannot reach PostgreSQL ({exc}): check REFUNDS_DATABASE_URL", EXIT_UNREACHABLE
    if isinstance(exc, RuntimeError) and str(exc).startswith("Failed client connect"):  # temporalio's words
        return f"cannot reach Temporal ({exc}): check TEMPORAL_ADDRESS", EXIT_UNREACHABLE
    if isinstance(exc, SystemExit) and exc.code in (None, 0):
        return "", EXIT_OK
    if isinstance(exc, RuntimeError | psycopg.Error):  # a defect, not the user's input: the trace helps
        traceback.print_exception(exc)
        return str(exc), EXIT_REFUSED
    return str(exc), EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    code = 1
    settings: Settings | None = None
    try:
        settings = Settings()
        code = event_loop.run(args.run(args, settings))
    except KeyboardInterrupt:
        code = 130
    except (CommandFailed, RuntimeError, httpx.HTTPError, psycopg.Error, PoolTimeout,
            ValueError, OSError, SystemExit) as exc:
        message, code = failure(exc, settings)
        if message:
            print(f"error: {message}", file=sys.stderr)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)
