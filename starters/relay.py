"""The relay: the HTTP front door for refund requests, approvals and provider webhooks.

Every webhook delivery is stored as a receipt before anything else, and acknowledged
only after its workflow was started or signalled (`webhooks.WebhookDesk`). Identity always
comes from the bearer token, never from a body field. What a person may do to a case lives
in `case_actions`, shared with the ops console (`console`, mounted here at /console); every
refusal of an identified caller is written to the audit trail, while a missing or invalid
token is counted and logged, sampled (`adapters.refusals`): anyone can send those.
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field
from temporalio.client import Client

from adapters import metrics
from adapters.approval_seal import approval_keys, sealing_client
from adapters.config import Settings
from adapters.health import readiness
from adapters.integration_store import IntegrationStore
from adapters.oidc import AccessTokenVerifier, looks_like_jwt
from adapters.providers.base import ProviderAdapter
from adapters.refusals import SampledRefusalLog
from adapters.store import CaseCreation, Principal, Store, hash_token
from adapters.telemetry import bind_case
from domain.models import RefundRequestBody, RequestSource
from starters.approving import ApprovalBody, Refused
from starters.case_actions import (
    ACT_ROLES,
    OPS_ROLES,
    REQUEST_ROLES,
    CaseActions,
    ManualConfirmationBody,
    ReissueBody,
)
from starters.cases import over_maximum, start_refund
from starters.codec_endpoint import CODEC_USES, Direction, answer, oidc_principal
from starters.console import PREFIX as CONSOLE_PREFIX
from starters.console import SESSION_COOKIE, install_console
from starters.integrations import advice_view, integration_routes
from starters.limits import InputGuard, read_limited
from starters.payout_routes import payout_routes
from starters.provider_wait import ProviderWaitBody, resolve_provider_wait
from starters.reconciliation_api import install_reconciliation_api
from starters.webhooks import WebhookDesk

log = logging.getLogger("relay")
CHANNEL_HEADER = "x-refund-channel"


class ReplayBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    receipt_id: int | None = None
    since: AwareDatetime | None = None
    after_receipt_id: int = Field(default=0, ge=0)
    """With `since`: go on after this original receipt (the last page's highest `replay_of`)."""
    limit: int = Field(default=100, ge=1, le=1000)
    """With `since`: at most this many deliveries a call."""


class WebhookAck(BaseModel):
    receipt_id: int
    verdict: str
    workflow_id: str | None = None


def create_app(store: Store, client: Client, providers: Mapping[str, ProviderAdapter],
               settings: Settings) -> FastAPI:
    """The relay application; `refunds dev`, `refunds relay` and the tests build it here.
    Its client seals the approvals it sends: this is the one path that can approve."""
    keys = approval_keys(settings)
    if keys is None:
        log.warning("REFUNDS_APPROVAL_KEYS is not set: approvals sent from here are unsealed and never count")
    client = sealing_client(client, keys)
    desk = WebhookDesk(store, client, providers, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        """The periodic re-drive runs while the relay serves, and is cancelled at shutdown."""
        every = settings.webhook_redrive_interval_seconds
        app.state.redrive = asyncio.create_task(desk.redrive_periodically(every)) if every > 0 else None
        try:
            yield
        finally:
            if app.state.redrive is not None:
                app.state.redrive.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await app.state.redrive

    app = FastAPI(title="Refund Orchestrator relay", version="0.1.0",
                  description="Refund requests, approvals and provider webhooks.", lifespan=lifespan)
    if settings.codec_cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.codec_cors_origins,
                           allow_credentials=True, allow_methods=["POST"],
                           allow_headers=["Authorization", "Authorization-Extras", "Content-Type",
                                          "X-Namespace"])
    actions = CaseActions(store, client, settings)
    app.state.webhooks = desk
    integrations = IntegrationStore(store)
    app.include_router(integration_routes(store, client, settings, start=start_refund, providers=providers))
    bearer = HTTPBearer(auto_error=False)
    anonymous = SampledRefusalLog()

    async def principal(
        request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> Principal:
        found = await store.authenticate(creds.credentials) if creds is not None else None
        if found is None:
            refusal = "missing bearer token" if creds is None else "invalid or revoked token"
            anonymous.refused("api", refusal, f"{request.method} {request.url.path}",
                              hash_token(creds.credentials)[:12] if creds else None)
            raise HTTPException(401, refusal, headers={"WWW-Authenticate": "Bearer"})
        return found

    Caller = Annotated[Principal, Depends(principal)]
    provider_prefixes = tuple(f"{name}-" for name in providers)

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
        action = f"{request.method} {request.url.path}"
        if caller is None:
            anonymous.refused("api", "invalid input without a valid token", action)
        else:
            await store.append_audit(None, caller.user, "action_refused", {
                "action": action, "via": "api",
                "refusal": f"invalid {'.'.join(str(p) for p in first['loc'])}: {first['msg']}"})
        return await request_validation_exception_handler(request, exc)

    async def guard_refused(request: Request, refusal: str) -> None:
        """A body over its limit, or text the store cannot hold, refused before any route:
        audited under the caller (bearer token or console session), only logged for
        someone without credentials (they do not grow the audit chain)."""
        creds = await bearer(request)
        caller = await store.authenticate(creds.credentials) if creds else None
        cookie = request.cookies.get(SESSION_COOKIE)
        if caller is None and cookie and (session := await store.console_session(cookie)):
            caller = session.principal
        action = f"{request.method} {request.url.path.replace(chr(0), '%00')}"  # no NUL in the trail
        via = "console" if request.url.path.startswith(CONSOLE_PREFIX) else "api"
        if caller is None:
            log.warning("refused %s without credentials: %s", action, refusal)
            return
        await store.append_audit(None, caller.user, "action_refused",
                                 {"action": action, "via": via, "refusal": refusal})

    app.add_middleware(InputGuard, refused=guard_refused)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """Readiness: PostgreSQL (with migrations) and Temporal (with the namespace) answer."""
        return await readiness(client, store)

    @app.get("/metrics", dependencies=[Depends(metrics.scrape_guard(settings))])
    async def prometheus_metrics() -> Response:
        """Prometheus text, for REFUNDS_METRICS_TOKEN's bearer (or anyone on a loopback bind)."""
        await metrics.refresh_case_gauges(store)
        body, content_type = metrics.exposition(metrics.CASE_REGISTRY)
        return Response(body, media_type=content_type)

    oidc = AccessTokenVerifier.from_settings(settings)

    async def codec_caller(
        request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> Principal:
        """A relay API token (the CLI) or, with OIDC configured, the Temporal UI's access token."""
        if oidc is None or creds is None or not looks_like_jwt(creds.credentials):
            return await principal(request, creds)
        try:
            return await oidc_principal(oidc, integrations, creds.credentials)
        except HTTPException as exc:
            refusal = {401: "invalid access token", 403: "access token of an unlinked person"}.get(
                exc.status_code, "issuer keys unavailable")  # a fixed set: metric labels
            anonymous.refused("temporal-ui", refusal, f"{request.method} {request.url.path}")
            raise

    @app.post("/codec/{direction}")
    async def codec(direction: Direction, body: dict[str, Any],
                    caller: Annotated[Principal, Depends(codec_caller)]) -> dict[str, Any]:
        """Temporal's remote codec protocol, for the UI and `temporal --codec-endpoint`."""
        await actions.require(caller, *CODEC_USES[direction], via="api")
        return await answer(client, direction, body)

    @app.post("/v1/refund-requests", status_code=202)
    async def request_refund(body: RefundRequestBody, caller: Caller, request: Request,
                             response: Response) -> dict[str, Any]:
        """Accepts a refund request once: 202 new, 200 identical repeat, 409 same id other
        values. The body says only what a caller may say; `X-Refund-Channel: cli` marks the
        CLI (both are token holders on this API; no other source can be claimed)."""
        bind_case(body.refund_request_id)
        await actions.require(caller, REQUEST_ROLES, "requesting a refund", body.refund_request_id,
                              via="api")
        if body.refund_request_id.startswith(provider_prefixes):
            raise RequestValidationError([{
                "type": "value_error", "loc": ("body", "refund_request_id"),
                "input": body.refund_request_id,
                "msg": "ids starting <provider>- are reserved for the provider's own requests"}])
        if too_large := over_maximum(providers, body.provider, body.amount, body.currency):
            raise RequestValidationError([{"type": "value_error", "loc": ("body", "amount"),
                                           "input": body.amount, "msg": too_large}])
        cli = request.headers.get(CHANNEL_HEADER, "").lower() == RequestSource.CLI.value
        refund = body.as_request(RequestSource.CLI if cli else RequestSource.API)
        outcome, row = await store.create_case(refund, caller.user)
        if outcome is CaseCreation.CONFLICT:
            raise HTTPException(409, f"refund_request_id {body.refund_request_id!r} was already "
                                     "used with different parameters")
        if row["requester"] != caller.user:  # a repeat of someone else's request shows nothing
            raise HTTPException(409, f"refund_request_id {body.refund_request_id!r} was already "
                                     "used by another requester")
        await start_refund(client, settings, refund, row["requester"])
        if outcome is CaseCreation.IDENTICAL:
            response.status_code = 200
        return await actions.view(body.refund_request_id)

    @app.get("/v1/refund-requests/{refund_request_id}")
    async def get_refund(refund_request_id: str, caller: Caller) -> dict[str, Any]:
        """The case, with the advisor's suggestion for approvers (labelled advisory)."""
        await actions.readable(caller, refund_request_id, "reading a case", via="api")
        return {**await actions.view(refund_request_id),
                "advice": advice_view(await integrations.advice(refund_request_id)),
                "tickets": await integrations.tickets(refund_request_id)}

    @app.get("/v1/refund-requests/{refund_request_id}/audit")
    async def get_audit(refund_request_id: str, caller: Caller) -> list[dict[str, Any]]:
        """The case's timeline: every decision, with who and when."""
        await actions.readable(caller, refund_request_id, "reading an audit trail", via="api")
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
        bind_case(refund_request_id)
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

    @app.post("/v1/refund-requests/{refund_request_id}/provider-wait")
    async def resolve_wait(refund_request_id: str, body: ProviderWaitBody,
                           caller: Caller) -> dict[str, Any]:
        """Ops end a wait for a provider's notification (Adyen: no lookup) with what its
        dashboard shows: 403 for the requester, trigger identities and approvers, 409 when
        the case is not waiting."""
        bind_case(refund_request_id)
        return await resolve_provider_wait(actions, caller, refund_request_id, body, via="api")

    @app.post("/v1/manual-refunds/{refund_request_id}/confirmation")
    async def confirm_manual(refund_request_id: str, body: ManualConfirmationBody,
                             caller: Caller) -> dict[str, Any]:
        """Ops confirm a bank transfer they made (or could not make); the case follows."""
        return await actions.confirm_manual(caller, refund_request_id, body, via="api")

    @app.post("/webhooks/{provider_name}", response_model=WebhookAck)
    async def webhook(provider_name: str, request: Request) -> Response:
        """Verify, store the receipt, dedup, then start or signal; 2xx only after that."""
        headers = {k.lower(): v for k, v in request.headers.items()}
        body = await read_limited(request, settings.webhook_max_body_bytes)
        result = await desk.ingest(provider_name, headers, body, now=time.time(),
                                   peer=request.client.host if request.client else "")
        if result.acknowledgement is not None:  # the provider reads the body, not the status
            return PlainTextResponse(result.acknowledgement, status_code=result.status_code,
                                     headers={"x-receipt-id": str(result.receipt_id),
                                              "x-webhook-verdict": result.verdict})
        return JSONResponse(result.body(), status_code=result.status_code)

    @app.get("/v1/webhooks/coverage")
    async def coverage(caller: Caller) -> dict[str, Any]:
        """Which event types arrived per provider, which have a handler, what was refused."""
        await actions.require(caller, OPS_ROLES, "reading webhook coverage", via="api")
        return await desk.coverage()

    @app.post("/v1/webhook-receipts/replay")
    async def replay(body: ReplayBody, caller: Caller) -> list[dict[str, Any]]:
        """Re-feeds stored receipts through the webhook path (idempotent: events act once)."""
        await actions.require(caller, ACT_ROLES, "replaying webhook receipts", via="api")
        if (body.receipt_id is None) == (body.since is None):
            raise HTTPException(422, "give exactly one of receipt_id and since")
        if body.receipt_id is not None:
            one = await desk.replay(body.receipt_id)
            if one is None:
                raise HTTPException(404, f"no receipt {body.receipt_id}")
            results = [one]
        else:
            assert body.since is not None
            results = await desk.replay_since(body.since, after_id=body.after_receipt_id,
                                              limit=body.limit)
        await store.append_audit(None, caller.user, "webhooks_replayed",
                                 {**body.model_dump(mode="json"),
                                  "receipts": [r.receipt_id for r in results]})
        return [{**r.body(), "status_code": r.status_code} for r in results]

    @app.post("/v1/webhook-receipts/redrive")
    async def redrive(caller: Caller) -> list[dict[str, Any]]:
        """Re-drives accepted receipts whose workflow was never reached."""
        await actions.require(caller, ACT_ROLES, "re-driving webhook receipts", via="api")
        return [{**r.body(), "status_code": r.status_code} for r in await desk.redrive()]

    async def require(caller: Principal, roles: frozenset[str], action: str,
                      case_id: str | None = None) -> None:
        await actions.require(caller, roles, action, case_id, via="api")

    app.include_router(payout_routes(store, client, principal, require, providers))
    install_reconciliation_api(app, store, client, providers, settings, principal, require)
    install_console(app, actions, providers)
    return app

