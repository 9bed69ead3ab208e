"""The relay's refund endpoints: a request (accepted once per id), the case and its audit
trail, an approver's verdict, a reissue, ops ending a provider wait or confirming a bank
transfer. Every rule is the shared `CaseActions`, so the console can do no more."""

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.exceptions import RequestValidationError

from adapters.db import CaseCreation, request_from_row
from adapters.telemetry import bind_case
from domain.models import RefundRequestBody, RequestSource
from domain.permissions import Permission
from starters.actions.approving import ApprovalBody
from starters.actions.cases import ManualConfirmationBody, ReissueBody, advice_view
from starters.actions.front import Door
from starters.actions.provider_wait import ProviderWaitBody, resolve_provider_wait
from starters.actions.starting import new_request_refusal, start_refund
from starters.relay.auth import Caller

CHANNEL_HEADER = "x-refund-channel"

router = APIRouter()


@router.post("/v1/refund-requests", status_code=202)
async def request_refund(body: RefundRequestBody, caller: Caller, request: Request,
                         response: Response, door: Door) -> dict[str, Any]:
    """Accepts a refund request once: 202 new, 200 identical repeat, 409 same id other
    values. The body says only what a caller may say; `X-Refund-Channel: cli` marks the
    CLI (both are token holders on this API; no other source can be claimed)."""
    bind_case(body.refund_request_id)
    actions, providers = door.actions, door.providers
    await actions.require(caller, Permission.REQUEST_REFUND, "requesting a refund",
                          body.refund_request_id, via="api")
    if body.refund_request_id.startswith(tuple(f"{name}-" for name in providers)):
        raise RequestValidationError([{
            "type": "value_error", "loc": ("body", "refund_request_id"),
            "input": body.refund_request_id,
            "msg": "ids starting <provider>- are reserved for the provider's own requests"}])
    cli = request.headers.get(CHANNEL_HEADER, "").lower() == RequestSource.CLI.value
    refund = body.as_request(RequestSource.CLI if cli else RequestSource.API)
    if refused := await new_request_refusal(door.store.cases, providers, refund):
        field, why = refused
        raise RequestValidationError([{"type": "value_error", "loc": ("body", field),
                                       "input": getattr(body, field), "msg": why}])
    outcome, row = await door.store.cases.create(refund, caller.user)
    if row["requester"] != caller.user:  # someone else's id shows nothing, not even whether the terms match
        await actions.refuse(caller, body.refund_request_id, 409, "requesting a refund",
                             f"refund_request_id {body.refund_request_id!r} was already used by "
                             "another requester", via="api")
    if outcome is CaseCreation.CONFLICT:
        await actions.refuse(caller, body.refund_request_id, 409, "requesting a refund",
                             f"refund_request_id {body.refund_request_id!r} was already used with "
                             "different parameters", via="api")
    # the stored request: a repeat through another channel is the same request, but its own
    # copy (another channel, another fingerprint) is not the row validation checks against
    await start_refund(door.client, door.settings, request_from_row(row), row["requester"], row["status"])
    if outcome is CaseCreation.IDENTICAL:
        response.status_code = 200
    return await actions.view(body.refund_request_id)


@router.get("/v1/refund-requests/{refund_request_id}")
async def get_refund(refund_request_id: str, caller: Caller, door: Door) -> dict[str, Any]:
    """The case, with the advisor's suggestion for approvers (labelled advisory)."""
    await door.actions.readable(caller, refund_request_id, "reading a case", via="api")
    return {**await door.actions.view(refund_request_id),
            "advice": advice_view(await door.store.integrations.advice(refund_request_id)),
            "tickets": await door.store.integrations.tickets(refund_request_id)}


@router.get("/v1/refund-requests/{refund_request_id}/audit")
async def get_audit(refund_request_id: str, caller: Caller, door: Door) -> list[dict[str, Any]]:
    """The case's timeline: every decision, with who and when."""
    await door.actions.readable(caller, refund_request_id, "reading an audit trail", via="api")
    return [{**e, "occurred_at": e["occurred_at"].isoformat()}
            for e in await door.store.audit.trail(refund_request_id)]


@router.post("/v1/refund-requests/{refund_request_id}/approvals", status_code=202)
async def approve(refund_request_id: str, body: ApprovalBody, caller: Caller,
                  door: Door) -> dict[str, Any]:
    """The verdict comes back at once: 202 with the roles still missing, 403 refused
    (audited), 409 when the case is not awaiting approval."""
    bind_case(refund_request_id)
    return await door.actions.decide(caller, refund_request_id, body, via="api")


@router.post("/v1/refund-requests/{refund_request_id}/reissue", status_code=202)
async def reissue(refund_request_id: str, body: ReissueBody, caller: Caller,
                  response: Response, door: Door) -> dict[str, Any]:
    """A failed or canceled refund is reissued as a new linked request (another method
    if need be) that passes the same gates; it never exceeds the original amount."""
    created, child = await door.actions.reissue(caller, refund_request_id, body, via="api",
                                                providers=door.providers)
    if not created:
        response.status_code = 200
    return child


@router.post("/v1/refund-requests/{refund_request_id}/provider-wait")
async def resolve_wait(refund_request_id: str, body: ProviderWaitBody, caller: Caller,
                       door: Door) -> dict[str, Any]:
    """Ops end a wait for a provider's notification (Adyen: no lookup) with what its
    dashboard shows: 403 for the requester, trigger identities and approvers, 409 when
    the case is not waiting."""
    bind_case(refund_request_id)
    return await resolve_provider_wait(door.actions, caller, refund_request_id, body, via="api")


@router.post("/v1/manual-refunds/{refund_request_id}/confirmation")
async def confirm_manual(refund_request_id: str, body: ManualConfirmationBody, caller: Caller,
                         door: Door) -> dict[str, Any]:
    """Ops confirm a bank transfer they made (or could not make); the case follows."""
    return await door.actions.confirm_manual(caller, refund_request_id, body, via="api")
