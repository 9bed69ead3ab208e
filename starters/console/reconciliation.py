"""The console's reconciliation page: recent runs with their breaks, and the forms that
decide on or reopen a break, performed by the API's own rules (`actions.reconciliation`)."""

from collections.abc import Awaitable, Callable
from typing import TypeVar
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import BaseModel, ValidationError

from adapters.db import ConsoleSession, Principal
from adapters.db.reconciliation import break_view, run_view
from domain.permissions import Permission, may
from starters.actions.approving import Refused
from starters.actions.cases import CaseActions
from starters.actions.front import front_door
from starters.actions.reconciliation import (
    BreakDecisionBody,
    BreakReopenBody,
    decide_on_break,
    reopen_break,
)
from starters.console.pages import forbidden, page
from starters.console.sessions import PREFIX, current, posted

RECONCILIATION_RUNS = 20
RECONCILIATION_RUNS_WITH_BREAKS = 5
WAITING_BREAKS = 500
Body = TypeVar("Body", bound=BaseModel)

router = APIRouter(prefix=PREFIX, include_in_schema=False)


async def reconciliation_page(request: Request, session: ConsoleSession, *, status: int = 200,
                              error: str = "", notice: str = "") -> Response:
    if denied := await forbidden(request, session, Permission.READ_RECONCILIATION_BREAKS,
                                 "reading reconciliation reports", "Reconciliation"):
        return denied
    recon = front_door(request).store.reconciliation
    runs = [run_view(r) for r in await recon.runs(RECONCILIATION_RUNS)]
    breaks = {run["run_id"]: [break_view(b) async for b in recon.breaks(run["run_id"], 200)]
              for run in runs[:RECONCILIATION_RUNS_WITH_BREAKS]}
    waiting = [break_view(b) for b in await recon.waiting_breaks(WAITING_BREAKS)]
    return page(request, "reconciliation.html", session, status=status, error=error,
                notice=notice, runs=runs, breaks=breaks, waiting=waiting,
                show_runs=may(session.principal.roles, Permission.READ_RECONCILIATION_RUNS),
                can_decide=may(session.principal.roles, Permission.APPROVE_RECONCILIATION_BREAK),
                can_reopen=may(session.principal.roles, Permission.REOPEN_RECONCILIATION_BREAK))


NOTICES = {"approve": "Break {}: your approval is recorded.", "deny": "Break {}: your denial is recorded.",
           "pending": "Break {}: your verdict is sent; the break has not answered yet.",
           "reopened": "Break {}: reopened; it waits for a decision again."}
"""What the page confirms after a form, by key: never text a link could carry."""


@router.get("/reconciliation")
async def reconciliation(request: Request, notice: str = "", break_id: int = 0) -> Response:
    return await reconciliation_page(request, await current(request),
                                     notice=NOTICES[notice].format(break_id) if notice in NOTICES else "")


async def on_break(request: Request, break_id: int, action: str, model: type[Body],
                   perform: Callable[[CaseActions, Principal, Body], Awaitable[str]]) -> Response:
    """A form about a break (`action`, as the trail names it), validated and performed by the
    API's own rule; refusals come back as the page with the reason, recorded. `perform`
    answers the key of the page's confirmation (`NOTICES`)."""
    session = await current(request)
    try:
        body = model.model_validate(await posted(request, session))
        done = await perform(front_door(request).actions, session.principal, body)
    except ValidationError as exc:
        refusal = f"invalid form: {exc.errors()[0]['msg']}"
        await front_door(request).store.audit.record(None, session.principal.user, "action_refused", {
            "action": action, "refusal": refusal, "via": "console"})
        return await reconciliation_page(request, session, status=422, error=refusal)
    except Refused as exc:
        return await reconciliation_page(request, session, status=exc.status, error=exc.detail)
    notice = urlencode({"notice": done, "break_id": break_id})
    return RedirectResponse(f"{PREFIX}/reconciliation?{notice}", status_code=303)


@router.post("/reconciliation/breaks/{break_id}")
async def decide_break(request: Request, break_id: int) -> Response:
    """Acknowledging a break = a verdict on its compensation, by the API's own rule."""
    async def perform(actions: CaseActions, caller: Principal, body: BreakDecisionBody) -> str:
        answer = await decide_on_break(actions, caller, break_id, body, via="console")
        return "pending" if "detail" in answer else body.decision.value
    return await on_break(request, break_id, "deciding on a reconciliation break", BreakDecisionBody, perform)


@router.post("/reconciliation/breaks/{break_id}/reopen")
async def reopen(request: Request, break_id: int) -> Response:
    """Takes back a dismissal or expiry: the break's case waits for a decision again."""
    async def perform(actions: CaseActions, caller: Principal, body: BreakReopenBody) -> str:
        await reopen_break(actions, caller, break_id, body, via="console")
        return "reopened"
    return await on_break(request, break_id, "reopening a reconciliation break", BreakReopenBody, perform)
