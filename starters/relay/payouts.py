"""The relay's payout endpoints: register a payout the internal payments system made (and
read the booked payouts); read a payout exception case with its timeline, approve or deny
its current approval round, and ask for a reissue (which then needs its own approval).
Identity comes from the bearer token, as everywhere in the relay."""

import asyncio
from typing import Any, NoReturn

from fastapi import APIRouter, HTTPException, Response
from pydantic import BaseModel, ConfigDict, Field
from temporalio.client import WorkflowUpdateFailedError, WorkflowUpdateRPCTimeoutOrCancelledError
from temporalio.service import RPCError, RPCStatusCode

from adapters.db import Principal
from adapters.providers.base import PayoutExecutor
from adapters.telemetry import bind_case
from adapters.temporal_client import update_until_taken
from domain import errors
from domain.payouts import PayoutCaseStatus, PayoutRegistration, ReissueAsk, payout_case_id
from domain.permissions import Permission
from starters.actions.approving import refusal
from starters.actions.front import Door
from starters.actions.payouts import PayoutApprovalBody, decide_on_payout_exception, payout_case_view
from starters.actions.starting import entry_refusal
from starters.relay.auth import Caller
from starters.relay.webhooks import Desk
from workflows.payout import PayoutReversalWorkflow


class ReasonBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(min_length=1, max_length=2000)


router = APIRouter()


@router.post("/v1/payouts", status_code=201)
async def register_payout(body: PayoutRegistration, caller: Caller, response: Response,
                          door: Door, desk: Desk) -> dict[str, Any]:
    """Books a payout as paid, once per id: the same registration again is a no-op
    (200), the id or the provider's payout id booked with other data a 409. A registrar's
    refusals are audited on the case chain the payout's failure would open; a caller who may
    not register begins no chain (the global trail names it)."""
    case_id = payout_case_id(body.provider, body.provider_payout_id)
    await door.actions.require(caller, Permission.REGISTER_PAYOUT, "registering a payout", case_id, via="api")

    async def refuse(status: int, refusal: str) -> NoReturn:
        await door.store.audit.record(case_id, caller.user, "payout_registration_refused",
                                      {"payout": body.model_dump(mode="json"), "refusal": refusal})
        raise HTTPException(status, refusal)

    # judged for a payout not booked yet: a resend of one that is gets its booking (or its
    # conflict) whatever a later deploy made of the provider or its limits
    if (refused := entry_refusal(door.providers, body.provider, body.amount, body.currency)) and (
            await door.store.payouts.payout(body.id) is None
            and await door.store.payouts.payout_at_provider(body.provider, body.provider_payout_id) is None):
        await refuse(422, refused[1])
    booked, created = await door.store.payouts.register_payout(body, caller.user)
    if booked is None:
        await refuse(409, f"payout {body.id} (or {body.provider} payout {body.provider_payout_id}) is "
                          "already registered with other data")
    response.status_code = 201 if created else 200
    # A failure the relay received before the payout was booked acts now; on a repeat too:
    # the first call's booking may have committed with the relay gone before this step.
    await desk.payout_registered(body.provider, body.provider_payout_id)
    return {"payout": booked.model_dump(mode="json"), "created": created, "case_id": case_id}


@router.get("/v1/payouts")
async def list_payouts(caller: Caller, door: Door, limit: int = 50) -> list[dict[str, Any]]:
    """The most recently booked payouts (reissues included), newest first."""
    await door.actions.require(caller, Permission.READ_PAYOUTS, "reading payouts", None, via="api")
    return [p.model_dump(mode="json") for p in await door.store.payouts.payouts(min(max(limit, 1), 500))]


@router.get("/v1/payouts/{payout_id}")
async def get_payout(payout_id: str, caller: Caller, door: Door) -> dict[str, Any]:
    """A booked payout with its exception case's id (whether or not one is open)."""
    await door.actions.require(caller, Permission.READ_PAYOUTS, "reading a payout", None, via="api")
    payout = await door.store.payouts.payout(payout_id)
    if payout is None:
        await door.actions.refuse(caller, None, 404, "reading a payout", f"no payout {payout_id!r}",
                                  via="api")
    case_id = payout_case_id(payout.provider, payout.provider_payout_id)
    case = await door.store.payouts.case(case_id)
    return {"payout": payout.model_dump(mode="json"), "case_id": case_id,
            "case_status": case.status if case else None}


@router.get("/v1/payout-exceptions/{case_id}")
async def get_payout_exception(case_id: str, caller: Caller, door: Door) -> dict[str, Any]:
    """The case: payout, decision, approvals still missing, the advisor's
    recommendation, ticket, beneficiary holds, reissue, and the whole timeline."""
    await door.actions.require(caller, Permission.READ_PAYOUTS, "reading a payout exception", case_id,
                               via="api")
    view = await payout_case_view(door.store, case_id)
    if view is None:
        await door.actions.refuse(caller, None, 404, "reading a payout exception",
                                  f"no payout exception {case_id!r}", via="api")
    return view


@router.post("/v1/payout-exceptions/{case_id}/approvals", status_code=202)
async def approve_payout_exception(case_id: str, body: PayoutApprovalBody, caller: Caller,
                                   door: Door) -> dict[str, Any]:
    """Approves or denies the case's current round (the reversal, or a reissue); the
    verdict comes back at once, refusals are audited."""
    bind_case(case_id)
    return await decide_on_payout_exception(door.actions, caller, case_id, body, via="api")


async def _existing_case(door: Door, caller: Caller, case_id: str, permission: Permission,
                         action: str) -> None:
    """An action on a payout case: the caller's role, then the case (404 when none), both
    refusals audited."""
    bind_case(case_id)
    await door.actions.require(caller, permission, action, case_id, via="api")
    if await door.store.payouts.case(case_id) is None:
        await door.actions.refuse(caller, None, 404, action, f"no payout exception {case_id!r}", via="api")


@router.post("/v1/payout-exceptions/{case_id}/reissue", status_code=202)
async def reissue_payout(case_id: str, body: ReasonBody, caller: Caller,
                         door: Door) -> dict[str, Any]:
    """Asks to pay the beneficiary again: taken once per remediated case, then it waits
    for its own approval (the requester cannot approve it); refusals are audited. Whoever
    registered the payout or one it reissues (and so named the beneficiary) does not ask."""
    action = "requesting a payout reissue"
    await _existing_case(door, caller, case_id, Permission.REISSUE_PAYOUT, action)
    if released := await door.store.payouts.acted_on_beneficiary(
            case_id, caller.user, "beneficiary_hold_released"):
        await door.actions.refuse(caller, case_id, 403, action,
                                  f"{caller.user} released this beneficiary's hold on {', '.join(released)}: "
                                  "another person asks for a payout to them", via="api",
                                  audit_action="access_refused")
    case = await door.store.payouts.case(case_id)
    payout = await door.store.payouts.payout(case.payout_id) if case is not None else None
    assert payout is not None  # `_existing_case` refused a case that is not there
    if registered := await door.store.payouts.registered_in_lineage(payout, caller.user):
        await door.actions.refuse(caller, case_id, 403, action,
                                  f"{caller.user} registered payout {registered} (and named its "
                                  "beneficiary): another person asks for it to be paid again",
                                  via="api", audit_action="access_refused")
    ask = ReissueAsk(requester=caller.user, roles=tuple(sorted(caller.roles)), reason=body.reason)
    if not isinstance(door.providers.get(payout.provider), PayoutExecutor):
        # asked of approvers, it would fail only once approved: refused now, the case as it is
        reason = (f"{payout.provider} cannot make payouts: pay the beneficiary again at the provider "
                  "or by bank, outside this case")
    else:
        try:
            async with asyncio.timeout(door.settings.approval_answer_seconds):
                progress = await update_until_taken(door.client.get_workflow_handle(case_id),
                                                    PayoutReversalWorkflow.request_reissue, ask)
        except (TimeoutError, WorkflowUpdateRPCTimeoutOrCancelledError):  # dropped, or no worker
            if (taken := await _taken_ask(door, case_id, caller)) is not None:
                return taken
            raise HTTPException(503, "the case has not taken the request yet; read the case, or send the "
                                "same request again", headers={"Retry-After": "5"}) from None
        except WorkflowUpdateFailedError as exc:
            reason, kind = refusal(exc)
            if kind == errors.REISSUE_TAKEN:
                # the case took an ask: its round lands on record a write later
                requester = await _reissue_requester_on_record(door, case_id)
                if requester is None:
                    raise HTTPException(503, "the case took a reissue request that is not on record yet; "
                                        "read the case, or send the same request again",
                                        headers={"Retry-After": "5"}) from None
                if requester == caller.user:  # their own ask, sent again: its answer
                    return await _case_answer(door, case_id)
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:
                raise
            reason = "the case is closed"
        else:
            return {"case_id": case_id, "status": progress.status,
                    "missing_roles": list(progress.missing_roles)}
    await door.store.audit.record(case_id, caller.user, "reissue_refused", {"refusal": reason})
    raise HTTPException(409, reason)


async def _taken_ask(door: Door, case_id: str, caller: Principal) -> dict[str, Any] | None:
    """The answer to a reissue ask that got none in time, when the case took the caller's
    ask (its round on record): the case's own; None when it took none of theirs (an ask
    Temporal holds may still be taken: sent again, it is answered as taken)."""
    if await door.store.payouts.reissue_requester(case_id) != caller.user:
        return None
    return await _case_answer(door, case_id)


async def _reissue_requester_on_record(door: Door, case_id: str) -> str | None:
    """Who asked for the reissue the case took, once its round is on record (waited for up
    to the answer time: the case takes an ask in memory, its `reissue_requested` row comes
    a write later), else None. Without the wait, the same person's ask sent twice at once
    heard "already requested" for their own."""
    deadline = asyncio.get_running_loop().time() + door.settings.approval_answer_seconds
    while (requester := await door.store.payouts.reissue_requester(case_id)) is None:
        if asyncio.get_running_loop().time() >= deadline:
            return None
        await asyncio.sleep(0.1)
    return requester


async def _case_answer(door: Door, case_id: str) -> dict[str, Any]:
    """A reissue ask's answer as the case row shows it."""
    view = await payout_case_view(door.store, case_id)
    assert view is not None  # `_existing_case` found it
    return {"case_id": case_id, "status": view["status"], "missing_roles": view["missing_roles"]}


@router.post("/v1/payout-exceptions/{case_id}/beneficiary-hold/release")
async def release_beneficiary_hold(case_id: str, body: ReasonBody, caller: Caller,
                                   door: Door) -> dict[str, Any]:
    """Ops end the case's hold on the beneficiary's payouts, with a reason (audited, ops
    told): a reissue of another case that waits for it then pays. Not by whoever asked for
    a reissue to this beneficiary still under way (403); 409 when nothing is held."""
    action = "releasing a beneficiary hold"
    await _existing_case(door, caller, case_id, Permission.RELEASE_BENEFICIARY_HOLD, action)
    if asked := await door.store.payouts.acted_on_beneficiary(
            case_id, caller.user, "reissue_requested",
            (PayoutCaseStatus.AWAITING_REISSUE_APPROVAL, PayoutCaseStatus.REISSUING)):
        # the hold checks the very payout they asked for: another person lifts it
        await door.actions.refuse(caller, case_id, 403, action,
                                  f"{caller.user} asked for the reissue of {', '.join(asked)}, which this "
                                  "beneficiary's holds check: another person releases them",
                                  via="api", audit_action="access_refused")
    released = await door.store.payouts.release_beneficiary(case_id, caller.user, body.reason, via="api")
    if released is None:
        await door.actions.refuse(caller, case_id, 409, action, "the case holds no beneficiary",
                                  via="api", audit_action="beneficiary_hold_release_refused")
    return {"case_id": case_id, "beneficiary_id": released, "released_by": caller.user}
