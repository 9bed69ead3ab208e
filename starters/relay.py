"""The relay: the HTTP front door for refund requests, approvals and provider webhooks.

Every webhook delivery is stored as a receipt before anything else, and acknowledged
only after its workflow was started or signalled. Identity always comes from the bearer
token, never from a body field.
"""

import hashlib
import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field
from temporalio.client import Client

from adapters import metrics
from adapters.codec import CodecError
from adapters.config import Settings
from adapters.health import readiness
from adapters.providers.base import ProviderAdapter
from adapters.providers.manual import manual_refund
from adapters.store import CaseCreation, Principal, Store, request_from_row
from adapters.telemetry import bind_case
from domain.lifecycle import unfilled
from domain.models import (
    APPROVER_ROLES,
    ApprovalSignal,
    Decision,
    EventKind,
    ProviderEvent,
    RefundMethod,
    RefundRequest,
    RequestSource,
    RoleRequirement,
)
from starters.approvals import ApprovalRefused, send_approval
from starters.cases import start_refund
from starters.codec_endpoint import Direction, transcode
from starters.reconciliation_api import install_reconciliation_api
from starters.webhooks import WebhookDesk
from workflows.refund import RefundWorkflow

log = logging.getLogger("relay")

REQUEST_ROLES = frozenset({"requester", "admin"})
APPROVAL_ROLES = APPROVER_ROLES
REISSUABLE = frozenset({"refund_failed", "refund_canceled"})
READ_ROLES = frozenset({"requester", "approver", "auditor", "ops", "admin"})
OPS_ROLES = frozenset({"auditor", "ops", "admin"})
REPLAY_ROLES = frozenset({"ops", "admin"})


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


class ReplayBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    receipt_id: int | None = None
    since: AwareDatetime | None = None


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


def create_app(store: Store, client: Client, providers: Mapping[str, ProviderAdapter],
               settings: Settings) -> FastAPI:
    """The relay application; `refunds dev`, `refunds relay` and the tests build it here."""
    app = FastAPI(title="Refund Orchestrator relay", version="0.1.0",
                  description="Refund requests, approvals and provider webhooks.")
    if settings.codec_cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.codec_cors_origins,
                           allow_credentials=True, allow_methods=["POST"],
                           allow_headers=["Authorization", "Content-Type", "X-Namespace"])
    desk = WebhookDesk(store, client, providers, settings)
    app.state.webhooks = desk
    bearer = HTTPBearer(auto_error=False)

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

    install_reconciliation_api(app, store, client, providers, settings, principal, require)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """Readiness: PostgreSQL (with migrations) and Temporal (with the namespace) answer."""
        return await readiness(client, store)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        await metrics.refresh_case_gauges(store)
        body, content_type = metrics.exposition(metrics.CASE_REGISTRY)
        return Response(body, media_type=content_type)

    @app.post("/codec/{direction}")
    async def codec(direction: Direction, body: dict[str, Any], caller: Caller) -> dict[str, Any]:
        """Temporal's remote codec protocol, for the UI and `temporal --codec-endpoint`."""
        await require(caller, OPS_ROLES, "using the payload codec")
        codec = client.data_converter.payload_codec
        if codec is None:
            raise HTTPException(404, "this relay has no payload codec")
        try:
            return await transcode(codec, direction, body)
        except CodecError as exc:  # not a Payloads body, or sealed with a key we do not hold
            raise HTTPException(400, str(exc)) from None

    @app.post("/v1/refund-requests", status_code=202)
    async def request_refund(body: RefundRequest, caller: Caller, response: Response) -> dict[str, Any]:
        """Accepts a refund request once: 202 new, 200 identical repeat, 409 same id other values."""
        bind_case(body.refund_request_id)
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
        await require(caller, READ_ROLES, "reading a case", refund_request_id)
        row = await store.get_case(refund_request_id)
        if row is None:
            raise HTTPException(404, f"no refund request {refund_request_id!r}")
        return case_view(row, await store.audit_trail(refund_request_id))

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
        bind_case(refund_request_id)
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
            progress = await send_approval(handle, RefundWorkflow.submit_approval, signal)
        except ApprovalRefused as refused:
            if refused.status_code == 403:
                await store.append_audit(refund_request_id, caller.user, "approval_refused",
                                         {"decision": body.decision.value, "refusal": refused.reason})
            raise HTTPException(refused.status_code, refused.reason) from None
        if not progress.accepted:
            raise HTTPException(403, progress.reason)
        observe_approval_wait(await store.audit_trail(refund_request_id), body.decision)
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

    async def read_limited(request: Request) -> bytes | None:
        """Reads the body while counting, so a chunked body cannot bypass the limit."""
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > settings.webhook_max_body_bytes:
            return None
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > settings.webhook_max_body_bytes:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    @app.post("/webhooks/{provider_name}", response_model=WebhookAck)
    async def webhook(provider_name: str, request: Request) -> Response:
        """Verify, store the receipt, dedup, then start or signal; 2xx only after that."""
        headers = {k.lower(): v for k, v in request.headers.items()}
        result = await desk.ingest(provider_name, headers, await read_limited(request), now=time.time(),
                                   peer=request.client.host if request.client else "")
        return JSONResponse(result.body(), status_code=result.status_code)

    @app.get("/v1/webhooks/coverage")
    async def coverage(caller: Caller) -> dict[str, Any]:
        """Which event types arrived per provider, which have a handler, what was refused."""
        await require(caller, OPS_ROLES, "reading webhook coverage")
        return await desk.coverage()

    @app.post("/v1/webhook-receipts/replay")
    async def replay(body: ReplayBody, caller: Caller) -> list[dict[str, Any]]:
        """Re-feeds stored receipts through the webhook path (idempotent: events act once)."""
        await require(caller, REPLAY_ROLES, "replaying webhook receipts")
        if (body.receipt_id is None) == (body.since is None):
            raise HTTPException(422, "give exactly one of receipt_id and since")
        if body.receipt_id is not None:
            one = await desk.replay(body.receipt_id)
            if one is None:
                raise HTTPException(404, f"no receipt {body.receipt_id}")
            results = [one]
        else:
            assert body.since is not None
            results = await desk.replay_since(body.since)
        await store.append_audit(None, caller.user, "webhooks_replayed",
                                 {**body.model_dump(mode="json"),
                                  "receipts": [r.receipt_id for r in results]})
        return [{**r.body(), "status_code": r.status_code} for r in results]

    @app.post("/v1/webhook-receipts/redrive")
    async def redrive(caller: Caller) -> list[dict[str, Any]]:
        """Re-drives accepted receipts whose workflow was never reached."""
        await require(caller, REPLAY_ROLES, "re-driving webhook receipts")
        return [{**r.body(), "status_code": r.status_code} for r in await desk.redrive()]

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


def observe_approval_wait(trail: list[dict[str, Any]], decision: Decision) -> None:
    """Time since the case started waiting for approval, sampled at each decision."""
    asked = [e["occurred_at"] for e in trail if e["action"] == "approval_requested"]
    if asked:
        waited = (datetime.now(UTC) - asked[-1]).total_seconds()
        metrics.APPROVAL_WAIT.labels(decision.value).observe(max(waited, 0.0))


