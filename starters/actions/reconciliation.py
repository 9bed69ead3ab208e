"""The rules for reconciliation breaks that both front ends apply: an approver's verdict on
a break's compensation, and ops reopening a dismissed or expired break."""

import asyncio
from datetime import timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from temporalio.client import WorkflowFailureError, WorkflowUpdateFailedError
from temporalio.common import WorkflowIDReusePolicy
from temporalio.service import RPCError, RPCStatusCode

from adapters.db import Principal
from adapters.db.reconciliation import NotReopenable, break_case, break_view
from adapters.db.rows import BreakRow
from domain.errors import ALREADY_DECIDED, NOT_AWAITING_APPROVAL
from domain.models import ApprovalProgress, ApprovalSignal, Decision
from domain.permissions import Permission
from domain.reconciliation import REOPENABLE, BreakState, break_workflow_id
from starters.actions.approving import (
    VERDICT_PENDING,
    Refused,
    deliver_verdict,
    new_verdict,
    pending_reason,
    refusal,
)
from starters.actions.cases import CaseActions
from workflows.reconciliation import ReconciliationBreakWorkflow


class BreakDecisionBody(BaseModel):
    """A verdict on a break. A reopened break is decided again: `reopened` names the round the
    approver saw (how often it had been reopened, as the break shows it), so a page or a
    read made before a reopen (or before the next run raised it again for another amount)
    does not decide the new round. Required: a verdict naming none counted in whatever
    round was open."""

    model_config = ConfigDict(extra="forbid")
    decision: Decision
    reason: str = Field(default="", max_length=2000)
    reopened: int = Field(ge=0)


class BreakReopenBody(BaseModel):
    """Taking a decision back names the round it undoes (`reopened` as the break showed it),
    as a verdict names the round it decides: a page read before the break was reopened and
    decided again would otherwise undo a decision its reader never saw."""

    model_config = ConfigDict(extra="forbid")
    reason: str = Field(min_length=1, max_length=2000, description="why the decision is taken back")
    reopened: int = Field(ge=0)


async def decide_on_break(actions: CaseActions, caller: Principal, break_id: int, body: BreakDecisionBody,
                          *, via: str) -> dict[str, Any]:
    """The one rule for a verdict on a break, whichever front end asks (API or console):
    approver roles, the break awaiting approval, then the workflow's update validator.
    Refusals raise the audited `Refused` both front ends answer."""
    action = "approving a reconciliation break"
    await actions.require(caller, Permission.APPROVE_RECONCILIATION_BREAK, action, via=via)
    row = await actions.store.reconciliation.get_break(break_id)
    if row is None:
        await actions.refuse(caller, None, 404, action, f"no reconciliation break {break_id}", via=via)
    if row["state"] != BreakState.AWAITING_APPROVAL:
        await actions.refuse(caller, row["chain"], 409, action,
                             f"break is {row['state']}, not awaiting approval", via=via)
    if body.reopened != row["reopened"]:
        await actions.refuse(caller, row["chain"], 409, action,
                             f"this verdict was given before the break was reopened (round {body.reopened}, "
                             f"now {row['reopened']}): reload it and decide again", via=via)
    round_ended = (f"round {body.reopened} of the break is no longer open (it ended, or its case "
                   "was stopped): read the break to see how it stands")
    if (run_id := await _run_of_round(actions, break_id, body.reopened)) is None:
        await actions.refuse(caller, row["chain"], 409, action, round_ended, via=via)
    try:
        progress = await _verdict_once_caught_up(actions, break_id, run_id, body.reopened,
                                                 new_verdict(caller, body.decision, body.reason))
    except RPCError as exc:
        if exc.status != RPCStatusCode.NOT_FOUND:
            raise
        await actions.refuse(caller, row["chain"], 409, action, round_ended, via=via)
    except WorkflowUpdateFailedError as exc:
        reason, kind = refusal(exc)
        if kind == NOT_AWAITING_APPROVAL:
            await actions.refuse(caller, row["chain"], 409, action, reason, via=via)
        await actions.store.audit.record(row["chain"], caller.user, "reconciliation_approval_refused",
                                         {"break_id": break_id, "decision": body.decision.value,
                                          "refusal": reason})
        raise Refused(409 if kind == ALREADY_DECIDED else 403, reason) from None
    if progress is None:
        seconds = actions.settings.approval_answer_seconds
        await actions.store.audit.record(row["chain"], caller.user, "reconciliation_approval_unanswered",
                                         {"break_id": break_id, "decision": body.decision.value,
                                          "waited_seconds": seconds})
        return {"break_id": break_id, "decision": body.decision.value, "status": VERDICT_PENDING,
                "missing_roles": [], "detail": pending_reason(seconds)}
    if not progress.accepted:
        raise Refused(403, progress.reason)
    return {"break_id": break_id, "decision": body.decision.value,
            "missing_roles": list(progress.missing_roles)}


CAUGHT_UP_POLL_SECONDS = 0.2
PREVIOUS_RUN_CLOSES_SECONDS = 30.0
"""How long a reopen waits for the break's previous case (which settled it) to close."""
START_WITHIN_SECONDS = 5.0
"""How long the reopen's start of that case may take (inside the reopen's transaction)."""


async def _run_of_round(actions: CaseActions, break_id: int, round_: int) -> str | None:
    """The run of the break's exception case that decides round `round_`, or None when the
    round has ended. Every round runs under the same workflow id, so a verdict sent to "the
    workflow" went to the latest run: a round denied and reopened after the verdict was
    checked took it in the next round. The run is described, then the row read again: still
    awaiting that round, no reopen has begun (one needs the round ended first), so the run
    described is that round's."""
    try:
        described = await actions.client.get_workflow_handle(break_workflow_id(break_id)).describe()
    except RPCError as exc:
        if exc.status != RPCStatusCode.NOT_FOUND:
            raise
        return None
    awaits = _awaits(await actions.store.reconciliation.get_break(break_id), round_)
    return described.run_id if awaits else None


def _awaits(row: BreakRow | None, round_: int) -> bool:
    """Whether the break (as just read) still waits for a verdict in round `round_`."""
    return row is not None and row["state"] == BreakState.AWAITING_APPROVAL and row["reopened"] == round_


async def _verdict_once_caught_up(actions: CaseActions, break_id: int, run_id: str, round_: int,
                                  verdict: ApprovalSignal) -> ApprovalProgress | None:
    """`deliver_verdict` to the round's run, asked again while it answers "not awaiting
    approval" but the break's row still says that round waits: opening the exception commits
    the row before the workflow hears of it, and a verdict in between was refused 409 for a
    break that waits. Past the answer time the workflow's answer stands."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + actions.settings.approval_answer_seconds
    while True:
        try:
            return await deliver_verdict(actions.client, break_workflow_id(break_id), verdict,
                                         max(deadline - loop.time(), CAUGHT_UP_POLL_SECONDS), run_id)
        except WorkflowUpdateFailedError as exc:
            if refusal(exc)[1] != NOT_AWAITING_APPROVAL or loop.time() >= deadline:
                raise
            if not _awaits(await actions.store.reconciliation.get_break(break_id), round_):
                raise
        await asyncio.sleep(CAUGHT_UP_POLL_SECONDS)


async def reopen_break(actions: CaseActions, caller: Principal, break_id: int, body: BreakReopenBody,
                       *, via: str) -> dict[str, Any]:
    """The one rule for reopening a break, whichever front end asks: ops roles, a break
    that ended without moving money, then the same exception case (id and break) runs
    again from the start: handed to its case when that can take it, else approvals."""
    action = "reopening a reconciliation break"
    await actions.require(caller, Permission.REOPEN_RECONCILIATION_BREAK, action, via=via)
    client, settings = actions.client, actions.settings
    workflow_id = break_workflow_id(break_id)
    found = await actions.store.reconciliation.get_break(break_id)
    if found is not None and found["state"] in REOPENABLE:
        try:  # the previous run settled the break; let it close, for a bounded while
            async with asyncio.timeout(PREVIOUS_RUN_CLOSES_SECONDS):
                await client.get_workflow_handle(workflow_id).result()
        except TimeoutError:
            await actions.refuse(caller, found["chain"], 409, action, "the break's previous case has not "
                                 "closed yet (is a worker running?); nothing was reopened", via=via)
        except (WorkflowFailureError, RPCError):
            pass  # it ended otherwise, or is gone past retention

    async def start(row: BreakRow) -> None:
        """Runs inside the reopen's transaction (the break's row locked): bounded, so Temporal
        away holds that lock for seconds, not the client's minute of retries."""
        await client.start_workflow(
            ReconciliationBreakWorkflow.run, break_case(row, settings.timings()), id=workflow_id,
            task_queue=settings.task_queue, id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
            rpc_timeout=timedelta(seconds=START_WITHIN_SECONDS))

    try:
        row = await actions.store.reconciliation.reopen(break_id, caller.user, body.reason, body.reopened,
                                                        start)
    except LookupError as exc:
        await actions.refuse(caller, None, 404, action, str(exc), via=via)
    except NotReopenable as exc:
        await actions.refuse(caller, found["chain"] if found else None, 409, action, str(exc), via=via)
    return {**break_view(row), "reopened_by": caller.user}
