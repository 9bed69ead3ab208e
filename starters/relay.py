"""The relay: the HTTP front door for refund requests, approvals and provider webhooks.

Every webhook delivery is stored as a receipt before anything else, and acknowledged
only after its workflow was started or signalled. Identity always comes from the bearer
token, never from a body field.
"""

import logging
import time
from collections.abc import Mapping
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field
from temporalio.client import Client

from adapters.config import Settings
from adapters.providers.base import ProviderAdapter
from adapters.store import CaseCreation, Principal, Store
from domain.models import ApprovalSignal, Decision, RefundRequest
from starters.cases import start_refund
from starters.webhooks import WebhookDesk
from workflows.refund import RefundWorkflow

log = logging.getLogger("relay")

REQUEST_ROLES = frozenset({"requester", "admin"})
APPROVAL_ROLES = frozenset({"approver", "admin"})
READ_ROLES = frozenset({"requester", "approver", "auditor", "ops", "admin"})
OPS_ROLES = frozenset({"auditor", "ops", "admin"})
REPLAY_ROLES = frozenset({"ops", "admin"})


class ApprovalBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    decision: Decision
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
    return {
        "refund_request_id": row["refund_request_id"], "status": row["status"],
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
        """Signals the workflow; the approver is the token's user. Refusals are audited."""
        await require(caller, APPROVAL_ROLES, "approving a refund", refund_request_id)
        row = await store.get_case(refund_request_id)
        if row is None:
            raise HTTPException(404, f"no refund request {refund_request_id!r}")
        if row["requester"] == caller.user:
            await store.append_audit(refund_request_id, caller.user, "approval_refused",
                                     {"decision": body.decision.value,
                                      "refusal": "the requester cannot approve their own refund"})
            raise HTTPException(403, "the requester cannot approve their own refund")
        if row["status"] != "awaiting_approval":
            raise HTTPException(409, f"case is {row['status']}, not awaiting approval")
        signal = ApprovalSignal(approver=caller.user, roles=tuple(sorted(caller.roles)),
                                decision=body.decision, reason=body.reason)
        await client.get_workflow_handle(refund_request_id).signal(RefundWorkflow.approve, signal)
        return {"refund_request_id": refund_request_id, "accepted_for_review": True,
                "decision": body.decision.value}

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
