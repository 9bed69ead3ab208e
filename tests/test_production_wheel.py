"""The production wheel, built from what deploy/Dockerfile copies: it leaves the dev stack
(`starters/dev/`: embedded services, sandbox provider, demo) out, and installed on its own
`refunds relay` and `refunds worker` start and get ready, while `refunds dev` ends with one
line saying it needs the dev install."""

import os
import re
import secrets
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from adapters.db import Store
from starters.dev.stack import TemporalDevServer
from starters.ports import free_port
from tests.harness import APPROVAL_KEYS, PAYLOAD_KEYS, process_env, wait_until_ready

ROOT = Path(__file__).resolve().parent.parent
CLI = "from starters.cli import main; main()"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from a copy of what the Dockerfile copies, unpacked as pip installs it."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    copies = re.findall(r"^COPY (.+?) \./\S*$", (ROOT / "deploy" / "Dockerfile").read_text(), re.M)
    for name in (n for entry in copies for n in entry.split()):
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    str(source), "-w", str(tmp / "dist")], check=True, capture_output=True, timeout=120)
    [wheel] = (tmp / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp / "site")
    return tmp / "site"


def test_the_wheel_leaves_the_dev_stack_out(installed: Path) -> None:
    assert (installed / "starters" / "relay" / "app.py").is_file()
    assert (installed / "starters" / "console" / "templates" / "case.html").is_file()
    assert (installed / "starters" / "console" / "static" / "console.css").is_file()
    assert (installed / "starters" / "cli" / "parser.py").is_file()
    assert not (installed / "starters" / "dev").exists()


def installed_alone(site: Path, *args: str) -> tuple[list[str], dict[str, str]]:
    """`refunds <args>` from the unpacked wheel and the dependencies only: `-S` skips the
    .pth files, so the development install's finder cannot lend this checkout's modules
    (starters.dev among them) to the wheel's packages."""
    libraries = dict.fromkeys([str(site), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    return [sys.executable, "-S", "-c", CLI, *args], {"PYTHONPATH": os.pathsep.join(libraries)}


@contextmanager
def production(command: str, site: Path, env: dict[str, str],
               log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`refunds <command>` from the unpacked wheel alone (not this checkout)."""
    argv, path = installed_alone(site, command)
    with log.open("wb") as out:
        process = subprocess.Popen(argv, cwd=site.parent, env={**env, **path}, stdout=out,
                                   stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        process.kill()
        process.wait()


async def test_relay_and_worker_start_from_the_wheel_and_dev_asks_for_the_dev_install(
        installed: Path, store: Store, postgres_dsn: str, temporal_server: TemporalDevServer,
        tmp_path: Path) -> None:
    relay_port, health_port = free_port(), free_port()
    env = process_env(
        REFUNDS_DATABASE_URL=postgres_dsn, TEMPORAL_ADDRESS=temporal_server.address,
        REFUNDS_PAYLOAD_KEYS=PAYLOAD_KEYS, REFUNDS_APPROVAL_KEYS=APPROVAL_KEYS,
        REFUNDS_TASK_QUEUE=f"tq-{secrets.token_hex(5)}", REFUNDS_RELAY_PORT=str(relay_port),
        REFUNDS_WORKER_HEALTH_PORT=str(health_port), REFUNDS_TEMPORAL_METRICS_PORT="0",
        REFUNDS_RECONCILIATION_INTERVAL_SECONDS="0")
    with production("relay", installed, env, tmp_path / "relay.log") as relay:
        await wait_until_ready(f"http://127.0.0.1:{relay_port}", relay)
    with production("worker", installed, env, tmp_path / "worker.log") as worker:
        await wait_until_ready(f"http://127.0.0.1:{health_port}", worker)

    argv, path = installed_alone(installed, "dev", "--no-demo")
    dev = subprocess.run(argv, cwd=installed.parent, env={**env, **path}, capture_output=True, text=True,
                         timeout=60)
    assert dev.returncode == 3, dev.stderr
    assert "`refunds dev` needs the dev stack, which only a development install" in dev.stderr
    assert "Traceback" not in dev.stderr
