"""A per-test stack on the session's real Temporal and PostgreSQL: its own task queue,
sandbox provider, relay and in-process worker, plus helpers to drive and inspect them."""

import asyncio
import contextlib
import dataclasses
import os
import secrets
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg
from google.protobuf.any_pb2 import Any as AnyProto
from google.protobuf.message import Message
from psycopg.conninfo import make_conninfo
from temporalio.api.common.v1 import GrpcStatus
from temporalio.api.errordetails.v1 import WorkflowNotReadyFailure
from temporalio.client import (
    Client,
    Interceptor,
    OutboundInterceptor,
    SignalWorkflowInput,
    StartWorkflowUpdateInput,
)
from temporalio.converter import PayloadConverter
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import Worker

from adapters.approval_seal import SEAL_HEADER, ApprovalKeys, NewsSealing
from adapters.codec import generate_key_spec
from adapters.config import Settings
from adapters.db import CaseCreation, Store
from adapters.db.rows import CaseRow
from adapters.http_server import AppServer, reserve_port
from adapters.policy_file import load_policy
from adapters.providers.base import ProviderAdapter
from adapters.providers.registry import build_providers, close_providers
from adapters.temporal_client import connect
from adapters.tls import client_tls
from domain.models import (
    ApprovalSignal,
    CaseEventInput,
    CaseWrites,
    CaseWritten,
    EventKind,
    ProviderEvent,
    ProviderRefundStatus,
    RefundRequest,
)
from starters import relay
from starters.actions.starting import start_refund
from starters.dev import sandbox_provider
from starters.dev.stack import TemporalDevServer
from starters.ports import free_port
from workers.main import build_worker
from workers.outbox import pool_dispatcher

# One throwaway payload key per test session: the session client, every stack's settings
# and the subprocess workers tests start all encrypt with it.
PAYLOAD_KEYS = generate_key_spec("test")
# Approval keys of every stack's relay and worker (the session client holds none: what it
# sends is what an outsider with Temporal access sends). Fixed, so recorded histories with
# sealed approvals replay in any session.
APPROVAL_KEYS = "test-approval-key-not-secret"


class FixedSeal(Interceptor):
    """A client interceptor that sends every signal with one seal: what someone who captured
    a genuine seal (and holds Temporal write access) replays, or a verdict the relay sealed
    long ago (a worker away past the seal's window)."""

    def __init__(self, seal: str) -> None:
        self.header = PayloadConverter.default.to_payloads([seal])[0]

    def intercept_client(self, next: OutboundInterceptor) -> OutboundInterceptor:
        header = self.header

        class Sealing(OutboundInterceptor):
            async def signal_workflow(self, input: SignalWorkflowInput) -> None:
                await super().signal_workflow(dataclasses.replace(
                    input, headers={**input.headers, SEAL_HEADER: header}))

        return Sealing(next)


def with_seal(client: Client, seal: str) -> Client:
    """`client`, its signals sent with `seal`."""
    config = client.config()
    config["interceptors"] = [*config["interceptors"], FixedSeal(seal)]
    return Client(**config)


async def sealed_signal(client: Client, case_id: str, verdict: ApprovalSignal, *,
                        issued_at: datetime) -> None:
    """`verdict` signalled to the case's workflow as the relay would seal it at `issued_at`
    (with the tests' approval key, for the case's run chain)."""
    chain = (await client.get_workflow_handle(case_id).describe()).run_id
    seal = ApprovalKeys([APPROVAL_KEYS]).seal(case_id, verdict, chain=chain, now=issued_at)
    await with_seal(client, seal).get_workflow_handle(case_id).signal("approve", verdict)


@dataclass
class Stack:
    """Everything one test talks to."""

    settings: Settings
    store: Store
    client: Client
    relay_url: str
    sandbox_url: str
    tokens: dict[str, str]
    providers: dict[str, ProviderAdapter]
    _cleanup: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    worker: Worker | None = None

    def api(self, user: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.relay_url, timeout=30, verify=client_tls(),
                                 headers={"Authorization": f"Bearer {self.tokens[user]}"})

    def sandbox(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.sandbox_url, timeout=60, verify=client_tls())

    def new_id(self, prefix: str = "rr") -> str:
        return f"{prefix}-{uuid.uuid4().hex[:12]}"

    async def charge(self, amount: int, currency: str = "USD", merchant: str = "acct_1") -> str:
        async with self.sandbox() as sb:
            response = await sb.post("/v1/charges", json={"amount": amount, "currency": currency,
                                                          "merchant_account": merchant})
            response.raise_for_status()
            return str(response.json()["id"])

    async def provider_refunds(self, charge_id: str) -> list[dict[str, Any]]:
        """Every refund the sandbox holds on the charge, page after page (the checker's
        truth: a refund past the first page is still money moved)."""
        refunds: list[dict[str, Any]] = []
        async with self.sandbox() as sb:
            while True:
                response = await sb.get("/v1/refunds", params={
                    "charge": charge_id, **({"starting_after": refunds[-1]["id"]} if refunds else {})})
                response.raise_for_status()
                page = response.json()
                refunds += page["data"]
                if not page["has_more"] or not page["data"]:
                    return refunds

    def refund_body(self, charge_id: str, amount: int, **overrides: Any) -> dict[str, Any]:
        body: dict[str, Any] = {
            "refund_request_id": self.new_id(), "provider": "sandbox", "charge_id": charge_id,
            "amount": amount, "currency": "USD", "merchant_account": "acct_1",
            "reason": "requested_by_customer", "evidence": {"order_id": "ord-1"}}
        body.update(overrides)
        return body

    async def set_provider_status(self, refund_id: str, status: str, *, failure_reason: str | None = None,
                                  send_webhook: bool = True) -> None:
        """Moves a refund at the sandbox provider, as the provider would on its own."""
        async with self.sandbox() as sb:
            response = await sb.post(f"/_sandbox/refunds/{refund_id}/status",
                                     json={"status": status, "failure_reason": failure_reason,
                                           "send_webhook": send_webhook})
            response.raise_for_status()

    async def request_refund(self, user: str, charge_id: str, amount: int, **overrides: Any) -> str:
        """Posts a refund request and returns its id (asserting the 202)."""
        body = self.refund_body(charge_id, amount, **overrides)
        async with self.api(user) as api:
            response = await api.post("/v1/refund-requests", json=body)
        assert response.status_code == 202, response.text
        return str(body["refund_request_id"])

    async def made_elsewhere(self, charge_id: str, case_id: str, *amounts: int) -> list[str]:
        """Refunds of `amounts` already at the sandbox under the case's reference (its
        idempotency keys ignored, their webhooks held), with the case's own create set to
        get no answer: only its verify-state lookup can find them. Their ids."""
        async with self.sandbox() as sb:
            (await sb.post("/_sandbox/config", json={"hold_webhooks": True})).raise_for_status()
            made = [(await sb.post("/v1/refunds", json={"charge": charge_id, "amount": amount, "metadata": {
                "refund_request_id": case_id}})).json()["id"] for amount in amounts]
            fault = {"mode": "error_before", "charge": charge_id}
            (await sb.post("/_sandbox/faults", json=fault)).raise_for_status()
        return [str(m) for m in made]

    async def open_case(self, user: str, charge_id: str, amount: int, **internal: Any) -> str:
        """Opens a case the way a server-side channel does (e.g. a ticket naming its opener
        as a trigger identity): fields the public API refuses come from `internal`."""
        body = {**self.refund_body(charge_id, amount), **internal}
        request = RefundRequest.model_validate(body)
        outcome, row = await self.store.cases.create(request, user)
        assert outcome is CaseCreation.CREATED, outcome
        await start_refund(self.client, self.settings, request, row["requester"], row["status"])
        return request.refund_request_id

    async def actions(self, case_id: str) -> list[str]:
        return [e["action"] for e in await self.store.audit.trail(case_id)]

    async def wait_for_status(self, case_id: str, *statuses: str, timeout: float = 60) -> CaseRow:
        """Polls the case row (what every API reader sees) until it reaches a status."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            row = await self.store.cases.get(case_id)
            if row is not None and row["status"] in statuses:
                return row
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{case_id} stuck in {row['status'] if row else None}, "
                                     f"wanted {statuses}")
            await asyncio.sleep(0.1)

    async def wait_for_audit(self, case_id: str, action: str, timeout: float = 60,
                             count: int = 1) -> list[str]:
        """Polls the case's audit trail until `action` appears (`count` times); returns the
        trail's actions."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            actions = [e["action"] for e in await self.store.audit.trail(case_id)]
            if actions.count(action) >= count:
                return actions
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"{case_id} never recorded {action}: {actions}")
            await asyncio.sleep(0.1)

    async def wait_for_signalled(self, case_id: str, timeout: float = 60) -> None:
        """Polls until a provider webhook was signalled to the case's workflow (its receipt
        marked processed for it)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not await self.store.database.fetch_one(
                "SELECT 1 FROM webhook_receipts WHERE workflow_id = %s AND processed_at IS NOT NULL",
                (case_id,)):
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"no webhook signalled to {case_id}")
            await asyncio.sleep(0.1)

    async def start_worker(self) -> Worker:
        worker = build_worker(self.client, self.settings.task_queue, self.store, self.providers,
                              load_policy(self.settings.policy_file), settings=self.settings)
        self.worker = worker
        task = asyncio.create_task(worker.run())
        dispatching = AsyncExitStack()  # the worker pool's notice dispatcher, as `refunds worker` runs it
        await dispatching.enter_async_context(pool_dispatcher(self.store, self.settings))

        async def stop() -> None:
            await dispatching.aclose()
            if not task.done():
                await worker.shutdown()
            await task

        self._cleanup.append(stop)
        return worker

    async def close(self) -> None:
        for step in reversed(self._cleanup):
            await step()


async def open_stack(store: Store, client: Client, temporal_address: str, *, worker: bool = True,
                     **overrides: Any) -> Stack:
    """Starts sandbox + relay on free loopback ports and, unless told not to, a worker."""
    secret = secrets.token_hex(16)
    # the stack's own reports folder goes with it; one the test passed in is the test's
    reports = None if "reports_dir" in overrides else tempfile.mkdtemp(prefix="refunds-reports-")
    relay_sock, sandbox_sock = reserve_port("127.0.0.1"), reserve_port("127.0.0.1")
    relay_port, sandbox_port = relay_sock.getsockname()[1], sandbox_sock.getsockname()[1]
    values: dict[str, Any] = {
        "task_queue": f"tq-{uuid.uuid4().hex[:10]}", "relay_port": relay_port,
        "sandbox_port": sandbox_port, "sandbox_webhook_secret": secret, "notice_dispatch_seconds": 0.2,
        "temporal_address": temporal_address, "approval_timeout_seconds": 60,
        "submit_timeout_seconds": 5, "status_poll_interval_seconds": 2,
        "late_failure_window_seconds": 2, "provider_http_timeout_seconds": 2,
        "resubmit_margin_seconds": 1,
        "payload_keys": PAYLOAD_KEYS, "reports_dir": reports,
        "approval_keys": APPROVAL_KEYS,
        "console_secure_cookie": False,
        # Test stacks share one database: a stack re-drives only when its test asks it to.
        "webhook_redrive_interval_seconds": 0,
    }
    values.update(overrides)
    settings = Settings(**values)
    providers = build_providers(settings, store)
    sandbox_app = sandbox_provider.create_app(
        webhook_url=f"{settings.relay_base_url()}/webhooks/sandbox", webhook_secret=secret)
    relay_app = relay.create_app(store, client, providers, settings)
    sandbox_server = AppServer(sandbox_app, settings.bind_host, sandbox_port, sock=sandbox_sock)
    relay_server = AppServer(relay_app, settings.bind_host, relay_port, sock=relay_sock)
    await sandbox_server.start()
    await relay_server.start()
    tokens = {}
    for user, roles in {"alice": ["requester"], "bob": ["approver"], "carol": ["approver"],
                        "dave": ["auditor"], "admin": ["admin"], "frank": ["finance_manager"],
                        "olga": ["ops"]}.items():
        tokens[user] = await store.access.create_token(user, roles, token=f"t-{user}-{uuid.uuid4().hex}",
                                                       by="test")
    stack = Stack(settings=settings, store=store, client=client, relay_url=relay_server.url,
                  sandbox_url=sandbox_server.url, tokens=tokens, providers=providers)

    async def close_servers() -> None:
        await relay_server.stop()
        await sandbox_server.stop()
        await close_providers(providers)
        if reports is not None:
            shutil.rmtree(reports, ignore_errors=True)

    stack._cleanup.append(close_servers)
    if worker:
        await stack.start_worker()
    return stack


def process_env(**values: str) -> dict[str, str]:
    """A subprocess's environment as production gives it: this process's minus every
    REFUNDS_/TEMPORAL_ variable, plus `values` (the product reads nothing else)."""
    kept = {k: v for k, v in os.environ.items() if not k.startswith(("REFUNDS_", "TEMPORAL_"))}
    return {**kept, **values}


async def wait_until_ready(url: str, process: subprocess.Popen[bytes]) -> None:
    """Polls `url`/readyz until it answers 200 from a port the process listens on (a port
    picked free can be taken by another server before the process binds it: that one's
    answer is not ours); fails at once if the process exits."""
    port = httpx.URL(url).port
    async with httpx.AsyncClient() as http:
        for _ in range(600):
            assert process.poll() is None, f"process exited ({process.returncode}) while starting"
            try:
                if listens_on(process, port) and (await http.get(f"{url}/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"{url} never became ready")


def listens_on(process: subprocess.Popen[bytes], port: int | None) -> bool:
    """Whether the process has a TCP socket listening on `port`."""
    with contextlib.suppress(psutil.NoSuchProcess):
        return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port
                   for c in psutil.Process(process.pid).net_connections("tcp"))
    return False


async def create_database_roles(postgres_dsn: str) -> tuple[str, str]:
    """A fresh database owned by a schema-owner role, and a runtime role with no rights yet
    (as deploy/README.md has an administrator create them); returns (owner DSN, runtime DSN)."""
    suffix = uuid.uuid4().hex[:8]
    owner, runtime, database = f"refunds_owner_{suffix}", f"refunds_app_{suffix}", f"refunds_{suffix}"
    async with await psycopg.AsyncConnection.connect(postgres_dsn, autocommit=True) as admin:
        await admin.execute(f"CREATE ROLE {owner} LOGIN PASSWORD 'owner-pw'")
        await admin.execute(f"CREATE ROLE {runtime} LOGIN PASSWORD 'app-pw'")
        await admin.execute(f"CREATE DATABASE {database} OWNER {owner}")
    return (make_conninfo(postgres_dsn, user=owner, password="owner-pw", dbname=database),
            make_conninfo(postgres_dsn, user=runtime, password="app-pw", dbname=database))


def foreign_refund_event(provider: str, case_id: str, charge_id: str, amount: int,
                         currency: str) -> ProviderEvent:
    """A succeeded refund event from `provider` naming `case_id` by our reference, with a
    refund id the case never made: what a case of another provider must ignore (signalled
    straight to its workflow, as the relay never would)."""
    return ProviderEvent(
        provider=provider, event_id=f"evt_{uuid.uuid4().hex[:12]}", event_type="refund.updated",
        kind=EventKind.REFUND_STATUS, body_sha256="0" * 64, occurred_at=datetime.now(UTC),
        refund_id="re_foreign", charge_id=charge_id, refund_request_id=case_id, amount=amount,
        currency=currency, status=ProviderRefundStatus.SUCCEEDED, raw_status="succeeded")


def intercepted(client: Client, interceptor: Interceptor) -> Client:
    """The same connection with one more client interceptor (an outage, a counter)."""
    config = client.config()
    config["interceptors"] = [*config["interceptors"], interceptor]
    return Client(**config)


WORKFLOW_TASK_FAILED = ("Unable to perform workflow execution update due to unexpected workflow task "
                        "failure.")
"""Temporal's refusal of an update whose workflow task it failed (WorkflowNotReady): the
update was dropped, never taken. Seen in CI as a deny raced the deciding approval."""


def any_of(detail: Message) -> AnyProto:
    packed = AnyProto()
    packed.Pack(detail)
    return packed


NOT_READY = GrpcStatus(code=RPCStatusCode.FAILED_PRECONDITION, message=WORKFLOW_TASK_FAILED,
                       details=[any_of(WorkflowNotReadyFailure())]).SerializeToString()
"""That refusal's gRPC status as the server sends it: FAILED_PRECONDITION, WorkflowNotReady."""


class UpdatesAborted(Interceptor):
    """A relay whose first `times` verdict updates to workflow `to` Temporal aborts as it
    fails their workflow task (the race of CI's 500), before any worker sees them."""

    def __init__(self, times: int) -> None:
        self.times = times
        self.to: str | None = None
        self.aborted = 0

    def intercept_client(self, next: OutboundInterceptor) -> OutboundInterceptor:
        outer = self

        class Aborting(OutboundInterceptor):
            async def start_workflow_update(self, input: StartWorkflowUpdateInput) -> Any:
                if input.id == outer.to and outer.aborted < outer.times:
                    outer.aborted += 1
                    raise RPCError(WORKFLOW_TASK_FAILED, RPCStatusCode.FAILED_PRECONDITION, NOT_READY)
                return await super().start_workflow_update(input)

        return Aborting(next)


def unsealing(client: Client) -> Client:
    """The same connection without the news seal: a caller straight to Temporal (its UI or
    CLI) who holds no key."""
    config = client.config()
    config["interceptors"] = [i for i in config["interceptors"] if not isinstance(i, NewsSealing)]
    return Client(**config)


@contextlib.contextmanager
def write_held(store: Store, action: str) -> Iterator[asyncio.Event]:
    """The first case write recording `action` is held (30 s, or until its workflow's cancel
    cuts it short): the event is set once it is, for a test to cancel the case meanwhile."""
    write, held = store.cases.write_case_steps, asyncio.Event()

    async def held_once(steps: CaseWrites, step_key: str | None = None, **options: Any) -> CaseWritten:
        if not held.is_set() and any(w.event is not None and w.event.action == action for w in steps.writes):
            held.set()
            await asyncio.sleep(30)
        return await write(steps, step_key, **options)

    store.cases.write_case_steps = held_once  # type: ignore[method-assign]
    try:
        yield held
    finally:
        store.cases.write_case_steps = write  # type: ignore[method-assign]


@asynccontextmanager
async def stack_with(store: Store, client: Client, temporal_address: str,
                     **overrides: Any) -> AsyncIterator[Stack]:
    """A stack with these settings for one test, closed after it."""
    opened = await open_stack(store, client, temporal_address, **overrides)
    try:
        yield opened
    finally:
        await opened.close()


@asynccontextmanager
async def own_temporal(folder: Path) -> AsyncIterator[tuple[TemporalDevServer, Client]]:
    """A Temporal dev server for one test that restarts it, with the product's client."""
    server = TemporalDevServer(folder / "temporal.db", port=free_port(), ui_port=None)
    await server.start()
    try:
        yield server, await connect(Settings(temporal_address=server.address, payload_keys=PAYLOAD_KEYS,
                                             approval_keys=APPROVAL_KEYS))
    finally:
        server.stop()


async def pending_verdict_stack(scope: AsyncExitStack, store: Store, client: Client,
                                server: TemporalDevServer, folder: Path, *,
                                own_temporal_server: bool) -> tuple[Stack, TemporalDevServer]:
    """A stack whose approvers hear `verdict_pending` after 1 s and whose approvals never
    expire (a loaded stop and restart outlasts none), on a Temporal of its own when the test
    restarts it; closed with `scope`. Returns the stack and its Temporal server."""
    temporal = client
    if own_temporal_server:
        server, temporal = await scope.enter_async_context(own_temporal(folder))
    stack = await open_stack(store, temporal, server.address, approval_answer_seconds=1,
                             approval_timeout_seconds=3600)
    scope.push_async_callback(stack.close)
    return stack, server


@asynccontextmanager
async def holding_records_of(stack: Stack, action: str) -> AsyncIterator[tuple[asyncio.Event, asyncio.Event]]:
    """Holds the recording of a case event `action` while the block runs: (set to release
    it, set once it waits)."""
    cases = stack.store.cases
    record, release, held = cases.record_event, asyncio.Event(), asyncio.Event()

    async def held_record(inp: CaseEventInput, step_key: str | None = None, **options: Any) -> None:
        if inp.action == action:
            held.set()
            await release.wait()
        await record(inp, step_key, **options)

    cases.record_event = held_record  # type: ignore[method-assign,assignment]
    try:
        yield release, held
    finally:
        cases.record_event = record  # type: ignore[method-assign]


async def window_passed(stack: Stack, case_id: str) -> None:
    """Waits until the run's late-failure watch timed out and a worker took it (a workflow
    task completed after the timer fired): an event signalled from then on comes after the
    watch, not with the timer in one task that the watch itself would read."""
    handle = stack.client.get_workflow_handle(case_id)
    for _ in range(600):
        events = (await handle.fetch_history()).events
        fired = [e.event_id for e in events if e.HasField("timer_fired_event_attributes")]
        if fired and any(e.event_id > fired[0] and e.HasField("workflow_task_completed_event_attributes")
                         for e in events):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{case_id}'s late-failure watch never timed out")
