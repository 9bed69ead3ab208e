"""The relay's reconciliation routes: start or resume a backfill, read runs and their
reports (ops, auditors, admins), read a break, approve or deny its exception case
(approvers, by the refund tiers and segregation-of-duties rules), and reopen a dismissed
or expired one (ops)."""

from collections.abc import Awaitable, Callable, Mapping
from contextlib import suppress
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Response
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field
from temporalio.client import Client, WorkflowFailureError, WorkflowUpdateFailedError
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.service import RPCError

from adapters.config import Settings
from adapters.providers.base import ProviderAdapter, RefundLister
from adapters.reconciliation import NotReopenable, Reconciliations, break_case, break_view, run_view
from adapters.store import Principal, Store
from domain.errors import ALREADY_DECIDED, NOT_AWAITING_APPROVAL
from domain.models import APPROVER_ROLES, ApprovalSignal, Decision
from domain.reconciliation import BreakState, ReconcileInput, RunKind, break_workflow_id
from starters.approving import Refused, refusal
from workflows.reconciliation import ReconciliationBreakWorkflow, ReconciliationWorkflow

READ_ROLES = frozenset({"auditor", "ops", "admin"})
RUN_ROLES = frozenset({"ops", "admin"})
REPORT_BREAKS = 500
"""Breaks listed inline in a run's page; the CSV report has them all."""

Require = Callable[[Principal, frozenset[str], str], Awaitable[None]]


class BackfillBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    provider: str = Field(min_length=1, max_length=64)
    since: AwareDatetime
    until: AwareDatetime | None = None


class BreakDecisionBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    decision: Decision
    reason: str = Field(default="", max_length=2000)


class BreakReopenBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(min_length=1, max_length=2000, description="why the decision is taken back")


def install_reconciliation_api(app: FastAPI, store: Store, client: Client,
                               providers: Mapping[str, ProviderAdapter], settings: Settings,
                               principal: Callable[..., Awaitable[Principal]], require: Require) -> None:
    """Adds the routes to the relay, with its authentication and role check."""
    recon = Reconciliations(store)
    Caller = Annotated[Principal, Depends(principal)]

    @app.post("/v1/reconciliation/runs", status_code=202)
    async def start_backfill(body: BackfillBody, caller: Caller, response: Response) -> dict[str, Any]:
        """Starts a backfill over [since, until) (default until: now), or resumes the
        provider's unfinished one from its stored cursor (200, `resumed`)."""
        await require(caller, RUN_ROLES, "starting a reconciliation")
        if not isinstance(providers.get(body.provider), RefundLister):
            raise HTTPException(422, f"provider {body.provider!r} is not configured or cannot list refunds")
        until = body.until or datetime.now(UTC)
        if until <= body.since:
            raise HTTPException(422, "until must be after since")
        run, resumed = await recon.open_backfill(body.provider, body.since, until, caller.user,
                                                 settings.task_queue)
        await client.start_workflow(
            ReconciliationWorkflow.run,
            ReconcileInput(provider=body.provider, kind=RunKind.BACKFILL, run_id=run["id"],
                           since=run["window_start"], until=run["window_end"],
                           requested_by=run["requested_by"], options=settings.reconcile_options()),
            id=run["id"], task_queue=settings.task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE)
        if resumed:
            response.status_code = 200
        return {**run_view(run), "resumed": resumed}

    @app.get("/v1/reconciliation/runs")
    async def list_runs(caller: Caller, limit: int = 50) -> list[dict[str, Any]]:
        await require(caller, READ_ROLES, "reading reconciliation runs")
        return [run_view(r) for r in await recon.runs(min(max(limit, 1), 500))]

    @app.get("/v1/reconciliation/runs/{run_id}")
    async def get_run(run_id: str, caller: Caller) -> dict[str, Any]:
        """The run's report: counts by class, amounts per currency, the oldest break, the
        breaks it saw with links to their cases and exception workflows."""
        await require(caller, READ_ROLES, "reading a reconciliation run")
        report = await recon.report(run_id)
        if report is None:
            raise HTTPException(404, f"no reconciliation run {run_id!r}")
        return {**report, "breaks": [break_view(b) async for b in recon.run_breaks(run_id, REPORT_BREAKS)]}

    @app.get("/v1/reconciliation/breaks/{break_id}")
    async def get_break(break_id: int, caller: Caller) -> dict[str, Any]:
        await require(caller, READ_ROLES | APPROVER_ROLES, "reading a reconciliation break")
        row = await recon.get_break(break_id)
        if row is None:
            raise HTTPException(404, f"no reconciliation break {break_id}")
        return break_view(row)

    @app.post("/v1/reconciliation/breaks/{break_id}/approvals", status_code=202)
    async def decide_break(break_id: int, body: BreakDecisionBody, caller: Caller) -> dict[str, Any]:
        """An approver's verdict on a break's compensation, answered at once (an update);
        refusals are audited on the break's chain."""
        return await decide_on_break(store, client, require, caller, break_id, body)

    @app.post("/v1/reconciliation/breaks/{break_id}/reopen", status_code=202)
    async def reopen(break_id: int, body: BreakReopenBody, caller: Caller) -> dict[str, Any]:
        """Sends a dismissed or expired break back to its exception case (ops)."""
        return await reopen_break(store, client, settings, require, caller, break_id, body)


async def decide_on_break(store: Store, client: Client, require: Require, caller: Principal,
                          break_id: int, body: BreakDecisionBody) -> dict[str, Any]:
    """The one rule for a verdict on a break, whichever front end asks (API or console):
    approver roles, the break awaiting approval, then the workflow's update validator.
    Refusals raise the audited `Refused` both front ends answer."""
    await require(caller, APPROVER_ROLES, "approving a reconciliation break")
    row = await Reconciliations(store).get_break(break_id)
    if row is None:
        raise Refused(404, f"no reconciliation break {break_id}")
    if row["state"] != BreakState.AWAITING_APPROVAL:
        raise Refused(409, f"break is {row['state']}, not awaiting approval")
    signal = ApprovalSignal(approver=caller.user, roles=tuple(sorted(caller.roles)),
                            decision=body.decision, reason=body.reason)
    handle = client.get_workflow_handle(break_workflow_id(break_id))
    try:
        progress = await handle.execute_update(ReconciliationBreakWorkflow.submit_approval, signal)
    except WorkflowUpdateFailedError as exc:
        reason, kind = refusal(exc)
        if kind == NOT_AWAITING_APPROVAL:
            raise Refused(409, reason) from None
        await store.append_audit(row["chain"], caller.user, "reconciliation_approval_refused",
                                 {"break_id": break_id, "decision": body.decision.value,
                                  "refusal": reason})
        raise Refused(409 if kind == ALREADY_DECIDED else 403, reason) from None
    if not progress.accepted:
        raise Refused(403, progress.reason)
    return {"break_id": break_id, "decision": body.decision.value,
            "missing_roles": list(progress.missing_roles)}


async def reopen_break(store: Store, client: Client, settings: Settings, require: Require, caller: Principal,
                       break_id: int, body: BreakReopenBody) -> dict[str, Any]:
    """The one rule for reopening a break, whichever front end asks: ops roles, a break
    that ended without moving money, then the same exception case (id and break) runs
    again from the start: handed to its case when that can take it, else approvals."""
    await require(caller, RUN_ROLES, "reopening a reconciliation break")
    recon = Reconciliations(store)
    try:
        row = await recon.reopen(break_id, caller.user, body.reason)
    except LookupError as exc:
        raise Refused(404, str(exc)) from None
    except NotReopenable as exc:
        raise Refused(409, str(exc)) from None
    workflow_id = break_workflow_id(break_id)
    with suppress(WorkflowFailureError, RPCError):  # the previous run settled; let it close
        await client.get_workflow_handle(workflow_id).result()
    await client.start_workflow(
        ReconciliationBreakWorkflow.run, break_case(row, settings.timings()), id=workflow_id,
        task_queue=settings.task_queue, id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE)
    return {**break_view(row), "reopened_by": caller.user}
