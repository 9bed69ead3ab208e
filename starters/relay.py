"""The relay: the HTTP front door for refund requests, approvals and provider webhooks.

Every webhook delivery is stored as a receipt before anything else, and acknowledged
only after its workflow was started or signalled. Identity always comes from the bearer
token, never from a body field.
"""

import hashlib
import logging
import time
from collections.abc import Mapping
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from temporalio.client import Client, WorkflowHandle, WorkflowUpdateFailedError
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from adapters.config import Settings
from adapters.integration_store import IntegrationStore
from adapters.providers.base import ProviderAdapter, WebhookRejected
from adapters.providers.manual import manual_refund
from adapters.store import CaseCreation, Principal, Store, request_from_row
from domain.lifecycle import unfilled
from domain.models import (
    APPROVER_ROLES,
    ApprovalSignal,
    Decision,
    EventKind,
    ProviderEvent,
    RefundMethod,
    RefundReason,
    RefundRequest,
    RefundWorkflowInput,
    RequestSource,
    RoleRequirement,
)
from starters.integrations import advice_view, integration_routes
from starters.limits import read_limited
from workflows.refund import RefundWorkflow

log = logging.getLogger("relay")

REQUEST_ROLES = frozenset({"requester", "admin"})
APPROVAL_ROLES = APPROVER_ROLES
REISSUABLE = frozenset({"refund_failed", "refund_canceled"})
READ_ROLES = frozenset({"requester", "approver", "auditor", "ops", "admin"})
OPS_ROLES = frozenset({"auditor", "ops", "admin"})


class ApprovalBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    decision: Decision
    reason: str = Field(default="", max_length=2000)


class ReissueBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: RefundMethod = RefundMethod.PROVIDER
    reason: str = Field(default="", max_length=2000)


class ManualConfirmationBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    paid: bool
    reason: str = Field(default="", max_length=2000)


class WebhookAck(BaseModel):
    receipt_id: int
    verdict: str
    workflow_id: str | None = None


def case_view(row: Mapping[str, Any], trail: list[dict[str, Any]]) -> dict[str, Any]:
    """The public shape of a case: amounts, state, provider refund, decision, approvals."""
    approvals = [
        {"approver": e["actor"], "action": e["action"], "at": e["occurred_at"].isoformat(),
         "reason": e["detail"].get("reason") or e["detail"].get("refusal", "")}
        for e in trail if e["action"].startswith("approval_") and e["action"] != "approval_requested"
    ]
    granted = [(e["actor"], frozenset(e["detail"].get("roles", []))) for e in trail
               if e["action"] == "approval_granted"]
    requirements = tuple(RoleRequirement.model_validate(r)
                         for r in (row["decision"] or {}).get("requirements", []))
    return {
        "refund_request_id": row["refund_request_id"], "status": row["status"],
        "missing_roles": unfilled(requirements, granted) if row["status"] == "awaiting_approval" else [],
        "parent_refund_request_id": row["parent_refund_request_id"], "method": row["method"],
        "provider": row["provider"], "charge_id": row["charge_id"], "amount": row["amount"],
        "currency": row["currency"], "merchant_account": row["merchant_account"],
        "reason": row["reason"], "source": row["source"], "requester": row["requester"],
        "reserved_amount": row["reserved_amount"], "provider_refund_id": row["provider_refund_id"],
        "provider_status": row["provider_status"], "failure_reason": row["failure_reason"],
        "decision": row["decision"], "approvals": approvals,
        "created_at": row["created_at"].isoformat(), "updated_at": row["updated_at"].isoformat(),
    }


async def start_refund(client: Client, settings: Settings, request: RefundRequest, requester: str,
                       trigger: ProviderEvent | None = None) -> WorkflowHandle[Any, Any]:
    """Starts the case's workflow, or attaches to the one already running or finished."""
    inp = RefundWorkflowInput(request=request, requester=requester, timings=settings.timings())
    options: dict[str, Any] = {
        "id": request.refund_request_id, "task_queue": settings.task_queue,
        "id_conflict_policy": WorkflowIDConflictPolicy.USE_EXISTING,
        "id_reuse_policy": WorkflowIDReusePolicy.REJECT_DUPLICATE,
    }
    if trigger is not None:
        options["start_signal"] = "provider_event"
        options["start_signal_args"] = [trigger]
    try:
        return await client.start_workflow(RefundWorkflow.run, inp, **options)
    except WorkflowAlreadyStartedError:
        return client.get_workflow_handle(request.refund_request_id)


def create_app(store: Store, client: Client, providers: Mapping[str, ProviderAdapter],
               settings: Settings) -> FastAPI:
    """The relay application; `refunds dev`, `refunds relay` and the tests build it here."""
    app = FastAPI(title="Refund Orchestrator relay", version="0.1.0",
                  description="Refund requests, approvals and provider webhooks.")
    bearer = HTTPBearer(auto_error=False)
    integrations = IntegrationStore(store)
    app.include_router(integration_routes(store, client, settings, start=start_refund))

    async def principal(
        creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> Principal:
        if creds is None:
            raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
        found = await store.authenticate(creds.credentials)
        if found is None:
            raise HTTPException(401, "invalid or revoked token", headers={"WWW-Authenticate": "Bearer"})
        return found

    Caller = Annotated[Principal, Depends(principal)]

    async def require(caller: Principal, roles: frozenset[str], action: str,
                      case_id: str | None = None) -> None:
        if caller.roles.isdisjoint(roles):
            await store.append_audit(case_id, caller.user, "access_refused",
                                     {"action": action, "needs_one_of": sorted(roles),
                                      "has": sorted(caller.roles)})
            raise HTTPException(403, f"{action} needs one of the roles {sorted(roles)}")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/refund-requests", status_code=202)
    async def request_refund(body: RefundRequest, caller: Caller, response: Response) -> dict[str, Any]:
        """Accepts a refund request once: 202 new, 200 identical repeat, 409 same id other values."""
        await require(caller, REQUEST_ROLES, "requesting a refund", body.refund_request_id)
        outcome, row = await store.create_case(body, caller.user)
        if outcome is CaseCreation.CONFLICT:
            raise HTTPException(409, f"refund_request_id {body.refund_request_id!r} was already "
                                     "used with different parameters")
        await start_refund(client, settings, body, row["requester"])
        if outcome is CaseCreation.IDENTICAL:
            response.status_code = 200
        fresh = await store.get_case(body.refund_request_id)
        assert fresh is not None
        return case_view(fresh, await store.audit_trail(body.refund_request_id))

    @app.get("/v1/refund-requests/{refund_request_id}")
    async def get_refund(refund_request_id: str, caller: Caller) -> dict[str, Any]:
        """The case, with the advisor's suggestion for approvers (labelled advisory)."""
        await require(caller, READ_ROLES, "reading a case", refund_request_id)
        row = await store.get_case(refund_request_id)
        if row is None:
            raise HTTPException(404, f"no refund request {refund_request_id!r}")
        return {**case_view(row, await store.audit_trail(refund_request_id)),
                "advice": advice_view(await integrations.advice(refund_request_id)),
                "tickets": await integrations.tickets(refund_request_id)}

    @app.get("/v1/refund-requests/{refund_request_id}/audit")
    async def get_audit(refund_request_id: str, caller: Caller) -> list[dict[str, Any]]:
        """The case's timeline: every decision, with who and when."""
        await require(caller, READ_ROLES, "reading an audit trail", refund_request_id)
        if await store.get_case(refund_request_id) is None:
            raise HTTPException(404, f"no refund request {refund_request_id!r}")
        return [{**e, "occurred_at": e["occurred_at"].isoformat()}
                for e in await store.audit_trail(refund_request_id)]

    @app.get("/v1/webhook-receipts")
    async def list_receipts(provider: str, caller: Caller,
                            event_id: str | None = None) -> list[dict[str, Any]]:
        """Every stored delivery of a provider's event (duplicates and rejections included)."""
        await require(caller, OPS_ROLES, "reading webhook receipts")
        return [{**r, "processed_at": r["processed_at"].isoformat() if r["processed_at"] else None}
                for r in await store.receipts(provider, event_id)]

    @app.post("/v1/refund-requests/{refund_request_id}/approvals", status_code=202)
    async def approve(refund_request_id: str, body: ApprovalBody, caller: Caller) -> dict[str, Any]:
        """Asks the workflow (an update with a validator) so the approver gets the verdict
        at once; the approver is the token's user. Refusals are audited."""
        await require(caller, APPROVAL_ROLES, "approving a refund", refund_request_id)
        row = await store.get_case(refund_request_id)
        if row is None:
            raise HTTPException(404, f"no refund request {refund_request_id!r}")
        if row["status"] != "awaiting_approval":
            raise HTTPException(409, f"case is {row['status']}, not awaiting approval")
        signal = ApprovalSignal(approver=caller.user, roles=tuple(sorted(caller.roles)),
                                decision=body.decision, reason=body.reason)
        handle = client.get_workflow_handle(refund_request_id)
        try:
            progress = await handle.execute_update(RefundWorkflow.submit_approval, signal)
        except WorkflowUpdateFailedError as exc:
            cause = exc.cause
            reason = cause.message if isinstance(cause, ApplicationError) else str(cause)
            if isinstance(cause, ApplicationError) and cause.type == "NotAwaitingApproval":
                raise HTTPException(409, reason) from None
            await store.append_audit(refund_request_id, caller.user, "approval_refused",
                                     {"decision": body.decision.value, "refusal": reason})
            raise HTTPException(403, reason) from None
        if not progress.accepted:
            raise HTTPException(403, progress.reason)
        return {"refund_request_id": refund_request_id, "decision": body.decision.value,
                "status": progress.status.value, "missing_roles": list(progress.missing_roles)}

    @app.post("/v1/refund-requests/{refund_request_id}/reissue", status_code=202)
    async def reissue(refund_request_id: str, body: ReissueBody, caller: Caller,
                      response: Response) -> dict[str, Any]:
        """A failed or canceled refund is reissued as a new linked request (another method
        if need be) that passes the same gates; it never exceeds the original amount."""
        await require(caller, OPS_ROLES - {"auditor"}, "reissuing a refund", refund_request_id)
        parent = await store.get_case(refund_request_id)
        if parent is None:
            raise HTTPException(404, f"no refund request {refund_request_id!r}")
        if parent["status"] not in REISSUABLE:
            raise HTTPException(409, f"case is {parent['status']}; only {sorted(REISSUABLE)} "
                                     "refunds can be reissued")
        children = await store.children(refund_request_id)
        open_child = next((c for c in children if c["status"] not in REISSUABLE), None)
        if open_child is not None:
            response.status_code = 200
            return case_view(open_child, await store.audit_trail(open_child["refund_request_id"]))
        request = reissue_request(parent, body, attempt=len(children) + 1)
        outcome, row = await store.create_case(request, caller.user)
        if outcome is CaseCreation.CONFLICT:
            raise HTTPException(409, f"{request.refund_request_id} exists with other parameters")
        await store.append_audit(refund_request_id, caller.user, "reissue_requested",
                                 {"child": request.refund_request_id, "method": body.method.value})
        await start_refund(client, settings, request, row["requester"])
        fresh = await store.get_case(request.refund_request_id)
        assert fresh is not None
        return case_view(fresh, await store.audit_trail(request.refund_request_id))

    @app.post("/v1/manual-refunds/{refund_request_id}/confirmation")
    async def confirm_manual(refund_request_id: str, body: ManualConfirmationBody,
                             caller: Caller) -> dict[str, Any]:
        """Ops confirm a bank transfer they made (or could not make); the case follows."""
        await require(caller, OPS_ROLES - {"auditor"}, "confirming a manual refund", refund_request_id)
        case = await store.get_case(refund_request_id)
        if case is None:
            raise HTTPException(404, f"no refund request {refund_request_id!r}")
        if case["requester"] == caller.user:
            await store.append_audit(refund_request_id, caller.user, "access_refused",
                                     {"action": "confirming a manual refund",
                                      "refusal": "the requester cannot confirm their own refund"})
            raise HTTPException(403, "the requester cannot confirm their own refund")
        row = await store.confirm_manual_refund(refund_request_id, succeeded=body.paid,
                                                by=caller.user, reason=body.reason)
        if row is None:
            raise HTTPException(409, "no pending manual refund for this case")
        refund = manual_refund(row)
        event = ProviderEvent(
            provider=refund.provider, event_id=f"{row['id']}:{row['status']}",
            event_type=f"manual_refund.{row['status']}", kind=EventKind.REFUND_STATUS,
            body_sha256=hashlib.sha256(body.model_dump_json().encode()).hexdigest(),
            occurred_at=row["confirmed_at"], refund_id=refund.refund_id, charge_id=refund.charge_id,
            refund_request_id=refund_request_id, amount=refund.amount, currency=refund.currency,
            status=refund.status, raw_status=refund.raw_status, failure_reason=refund.failure_reason)
        await client.get_workflow_handle(refund_request_id).signal(RefundWorkflow.provider_event, event)
        return {"refund_request_id": refund_request_id, "manual_refund": row["id"],
                "status": row["status"]}

    async def route(event: ProviderEvent) -> str | None:
        """Starts or signals the event's workflow; returns its id (None when unmatched)."""
        if event.kind is EventKind.REFUND_REQUESTED:
            request = request_from_event(event)
            requester = f"provider:{event.provider}"
            outcome, _ = await store.create_case(request, requester)
            if outcome is CaseCreation.CONFLICT:
                log.error("provider request %s conflicts with an existing case", request.refund_request_id)
                return None
            handle = await start_refund(client, settings, request, requester, trigger=event)
            return handle.id
        case_id = event.refund_request_id
        row = await store.get_case(case_id) if case_id else None
        if row is None and event.refund_id:
            row = await store.case_by_provider_refund(event.provider, event.refund_id)
        if row is None:
            log.error("NO CASE for %s %s (refund %s): provider-originated or unknown refund",
                      event.provider, event.event_type, event.refund_id)
            return None
        case_id = str(row["refund_request_id"])
        try:
            await client.get_workflow_handle(case_id).signal(RefundWorkflow.provider_event, event)
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:
                raise
            log.error("case %s is closed; event %s left for reconciliation", case_id, event.event_id)
            await store.append_audit(case_id, f"provider:{event.provider}", "event_after_close",
                                     {"event_id": event.event_id, "event_type": event.event_type})
        return case_id

    @app.post("/webhooks/{provider_name}", response_model=WebhookAck)
    async def webhook(provider_name: str, request: Request) -> Response:
        """Verify, store the receipt, dedup, then start or signal; 2xx only after that."""
        headers = {k.lower(): v for k, v in request.headers.items()}
        kept_headers = {k: v for k, v in headers.items() if k != "authorization"}
        body = await read_limited(request, settings.webhook_max_body_bytes)
        provider = providers.get(provider_name)
        event: ProviderEvent | None = None
        rejection: WebhookRejected | None = None
        if body is None:
            rejection = WebhookRejected(
                "too_large", f"body exceeds {settings.webhook_max_body_bytes} bytes")
        elif provider is None:
            rejection = WebhookRejected("unknown_provider", f"no provider {provider_name!r}")
        else:
            try:
                event = provider.parse_webhook(headers, body, time.time())
                if event.kind is EventKind.REFUND_REQUESTED:
                    request_from_event(event)
            except WebhookRejected as exc:
                rejection = exc
            except ValidationError as exc:
                rejection = WebhookRejected("malformed", f"invalid refund request: {exc.errors()[0]['msg']}")
        digest = hashlib.sha256(body or b"").hexdigest()
        if rejection is not None:
            stored = await store.store_receipt(
                provider=provider_name, event_id=rejection.event_id, event_type=rejection.event_type,
                body=body, body_sha256=digest, headers=kept_headers, verdict=rejection.verdict,
                error=rejection.message)
            level = logging.ERROR if rejection.verdict == "unknown_type" else logging.WARNING
            log.log(level, "webhook %s rejected (%s): %s", provider_name, rejection.verdict,
                    rejection.message)
            status = {"too_large": 413, "unknown_provider": 404, "unknown_type": 202,
                      "malformed": 400}.get(rejection.verdict, 401)
            return JSONResponse({"receipt_id": stored.receipt_id, "verdict": rejection.verdict,
                                 "detail": rejection.message}, status_code=status)
        assert event is not None
        stored = await store.store_receipt(
            provider=provider_name, event_id=event.event_id, event_type=event.event_type, body=body,
            body_sha256=digest, headers=kept_headers, verdict="accepted", error=None)
        if stored.verdict == "duplicate":
            log.info("duplicate delivery of %s %s (first receipt %s)", provider_name,
                     event.event_id, stored.first_receipt_id)
            if stored.first_processed:
                return JSONResponse(WebhookAck(receipt_id=stored.receipt_id,
                                               verdict="duplicate").model_dump())
        workflow_id = await route(event)
        await store.mark_receipt_processed(stored.first_receipt_id or stored.receipt_id, workflow_id)
        return JSONResponse(WebhookAck(receipt_id=stored.receipt_id, verdict=stored.verdict,
                                       workflow_id=workflow_id).model_dump())

    return app


def reissue_request(parent: dict[str, Any], body: ReissueBody, attempt: int) -> RefundRequest:
    """The child request: same charge and amount, its own id, linked to its parent; the
    parent's requester is behind it, so cannot approve it."""
    original = request_from_row(parent)
    return original.model_copy(update={
        "refund_request_id": f"{original.refund_request_id}-r{attempt}",
        "evidence": {**original.evidence, "reissue_reason": body.reason},
        "source": RequestSource.CONSOLE, "method": body.method,
        "parent_refund_request_id": original.refund_request_id,
        "trigger_identities": (parent["requester"],)})


def request_from_event(event: ProviderEvent) -> RefundRequest:
    """A provider-originated refund request becomes an ordinary request with a derived id."""
    return RefundRequest(
        refund_request_id=f"{event.provider}-{event.request_object_id}", provider=event.provider,
        charge_id=event.charge_id or "", amount=event.amount or 0, currency=event.currency or "",
        merchant_account=event.merchant_account or "", reason=event.reason or RefundReason.OTHER,
        evidence=event.evidence, source=RequestSource.WEBHOOK,
    )


