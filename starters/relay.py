"""The relay: the HTTP front door for refund requests, approvals and provider webhooks.

Every webhook delivery is stored as a receipt before anything else, and acknowledged
only after its workflow was started or signalled. Identity always comes from the bearer
token, never from a body field. What a person may do to a case lives in `case_actions`,
shared with the ops console (`console`, mounted here at /console); every refusal, including
a missing or revoked token, is written to the audit trail.
"""

import hashlib
import logging
import time
from collections.abc import Mapping
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ValidationError
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from adapters.config import Settings
from adapters.providers.base import ProviderAdapter, WebhookRejected
from adapters.store import CaseCreation, Principal, Store, hash_token
from domain.models import (
    EventKind,
    ProviderEvent,
    RefundReason,
    RefundRequest,
    RequestSource,
)
from starters.case_actions import (
    OPS_ROLES,
    READ_ROLES,
    REQUEST_ROLES,
    ApprovalBody,
    CaseActions,
    ManualConfirmationBody,
    Refused,
    ReissueBody,
    case_view,
    start_refund,
)
from starters.console import install_console
from workflows.refund import RefundWorkflow

log = logging.getLogger("relay")


class WebhookAck(BaseModel):
    receipt_id: int
    verdict: str
    workflow_id: str | None = None


def create_app(store: Store, client: Client, providers: Mapping[str, ProviderAdapter],
               settings: Settings) -> FastAPI:
    """The relay application; `refunds dev`, `refunds relay` and the tests build it here."""
    app = FastAPI(title="Refund Orchestrator relay", version="0.1.0",
                  description="Refund requests, approvals and provider webhooks.")
    actions = CaseActions(store, client, settings)
    bearer = HTTPBearer(auto_error=False)

    async def principal(
        request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> Principal:
        found = await store.authenticate(creds.credentials) if creds is not None else None
        if found is None:
            refusal = "missing bearer token" if creds is None else "invalid or revoked token"
            await store.append_audit(None, "anonymous", "access_refused", {
                "action": f"{request.method} {request.url.path}", "refusal": refusal, "via": "api",
                "token_fingerprint": hash_token(creds.credentials)[:12] if creds else None})
            raise HTTPException(401, refusal, headers={"WWW-Authenticate": "Bearer"})
        return found

    Caller = Annotated[Principal, Depends(principal)]

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused) -> JSONResponse:
        """A refusal from the shared case rules (already audited) as an HTTP answer."""
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        """Bad input is answered 422 as usual and recorded, under the caller's name when the
        token is valid (FastAPI validates before our handlers run, so we look it up here)."""
        creds = await bearer(request)
        caller = await store.authenticate(creds.credentials) if creds else None
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid"}
        await store.append_audit(None, caller.user if caller else "anonymous", "action_refused", {
            "action": f"{request.method} {request.url.path}", "via": "api",
            "refusal": f"invalid {'.'.join(str(p) for p in first['loc'])}: {first['msg']}"})
        return await request_validation_exception_handler(request, exc)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/refund-requests", status_code=202)
    async def request_refund(body: RefundRequest, caller: Caller, response: Response) -> dict[str, Any]:
        """Accepts a refund request once: 202 new, 200 identical repeat, 409 same id other values."""
        await actions.require(caller, REQUEST_ROLES, "requesting a refund", body.refund_request_id,
                              via="api")
        outcome, row = await store.create_case(body, caller.user)
        if outcome is CaseCreation.CONFLICT:
            raise HTTPException(409, f"refund_request_id {body.refund_request_id!r} was already "
                                     "used with different parameters")
        await start_refund(client, settings, body, row["requester"])
        if outcome is CaseCreation.IDENTICAL:
            response.status_code = 200
        return await actions.view(body.refund_request_id)

    @app.get("/v1/refund-requests/{refund_request_id}")
    async def get_refund(refund_request_id: str, caller: Caller) -> dict[str, Any]:
        await actions.require(caller, READ_ROLES, "reading a case", refund_request_id, via="api")
        row = await store.get_case(refund_request_id)
        if row is None:
            raise HTTPException(404, f"no refund request {refund_request_id!r}")
        return case_view(row, await store.audit_trail(refund_request_id))

    @app.get("/v1/refund-requests/{refund_request_id}/audit")
    async def get_audit(refund_request_id: str, caller: Caller) -> list[dict[str, Any]]:
        """The case's timeline: every decision, with who and when."""
        await actions.require(caller, READ_ROLES, "reading an audit trail", refund_request_id, via="api")
        if await store.get_case(refund_request_id) is None:
            raise HTTPException(404, f"no refund request {refund_request_id!r}")
        return [{**e, "occurred_at": e["occurred_at"].isoformat()}
                for e in await store.audit_trail(refund_request_id)]

    @app.get("/v1/webhook-receipts")
    async def list_receipts(provider: str, caller: Caller,
                            event_id: str | None = None) -> list[dict[str, Any]]:
        """Every stored delivery of a provider's event (duplicates and rejections included)."""
        await actions.require(caller, OPS_ROLES, "reading webhook receipts", via="api")
        return [{**r, "processed_at": r["processed_at"].isoformat() if r["processed_at"] else None}
                for r in await store.receipts(provider, event_id)]

    @app.post("/v1/refund-requests/{refund_request_id}/approvals", status_code=202)
    async def approve(refund_request_id: str, body: ApprovalBody, caller: Caller) -> dict[str, Any]:
        """The verdict comes back at once: 202 with the roles still missing, 403 refused
        (audited), 409 when the case is not awaiting approval."""
        return await actions.decide(caller, refund_request_id, body, via="api")

    @app.post("/v1/refund-requests/{refund_request_id}/reissue", status_code=202)
    async def reissue(refund_request_id: str, body: ReissueBody, caller: Caller,
                      response: Response) -> dict[str, Any]:
        """A failed or canceled refund is reissued as a new linked request (another method
        if need be) that passes the same gates; it never exceeds the original amount."""
        created, child = await actions.reissue(caller, refund_request_id, body, via="api")
        if not created:
            response.status_code = 200
        return child

    @app.post("/v1/manual-refunds/{refund_request_id}/confirmation")
    async def confirm_manual(refund_request_id: str, body: ManualConfirmationBody,
                             caller: Caller) -> dict[str, Any]:
        """Ops confirm a bank transfer they made (or could not make); the case follows."""
        return await actions.confirm_manual(caller, refund_request_id, body, via="api")

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
        body = await read_limited(request)
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

    install_console(app, actions, providers)
    return app


def request_from_event(event: ProviderEvent) -> RefundRequest:
    """A provider-originated refund request becomes an ordinary request with a derived id."""
    return RefundRequest(
        refund_request_id=f"{event.provider}-{event.request_object_id}", provider=event.provider,
        charge_id=event.charge_id or "", amount=event.amount or 0, currency=event.currency or "",
        merchant_account=event.merchant_account or "", reason=event.reason or RefundReason.OTHER,
        evidence=event.evidence, source=RequestSource.WEBHOOK,
    )


