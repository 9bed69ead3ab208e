"""Rendering the console's pages: Jinja2 templates with the money, time and status filters,
the security headers every page carries, and the refusal page for a missing role."""

from datetime import UTC, datetime
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, PackageLoader, StrictUndefined

from adapters.db import ConsoleSession
from adapters.db.cases import BANNER_STATUSES
from domain.models import CLOSED_STATUSES
from domain.money import shown_minor
from domain.permissions import Permission, may
from starters.actions.approving import Refused
from starters.actions.front import front_door

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


def _when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if value else "—"


def _age(value: datetime) -> str:
    seconds = int((datetime.now(UTC) - value).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def _templates() -> Jinja2Templates:
    env = Environment(loader=PackageLoader("starters.console", "templates"), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(money=shown_minor, when=_when, age=_age,
                       tone=lambda status: STATUS_TONES.get(status, "run"))
    return Jinja2Templates(env=env)


templates = _templates()


def page(request: Request, name: str, session: ConsoleSession | None, status: int = 200,
         **context: Any) -> Response:
    response = templates.TemplateResponse(request, name, {
        "me": session.principal if session else None,
        "csrf": session.csrf_token if session else "",
        "can_see_ops": bool(session and may(session.principal.roles, Permission.READ_WEBHOOKS)),
        **context}, status_code=status)
    response.headers.update(SECURITY_HEADERS)
    if front_door(request).settings.console_secure_cookie:  # behind TLS: only ever over TLS
        response.headers["Strict-Transport-Security"] = "max-age=31536000"
    return response


async def forbidden(request: Request, session: ConsoleSession, permission: Permission, action: str,
                    title: str, case_id: str | None = None) -> Response | None:
    """The refusal page when the user may not (audited), else None."""
    try:
        await front_door(request).actions.require(session.principal, permission, action, case_id,
                                                  via="console")
    except Refused as exc:
        return page(request, "message.html", session, status=exc.status, title=title,
                    error=exc.detail)
    return None
