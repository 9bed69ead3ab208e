"""A run that continued as new has its carried case before any handler runs (`@workflow.init`):
an update or signal that reaches the new run with its very first activation is judged against
the case, not the fresh run's empty state. Before, a reissue request right after a payout case
continued as new was refused ("case is opening") and a late approval to a continued refund
reached a round nobody reads."""

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import httpx
from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.enums.v1 import UpdateWorkflowExecutionLifecycleStage
from temporalio.api.update.v1 import UpdateRef, WaitPolicy
from temporalio.api.workflowservice.v1 import PollWorkflowExecutionUpdateRequest
from temporalio.client import Client, Interceptor, OutboundInterceptor, StartWorkflowUpdateInput
from temporalio.service import RPCError, RPCStatusCode
from temporalio.worker import (
    CustomSlotSupplier,
    FixedSizeSlotSupplier,
    SlotMarkUsedContext,
    SlotPermit,
    SlotReleaseContext,
    SlotReserveContext,
    Worker,
    WorkerTuner,
)

from adapters.approval_seal import ApprovalKeys, sealing_client
from adapters.db import Store
from adapters.policy_file import load_policy
from domain.models import (
    ApprovalSignal,
    Decision,
    EventKind,
    ProviderEvent,
    ProviderRefundStatus,
    RefundOutcome,
)
from domain.payouts import PayoutEvent, ProviderPayout, ProviderPayoutStatus
from starters.dev.stack import TemporalDevServer
from tests.harness import APPROVAL_KEYS, Stack, open_stack
from tests.payouts_kit import ask_reissue
from tests.test_bounded_history import THRESHOLD
from tests.test_payout_bounded_history import TINY, _remediated
from workers.main import build_worker
from workflows.payout import PayoutReversalWorkflow
from workflows.refund import RefundWorkflow


class StepGate(CustomSlotSupplier):
    """Workflow task slots handed out one at a time, each only after the test has looked at
    the server (`look`): so a run's first task is not polled before the test acts on it. Until
    `open`, at most one poll is out."""

    def __init__(self, look: Callable[[], Awaitable[bool]]) -> None:
        self._look = look
        self._loop = asyncio.get_running_loop()
        self._permits = asyncio.Semaphore(0)
        self._released = asyncio.Event()
        self._open = False

    async def reserve_slot(self, ctx: SlotReserveContext) -> SlotPermit:
        if not self._open:
            await self._permits.acquire()
        return SlotPermit()

    def try_reserve_slot(self, ctx: SlotReserveContext) -> SlotPermit | None:
        return SlotPermit() if self._open else None

    def mark_slot_used(self, ctx: SlotMarkUsedContext) -> None:
        pass

    def release_slot(self, ctx: SlotReleaseContext) -> None:
        self._loop.call_soon_threadsafe(self._released.set)

    async def step(self) -> None:
        """One poll at a time until `look` says it acted; then every poll at once."""
        while not await self._look():
            self._released.clear()
            self._permits.release()
            await self._released.wait()
        self._open = True
        self._permits.release()


@contextlib.asynccontextmanager
async def stepped_worker(stack: Stack, look: Callable[[], Awaitable[bool]]) -> AsyncIterator[None]:
    """The product's worker, its workflow tasks stepped by a `StepGate` (no sticky cache, so
    every task is polled from the task queue the gate controls)."""
    gate = StepGate(look)
    built = build_worker(stack.client, f"{stack.settings.task_queue}-template", stack.store, stack.providers,
                         load_policy(stack.settings.policy_file), settings=stack.settings)  # never run
    fixed = FixedSizeSlotSupplier(100)
    config = built.config()
    config["task_queue"] = stack.settings.task_queue
    config["max_cached_workflows"] = 0
    config["tuner"] = WorkerTuner.create_composite(
        workflow_supplier=gate, activity_supplier=fixed, local_activity_supplier=fixed, nexus_supplier=fixed)
    worker = Worker(**config)
    running = asyncio.create_task(worker.run())
    stepping = asyncio.create_task(gate.step())
    try:
        yield
    finally:
        stepping.cancel()
        await worker.shutdown()
        await running


class Continued:
    """What `look` watches: the case's workflow, until it shows a second run; then `act`."""

    def __init__(self, client: Client, act: Callable[[str], Awaitable[None]]) -> None:
        self.client, self.act = client, act
        self.case_id: str | None = None
        self.first_run: str | None = None

    async def look(self) -> bool:
        if self.case_id is None:
            return False
        try:
            run_id = (await self.client.get_workflow_handle(self.case_id).describe()).run_id
        except RPCError as err:
            if err.status is RPCStatusCode.NOT_FOUND:
                return False
            raise
        if self.first_run is None or run_id == self.first_run:
            self.first_run = self.first_run or run_id
            return False
        await self.act(self.case_id)  # the new run's first task is not polled yet
        return True


class UpdateIds(Interceptor):
    """Names every update the relay sends, so the test can see when the server has it."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    def intercept_client(self, next: OutboundInterceptor) -> OutboundInterceptor:
        return _NamingUpdates(next, self.ids)


class _NamingUpdates(OutboundInterceptor):
    def __init__(self, next: OutboundInterceptor, ids: list[str]) -> None:
        super().__init__(next)
        self._ids = ids

    async def start_workflow_update(self, input: StartWorkflowUpdateInput) -> Any:
        input.update_id = input.update_id or str(uuid.uuid4())
        self._ids.append(input.update_id)
        return await super().start_workflow_update(input)


ADMITTED_POLL = PollWorkflowExecutionUpdateRequest
ADMITTED = UpdateWorkflowExecutionLifecycleStage.UPDATE_WORKFLOW_EXECUTION_LIFECYCLE_STAGE_ADMITTED


async def admitted(client: Client, workflow_id: str, ids: list[str]) -> None:
    """Returns once the server holds an update named in `ids` for `workflow_id`."""
    while True:
        for update_id in ids:
            try:
                await client.workflow_service.poll_workflow_execution_update(ADMITTED_POLL(
                    namespace=client.namespace, identity="test", update_ref=UpdateRef(
                        workflow_execution=WorkflowExecution(workflow_id=workflow_id), update_id=update_id),
                    wait_policy=WaitPolicy(lifecycle_stage=ADMITTED)))
                return
            except RPCError as err:
                if err.status is not RPCStatusCode.NOT_FOUND:
                    raise
        await asyncio.sleep(0.01)


async def _stale_payout_events(stack: Stack, case_id: str, provider_payout_id: str) -> None:
    """`paid` after the failure, one after another: each a turn of the reissue window."""
    handle = stack.client.get_workflow_handle(case_id)
    for n in range(10_000):
        await handle.signal(PayoutReversalWorkflow.payout_event, PayoutEvent(
            provider="sandbox", event_id=f"evt-paid-{n}", event_type="payout.paid",
            body_sha256="0" * 64, occurred_at=datetime.now(UTC), payout=ProviderPayout(
                provider="sandbox", payout_id=provider_payout_id, amount=150_000, currency="usd",
                status=ProviderPayoutStatus.PAID, raw_status="paid")))


async def test_a_reissue_request_right_after_continue_as_new_is_taken(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    updates = UpdateIds()
    config = client.config()
    config["interceptors"] = [*config["interceptors"], updates]
    named = Client(**config)
    tiny = await open_stack(store, named, temporal_server.address, worker=False, **TINY)
    asked: list[asyncio.Task[httpx.Response]] = []
    sent = asyncio.Event()

    async def ask(case_id: str) -> None:
        updates.ids.clear()
        asked.append(asyncio.create_task(ask_reissue(tiny, "omar", case_id)))
        await admitted(client, case_id, updates.ids)
        sent.set()

    watch = Continued(client, ask)
    try:
        async with stepped_worker(tiny, watch.look):
            watch.case_id, provider_payout_id = await _remediated(tiny)
            feed = asyncio.create_task(_stale_payout_events(tiny, watch.case_id, provider_payout_id))
            await sent.wait()
            feed.cancel()
            answer = await asked[0]
            state = await tiny.client.get_workflow_handle(watch.case_id).query(PayoutReversalWorkflow.state)
            actions = [e["action"] for e in await tiny.store.audit.trail(watch.case_id)]
    finally:
        await tiny.close()
    assert answer.status_code == 202, answer.text
    assert state.status == "awaiting_reissue_approval"
    assert "reissue_refused" not in actions


async def _pending_refund_events(stack: Stack, case_id: str, refund_id: str, charge: str) -> None:
    """The provider saying "still pending", one after another: each a turn of the follow loop."""
    handle = stack.client.get_workflow_handle(case_id)
    for n in range(10_000):
        await handle.signal(RefundWorkflow.provider_event, ProviderEvent(
            provider="sandbox", event_id=f"evt-pending-{n}", event_type="refund.updated",
            kind=EventKind.REFUND_STATUS, body_sha256="0" * 64, occurred_at=datetime.now(UTC),
            refund_id=refund_id, charge_id=charge, refund_request_id=case_id, amount=9_000,
            currency="USD", status=ProviderRefundStatus.PENDING, raw_status="pending"))


async def test_a_late_approval_right_after_continue_as_new_is_refused_as_decided(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    tiny = await open_stack(store, client, temporal_server.address, worker=False,
                            status_poll_interval_seconds=0.01, continue_as_new_after_events=THRESHOLD)
    relay = sealing_client(client, ApprovalKeys([APPROVAL_KEYS]))  # sealed, as the relay sends it
    sent = asyncio.Event()

    async def approve_late(case_id: str) -> None:
        await relay.get_workflow_handle(case_id).signal(RefundWorkflow.approve, ApprovalSignal(
            approver="carol", roles=("approver",), decision=Decision.APPROVE, reason="late"))
        sent.set()

    watch = Continued(client, approve_late)
    try:
        async with stepped_worker(tiny, watch.look):
            async with tiny.sandbox() as sb:
                configured = await sb.post("/_sandbox/config", json={"refund_initial_status": "pending"})
                configured.raise_for_status()
            charge = await tiny.charge(20_000)
            watch.case_id = await tiny.request_refund("alice", charge, 9_000)
            await tiny.wait_for_status(watch.case_id, "awaiting_approval")
            async with tiny.api("bob") as api:
                assert (await api.post(f"/v1/refund-requests/{watch.case_id}/approvals",
                                       json={"decision": "approve", "reason": "ok"})).status_code == 202
            await tiny.wait_for_status(watch.case_id, "pending")
            [refund] = await tiny.provider_refunds(charge)
            feed = asyncio.create_task(_pending_refund_events(tiny, watch.case_id, refund["id"], charge))
            await sent.wait()
            feed.cancel()
            await tiny.set_provider_status(refund["id"], "succeeded")
            outcome = await asyncio.wait_for(
                tiny.client.get_workflow_handle(watch.case_id, result_type=RefundOutcome).result(), 60)
            trail = await tiny.store.audit.trail(watch.case_id)
    finally:
        await tiny.close()
    refused = [e["detail"]["refusal"] for e in trail if e["action"] == "approval_refused"]
    assert len(refused) == 1 and refused[0].startswith("already decided"), refused
    assert [a.approver for a in outcome.state.approvals] == ["bob"]
    assert [a.approver for a in outcome.state.refused_approvals] == ["carol"]
