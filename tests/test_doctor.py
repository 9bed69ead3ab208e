"""`refunds doctor` and the Temporal connection settings it checks: envconfig profiles and
TEMPORAL_* variables (mTLS, API key), with explicit settings on top; the relay's /readyz,
which runs the same checks."""

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from temporalio.client import Client
from temporalio.service import TLSConfig

from adapters.config import Settings
from adapters.db import Store
from adapters.health import database_problem, temporal_problem
from adapters.temporal_client import connect, connect_options
from starters.cli.doctor import run_doctor
from starters.dev.stack import TemporalDevServer
from starters.ports import free_port
from tests.harness import APPROVAL_KEYS, PAYLOAD_KEYS, open_stack

REFUNDS = str(Path(sys.executable).parent / "refunds")


def _env(temporal_address: str, dsn: str) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("REFUNDS_", "TEMPORAL_"))}
    return {**clean, "TEMPORAL_ADDRESS": temporal_address, "REFUNDS_DATABASE_URL": dsn,
            "REFUNDS_PAYLOAD_KEYS": PAYLOAD_KEYS, "REFUNDS_SANDBOX_WEBHOOK_SECRET": "whsec-doctor",
            "REFUNDS_APPROVAL_KEYS": APPROVAL_KEYS}


def test_doctor_exits_0_on_a_healthy_stack_and_1_naming_an_unreachable_temporal(
        temporal_server: TemporalDevServer, postgres_dsn: str, store: Store) -> None:
    healthy = subprocess.run([REFUNDS, "doctor"], env=_env(temporal_server.address, postgres_dsn),
                             capture_output=True, text=True, timeout=60)
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert [line.split()[:2] for line in healthy.stdout.splitlines()] == [
        ["ok", "timeouts"], ["ok", "payloads"], ["ok", "approvals"], ["ok", "temporal"], ["ok", "postgres"],
        ["ok", "providers"]]

    nowhere = f"127.0.0.1:{free_port()}"
    broken = subprocess.run([REFUNDS, "doctor"], env=_env(nowhere, postgres_dsn),
                            capture_output=True, text=True, timeout=60)
    assert broken.returncode == 1, broken.stdout + broken.stderr
    assert f"FAIL  temporal   cannot reach Temporal at {nowhere}" in broken.stdout
    assert "ok    postgres" in broken.stdout


async def test_doctor_names_a_missing_namespace_keys_database_and_provider(
        temporal_server: TemporalDevServer) -> None:
    findings = await run_doctor(Settings(temporal_address=temporal_server.address,
                                         temporal_namespace="no-such-namespace"))
    detail = {f.check: (f.ok, f.detail) for f in findings}
    assert detail["payloads"] == (False, detail["payloads"][1])
    assert "REFUNDS_PAYLOAD_KEYS is not set" in detail["payloads"][1]
    assert detail["postgres"] == (False, "REFUNDS_DATABASE_URL is not set")
    assert detail["providers"][0] is False
    assert detail["approvals"] == (False, "REFUNDS_APPROVAL_KEYS is not set: the relay seals no approval "
                                          "and the worker counts none, so no case that needs a person can "
                                          "proceed")

    # a provider setting that cannot be read is one finding naming it, the others still made
    findings = await run_doctor(Settings(temporal_address=temporal_server.address,
                                         adyen_hmac_keys="not-hex"))
    detail = {f.check: (f.ok, f.detail) for f in findings}
    assert detail["providers"][0] is False and "REFUNDS_ADYEN_HMAC_KEYS" in detail["providers"][1]
    assert detail["postgres"] == (False, "REFUNDS_DATABASE_URL is not set")

    # a key that signs every merchant's events is named when no filter narrows it
    hmac = "AB" * 32
    findings = await run_doctor(Settings(temporal_address=temporal_server.address, adyen_hmac_keys=hmac))
    [providers] = [f for f in findings if f.check == "providers"]
    assert providers.ok and providers.detail == (
        "configured: adyen; adyen acts for every merchant account its HMAC key signs "
        "(REFUNDS_ADYEN_MERCHANT_ACCOUNTS unset)")
    findings = await run_doctor(Settings(temporal_address=temporal_server.address, adyen_hmac_keys=hmac,
                                         adyen_merchant_accounts="OURS"))
    assert [f.detail for f in findings if f.check == "providers"] == ["configured: adyen"]
    findings = await run_doctor(Settings(temporal_address=temporal_server.address, adyen_hmac_keys=hmac,
                                         adyen_merchant_accounts=" , "))  # read as no account: all
    assert [f.detail for f in findings if f.check == "providers"] == [providers.detail]

    findings = await run_doctor(Settings(temporal_address=temporal_server.address, payload_keys=PAYLOAD_KEYS,
                                         temporal_namespace="no-such-namespace"))
    [temporal] = [f for f in findings if f.check == "temporal"]
    assert not temporal.ok
    assert temporal.detail == (f"namespace 'no-such-namespace' does not exist at Temporal "
                               f"{temporal_server.address}")


def test_connection_comes_from_envconfig_with_mtls_and_api_key(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, content in {"ca.pem": b"CA", "client.pem": b"CERT", "client.key": b"KEY"}.items():
        (tmp_path / name).write_bytes(content)
    profile = tmp_path / "temporal.toml"
    profile.write_text(f"""
[profile.cloud]
address = "payments.a1b2c.tmprl.cloud:7233"
namespace = "payments.a1b2c"
[profile.cloud.tls]
server_ca_cert_path = "{tmp_path / 'ca.pem'}"
client_cert_path = "{tmp_path / 'client.pem'}"
client_key_path = "{tmp_path / 'client.key'}"
""")
    for var in [v for v in os.environ if v.startswith("TEMPORAL_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("TEMPORAL_CONFIG_FILE", str(profile))
    monkeypatch.setenv("TEMPORAL_PROFILE", "cloud")
    options = connect_options(Settings())
    assert options["target_host"] == "payments.a1b2c.tmprl.cloud:7233"
    assert options["namespace"] == "payments.a1b2c"
    tls = options["tls"]
    assert isinstance(tls, TLSConfig)
    assert (tls.server_root_ca_cert, tls.client_cert, tls.client_private_key) == (b"CA", b"CERT", b"KEY")

    monkeypatch.setenv("TEMPORAL_API_KEY", "key-from-env")
    explicit = connect_options(Settings(temporal_address="other:7233", temporal_namespace="refunds"))
    assert (explicit["target_host"], explicit["namespace"]) == ("other:7233", "refunds")
    assert explicit["api_key"] == "key-from-env"

    monkeypatch.setenv("TEMPORAL_TLS_CLIENT_CERT_PATH", str(tmp_path / "missing.pem"))
    with pytest.raises(FileNotFoundError):
        connect_options(Settings())


async def test_relay_readyz_is_200_when_healthy_and_503_logging_each_problem_it_does_not_show(
        temporal_server: TemporalDevServer, store: Store, client: Client,
        caplog: pytest.LogCaptureFixture) -> None:
    lost = await connect(Settings(temporal_address=temporal_server.address, payload_keys=PAYLOAD_KEYS,
                                  temporal_namespace="no-such-namespace"))
    for relay_client, status in ((client, 200), (lost, 503)):
        stack = await open_stack(store, relay_client, temporal_server.address, worker=False)
        try:
            async with httpx.AsyncClient(base_url=stack.relay_url) as http:
                answer = await http.get("/readyz")
        finally:
            await stack.close()
        assert answer.status_code == status, answer.text
    problem = f"namespace 'no-such-namespace' does not exist at Temporal {temporal_server.address}"
    assert answer.json() == {"status": "unready"}  # anyone may ask: no hosts, no users
    assert f"not ready: {problem}" in caplog.messages


async def test_readiness_rides_out_the_servers_connection_rotation(tmp_path: Path) -> None:
    """The server closes each connection at its max age (5 minutes in the dev server, 1 s here); a
    check caught in the switch used to answer CANCELLED, a 503 while Temporal was fine."""
    server = TemporalDevServer(tmp_path / "temporal.db", port=free_port(), ui_port=None, dynamic_config=(
        'frontend.keepAliveMaxConnectionAge="1s"', 'frontend.keepAliveMaxConnectionAgeGrace="1s"'))
    await server.start()
    problems: list[str | None] = []
    try:
        client = await Client.connect(server.address)
        loop = asyncio.get_running_loop()
        end = loop.time() + 8

        async def check_until_the_end() -> None:
            while loop.time() < end:
                problems.append(await temporal_problem(client))
                await asyncio.sleep(0.01)  # under the server's rate limit, which is not the point here

        await asyncio.gather(*(check_until_the_end() for _ in range(10)))
    finally:
        server.stop()
    # some five rotations under ten checkers: without retries, 7-9 in 15 s failed CANCELLED
    assert len(problems) > 1000
    assert {p for p in problems if p is not None} == set()
    # the retries stop at the check's bound: a server that is gone is named, not waited for
    assert await temporal_problem(client) == f"Temporal at {server.address} did not answer within 5 s"


async def test_readiness_names_a_database_that_does_not_answer_within_the_bound(
        store: Store, postgres_dsn: str) -> None:
    """The pool would wait 30 s for a connection; the check answers after its own 5 s."""
    one_connection = await Store.open(postgres_dsn, max_size=1)
    try:
        async with one_connection.database.transaction():  # held: the check finds no free connection
            assert await database_problem(one_connection) == (
                "PostgreSQL did not answer within 5 s (no free pooled connection, or the server is stuck)")
        assert await database_problem(one_connection) is None  # migrated by the `store` fixture
    finally:
        await one_connection.close()
