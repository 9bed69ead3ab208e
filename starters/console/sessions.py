"""Console sessions: sign-in exchanges an API token for a server-side session (random id in
an HttpOnly, SameSite=Strict cookie; only its hash is stored, and it dies with its token),
every form carries the session's CSRF token, sign-out ends it. Also the console's own
Temporal codec, for the UI of people signed in here."""

import secrets
from datetime import timedelta
from importlib import resources
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from adapters.db import ConsoleSession, token_fingerprint
from starters.actions.approving import Refused
from starters.actions.codec import CODEC_USES, Direction, answer, sent_as_json
from starters.actions.front import front_door
from starters.console.pages import page

SESSION_COOKIE = "rfo_session"
SIGN_IN_COOKIE = "rfo_sign_in"
PREFIX = "/console"
HOST_ONLY = "__Host-"
"""Behind TLS the cookies' names carry this prefix (with Secure, Path=/ and no Domain): a
browser then takes them only from this host, so another host of the site cannot plant a
sign-in form cookie or a session."""


def cookie_name(request: Request, name: str) -> str:
    """The console cookie `name` as this deployment sets and reads it."""
    return HOST_ONLY + name if front_door(request).settings.console_secure_cookie else name


def _set_cookie(request: Request, response: Response, name: str, value: str, max_age: int) -> None:
    secure = front_door(request).settings.console_secure_cookie
    response.set_cookie(cookie_name(request, name), value, httponly=True, samesite="strict", secure=secure,
                        path="/" if secure else PREFIX, max_age=max_age)


def _delete_cookie(request: Request, response: Response, name: str) -> None:
    """Deletes the cookie, and behind TLS also the plain one a console before the `__Host-`
    names set (Path=/console), which would otherwise linger until it expires."""
    secure = front_door(request).settings.console_secure_cookie
    response.delete_cookie(cookie_name(request, name), path="/" if secure else PREFIX, secure=secure,
                           httponly=True, samesite="strict")
    if secure:
        response.delete_cookie(name, path=PREFIX, secure=True, httponly=True, samesite="strict")

stylesheet = resources.files("starters.console").joinpath("static/console.css").read_bytes()
router = APIRouter(prefix=PREFIX, include_in_schema=False)


class SignInRequired(Exception):
    """No live session behind the request's cookie (never had one, ended, expired, revoked)."""


def sign_in_page(request: Request, status: int = 200, error: str = "") -> Response:
    """The form carries a fresh value that must match its cookie (double submit), so
    another site cannot sign a browser in under someone else's token."""
    form_token = secrets.token_urlsafe(24)
    response = page(request, "sign_in.html", None, status=status, form_token=form_token,
                    error=error)
    _set_cookie(request, response, SIGN_IN_COOKIE, form_token, 3600)
    return response


def session_cookie(request: Request) -> str | None:
    """The session cookie, unless another host or port of the site made the request (the
    browser says so in `Sec-Fetch-Site`; SameSite=Strict still sends the cookie there): a
    page there could otherwise have a signed-in browser write text it chose into the trail
    under that person's name. A link the person clicks (a GET navigation they started) is
    theirs; so is the codec, which the Temporal UI calls from its own port by design."""
    elsewhere = request.headers.get("sec-fetch-site") in ("same-site", "cross-site")
    clicked = (request.method == "GET" and request.headers.get("sec-fetch-mode") == "navigate"
               and request.headers.get("sec-fetch-user") == "?1")
    if elsewhere and not clicked and not request.url.path.startswith(f"{PREFIX}/codec/"):
        return None
    return request.cookies.get(cookie_name(request, SESSION_COOKIE))


async def current(request: Request) -> ConsoleSession:
    cookie = session_cookie(request)
    session = await front_door(request).store.access.session(cookie) if cookie else None
    if session is None:
        raise SignInRequired
    return session


async def sign_in_first(request: Request, exc: Exception) -> Response:
    """Pages send the browser to sign in; a form posted without a live session is a
    refused action (a revoked token's session lands here), counted: it names nobody."""
    if request.method == "GET":
        return RedirectResponse(f"{PREFIX}/sign-in", status_code=303)
    front_door(request).console_refusals.refused("console", "no live console session",
                                                 f"POST {request.url.path}")
    return sign_in_page(request, 401, "Your session has ended (signed out, expired or its "
                                      "token was revoked). Sign in again.")


async def posted(request: Request, session: ConsoleSession) -> dict[str, str]:
    """The form's fields, once its CSRF token matched the session's; else 403 (audited)."""
    form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
    sent = form.pop("csrf", "")
    if not secrets.compare_digest(sent.encode(), session.csrf_token.encode()):
        await front_door(request).store.audit.record(None, session.principal.user, "csrf_refused", {
            "action": f"POST {request.url.path}", "via": "console",
            "refusal": "missing or wrong CSRF token"})
        raise Refused(403, "This form is out of date or was not sent by the console "
                           "(CSRF check failed). Reload the page and try again.")
    return form


@router.post("/codec/{direction}")
async def codec(request: Request, direction: Direction) -> dict[str, Any]:
    """The Temporal UI's remote codec for people signed in here: the UI sends the session
    cookie when its codec setting includes credentials (same site, another port); the body
    is read once the session is let in."""
    sent_as_json(request)
    session = await current(request)
    actions = front_door(request).actions
    await actions.require(session.principal, *CODEC_USES[direction], via="console")
    return await answer(actions.client, direction, request)


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
    door = front_door(request)
    form = await request.form()
    token, sent = str(form.get("token", "")).strip(), str(form.get("form_token", ""))
    expected = request.cookies.get(cookie_name(request, SIGN_IN_COOKIE), "")
    if not expected or not secrets.compare_digest(sent.encode(), expected.encode()):
        door.console_refusals.refused("console", "sign-in form token does not match its cookie",
                                      "console sign-in")
        return sign_in_page(request, 403, "The sign-in form expired. Try again.")
    hours = door.settings.console_session_hours
    session_id = await door.store.access.open_session(token, timedelta(hours=hours)) if token else None
    if session_id is None:
        door.console_refusals.refused("console", "missing token" if not token else "invalid or revoked token",
                                      "console sign-in", token_fingerprint(token) if token else None)
        return sign_in_page(request, 401, "That token is not valid (unknown or revoked).")
    # the session this browser held ends: else it lived on to its expiry for whoever copied it
    held = request.cookies.get(cookie_name(request, SESSION_COOKIE))
    if held and (previous := await door.store.access.session(held)) is not None:
        await door.store.access.end_session(previous, "console_session_replaced")
    response = RedirectResponse(f"{PREFIX}/cases", status_code=303)
    _set_cookie(request, response, SESSION_COOKIE, session_id, int(hours * 3600))
    _delete_cookie(request, response, SIGN_IN_COOKIE)
    return response


@router.post("/sign-out")
async def sign_out(request: Request) -> Response:
    session = await current(request)
    try:
        await posted(request, session)
    except Refused as exc:
        return page(request, "message.html", session, status=exc.status, title="Refused",
                    error=exc.detail)
    await front_door(request).store.access.end_session(session)
    response = RedirectResponse(f"{PREFIX}/sign-in", status_code=303)
    _delete_cookie(request, response, SESSION_COOKIE)
    return response
