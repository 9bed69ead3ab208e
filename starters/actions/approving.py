"""Asking a case workflow for an approver's verdict, for every endpoint that takes one
(refunds, payout exceptions): the workflow's update validator answers at once, so the
approver hears a refusal (and why) immediately; refusals are audited. A case no worker
answers in time (killed, saturated) is answered `verdict_pending`, never left hanging, and the
verdict is sent again as a durable signal. Also the approvals part of the public view of a
case, read from the approvals projection."""

import asyncio
import uuid
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from temporalio.client import Client, WorkflowUpdateFailedError, WorkflowUpdateRPCTimeoutOrCancelledError
from temporalio.exceptions import ApplicationError

from adapters import metrics
from adapters.db import Principal, Store
from adapters.db.rows import ApprovalStep
from adapters.temporal_client import update_until_taken, workflow_closed
from domain.audit import APPROVAL_REQUESTED
from domain.errors import ALREADY_DECIDED, NOT_AWAITING_APPROVAL
from domain.lifecycle import unfilled
from domain.models import ApprovalProgress, ApprovalSignal, Decision, RoleRequirement
from workflows.approvals import ApprovingWorkflow


class ApprovalBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    decision: Decision
    reason: str = Field(default="", max_length=2000)


class Refused(Exception):
    """An action the caller may not take or the case does not allow; already audited.
    `status` is the HTTP status that says why (403, 404, 409, 422); the relay answers it as
    JSON, the console as a page."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


VERDICT_PENDING = "verdict_pending"
"""The status answered when the case did not take the verdict within the wait."""

PENDING_NOTICE = ("The case has not taken your verdict yet (its worker is busy or restarting): it counts, "
                  "or is refused with the reason in the trail, when the case does.")
"""What the console shows an approver answered `verdict_pending`."""


def new_verdict(caller: Principal, decision: Decision, reason: str, awaiting: str = "") -> ApprovalSignal:
    """The caller's verdict with a fresh id: the token's user and roles, never the body's;
    `awaiting`, the case status the caller decided on (the round it counts in)."""
    return ApprovalSignal(approver=caller.user, roles=tuple(sorted(caller.roles)), decision=decision,
                          reason=reason, verdict_id=uuid.uuid4().hex, awaiting=awaiting)


async def deliver_verdict(client: Client, workflow_id: str, verdict: ApprovalSignal,
                          seconds: float, run_id: str | None = None) -> ApprovalProgress | None:
    """The workflow's answer to the verdict as an update, or None past `seconds`: the same
    verdict (same id) then goes again as the `approve` signal. Temporal keeps an update that
    no worker has accepted only in memory, and drops it when it restarts or evicts the
    workflow's state under load, with no one left polling to send it again; a signal is
    durable once sent. The workflow takes one verdict id once, whichever arrives first, so an
    update Temporal dropped with its workflow task goes again (`update_until_taken`).
    `run_id`: the run the verdict is for (a break's round), else the workflow's latest."""
    handle = client.get_workflow_handle(workflow_id, run_id=run_id)
    try:
        return await asyncio.wait_for(update_until_taken(handle, ApprovingWorkflow.submit_approval, verdict),
                                      timeout=seconds)
    except (TimeoutError, WorkflowUpdateRPCTimeoutOrCancelledError):  # the SDK's word for the cancel
        await handle.signal(ApprovingWorkflow.approve, verdict)
        return None


def pending_reason(seconds: float) -> str:
    return (f"the case did not take the verdict within {seconds:g} s; it counts (or is refused, "
            "audited) when the case does: read the case's approvals")


def verdict_notice(answer: dict[str, Any], body: ApprovalBody) -> str:
    """The console's notice key after a verdict: the decision, or pending."""
    return VERDICT_PENDING if answer["status"] == VERDICT_PENDING else body.decision.value


async def ask_for_verdict(client: Client, store: Store, case_id: str, body: ApprovalBody,
                          caller: Principal, *, answer_within: float, via: str = "api",
                          awaiting: str = "") -> ApprovalProgress:
    """Sends the caller's verdict as an update; 409 when the case takes none, 403 when it is
    refused (both audited). The approver is the token's user, with the token's roles; the
    verdict names the case status the approver decided on (`awaiting`): a relay's read and
    its send are apart, and the round may have changed between them.

    Past `answer_within` seconds the call stops waiting and answers `verdict_pending`
    (audited as `approval_unanswered`): the verdict is resent durably (`deliver_verdict`),
    and the workflow counts it (or refuses it, audited) when a worker takes the case."""
    try:
        verdict = new_verdict(caller, body.decision, body.reason, awaiting)
        progress = await deliver_verdict(client, case_id, verdict, answer_within)
    except WorkflowUpdateFailedError as exc:
        reason, kind = refusal(exc)
        too_late = kind in (NOT_AWAITING_APPROVAL, ALREADY_DECIDED)
        await store.audit.record(case_id, caller.user, "action_refused" if too_late else "approval_refused",
                                 {"decision": body.decision.value, "refusal": reason, "via": via})
        raise Refused(409 if too_late else 403, reason) from None
    if progress is None:
        await store.audit.record(case_id, caller.user, "approval_unanswered",
                                 {"decision": body.decision.value, "waited_seconds": answer_within,
                                  "via": via})
        return ApprovalProgress(accepted=False, status=VERDICT_PENDING, reason=pending_reason(answer_within))
    if not progress.accepted:  # refused inside the workflow, which audited it
        raise Refused(403, progress.reason)
    observe_approval_wait(await store.audit.approvals_of(case_id), body.decision)
    return progress


def refusal(exc: WorkflowUpdateFailedError) -> tuple[str, str | None]:
    """Why a case workflow refused an update (its validator's message), and the refusal's type."""
    cause = exc.cause
    if isinstance(cause, ApplicationError):
        return cause.message, cause.type
    return str(cause), None


def observe_approval_wait(steps: list[ApprovalStep], decision: Decision) -> None:
    """Time since the case started waiting for approval, sampled at each decision."""
    asked = [s.occurred_at for s in steps if s.action == APPROVAL_REQUESTED]
    if asked:
        waited = (datetime.now(UTC) - asked[-1]).total_seconds()
        metrics.APPROVAL_WAIT.labels(decision.value).observe(max(waited, 0.0))


def granted_in(steps: list[ApprovalStep]) -> list[tuple[str, frozenset[str]]]:
    """Approvals that counted, as (approver, roles): what fills a tier's slots."""
    return [(s.approver, s.roles) for s in steps if s.action == "approval_granted"]


def approvals_view(steps: list[ApprovalStep], requirements: list[dict[str, Any]],
                   awaiting: bool) -> tuple[list[dict[str, Any]], list[str]]:
    """Every approval step with who and when, and the roles the current round still needs
    (counted from its `approval_requested` on, so a second round starts empty)."""
    approvals = [{"approver": s.approver, "action": s.action, "at": s.occurred_at.isoformat(),
                  "reason": s.reason} for s in steps if s.action != APPROVAL_REQUESTED]
    if not awaiting:
        return approvals, []
    starts = [i for i, s in enumerate(steps) if s.action == APPROVAL_REQUESTED]
    granted = granted_in(steps[starts[-1]:] if starts else steps)
    needs = tuple(RoleRequirement.model_validate(r) for r in requirements)
    return approvals, unfilled(needs, granted)


async def ended_while(client: Client, case_id: str, shown: str) -> str | None:
    """After a verdict's signal or update failed: why it is refused when the case's workflow
    has ended (the row still `shown`, until the sweep hands it to ops), or None while the
    workflow runs (Temporal away: the caller re-raises, a 5xx to try again)."""
    ended = await workflow_closed(client, case_id)
    if ended is None:
        return None
    return f"the case's workflow has ended ({ended.lower()}) while the case is {shown}; it goes to ops review"
