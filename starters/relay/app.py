"""The relay: the HTTP front door for refund requests, approvals and provider webhooks.

The app factory only wires: it builds the `FrontDoor` the routers reach through a
dependency, the webhook desk and its periodic re-drive, the CORS and input guards and the
answers to refusals and bad input, then includes the routers (each a module of this folder)
and mounts the ops console at /console. Every webhook delivery is stored as a receipt
before anything else, and acknowledged only after its workflow was started or signalled
(`webhook_desk.WebhookDesk`). Identity always comes from the bearer token, never from a body
field (`auth`). What a person may do to a case lives in `starters.actions`, shared with the
console; every refusal of an identified caller is written to the audit trail, while a
missing or invalid token is counted and logged, sampled (`adapters.refusals`): anyone can
send those.
"""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping

from fastapi import FastAPI, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send
from temporalio.client import Client
from temporalio.service import RPCError

from adapters import metrics
from adapters.approval_seal import approval_keys, sealing_client
from adapters.config import Settings
from adapters.db import Principal, Store
from adapters.oidc import AccessTokenVerifier
from adapters.providers.base import ProviderAdapter
from adapters.telemetry import server_telemetry
from starters.actions.approving import Refused
from starters.actions.cases import CaseActions
from starters.actions.front import FrontDoor, front_door
from starters.console import mount_console
from starters.console.sessions import PREFIX as CONSOLE_PREFIX
from starters.console.sessions import session_cookie
from starters.relay.auth import bearer
from starters.relay.integrations import router as integration_routes
from starters.relay.limits import InputGuard
from starters.relay.ops import router as ops_routes
from starters.relay.payouts import router as payout_routes
from starters.relay.reconciliation import router as reconciliation_routes
from starters.relay.refunds import router as refund_routes
from starters.relay.webhook_desk import TEMPORAL_AWAY, WebhookDesk
from starters.relay.webhooks import router as webhook_routes

log = logging.getLogger("relay")


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
                  description="Refund requests, approvals and provider webhooks.", lifespan=lifespan,
                  telemetry=server_telemetry())
    if settings.codec_cors_origins:
        app.add_middleware(CodecCors, allow_origins=settings.codec_cors_origins,
                           allow_credentials=True, allow_methods=["POST"],
                           allow_headers=["Authorization", "Authorization-Extras", "Content-Type",
                                          "X-Namespace"])
    app.state.front_door = FrontDoor(CaseActions(store, client, settings), providers)
    app.state.webhooks = desk
    app.state.oidc = AccessTokenVerifier.from_settings(settings)
    app.state.scrape_guard = metrics.scrape_guard(settings)
    app.add_exception_handler(Refused, refused)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(RPCError, temporal_unavailable)
    app.add_middleware(InputGuard, refused=guard_refused, codec_paths=CODEC_PATHS)
    for router in (integration_routes, ops_routes, refund_routes, webhook_routes, payout_routes,
                   reconciliation_routes):
        app.include_router(router)
    mount_console(app)
    return app


CODEC_PATHS = ("/codec/", f"{CONSOLE_PREFIX}/codec/")


class CodecCors(CORSMiddleware):
    """CORS for the codec endpoints only (`/codec/…`, `/console/codec/…`): the Temporal UI's
    origin may call them, and nothing else. Answering its scripts everywhere would let them
    read console pages (and their CSRF tokens) with the session's cookie, which SameSite
    does not stop (the UI is the same site, another port or host)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and str(scope["path"]).startswith(CODEC_PATHS):
            await super().__call__(scope, receive, send)
        else:
            await self.app(scope, receive, send)


async def refused(request: Request, exc: Exception) -> Response:
    """A refusal from the shared case rules (already audited) as an HTTP answer."""
    assert isinstance(exc, Refused)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status)


async def temporal_unavailable(request: Request, exc: Exception) -> Response:
    """Temporal did not answer a call a route made: a 503 the caller may send again (what was
    written stays, and a repeat is answered as the same request), not a bare 500. Any other
    refusal by Temporal (a payload too large, a wrong namespace, no permission) is no outage:
    a 500 that says so, never "send it again"."""
    assert isinstance(exc, RPCError)
    log.error("%s %s: Temporal refused or did not answer (%s): %s", request.method, request.url.path,
              exc.status.name, exc)
    if exc.status not in TEMPORAL_AWAY:
        return JSONResponse({"detail": f"the workflow service refused the call ({exc.status.name})"},
                            status_code=500)
    return JSONResponse({"detail": "the workflow service did not answer; send the same request again"},
                        status_code=503, headers={"Retry-After": "5"})


async def invalid(request: Request, exc: Exception) -> Response:
    """Bad input is answered 422 as usual and recorded, under the caller's name when the
    token (or, in the console, its session) is valid (FastAPI validates before our handlers
    run, so we look it up here). Where it failed is cut as the guard cuts names: a field
    name is the caller's to choose, and the trail is everyone's."""
    assert isinstance(exc, RequestValidationError)
    door = front_door(request)
    caller, via = await caller_of(request)
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid"}
    action = f"{request.method} {request.url.path}"
    if caller is None:
        door.api_refusals.refused(via, "invalid input without a valid token", action)
    else:
        await door.store.audit.record(None, caller.user, "action_refused", {
            "action": action, "via": via,
            "refusal": f"invalid {'.'.join(str(p)[:64] for p in first['loc'])}: {str(first['msg'])[:200]}"})
    return await request_validation_exception_handler(request, exc)


async def caller_of(request: Request) -> tuple[Principal | None, str]:
    """Who sent a request refused before any route ran (bearer token, else, on the console's
    own paths, its session), and through which front end. Elsewhere a session names nobody:
    behind TLS its cookie goes with every same-site request, so a page on another port could
    have a signed-in person's browser grow the trail under their name."""
    store = front_door(request).store
    via = "console" if request.url.path.startswith(CONSOLE_PREFIX) else "api"
    creds = await bearer(request)
    caller = await store.access.authenticate(creds.credentials) if creds else None
    cookie = session_cookie(request) if via == "console" else None
    if caller is None and cookie and (session := await store.access.session(cookie)):
        caller = session.principal
    return caller, via


async def guard_refused(request: Request, refusal: str) -> None:
    """A body over its limit, or text the store cannot hold, refused before any route:
    audited under the caller (bearer token, or the console's session), only logged for
    someone without credentials (they do not grow the audit chain)."""
    caller, via = await caller_of(request)
    action = f"{request.method} {request.url.path.replace(chr(0), '%00')}"  # no NUL in the trail
    if caller is None:
        log.warning("refused %s without credentials: %s", action, refusal)
        return
    await front_door(request).store.audit.record(None, caller.user, "action_refused",
                             {"action": action, "via": via, "refusal": refusal})
