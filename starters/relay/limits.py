"""Request body limits and input checks shared by every inbound endpoint of the relay."""

import email.message
import json
import math
import re
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

API_MAX_BODY_BYTES = 256 * 1024
"""JSON API bodies, console forms and sign-in: the largest valid refund request (32
evidence fields of 2,000 characters) fits several times over."""
CODEC_MAX_BODY_BYTES = 4 * 1024 * 1024
"""The payload codec decodes whole history pages for the Temporal UI."""
MAX_PATH_BYTES = 1024
"""Far past any id of ours (128 characters), and under what PostgreSQL can index (2,704
bytes: a receipt's provider, an audit chain's key are taken from the path)."""
OWN_LIMITS = ("/webhooks/", "/integrations/")
"""Signed deliveries read their body under their own limit and keep a receipt of every
refusal, so they pass through untouched."""

_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")
"""What a decoded string may hold but PostgreSQL cannot store: a NUL, or half of a surrogate
pair (JSON can escape one; a whole escaped pair decodes to one character)."""
_FORM_NUL = b"%00"
UNSTORABLE_TEXT = "text may not contain NUL (U+0000) characters or half of a surrogate pair"
FORM_TYPE = "application/x-www-form-urlencoded"
JSON_TYPE = "application/json"

Refusal = Callable[[Request, str], Awaitable[None]]


async def read_limited(request: Request, limit: int) -> bytes | None:
    """Reads the body while counting, so a chunked body cannot bypass the limit; None when
    it is over."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def carries_nul(data: bytes) -> bool:
    """A NUL PostgreSQL cannot store, raw or as a query or form writes it (%00)."""
    return b"\x00" in data or _FORM_NUL in data


class InputGuard:
    """ASGI middleware: before any route parses it, a request whose path is over its limit
    is a 414 (signed deliveries too), one whose body is over its limit a 413, one whose body
    is not JSON or a form in UTF-8 a 400 or 415, and one carrying text PostgreSQL cannot
    store (a NUL in the path, query or body, a lone surrogate in JSON) a 422, so no handler,
    store or workflow sees any of them. `refused` records each refusal."""

    def __init__(self, app: ASGIApp, refused: Refusal, codec_paths: tuple[str, ...] = ()) -> None:
        self.app = app
        self.refused = refused
        self.codec_paths = codec_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope.get("path", ""))
        if scope["type"] == "http" and len(path.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
            await self._refuse(scope, receive, send, 414, f"request path exceeds {MAX_PATH_BYTES} bytes")
            return
        if scope["type"] != "http" or path.startswith(OWN_LIMITS):
            await self.app(scope, receive, send)
            return
        codec = bool(self.codec_paths) and path.startswith(self.codec_paths)
        limit = CODEC_MAX_BODY_BYTES if codec else API_MAX_BODY_BYTES
        body = await self._body(scope, receive, limit)
        if body is None:
            await self._refuse(scope, receive, send, 413, f"request body exceeds {limit} bytes")
            return
        declared = [v for k, v in scope.get("headers", []) if k.lower() == b"content-type"]
        media_type, charset = _media_type(declared[0]) if declared else ("", "")
        unreadable = self._unreadable(len(declared), media_type, charset, body)
        if unreadable is not None:
            await self._refuse(scope, receive, send, *unreadable)
            return
        form = media_type == FORM_TYPE
        if ("\x00" in path or carries_nul(scope.get("query_string", b""))
                or (form and carries_nul(body))):
            await self._refuse(scope, receive, send, 422, UNSTORABLE_TEXT)
            return
        # the codec's protobuf JSON (up to 4 MiB, from the Temporal UI) moves no money and is
        # stored nowhere: its route reads it once the caller is let in, never before
        problem = None if form or not body or codec else _json_problem(body, names_once=True)
        if problem is not None:
            await self._refuse(scope, receive, send, *problem)
            return
        await self.app(scope, _replay(body, receive), send)

    @staticmethod
    def _unreadable(content_types: int, media_type: str, charset: str, body: bytes) -> tuple[int, str] | None:
        """Why a body cannot be checked as its route will parse it, or None: one Content-Type
        (the guard and the parser must read the same one), JSON or a URL-encoded form in
        UTF-8 (another charset or multipart decodes NULs and surrogates the checks cannot
        see), and bytes that are UTF-8 (JSON decodes raw surrogate bytes). A body with no
        Content-Type is refused too: the routes read it as bytes, not JSON, and answered
        "not an object" for well-formed JSON."""
        if content_types > 1:
            return 400, "send one Content-Type header"
        if not body:
            return None
        if not content_types:
            return 415, "send Content-Type: application/json with a JSON body"
        if media_type not in (JSON_TYPE, FORM_TYPE) or charset not in ("", "utf-8", "utf8"):
            return 415, "send JSON or a URL-encoded form, in UTF-8"
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            return 400, "the body is not UTF-8"
        return None

    @staticmethod
    async def _body(scope: Scope, receive: Receive, limit: int) -> bytes | None:
        """The whole body, or None as soon as it is (or says it will be) over `limit`."""
        declared = dict(scope.get("headers", [])).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            return None
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, status: int,
                      detail: str) -> None:
        await self.refused(Request(scope), detail)
        await JSONResponse({"detail": detail}, status_code=status)(scope, receive, send)


class _NamedTwice(Exception):
    pass


def _unique_names(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: set[str] = set()
    for name, _ in pairs:
        if name in seen:
            raise _NamedTwice(name)
        seen.add(name)
    return dict(pairs)


class _NoJsonNumber(Exception):
    pass


def _no_constant(name: str) -> Any:
    raise _NoJsonNumber(name)


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise _NoJsonNumber(text[:64])
    return number


def _json_problem(body: bytes, *, names_once: bool) -> tuple[int, str] | None:
    """Why a JSON body is refused before its route parses it, or None (for a body that is
    not JSON at all too: its route refuses that, naming where): a name given twice in one
    object (`names_once`: which value counts is up to each reader), a string PostgreSQL
    cannot store, JSON no parser here reads (a number of more than 4,300 digits, nesting
    past the recursion limit: the route's parser failed with a bare, unrecorded 400), or
    NaN, Infinity or a number past a float's range, which Python's parser reads but no JSON
    answer can quote (the route's refusal of one became a 500)."""
    try:
        parsed = json.loads(body, object_pairs_hook=_unique_names if names_once else None,
                            parse_constant=_no_constant, parse_float=_finite)
    except _NoJsonNumber as number:
        return 422, (f"the JSON body holds {number.args[0]}: no number a double holds (NaN, Infinity "
                     "or past its range)")
    except _NamedTwice as twice:
        return 400, (f"the JSON body names {str(twice.args[0])[:64]!r} twice in one object: which "
                     "value counts is up to each reader")
    except json.JSONDecodeError:
        return None
    except (ValueError, RecursionError) as unreadable:
        return 422, f"the JSON body cannot be read: {str(unreadable)[:120]}"
    if _holds_unstorable(parsed):
        return 422, UNSTORABLE_TEXT
    return None


def _holds_unstorable(parsed: Any) -> bool:
    """Whether any string (name or value) of parsed JSON holds text PostgreSQL cannot store."""
    pending = [parsed]
    while pending:
        value = pending.pop()
        if isinstance(value, str):
            if _UNSTORABLE.search(value):
                return True
        elif isinstance(value, dict):
            pending += [*value.keys(), *value.values()]
        elif isinstance(value, list):
            pending += value
    return False


def _media_type(declared: bytes) -> tuple[str, str]:
    """A Content-Type's media type (JSON for any `+json`) and charset, lower case, read with
    the standard library's header parser as FastAPI reads it ("" when not given)."""
    message = email.message.Message()
    message["content-type"] = declared.decode("latin-1")
    media_type = message.get_content_type()
    charset = message.get_param("charset")
    return (JSON_TYPE if media_type.endswith("+json") else media_type,
            charset.lower() if isinstance(charset, str) else "")


def _replay(body: bytes, receive: Receive) -> Receive:
    """Hands the already read body to the application, then the connection's own events."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        message: dict[str, Any] = {"type": "http.request", "body": body, "more_body": False}
        return message

    return replay
