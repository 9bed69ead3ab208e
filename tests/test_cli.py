"""The `refunds` command line: real processes, exit codes, and what they print."""

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from tests.harness import Stack

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
        'version = "2026-11-21.1"', 'version = "stricter"'))
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
    assert refused.returncode == 1 and "needs one of the roles" in refused.stdout
    too_precise = await run("request", "--id", "cli-y", "--charge", charge, "--amount", "1.001",
                            "--currency", "USD", "--merchant", "acct_1", env=env)
    assert too_precise.returncode == 2 and "more than 2 decimals" in too_precise.stderr


async def test_audit_verify_exits_non_zero_when_a_row_was_edited(stack: Stack, postgres_dsn: str) -> None:
    charge = await stack.charge(10_000)
    case_id = await stack.request_refund("alice", charge, 1_000)
    await stack.wait_for_status(case_id, "succeeded")
    async with stack.store.transaction() as conn:
        await conn.execute("ALTER TABLE audit_events DISABLE TRIGGER audit_events_no_update")
        await conn.execute("UPDATE audit_events SET actor = 'mallory' WHERE chain = %s AND seq = 2",
                           (case_id,))
        await conn.execute("ALTER TABLE audit_events ENABLE TRIGGER audit_events_no_update")
    result = await run("audit", "verify", env={"REFUNDS_DATABASE_URL": postgres_dsn})
    assert result.returncode == 1
    assert f"TAMPERED: chain {case_id} " in result.stdout
