"""The ops console at /console: cases, banners, approvals, reissue, payouts, reconciliation
and webhook coverage, server-rendered (Jinja2, one CSS file, no JavaScript), mounted on the
relay application. Sessions and CSRF in `sessions`, rendering in `pages`, one module of
routes per subject; none of it enters the OpenAPI document."""

from fastapi import FastAPI

from starters.console.cases import router as case_pages
from starters.console.payouts import router as payout_pages
from starters.console.reconciliation import router as reconciliation_pages
from starters.console.sessions import SignInRequired, sign_in_first
from starters.console.sessions import router as session_pages


def mount_console(app: FastAPI) -> None:
    """Adds the console's pages to the relay application, and its answer to a request
    without a live session (sign in, or a counted refusal for a form)."""
    app.add_exception_handler(SignInRequired, sign_in_first)
    for router in (session_pages, case_pages, reconciliation_pages, payout_pages):
        app.include_router(router)
