"""The console's case pages: the list with its filters, one case (timeline, ledger, notices,
advice, tickets) with its buttons, and webhook coverage for ops. Every button calls the same
`CaseActions` as the HTTP API, so the console can never do what the API would refuse;
refusals are audited there."""

from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TypeVar
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import BaseModel, ValidationError

from adapters.db import ConsoleSession, Principal, Store
from adapters.db.cases import BANNER_STATUSES, CaseFilter
from adapters.db.rows import CaseRow
from domain.models import CLOSED_STATUSES, CaseStatus
from domain.money import UnknownCurrencyError, normalise_currency, parse_major
from domain.permissions import Permission, may
from starters.actions.approving import (
    PENDING_NOTICE,
    VERDICT_PENDING,
    ApprovalBody,
    Refused,
    granted_in,
    verdict_notice,
)
from starters.actions.cases import (
    REISSUABLE,
    CaseActions,
    ManualConfirmationBody,
    ReissueBody,
    advice_view,
    approval_verdict,
    case_view,
    missing_roles,
)
from starters.actions.front import front_door
from starters.actions.provider_wait import ProviderWaitBody, resolve_provider_wait, waiting
from starters.ages import parse_age
from starters.console.pages import forbidden, page
from starters.console.sessions import PREFIX, current, posted

AGES = ("", "1h", "24h", "7d", "30d", "90d")
NOTICES = {
    "approve": "Your approval was recorded.",
    "deny": "Your denial was recorded; the case is closed and its reservation released.",
    VERDICT_PENDING: PENDING_NOTICE,
    "reissued": "Reissue requested: this is the new linked case.",
    "reissue_open": "A reissue of that refund is already open: this is it.",
    "confirmed": "Your confirmation was recorded; the case follows it.",
    "wait_resolved": "What the provider shows was recorded; the case follows it.",
}
Body = TypeVar("Body", bound=BaseModel)

router = APIRouter(prefix=PREFIX, include_in_schema=False)


async def case_filter(actions: CaseActions, request: Request,
                      caller: Principal) -> tuple[CaseFilter, dict[str, str]]:
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
                        requester=None if may(caller.roles, Permission.READ_EVERY_CASE) else caller.user)
    return wanted, query


Granted = dict[str, list[tuple[str, frozenset[str]]]]
MINE_PAGES = 25
"""How many pages of waiting cases "needs my approval" reads at most (5,000 cases)."""


async def listed(store: Store, wanted: CaseFilter) -> tuple[list[CaseRow], Granted]:
    """The newest cases the filter matches, with the approvals the waiting ones hold."""
    rows = await store.cases.find(wanted)
    waiting = [r["refund_request_id"] for r in rows if r["status"] == "awaiting_approval"]
    return rows, {c: granted_in(steps) for c, steps in (await store.audit.approvals(waiting)).items()}


async def mine(store: Store, caller: Principal, wanted: CaseFilter) -> tuple[list[CaseRow], Granted]:
    """The waiting cases the caller may approve, newest first: page after page of waiting
    cases until a page's worth is found (whoever needs you is not hidden behind the newest
    200 others need)."""
    found: list[CaseRow] = []
    granted: Granted = {}
    for _ in range(MINE_PAGES):
        rows, held = await listed(store, wanted)
        granted.update(held)
        found += [r for r in rows if approval_verdict(caller, r, held[r["refund_request_id"]]).accepted]
        if len(found) >= wanted.limit or len(rows) < wanted.limit:
            break
        wanted = replace(wanted, before=(rows[-1]["created_at"], rows[-1]["refund_request_id"]))
    return found[:wanted.limit], granted


@router.get("/cases")
async def cases(request: Request) -> Response:
    session = await current(request)
    caller = session.principal
    door = front_door(request)
    store = door.store
    if denied := await forbidden(request, session, Permission.READ_CASE, "reading cases", "Cases"):
        return denied
    try:
        wanted, query = await case_filter(door.actions, request, caller)
    except Refused as exc:
        return page(request, "message.html", session, status=exc.status, title="Cases",
                    error=exc.detail)
    rows, granted = await (mine(store, caller, wanted) if query["mine"] else listed(store, wanted))
    items = [{"row": r, "missing": missing_roles(r, granted.get(r["refund_request_id"], []))}
             for r in rows]
    return page(request, "cases.html", session, items=items, query=query, limit=wanted.limit,
                statuses=[s.value for s in CaseStatus], ages=AGES,
                providers=sorted(set(await store.cases.providers()) | set(door.providers)))


async def case_page(request: Request, session: ConsoleSession, case_id: str, *,
                    status: int = 200, error: str = "", notice: str = "") -> Response:
    caller = session.principal
    door = front_door(request)
    store, settings = door.store, door.settings
    try:
        row = await door.actions.readable(caller, case_id, "reading a case", via="console")
    except Refused as exc:
        return page(request, "message.html", session, status=exc.status,
                    title="No such case" if exc.status == 404 else "Case", error=exc.detail)
    trail, steps = await store.audit.trail(case_id), await store.audit.approvals_of(case_id)
    granted = granted_in(steps)
    manual = await store.manual_refunds.get(case_id)
    ui = settings.temporal_ui_url
    return page(
        request, "case.html", session, status=status, error=error, notice=notice,
        case=case_view(row, steps), row=row, trail=trail,
        children=[c for c in await store.cases.children(case_id)  # only the ones they may open
                  if may(caller.roles, Permission.READ_EVERY_CASE) or c["requester"] == caller.user],
        manual=manual, ledger=await store.ledger.entries(case_id),
        notices=await store.outbox.notices(case_id),
        advice=advice_view(await store.integrations.advice(case_id)),
        tickets=await store.integrations.tickets(case_id),
        temporal_url=(f"{ui.rstrip('/')}/namespaces/{quote(settings.temporal_namespace)}"
                      f"/workflows/{quote(case_id)}") if ui else None,
        banner=row["status"] if row["status"] in BANNER_STATUSES else None,
        verdict=approval_verdict(caller, row, granted) if row["status"] == "awaiting_approval"
        else None,
        can_decide=row["status"] == "awaiting_approval" and may(caller.roles, Permission.APPROVE_REFUND),
        can_reissue=row["status"] in REISSUABLE and may(caller.roles, Permission.REISSUE_REFUND),
        can_confirm=bool(manual and manual["status"] == "pending"
                         and may(caller.roles, Permission.CONFIRM_MANUAL_REFUND)),
        can_resolve_wait=waiting(trail) and may(caller.roles, Permission.RESOLVE_PROVIDER_WAIT))


@router.get("/cases/{case_id}")
async def case(request: Request, case_id: str, notice: str = "") -> Response:
    return await case_page(request, await current(request), case_id,
                           notice=NOTICES.get(notice, ""))


async def validated(actions: CaseActions, model: type[Body], form: dict[str, str], caller: Principal,
                    case_id: str, action: str) -> Body:
    try:
        return model.model_validate(form)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "form"
        await actions.refuse(caller, case_id, 422, action, f"invalid {where}: {first['msg']}",
                             via="console")


async def act(request: Request, case_id: str, model: type[Body], action: str,
              perform: Callable[[CaseActions, Principal, Body], Awaitable[tuple[str, str]]]) -> Response:
    """One button: session, CSRF, input, then the shared rule; success redirects to the
    case it produced (post/redirect/get), a refusal shows the case with its reason."""
    session = await current(request)
    actions = front_door(request).actions
    try:
        form = await posted(request, session)
        body = await validated(actions, model, form, session.principal, case_id, action)
        target, notice = await perform(actions, session.principal, body)
    except Refused as exc:
        return await case_page(request, session, case_id, status=exc.status, error=exc.detail)
    return RedirectResponse(f"{PREFIX}/cases/{quote(target)}?{urlencode({'notice': notice})}",
                            status_code=303)


@router.post("/cases/{case_id}/approval")
async def decide(request: Request, case_id: str) -> Response:
    async def perform(actions: CaseActions, caller: Principal, body: ApprovalBody) -> tuple[str, str]:
        return case_id, verdict_notice(await actions.decide(caller, case_id, body, via="console"), body)
    return await act(request, case_id, ApprovalBody, "approving a refund", perform)


@router.post("/cases/{case_id}/reissue")
async def reissue(request: Request, case_id: str) -> Response:
    providers = front_door(request).providers

    async def perform(actions: CaseActions, caller: Principal, body: ReissueBody) -> tuple[str, str]:
        created, child = await actions.reissue(caller, case_id, body, via="console", providers=providers)
        return child["refund_request_id"], "reissued" if created else "reissue_open"
    return await act(request, case_id, ReissueBody, "reissuing a refund", perform)


@router.post("/cases/{case_id}/manual-confirmation")
async def confirm(request: Request, case_id: str) -> Response:
    async def perform(actions: CaseActions, caller: Principal,
                      body: ManualConfirmationBody) -> tuple[str, str]:
        await actions.confirm_manual(caller, case_id, body, via="console")
        return case_id, "confirmed"
    return await act(request, case_id, ManualConfirmationBody, "confirming a manual refund",
                     perform)


@router.post("/cases/{case_id}/provider-wait")
async def resolve_wait(request: Request, case_id: str) -> Response:
    async def perform(actions: CaseActions, caller: Principal, body: ProviderWaitBody) -> tuple[str, str]:
        await resolve_provider_wait(actions, caller, case_id, body, via="console")
        return case_id, "wait_resolved"
    return await act(request, case_id, ProviderWaitBody, "resolving a provider notification wait",
                     perform)


@router.get("/coverage")
async def coverage(request: Request) -> Response:
    session = await current(request)
    if denied := await forbidden(request, session, Permission.READ_WEBHOOKS, "reading webhook coverage",
                                 "Webhook coverage"):
        return denied
    door = front_door(request)
    report = await door.store.receipts.coverage({n: p.event_types for n, p in door.providers.items()})
    return page(request, "coverage.html", session, report=report,
                rejected=await door.store.receipts.rejections(50))
