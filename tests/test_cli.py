"""The `refunds` command line: real processes, exit codes, and what they print."""

import asyncio
import getpass
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import IO

import httpx
import psycopg
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from psycopg.conninfo import make_conninfo
from temporalio.client import Client

from adapters.db import Store
from adapters.http_server import AppServer
from starters.dev.stack import TemporalDevServer
from starters.ports import free_port
from tests.harness import PAYLOAD_KEYS, Stack, stack_with

REFUNDS = str(Path(sys.executable).parent / "refunds")


async def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(subprocess.run, [REFUNDS, *args], capture_output=True, text=True,
                                   timeout=120, env={**os.environ, **(env or {})})


async def test_processes_run_on_uvloop() -> None:
    """Every command and benchmark runs through `event_loop.run`; the ingest ratio in
    docs/BENCHMARKS.md was measured on uvloop. A process of its own: the runner replaces
    the thread's event loop."""
    probe = ("import asyncio; from adapters import event_loop\n"
             "async def loop_type() -> str: return type(asyncio.get_running_loop()).__module__\n"
             "print(event_loop.run(loop_type()))")
    done = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", probe],
                                   capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "uvloop"


async def test_policy_check_accepts_the_default_and_explains_a_broken_file(tmp_path: Path) -> None:
    ok = await run("policy", "check", "adapters/policies/default.toml")
    assert ok.returncode == 0, ok.stderr
    assert "refund tier large" in ok.stdout
    broken = tmp_path / "broken.toml"
    broken.write_text('version = "x"\n[refunds]\ntiers = []\n')
    bad = await run("policy", "check", str(broken))
    assert bad.returncode == 2
    assert "refunds.tiers" in bad.stderr


async def test_policy_simulate_lists_decisions_a_candidate_would_change(
        stack: Stack, postgres_dsn: str, tmp_path: Path) -> None:
    charge = await stack.charge(10_000)
    case_id = await stack.request_refund("alice", charge, 2_000)
    await stack.wait_for_status(case_id, "succeeded")
    text = Path("adapters/policies/default.toml").read_text()
    candidate = tmp_path / "stricter.toml"
    candidate.write_text(text.replace("USD = 5000", "USD = 1000").replace(
        'version = "2026-12-08.1"', 'version = "stricter"'))
    result = await run("policy", "simulate", str(candidate), "--since", "1h",
                       env={"REFUNDS_DATABASE_URL": postgres_dsn})
    assert result.returncode == 0, result.stderr
    assert f"{case_id}: auto -> standard" in result.stdout
    assert "under version stricter" in result.stdout


async def test_audit_show_and_status_go_through_the_relay(stack: Stack) -> None:
    charge = await stack.charge(10_000)
    case_id = await stack.request_refund("alice", charge, 1_000)
    await stack.wait_for_status(case_id, "succeeded")
    env = {"REFUNDS_RELAY_URL": stack.relay_url, "REFUNDS_TOKEN": stack.tokens["dave"]}
    shown = await run("audit", "show", case_id, env=env)
    assert shown.returncode == 0, shown.stderr
    assert "request_received" in shown.stdout and "ledger_posted" in shown.stdout
    status = await run("status", case_id, env=env)
    assert status.returncode == 0 and '"succeeded"' in status.stdout
    refused = await run("request", "--id", "cli-x", "--charge", charge, "--amount", "1.00",
                        "--currency", "USD", "--merchant", "acct_1", env=env)
    assert refused.returncode == 1 and "needs one of the roles" in refused.stderr and not refused.stdout
    too_precise = await run("request", "--id", "cli-y", "--charge", charge, "--amount", "1.001",
                            "--currency", "USD", "--merchant", "acct_1", env=env)
    assert too_precise.returncode == 2 and "more than 2 decimals" in too_precise.stderr


async def test_audit_verify_exits_non_zero_when_a_row_was_edited(stack: Stack, postgres_dsn: str) -> None:
    charge = await stack.charge(10_000)
    case_id = await stack.request_refund("alice", charge, 1_000)
    await stack.wait_for_status(case_id, "succeeded")
    async with stack.store.database.transaction() as conn:
        await conn.execute("ALTER TABLE audit_events DISABLE TRIGGER audit_events_no_update")
        await conn.execute("UPDATE audit_events SET actor = 'mallory' WHERE chain = %s AND seq = 2",
                           (case_id,))
        await conn.execute("ALTER TABLE audit_events ENABLE TRIGGER audit_events_no_update")
    result = await run("audit", "verify", env={"REFUNDS_DATABASE_URL": postgres_dsn})
    assert result.returncode == 1
    assert f"TAMPERED: chain {case_id} " in result.stdout


async def test_list_and_show_commands_print_json_with_json(stack: Stack, postgres_dsn: str) -> None:
    charge = await stack.charge(10_000)
    case_id = await stack.request_refund("alice", charge, 1_000)
    await stack.wait_for_status(case_id, "succeeded")
    env = {"REFUNDS_RELAY_URL": stack.relay_url, "REFUNDS_TOKEN": stack.tokens["dave"]}
    audit = await run("audit", "show", case_id, "--json", env=env)
    assert audit.returncode == 0, audit.stderr
    assert "ledger_posted" in [entry["action"] for entry in json.loads(audit.stdout)]
    status = await run("status", case_id, "--json", env=env)
    assert status.returncode == 0 and json.loads(status.stdout)["status"] == "succeeded"
    payouts = await run("payouts", "list", "--json", env=env)
    assert payouts.returncode == 0, payouts.stderr
    assert isinstance(json.loads(payouts.stdout), list)
    tokens = await run("token", "list", "--json", env={"REFUNDS_DATABASE_URL": postgres_dsn})
    assert tokens.returncode == 0, tokens.stderr
    listed = json.loads(tokens.stdout)
    assert "dave" in {t["user_name"] for t in listed} and all("token_hash" not in t for t in listed)


async def test_linking_an_identity_names_who_did_it_and_never_re_points_one_silently(
        store: Store, postgres_dsn: str) -> None:
    """Who a Slack user approves as is an access grant: the trail names the operator (as
    `token create` does), and moving an identity from one person to another says so and
    takes `--replace` (before, it moved silently, audited as "admin")."""
    slack = f"U{uuid.uuid4().hex[:10].upper()}"
    env = {"REFUNDS_DATABASE_URL": postgres_dsn}
    first = await run("integrations", "link", "--user", "alice", "--slack", slack, env=env)
    assert first.returncode == 0, first.stderr
    moved = await run("integrations", "link", "--user", "bob", "--slack", slack, env=env)
    assert moved.returncode == 2 and "alice" in moved.stderr and "--replace" in moved.stderr, moved.stderr
    linked = await store.database.fetch_one(
        "SELECT user_name FROM identity_links WHERE system = 'slack' AND external_id = %s", (slack,))
    assert linked is not None and linked["user_name"] == "alice"
    servicenow = f"sn-{uuid.uuid4().hex[:8]}"  # all or none: the refused slack link takes this one back
    both = await run("integrations", "link", "--user", "bob", "--servicenow", servicenow, "--slack", slack,
                     env=env)
    assert both.returncode == 2, both.stderr
    assert await store.database.fetch_one("SELECT 1 AS x FROM identity_links WHERE external_id = %s",
                                          (servicenow,)) is None
    replaced = await run("integrations", "link", "--user", "bob", "--slack", slack, "--replace", env=env)
    assert replaced.returncode == 0, replaced.stderr
    rows = await store.database.fetch_all(
        "SELECT actor, detail FROM audit_events WHERE chain = '' AND action = 'identity_linked'"
        " AND detail->>'external_id' = %s ORDER BY seq", (slack,))
    assert [(r["detail"]["user"], r["detail"].get("previous_user")) for r in rows] == [
        ("alice", None), ("bob", "alice")]
    assert all(r["actor"] == f"cli:{getpass.getuser()}" for r in rows)


async def test_exit_codes_usage_2_and_an_unreachable_relay_3_on_stderr() -> None:
    usage = await run("token", "revoke", env={"REFUNDS_DATABASE_URL": "postgresql://nowhere/x"})
    assert usage.returncode == 2 and "give a token id or --user" in usage.stderr and not usage.stdout
    unknown = await run("token", "create", "--user", "x", "--roles", "requester,root",  # the table says
                        env={"REFUNDS_DATABASE_URL": "postgresql://nowhere/x"})
    assert unknown.returncode == 2 and "unknown roles ['root']" in unknown.stderr and not unknown.stdout
    nowhere = f"http://127.0.0.1:{free_port()}"
    unreachable = await run("status", "any", env={"REFUNDS_RELAY_URL": nowhere, "REFUNDS_TOKEN": "t"})
    assert unreachable.returncode == 3, unreachable.stdout + unreachable.stderr
    assert unreachable.stderr.count("\n") == 1
    assert f"cannot reach the relay at {nowhere}" in unreachable.stderr


async def test_a_command_whose_reader_is_gone_still_exits_with_its_code() -> None:
    """A closed terminal (SIGHUP) or a reader gone: writing the error line failed, and that
    failure skipped the clean exit (sdk-python #300's path) and ended with another code
    (reproduced). The command's own code comes back, whatever its output met."""
    nowhere = f"http://127.0.0.1:{free_port()}"

    def with_reader_gone() -> int:
        process = subprocess.Popen([REFUNDS, "status", "any"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   env={**os.environ, "REFUNDS_RELAY_URL": nowhere, "REFUNDS_TOKEN": "t"})
        assert process.stdout is not None and process.stderr is not None
        process.stdout.close()
        process.stderr.close()
        return process.wait(timeout=120)

    assert await asyncio.to_thread(with_reader_gone) == 3


async def test_only_migrate_migrates_every_other_command_refuses_an_unmigrated_database(
        postgres_dsn: str, temporal_server: TemporalDevServer) -> None:
    """The relay and the worker too: a release rolled out before its migrations ran new code
    against the old schema (they started and took tasks; reproduced: both kept running)."""
    name = f"unmigrated_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    env = {"REFUNDS_DATABASE_URL": make_conninfo(postgres_dsn, dbname=name),
           "TEMPORAL_ADDRESS": temporal_server.address, "REFUNDS_PAYLOAD_KEYS": PAYLOAD_KEYS,
           "REFUNDS_APPROVAL_KEYS": "k-unmigrated", "REFUNDS_RELAY_PORT": str(free_port()),
           "REFUNDS_WORKER_HEALTH_PORT": "0", "REFUNDS_TEMPORAL_METRICS_PORT": "0",
           "REFUNDS_TASK_QUEUE": f"tq-unmigrated-{uuid.uuid4().hex[:8]}"}
    for command in (["token", "create", "--user", "x", "--roles", "admin"], ["token", "list"],
                    ["token", "revoke", "--user", "x"], ["audit", "verify"],
                    ["integrations", "link", "--user", "x", "--slack", "U1"], ["relay"], ["worker"]):
        refused = await run(*command, env=env)
        assert refused.returncode == 3, (command, refused.stdout, refused.stderr)
        assert "run `refunds migrate`" in refused.stderr and not refused.stdout, command
    with psycopg.connect(env["REFUNDS_DATABASE_URL"]) as conn:
        assert conn.execute("SELECT to_regclass('schema_migrations')").fetchone() == (None,)
    migrated = await run("migrate", env=env)
    assert migrated.returncode == 0, migrated.stderr
    assert migrated.stdout.startswith("applied: 0001_foundation")
    created = await run("token", "create", "--user", "x", "--roles", "admin", env=env)
    assert created.returncode == 0 and created.stdout.strip(), created.stderr


async def test_relay_trusts_forwarded_headers_only_from_the_proxies_it_is_told(
        temporal_server: TemporalDevServer, postgres_dsn: str, store: Store) -> None:
    """With --forwarded-allow-ips naming the proxy, a loopback peer is not that proxy: its
    X-Forwarded-For is ignored and the allowlist sees the peer itself."""
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("REFUNDS_", "TEMPORAL_"))},
           "TEMPORAL_ADDRESS": temporal_server.address, "REFUNDS_DATABASE_URL": postgres_dsn,
           "REFUNDS_PAYLOAD_KEYS": PAYLOAD_KEYS, "REFUNDS_SANDBOX_WEBHOOK_SECRET": "whsec-forwarded",
           "REFUNDS_RELAY_PORT": str(port), "REFUNDS_WORKER_HEALTH_PORT": "0",
           "REFUNDS_APPROVAL_KEYS": "k-forwarded",  # configured as in production: no warning first
           "REFUNDS_WEBHOOK_ALLOWED_SOURCES": '{"sandbox": ["203.0.113.7/32"]}'}
    process = subprocess.Popen([REFUNDS, "relay", "--forwarded-allow-ips", "10.0.0.1"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert process.stdout is not None
        started = await asyncio.to_thread(process.stdout.readline)
        assert started.startswith("relay on"), started
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as relay:
            sent = await relay.post("/webhooks/sandbox", content=b"{}",
                                    headers={"X-Forwarded-For": "203.0.113.7"})
        assert sent.status_code == 403 and "127.0.0.1 is not an allowed source" in sent.text, sent.text
        # Its lifelong startup objects are out of the collector's walk (each full collection
        # walked them all, about 110 ms with the event loop stopped).
        settled = await asyncio.wait_for(asyncio.to_thread(line_from, process.stdout, "refunds.heap"), 60)
        assert int(json.loads(settled)["message"].split(": ")[1].split()[0]) > 50_000, settled
    finally:
        process.terminate()
        assert await asyncio.to_thread(process.wait, 60) == 0


def line_from(output: IO[str], logger: str) -> str:
    """The first JSON log line of `logger` in a process's output."""
    for line in output:
        if line.startswith("{") and json.loads(line).get("logger") == logger:
            return line
    raise AssertionError(f"no line from {logger}")


async def test_otel_service_name_names_the_service_and_the_command_only_defaults_it() -> None:
    probe = ("from adapters.telemetry import configure_tracing\n"
             "print(configure_tracing('refunds-relay').resource.attributes['service.name'])")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    for extra, expected in (({"OTEL_SERVICE_NAME": "payments-refunds"}, "payments-refunds"),
                            ({"OTEL_RESOURCE_ATTRIBUTES": "service.name=eu-refunds"}, "eu-refunds"),
                            ({}, "refunds-relay")):
        done = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", probe], capture_output=True,
                                       text=True, timeout=60, env={**clean, **extra})
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == expected


async def test_a_classified_fault_logs_one_line_and_its_traceback_only_at_debug() -> None:
    """What the demo's expected timeout logs: Temporal's worker logs a failed activity with
    its traceback; a fault our code classified (an ApplicationError) is one line unless the
    level is DEBUG, while a defect keeps its traceback."""
    probe = """
import logging
from temporalio.exceptions import ApplicationError
from adapters.config import Settings
from adapters.telemetry import configure_logging
configure_logging(Settings(log_format="text"))
log = logging.getLogger("temporalio.activity")
for fault in (ApplicationError("POST /v1/refunds: timed out", type="ProviderOutcomeUnknown"),
              KeyError("defect")):
    try:
        try:
            raise TimeoutError("read timed out")
        except TimeoutError as cause:
            raise fault from cause
    except Exception:
        log.warning("Completing activity as failed", exc_info=True)
"""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("REFUNDS_")}
    for level in ("INFO", "DEBUG"):
        done = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", probe], capture_output=True,
                                       text=True, timeout=60, env={**clean, "REFUNDS_LOG_LEVEL": level})
        assert done.returncode == 0, done.stderr
        classified, defect = done.stderr.split("Completing activity as failed")[1:]
        if level == "INFO":
            assert classified.startswith(": ProviderOutcomeUnknown: POST /v1/refunds: timed out\n")
            assert classified.count("\n") == 1
        else:
            assert "Traceback" in classified and "read timed out" in classified
        assert "Traceback" in defect and "KeyError: 'defect'" in defect


async def test_reconcile_rides_out_a_relay_restart_and_a_refusal_mid_run_is_a_refusal() -> None:
    """Following a run, a relay that answers 503 for a moment (a restart behind its proxy)
    was a usage error (exit 2) and the run's report was lost to the terminal; the run goes
    on, so the CLI polls on. An answer that refuses for good (403: the token revoked
    meanwhile) exits 1, as every refusal does."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    from adapters.http_server import AppServer

    polls: dict[str, int] = {}
    report = {"run_id": "r1", "provider": "sandbox", "state": "completed", "objects_seen": 3, "new_breaks": 0,
              "known_breaks": 0, "classes": {}, "cursor_created": None, "oldest_break": None, "warnings": [],
              "report_files": [],
              "window": {"since": "2026-01-01T00:00:00+00:00", "until": "2026-01-02T00:00:00+00:00"}}
    app = FastAPI()

    @app.post("/v1/reconciliation/runs")
    async def start() -> JSONResponse:
        run_id = "r1" if not polls.get("started") else "r2"
        polls["started"] = 1
        return JSONResponse({**report, "run_id": run_id, "resumed": False}, 202)

    @app.get("/v1/reconciliation/runs/{run_id}")
    async def follow(run_id: str) -> JSONResponse:
        polls[run_id] = polls.get(run_id, 0) + 1
        if run_id == "r2":
            return JSONResponse({"detail": "token revoked"}, 403)
        if polls[run_id] <= 2:
            return JSONResponse({"detail": "upstream restarting"}, 503)
        return JSONResponse({**report, "run_id": run_id})

    server = AppServer(app, "127.0.0.1", free_port())
    await server.start()
    try:
        env = {"REFUNDS_RELAY_URL": server.url, "REFUNDS_TOKEN": "t"}
        rode = await run("reconcile", "--provider", "sandbox", "--no-progress", env=env)
        assert rode.returncode == 0, rode.stdout + rode.stderr
        assert polls["r1"] == 3 and "3 objects" in rode.stdout
        refused = await run("reconcile", "--provider", "sandbox", "--no-progress", env=env)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        assert "403" in refused.stderr and "token revoked" in refused.stderr
    finally:
        await server.stop()


async def test_an_approval_no_worker_has_counted_yet_is_not_exit_0(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    """`refunds approve` answered `verdict_pending` (no worker took the case in time: the
    verdict is resent and may still be refused, e.g. past its seal's age, or as the
    requester's own) exits 4, so `approve && next-step` never goes on as if it counted; a
    relay that failed is exit 3 (send it again), as the README says."""
    async with stack_with(store, client, temporal_server.address, approval_answer_seconds=1,
                          approval_timeout_seconds=3600) as stack:
        charge = await stack.charge(20_000)
        case_id = await stack.request_refund("alice", charge, 9_000)
        await stack.wait_for_status(case_id, "awaiting_approval")
        assert stack.worker is not None
        await stack.worker.shutdown()
        env = {"REFUNDS_RELAY_URL": stack.relay_url}
        pending = await run("--token", stack.tokens["bob"], "approve", case_id, "--reason", "ok", env=env)
        own = await run("--token", stack.tokens["alice"], "approve", case_id, env=env)
        assert pending.returncode == 4, pending.stdout + pending.stderr
        assert json.loads(pending.stdout)["status"] == "verdict_pending"
        assert own.returncode in (1, 4), own.stdout + own.stderr  # refused by role, or pending
        assert own.returncode != 0
        await stack.start_worker()
        await stack.wait_for_status(case_id, "succeeded")

    failing = FastAPI()
    failing.add_api_route("/v1/refund-requests/{case_id}", lambda case_id: JSONResponse(
        {"detail": "the workflow service did not answer"}, status_code=503))
    server = AppServer(failing, "127.0.0.1", 0)
    await server.start()
    try:
        answered = await run("--token", "t", "status", "r-1", env={"REFUNDS_RELAY_URL": server.url})
    finally:
        await server.stop()
    assert answered.returncode == 3 and "did not answer" in answered.stderr, answered


async def test_the_dev_admin_token_is_used_only_for_the_local_dev_stack(tmp_path: Path) -> None:
    """Without --token and REFUNDS_TOKEN the CLI acts with the dev stack's admin token (its
    data folder's dev-secrets.json) against a loopback relay. A REFUNDS_TOKEN set empty (a
    script whose secret is missing) or another relay never gets it: it sent the admin token
    to whatever REFUNDS_RELAY_URL named, and acted as admin where that token existed."""
    (tmp_path / "dev-secrets.json").write_text(json.dumps({"admin_token": "dev-admin-token"}))
    seen: list[str | None] = []
    relay = FastAPI()

    @relay.get("/v1/refund-requests/{case_id}")
    async def status(case_id: str, request: Request) -> JSONResponse:
        seen.append(request.headers.get("authorization"))
        return JSONResponse({"refund_request_id": case_id, "status": "succeeded"})

    server = AppServer(relay, "127.0.0.1", 0)
    await server.start()
    try:
        base = {"REFUNDS_DATA_DIR": str(tmp_path), "REFUNDS_RELAY_URL": server.url}
        unset = {k: v for k, v in os.environ.items() if k != "REFUNDS_TOKEN"}
        local = await asyncio.to_thread(subprocess.run, [REFUNDS, "status", "r-1"], capture_output=True,
                                        text=True, timeout=120, env={**unset, **base})
        bound_everywhere = await asyncio.to_thread(  # a dev stack bound to 0.0.0.0 (its image's)
            subprocess.run, [REFUNDS, "status", "r-1"], capture_output=True, text=True, timeout=120,
            env={**unset, **base, "REFUNDS_RELAY_URL": server.url.replace("127.0.0.1", "0.0.0.0")})
        empty = await run("status", "r-1", env={**base, "REFUNDS_TOKEN": ""})
        elsewhere = await asyncio.to_thread(
            subprocess.run, [REFUNDS, "status", "r-1"], capture_output=True, text=True, timeout=120,
            env={**unset, **base, "REFUNDS_RELAY_URL": "https://refunds.example.invalid"})
    finally:
        await server.stop()
    assert (local.returncode, bound_everywhere.returncode) == (0, 0), local.stderr + bound_everywhere.stderr
    assert (empty.returncode, elsewhere.returncode) == (2, 2), (empty.stderr, elsewhere.stderr)
    assert "no token" in empty.stderr and "no token" in elsewhere.stderr
    assert seen == ["Bearer dev-admin-token"] * 2


async def test_a_setting_refused_or_unread_never_prints_a_secret() -> None:
    """A settings error printed pydantic's message, which quotes what it was given: the
    tail of the metrics token when the OIDC settings were incomplete, the whole database URL
    (password included) when any database setting was refused. A connection string psycopg
    cannot read was printed as psycopg quotes it, password and all."""
    token, password = "metrics-token-VERY-SECRET-TAIL-0123456789", "pw%zzSECRETpass"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("REFUNDS_", "TEMPORAL_"))}
    incomplete = await asyncio.to_thread(subprocess.run, [REFUNDS, "doctor"], capture_output=True, text=True,
                                         timeout=120, env={**base, "REFUNDS_METRICS_TOKEN": token,
                                                           "REFUNDS_OIDC_ISSUER": "https://idp.example"})
    assert incomplete.returncode == 2 and "OIDC" in incomplete.stderr, incomplete.stderr
    unread = await asyncio.to_thread(subprocess.run, [REFUNDS, "migrate"], capture_output=True, text=True,
                                     timeout=120, env={**base,
                                                       "REFUNDS_DATABASE_URL": f"postgresql://app:{password}@h/db",
                                                       "REFUNDS_MIGRATION_DATABASE_URL": "postgresql://own@h/db"})
    assert unread.returncode != 0 and "REFUNDS_DATABASE_URL" in unread.stderr, unread.stderr
    for done in (incomplete, unread):
        shown = done.stdout + done.stderr
        assert "SECRET" not in shown and "0123456789" not in shown, shown
