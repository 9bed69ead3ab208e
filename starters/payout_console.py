"""The console's payout exception pages: the cases, and one case with its timeline (every
delivery, duplicates and late events included), the advisor's recommendation (advisory
only), approvals needed and given, the runbook steps done, the ticket and the hold.
Approve and deny call the API's own rule (`payout_routes.decide_on_payout_exception`), so
the console can never do what the API would refuse."""

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import ValidationError

from adapters.payout_book import PayoutBook
from adapters.store import ConsoleSession, Principal
from domain.models import APPROVER_ROLES
from domain.payouts import APPROVAL_STATUSES, PayoutCaseStatus
from starters.approving import ApprovalBody, Refused
from starters.case_actions import CaseActions
from starters.payout_routes import READ_ROLES, decide_on_payout_exception, payout_case_view

CASES_SHOWN = 200
NOTICES = {"approve": "Your approval was recorded; the case shows what it still needs.",
           "deny": "Your denial was recorded; the case acts on nothing further."}
# The runbook as the timeline records it: (step, the audit action that says it is done).
RUNBOOK = (("A hold", "payout_held"), ("B compensating entry", "ledger_posted"),
           ("B failed: hold rolled back", "payout_hold_rolled_back"), ("C ticket", "ticket_opened"),
           ("C ticket reference recorded", "ticket_ref_recorded"), ("D notice", "runbook_completed"),
           ("reissue", "payout_reissued"))
# Timeline rows that only join the case or are ignored, shown apart from the acting ones.
QUIET_ACTIONS = frozenset({"payout_status_stale_ignored", "payout_status_unchanged", "payout_already_handled",
                           "payout_event_joined"})


@dataclass(frozen=True)
class ConsolePages:
    """What the console shares with its page modules: rendering, the session, the CSRF
    check and the audited role check."""

    page: Callable[..., Response]
    current: Callable[[Request], Awaitable[ConsoleSession]]
    posted: Callable[[Request, ConsoleSession], Awaitable[dict[str, str]]]
    forbidden: Callable[..., Awaitable[Response | None]]


def runbook_view(trail: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each runbook step with when it was done (None: not done)."""
    first: dict[str, datetime] = {}
    for event in trail:
        first.setdefault(event["action"], event["occurred_at"])
    return [{"step": step, "action": action, "done_at": first.get(action)} for step, action in RUNBOOK]


def install_payout_pages(router: APIRouter, pages: ConsolePages, actions: CaseActions) -> None:
    """Adds /payouts and /payouts/{case_id} (and its approval form) to the console router."""
    store, client = actions.store, actions.client
    book = PayoutBook(store)

    @router.get("/payouts")
    async def payout_cases(request: Request, status: str = "") -> Response:
        session = await pages.current(request)
        if denied := await pages.forbidden(request, session, READ_ROLES, "reading payout cases",
                                           "Payout cases"):
            return denied
        known = [s.value for s in PayoutCaseStatus]
        if status and status not in known:
            await actions.store.append_audit(None, session.principal.user, "action_refused", {
                "action": "filtering payout cases", "refusal": f"unknown status {status!r}",
                "via": "console"})
            return pages.page(request, "message.html", session, status=422, title="Payout cases",
                              error=f"unknown status {status!r}")
        cases = await book.cases(CASES_SHOWN, status or None)
        return pages.page(request, "payouts.html", session, cases=cases, wanted=status, statuses=known,
                          limit=CASES_SHOWN)

    async def case_page(request: Request, session: ConsoleSession, case_id: str, *, status: int = 200,
                        error: str = "", notice: str = "") -> Response:
        if denied := await pages.forbidden(request, session, READ_ROLES, "reading a payout case",
                                           "Payout case", case_id):
            return denied
        view = await payout_case_view(store, case_id)
        if view is None:
            return pages.page(request, "message.html", session, status=404, title="No such case",
                              error=f"There is no payout exception case {case_id!r}.")
        trail = await store.audit_trail(case_id)
        awaiting = view["status"] in APPROVAL_STATUSES
        return pages.page(
            request, "payout.html", session, status=status, error=error, notice=notice, case=view,
            trail=trail, runbook=runbook_view(trail), quiet=QUIET_ACTIONS,
            ledger=await store.ledger_entries(case_id), notices=await store.notices(case_id),
            can_decide=awaiting and not session.principal.roles.isdisjoint(APPROVER_ROLES))

    @router.get("/payouts/{case_id}")
    async def payout_case(request: Request, case_id: str, notice: str = "") -> Response:
        return await case_page(request, await pages.current(request), case_id,
                               notice=NOTICES.get(notice, ""))

    @router.post("/payouts/{case_id}/approval")
    async def decide(request: Request, case_id: str) -> Response:
        session = await pages.current(request)

        async def require(caller: Principal, roles: frozenset[str], action: str,
                          chain: str | None = None) -> None:
            await actions.require(caller, roles, action, chain, via="console")

        try:
            form = await pages.posted(request, session)
            body = ApprovalBody.model_validate(form)
            await decide_on_payout_exception(store, client, require, session.principal, case_id,
                                                       body, via="console")
        except ValidationError as exc:
            first = exc.errors()[0]
            refusal = f"invalid {'.'.join(str(p) for p in first['loc']) or 'form'}: {first['msg']}"
            await store.append_audit(case_id, session.principal.user, "action_refused", {
                "action": "approving a payout exception", "refusal": refusal, "via": "console"})
            return await case_page(request, session, case_id, status=422, error=refusal)
        except Refused as exc:
            return await case_page(request, session, case_id, status=exc.status, error=exc.detail)
        target = f"/console/payouts/{quote(case_id)}?{urlencode({'notice': body.decision.value})}"
        return RedirectResponse(target, status_code=303)
