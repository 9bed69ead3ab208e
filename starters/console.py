"""The ops console at /console: cases, banners, approvals, reissue and webhook coverage,
server-rendered (Jinja2, one CSS file, no JavaScript).

Sign-in exchanges an API token for a server-side session (random id in an HttpOnly,
SameSite=Strict cookie; only its hash is stored, and it dies with its token). Every form
carries the session's CSRF token. Every button calls the same `CaseActions` as the HTTP
API, so the console can never do what the API would refuse; refusals are audited there.
"""

import secrets
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, PackageLoader, StrictUndefined
from pydantic import BaseModel, ValidationError

from adapters import casebook
from adapters.casebook import BANNER_STATUSES, CaseFilter
from adapters.integration_store import IntegrationStore
from adapters.providers.base import ProviderAdapter
from adapters.reconciliation import Reconciliations, break_view, run_view
from adapters.refusals import SampledRefusalLog
from adapters.store import ConsoleSession, Principal, hash_token
from domain.models import CLOSED_STATUSES, CaseStatus
from domain.money import UnknownCurrencyError, format_minor, normalise_currency, parse_major
from starters.ages import parse_age
from starters.approving import ApprovalBody, Refused
from starters.case_actions import (
    ACT_ROLES,
    APPROVAL_ROLES,
    OPS_ROLES,
    READ_ROLES,
    REISSUABLE,
    SEE_ALL_ROLES,
    CaseActions,
    ManualConfirmationBody,
    ReissueBody,
    approval_verdict,
    case_view,
    granted_in,
    missing_roles,
)
from starters.codec_endpoint import CODEC_USES, Direction, answer
from starters.integrations import advice_view
from starters.payout_console import ConsolePages, install_payout_pages
from starters.provider_wait import ProviderWaitBody, resolve_provider_wait, waiting
from starters.reconciliation_api import (
    RUN_ROLES,
    BreakDecisionBody,
    BreakReopenBody,
    Require,
    decide_on_break,
    reopen_break,
)

SESSION_COOKIE = "rfo_session"
SIGN_IN_COOKIE = "rfo_sign_in"
RECONCILIATION_RUNS = 20
RECONCILIATION_RUNS_WITH_BREAKS = 5

PREFIX = "/console"
AGES = ("", "1h", "24h", "7d", "30d", "90d")
NOTICES = {
    "approve": "Your approval was recorded.",
    "deny": "Your denial was recorded; the case is closed and its reservation released.",
    "reissued": "Reissue requested: this is the new linked case.",
    "reissue_open": "A reissue of that refund is already open: this is it.",
    "confirmed": "Your confirmation was recorded; the case follows it.",
    "wait_resolved": "What the provider shows was recorded; the case follows it.",
}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY", "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin", "Cache-Control": "no-store",
}
STATUS_TONES = {
    "succeeded": "ok", "awaiting_approval": "wait",
    **{s: "bad" for s in BANNER_STATUSES},
    **{s.value: "off" for s in CLOSED_STATUSES if s.value not in BANNER_STATUSES},
}
Body = TypeVar("Body", bound=BaseModel)


class SignInRequired(Exception):
    """No live session behind the request's cookie (never had one, ended, expired, revoked)."""


def _when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if value else "—"


def _age(value: datetime) -> str:
    seconds = int((datetime.now(UTC) - value).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def _templates() -> Jinja2Templates:
    env = Environment(loader=PackageLoader("starters", "templates"), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(money=format_minor, when=_when, age=_age,
                       tone=lambda status: STATUS_TONES.get(status, "run"))
    return Jinja2Templates(env=env)


def install_console(app: FastAPI, actions: CaseActions,
                    providers: Mapping[str, ProviderAdapter]) -> None:
    """Mounts the console on the relay application."""
    store, settings = actions.store, actions.settings
    anonymous = SampledRefusalLog()  # refusals nobody signed: counted, never chained
    integrations = IntegrationStore(store)
    recon = Reconciliations(store)
    templates = _templates()
    stylesheet = resources.files("starters").joinpath("static/console.css").read_bytes()
    router = APIRouter(prefix=PREFIX, include_in_schema=False)

    def page(request: Request, name: str, session: ConsoleSession | None, status: int = 200,
             **context: Any) -> Response:
        response = templates.TemplateResponse(request, name, {
            "me": session.principal if session else None,
            "csrf": session.csrf_token if session else "",
            "can_see_ops": bool(session and not session.principal.roles.isdisjoint(OPS_ROLES)),
            **context}, status_code=status)
        response.headers.update(SECURITY_HEADERS)
        return response

    def sign_in_page(request: Request, status: int = 200, error: str = "") -> Response:
        """The form carries a fresh value that must match its cookie (double submit), so
        another site cannot sign a browser in under someone else's token."""
        form_token = secrets.token_urlsafe(24)
        response = page(request, "sign_in.html", None, status=status, form_token=form_token,
                        error=error)
        response.set_cookie(SIGN_IN_COOKIE, form_token, httponly=True, samesite="strict",
                            secure=settings.console_secure_cookie, path=PREFIX, max_age=3600)
        return response

    async def current(request: Request) -> ConsoleSession:
        cookie = request.cookies.get(SESSION_COOKIE)
        session = await store.console_session(cookie) if cookie else None
        if session is None:
            raise SignInRequired
        return session

    @app.exception_handler(SignInRequired)
    async def sign_in_first(request: Request, exc: SignInRequired) -> Response:
        """Pages send the browser to sign in; a form posted without a live session is a
        refused action (a revoked token's session lands here), counted: it names nobody."""
        if request.method == "GET":
            return RedirectResponse(f"{PREFIX}/sign-in", status_code=303)
        anonymous.refused("console", "no live console session", f"POST {request.url.path}")
        return sign_in_page(request, 401, "Your session has ended (signed out, expired or its "
                                          "token was revoked). Sign in again.")

    async def posted(request: Request, session: ConsoleSession) -> dict[str, str]:
        """The form's fields, once its CSRF token matched the session's; else 403 (audited)."""
        form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
        sent = form.pop("csrf", "")
        if not secrets.compare_digest(sent.encode(), session.csrf_token.encode()):
            await store.append_audit(None, session.principal.user, "csrf_refused", {
                "action": f"POST {request.url.path}", "via": "console",
                "refusal": "missing or wrong CSRF token"})
            raise Refused(403, "This form is out of date or was not sent by the console "
                               "(CSRF check failed). Reload the page and try again.")
        return form

    async def validated(model: type[Body], form: dict[str, str], caller: Principal,
                        case_id: str, action: str) -> Body:
        try:
            return model.model_validate(form)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "form"
            await actions.refuse(caller, case_id, 422, action, f"invalid {where}: {first['msg']}",
                                 via="console")

    async def forbidden(request: Request, session: ConsoleSession, roles: frozenset[str], action: str,
                        title: str, case_id: str | None = None) -> Response | None:
        """The refusal page when the user lacks every role in `roles` (audited), else None."""
        try:
            await actions.require(session.principal, roles, action, case_id, via="console")
        except Refused as exc:
            return page(request, "message.html", session, status=exc.status, title=title,
                        error=exc.detail)
        return None

    @router.post("/codec/{direction}")
    async def codec(request: Request, direction: Direction, body: dict[str, Any]) -> dict[str, Any]:
        """The Temporal UI's remote codec for people signed in here: the UI sends the session
        cookie when its codec setting includes credentials (same site, another port)."""
        session = await current(request)
        await actions.require(session.principal, *CODEC_USES[direction], via="console")
        return await answer(actions.client, direction, body)

    # -- sign-in ----------------------------------------------------------------------

    @router.get("")
    async def home() -> Response:
        return RedirectResponse(f"{PREFIX}/cases", status_code=303)

    @router.get("/static/console.css")
    async def css() -> Response:
        return Response(stylesheet, media_type="text/css",
                        headers={"Cache-Control": "public, max-age=3600"})

    @router.get("/sign-in")
    async def sign_in_form(request: Request) -> Response:
        return sign_in_page(request)

    @router.post("/sign-in")
    async def sign_in(request: Request) -> Response:
        form = await request.form()
        token, sent = str(form.get("token", "")).strip(), str(form.get("form_token", ""))
        expected = request.cookies.get(SIGN_IN_COOKIE, "")
        if not expected or not secrets.compare_digest(sent.encode(), expected.encode()):
            anonymous.refused("console", "sign-in form token does not match its cookie", "console sign-in")
            return sign_in_page(request, 403, "The sign-in form expired. Try again.")
        session_id = await store.open_session(
            token, timedelta(hours=settings.console_session_hours)) if token else None
        if session_id is None:
            anonymous.refused("console", "missing token" if not token else "invalid or revoked token",
                              "console sign-in", hash_token(token)[:12] if token else None)
            return sign_in_page(request, 401, "That token is not valid (unknown or revoked).")
        response = RedirectResponse(f"{PREFIX}/cases", status_code=303)
        response.set_cookie(SESSION_COOKIE, session_id, httponly=True, samesite="strict",
                            secure=settings.console_secure_cookie, path=PREFIX,
                            max_age=int(settings.console_session_hours * 3600))
        response.delete_cookie(SIGN_IN_COOKIE, path=PREFIX)
        return response

    @router.post("/sign-out")
    async def sign_out(request: Request) -> Response:
        session = await current(request)
        try:
            await posted(request, session)
        except Refused as exc:
            return page(request, "message.html", session, status=exc.status, title="Refused",
                        error=exc.detail)
        await store.end_session(session)
        response = RedirectResponse(f"{PREFIX}/sign-in", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path=PREFIX)
        return response

    # -- cases --------------------------------------------------------------------------

    async def case_filter(request: Request, caller: Principal) -> tuple[CaseFilter, dict[str, str]]:
        """Reads the list's query; bad values are a 422 (audited), never silently ignored."""
        query = {k: request.query_params.get(k, "").strip() for k in
                 ("status", "provider", "currency", "min", "max", "older_than", "newer_than", "q",
                  "mine")}
        known = {s.value for s in CaseStatus}
        try:
            if query["status"] not in known | {"", "attention", "open"}:
                raise ValueError(f"unknown status {query['status']!r}")
            statuses = {"attention": BANNER_STATUSES,
                        "open": tuple(sorted(known - {s.value for s in CLOSED_STATUSES}))}.get(
                query["status"], (query["status"],) if query["status"] else ())
            if query["mine"]:
                statuses = ("awaiting_approval",)
            currency = normalise_currency(query["currency"]) if query["currency"] else None
            if (query["min"] or query["max"]) and currency is None:
                raise ValueError("choose a currency for an amount range")
            bounds = [parse_major(query[k], currency) if query[k] and currency else None
                      for k in ("min", "max")]
            ages = [parse_age(query[k]) if query[k] else None for k in ("older_than", "newer_than")]
        except (ValueError, UnknownCurrencyError) as exc:
            await actions.refuse(caller, None, 422, "filtering cases", str(exc), via="console")
        wanted = CaseFilter(statuses=statuses, provider=query["provider"] or None, currency=currency,
                            min_amount=bounds[0], max_amount=bounds[1], older_than=ages[0],
                            newer_than=ages[1], search=query["q"][:128] or None,
                            requester=caller.user if caller.roles.isdisjoint(SEE_ALL_ROLES) else None)
        return wanted, query

    @router.get("/cases")
    async def cases(request: Request) -> Response:
        session = await current(request)
        caller = session.principal
        if denied := await forbidden(request, session, READ_ROLES, "reading cases", "Cases"):
            return denied
        try:
            wanted, query = await case_filter(request, caller)
        except Refused as exc:
            return page(request, "message.html", session, status=exc.status, title="Cases",
                        error=exc.detail)
        rows = await casebook.find_cases(store, wanted)
        waiting = [r["refund_request_id"] for r in rows if r["status"] == "awaiting_approval"]
        granted = await casebook.granted_approvals(store, waiting)
        if query["mine"]:
            rows = [r for r in rows
                    if approval_verdict(caller, r, granted[r["refund_request_id"]]).accepted]
        items = [{"row": r, "missing": missing_roles(r, granted.get(r["refund_request_id"], []))}
                 for r in rows]
        return page(request, "cases.html", session, items=items, query=query, limit=wanted.limit,
                    statuses=[s.value for s in CaseStatus], ages=AGES,
                    providers=sorted(set(await casebook.providers_seen(store)) | set(providers)))

    async def case_page(request: Request, session: ConsoleSession, case_id: str, *,
                        status: int = 200, error: str = "", notice: str = "") -> Response:
        caller = session.principal
        try:
            row = await actions.readable(caller, case_id, "reading a case", via="console")
        except Refused as exc:
            return page(request, "message.html", session, status=exc.status,
                        title="No such case" if exc.status == 404 else "Case", error=exc.detail)
        trail = await store.audit_trail(case_id)
        granted = granted_in(trail)
        manual = await store.manual_refund(case_id)
        ui = settings.temporal_ui_url
        return page(
            request, "case.html", session, status=status, error=error, notice=notice,
            case=case_view(row, trail), row=row, trail=trail, children=await store.children(case_id),
            manual=manual, ledger=await store.ledger_entries(case_id),
            notices=await store.notices(case_id),
            advice=advice_view(await integrations.advice(case_id)),
            tickets=await integrations.tickets(case_id),
            temporal_url=(f"{ui.rstrip('/')}/namespaces/{quote(settings.temporal_namespace)}"
                          f"/workflows/{quote(case_id)}") if ui else None,
            banner=row["status"] if row["status"] in BANNER_STATUSES else None,
            verdict=approval_verdict(caller, row, granted) if row["status"] == "awaiting_approval"
            else None,
            can_decide=row["status"] == "awaiting_approval" and not caller.roles.isdisjoint(
                APPROVAL_ROLES),
            can_reissue=row["status"] in REISSUABLE and not caller.roles.isdisjoint(ACT_ROLES),
            can_confirm=bool(manual and manual["status"] == "pending"
                             and not caller.roles.isdisjoint(ACT_ROLES)),
            can_resolve_wait=waiting(trail) and not caller.roles.isdisjoint(ACT_ROLES))

    @router.get("/cases/{case_id}")
    async def case(request: Request, case_id: str, notice: str = "") -> Response:
        return await case_page(request, await current(request), case_id,
                               notice=NOTICES.get(notice, ""))

    async def act(request: Request, case_id: str, model: type[Body], action: str,
                  perform: Callable[[Principal, Body], Awaitable[tuple[str, str]]]) -> Response:
        """One button: session, CSRF, input, then the shared rule; success redirects to the
        case it produced (post/redirect/get), a refusal shows the case with its reason."""
        session = await current(request)
        try:
            form = await posted(request, session)
            body = await validated(model, form, session.principal, case_id, action)
            target, notice = await perform(session.principal, body)
        except Refused as exc:
            return await case_page(request, session, case_id, status=exc.status, error=exc.detail)
        return RedirectResponse(f"{PREFIX}/cases/{quote(target)}?{urlencode({'notice': notice})}",
                                status_code=303)

    @router.post("/cases/{case_id}/approval")
    async def decide(request: Request, case_id: str) -> Response:
        async def perform(caller: Principal, body: ApprovalBody) -> tuple[str, str]:
            await actions.decide(caller, case_id, body, via="console")
            return case_id, body.decision.value
        return await act(request, case_id, ApprovalBody, "approving a refund", perform)

    @router.post("/cases/{case_id}/reissue")
    async def reissue(request: Request, case_id: str) -> Response:
        async def perform(caller: Principal, body: ReissueBody) -> tuple[str, str]:
            created, child = await actions.reissue(caller, case_id, body, via="console")
            return child["refund_request_id"], "reissued" if created else "reissue_open"
        return await act(request, case_id, ReissueBody, "reissuing a refund", perform)

    @router.post("/cases/{case_id}/manual-confirmation")
    async def confirm(request: Request, case_id: str) -> Response:
        async def perform(caller: Principal, body: ManualConfirmationBody) -> tuple[str, str]:
            await actions.confirm_manual(caller, case_id, body, via="console")
            return case_id, "confirmed"
        return await act(request, case_id, ManualConfirmationBody, "confirming a manual refund",
                         perform)

    @router.post("/cases/{case_id}/provider-wait")
    async def resolve_wait(request: Request, case_id: str) -> Response:
        async def perform(caller: Principal, body: ProviderWaitBody) -> tuple[str, str]:
            await resolve_provider_wait(actions, caller, case_id, body, via="console")
            return case_id, "wait_resolved"
        return await act(request, case_id, ProviderWaitBody, "resolving a provider notification wait",
                         perform)

    # -- ops pages ------------------------------------------------------------------------

    @router.get("/coverage")
    async def coverage(request: Request) -> Response:
        session = await current(request)
        if denied := await forbidden(request, session, OPS_ROLES, "reading webhook coverage",
                                     "Webhook coverage"):
            return denied
        report = await casebook.coverage(store, {n: p.event_types for n, p in providers.items()})
        return page(request, "coverage.html", session, report=report,
                    rejected=await casebook.rejected_receipts(store))

    async def reconciliation_page(request: Request, session: ConsoleSession, *, status: int = 200,
                                  error: str = "", notice: str = "") -> Response:
        if denied := await forbidden(request, session, OPS_ROLES | APPROVAL_ROLES,
                                     "reading reconciliation reports", "Reconciliation"):
            return denied
        runs = [run_view(r) for r in await recon.runs(RECONCILIATION_RUNS)]
        breaks = {run["run_id"]: [break_view(b) async for b in recon.run_breaks(run["run_id"], 200)]
                  for run in runs[:RECONCILIATION_RUNS_WITH_BREAKS]}
        return page(request, "reconciliation.html", session, status=status, error=error,
                    notice=notice, runs=runs, breaks=breaks,
                    can_decide=not session.principal.roles.isdisjoint(APPROVAL_ROLES),
                    can_reopen=not session.principal.roles.isdisjoint(RUN_ROLES))

    @router.get("/reconciliation")
    async def reconciliation(request: Request, notice: str = "") -> Response:
        return await reconciliation_page(request, await current(request), notice=notice)

    async def on_break(request: Request, break_id: int, model: type[Body],
                       perform: Callable[[Principal, Body, Require], Awaitable[str]]) -> Response:
        """A form about a break, validated and performed by the API's own rule; refusals
        come back as the page with the reason."""
        session = await current(request)

        async def require(caller: Principal, roles: frozenset[str], action: str,
                          case_id: str | None = None) -> None:
            await actions.require(caller, roles, action, case_id, via="console")

        try:
            body = model.model_validate(await posted(request, session))
            done = await perform(session.principal, body, require)
        except ValidationError as exc:
            return await reconciliation_page(request, session, status=422,
                                             error=f"invalid form: {exc.errors()[0]['msg']}")
        except Refused as exc:
            return await reconciliation_page(request, session, status=exc.status, error=exc.detail)
        notice = urlencode({"notice": f"break {break_id}: {done}"})
        return RedirectResponse(f"{PREFIX}/reconciliation?{notice}", status_code=303)

    @router.post("/reconciliation/breaks/{break_id}")
    async def decide_break(request: Request, break_id: int) -> Response:
        """Acknowledging a break = a verdict on its compensation, by the API's own rule."""
        async def perform(caller: Principal, body: BreakDecisionBody, require: Require) -> str:
            await decide_on_break(store, actions.client, require, caller, break_id, body)
            return body.decision.value
        return await on_break(request, break_id, BreakDecisionBody, perform)

    @router.post("/reconciliation/breaks/{break_id}/reopen")
    async def reopen(request: Request, break_id: int) -> Response:
        """Takes back a dismissal or expiry: the break's case waits for a decision again."""
        async def perform(caller: Principal, body: BreakReopenBody, require: Require) -> str:
            await reopen_break(store, actions.client, actions.settings, require, caller, break_id, body)
            return "reopened"
        return await on_break(request, break_id, BreakReopenBody, perform)

    install_payout_pages(router, ConsolePages(page=page, current=current, posted=posted, forbidden=forbidden),
                         actions)
    app.include_router(router)
