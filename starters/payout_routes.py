"""The relay's payout endpoints: register a payout the internal payments system made (and
read the booked payouts); read a payout exception case with its timeline, approve or deny
its current approval round, and ask for a reissue (which then needs its own approval).
Identity comes from the bearer token, as everywhere in the relay."""

from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated, Any, NoReturn

from fastapi import APIRouter, Depends, HTTPException, Response
from pydantic import BaseModel, ConfigDict, Field
from temporalio.client import Client, WorkflowUpdateFailedError
from temporalio.service import RPCError, RPCStatusCode

from adapters.payout_book import PayoutBook
from adapters.providers.base import ProviderAdapter
from adapters.store import Principal, Store
from adapters.telemetry import bind_case
from domain.models import APPROVER_ROLES
from domain.payouts import APPROVAL_STATUSES, PayoutRegistration, ReissueAsk, payout_case_id
from starters.approving import ApprovalBody, Refused, approvals_view, ask_for_verdict, refusal
from starters.cases import over_maximum
from workflows.payout import PayoutReversalWorkflow

READ_ROLES = APPROVER_ROLES | {"auditor", "ops", "admin"}
REISSUE_ROLES = frozenset({"ops", "admin"})
REGISTER_ROLES = frozenset({"ops", "admin"})

Require = Callable[[Principal, frozenset[str], str, str | None], Awaitable[None]]


class PayoutReissueBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(min_length=1, max_length=2000)


def payout_routes(store: Store, client: Client, principal: Callable[..., Awaitable[Principal]],
                  require: Require, providers: Mapping[str, ProviderAdapter]) -> APIRouter:
    """The routes, over the relay's store, Temporal client, authentication, role check and
    configured providers."""
    router = APIRouter()
    book = PayoutBook(store)
    Caller = Annotated[Principal, Depends(principal)]

    @router.post("/v1/payouts", status_code=201)
    async def register_payout(body: PayoutRegistration, caller: Caller, response: Response) -> dict[str, Any]:
        """Books a payout as paid, once per id: the same registration again is a no-op
        (200), the id or the provider's payout id booked with other data a 409. Refusals
        are audited on the case chain the payout's failure would open."""
        case_id = payout_case_id(body.provider, body.provider_payout_id)
        await require(caller, REGISTER_ROLES, "registering a payout", case_id)

        async def refuse(status: int, refusal: str) -> NoReturn:
            await store.append_audit(case_id, caller.user, "payout_registration_refused",
                                     {"payout": body.model_dump(mode="json"), "refusal": refusal})
            raise HTTPException(status, refusal)

        if body.provider not in providers:
            await refuse(422, f"provider {body.provider!r} is not configured")
        if too_large := over_maximum(providers, body.provider, body.amount, body.currency):
            await refuse(422, too_large)
        booked, created = await book.register_payout(body, caller.user)
        if booked is None:
            await refuse(409, f"payout {body.id} (or {body.provider} payout {body.provider_payout_id}) is "
                              "already registered with other data")
        response.status_code = 201 if created else 200
        return {"payout": booked.model_dump(mode="json"), "created": created, "case_id": case_id}

    @router.get("/v1/payouts")
    async def list_payouts(caller: Caller, limit: int = 50) -> list[dict[str, Any]]:
        """The most recently booked payouts (reissues included), newest first."""
        await require(caller, READ_ROLES, "reading payouts", None)
        return [p.model_dump(mode="json") for p in await book.payouts(min(max(limit, 1), 500))]

    @router.get("/v1/payouts/{payout_id}")
    async def get_payout(payout_id: str, caller: Caller) -> dict[str, Any]:
        """A booked payout with its exception case's id (whether or not one is open)."""
        await require(caller, READ_ROLES, "reading a payout", None)
        payout = await book.payout(payout_id)
        if payout is None:
            raise HTTPException(404, f"no payout {payout_id!r}")
        case_id = payout_case_id(payout.provider, payout.provider_payout_id)
        case = await book.case(case_id)
        return {"payout": payout.model_dump(mode="json"), "case_id": case_id,
                "case_status": case["status"] if case else None}

    async def case_row(case_id: str) -> dict[str, Any]:
        row = await book.case(case_id)
        if row is None:
            raise HTTPException(404, f"no payout exception {case_id!r}")
        return row

    @router.get("/v1/payout-exceptions/{case_id}")
    async def get_payout_exception(case_id: str, caller: Caller) -> dict[str, Any]:
        """The case: payout, decision, approvals still missing, the advisor's
        recommendation, ticket, beneficiary holds, reissue, and the whole timeline."""
        await require(caller, READ_ROLES, "reading a payout exception", case_id)
        view = await payout_case_view(store, case_id)
        if view is None:
            raise HTTPException(404, f"no payout exception {case_id!r}")
        return view

    @router.post("/v1/payout-exceptions/{case_id}/approvals", status_code=202)
    async def approve_payout_exception(case_id: str, body: ApprovalBody, caller: Caller) -> dict[str, Any]:
        """Approves or denies the case's current round (the reversal, or a reissue); the
        verdict comes back at once, refusals are audited."""
        bind_case(case_id)
        return await decide_on_payout_exception(store, client, require, caller, case_id, body)

    @router.post("/v1/payout-exceptions/{case_id}/reissue", status_code=202)
    async def reissue_payout(case_id: str, body: PayoutReissueBody, caller: Caller) -> dict[str, Any]:
        """Asks to pay the beneficiary again: taken once per remediated case, then it waits
        for its own approval (the requester cannot approve it); refusals are audited."""
        bind_case(case_id)
        await require(caller, REISSUE_ROLES, "requesting a payout reissue", case_id)
        await case_row(case_id)
        ask = ReissueAsk(requester=caller.user, roles=tuple(sorted(caller.roles)), reason=body.reason)
        try:
            progress = await client.get_workflow_handle(case_id).execute_update(
                PayoutReversalWorkflow.request_reissue, ask)
        except WorkflowUpdateFailedError as exc:
            reason, _ = refusal(exc)
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:
                raise
            reason = "the case is closed"
        else:
            return {"case_id": case_id, "status": progress.status,
                    "missing_roles": list(progress.missing_roles)}
        await store.append_audit(case_id, caller.user, "reissue_refused", {"refusal": reason})
        raise HTTPException(409, reason)

    return router


async def payout_case_view(store: Store, case_id: str) -> dict[str, Any] | None:
    """The public view of a payout exception case (the API's answer, the console's page)."""
    book = PayoutBook(store)
    row = await book.case(case_id)
    if row is None:
        return None
    payout = await book.payout(row["payout_id"])
    assert payout is not None
    trail = await store.audit_trail(case_id)
    decision = row["decision"] or {}
    approvals, missing = approvals_view(trail, (decision.get("decision") or {}).get("requirements", []),
                                        row["status"] in APPROVAL_STATUSES)
    reissue = await book.payout(payout.reissue_id())
    return {
        "case_id": case_id, "status": row["status"], "payout": payout.model_dump(mode="json"),
        "reported_status": row["reported_status"], "failure_code": row["failure_code"],
        "decision": row["decision"], "missing_roles": missing, "approvals": approvals,
        "recommendation": row["recommendation"], "ticket_ref": row["ticket_ref"],
        "reversal_entry_id": row["reversal_entry_id"],
        "beneficiary_holds": [{**h, "placed_at": h["placed_at"].isoformat(),
                               "released_at": h["released_at"].isoformat() if h["released_at"] else None}
                              for h in await book.beneficiary_holds(payout.beneficiary_id)],
        "reissue": reissue.model_dump(mode="json") if reissue else None,
        "timeline": [{"at": e["occurred_at"].isoformat(), "actor": e["actor"], "action": e["action"],
                      "detail": e["detail"]} for e in trail],
    }


async def decide_on_payout_exception(store: Store, client: Client, require: Require, caller: Principal,
                                     case_id: str, body: ApprovalBody, *, via: str = "api") -> dict[str, Any]:
    """The one rule for a verdict on a payout case, whichever front end asks (API or
    console): approver roles, the case awaiting approval, then the workflow's update
    validator (tier roles, segregation of duties). Refusals raise the audited `Refused`."""
    await require(caller, APPROVER_ROLES, "approving a payout exception", case_id)
    row = await PayoutBook(store).case(case_id)
    if row is None:
        raise Refused(404, f"no payout exception {case_id!r}")
    if row["status"] not in APPROVAL_STATUSES:
        raise Refused(409, f"case is {row['status']}, not awaiting approval")
    progress = await ask_for_verdict(client, store, case_id, body, caller, via=via)
    return {"case_id": case_id, "decision": body.decision.value, "status": progress.status,
            "missing_roles": list(progress.missing_roles)}
