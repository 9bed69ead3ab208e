"""The embedded Temporal UI as `refunds dev` serves it: the dev server's own UI behind a thin
proxy on the UI port that turns on the one codec setting `temporal server start-dev` has no
flag for, "include cross-origin credentials".

The UI reads its codec settings from `/api/v1/settings`; with credentials included, its
codec calls carry the console's session cookie (same site, another port), so people signed
in to the console read decoded histories with no browser-side setting, and everyone else
sees `binary/encrypted`. The UI keeps its own origin: its pages cannot act on the console.
Production UIs (temporalio/ui image) set TEMPORAL_CODEC_INCLUDE_CREDENTIALS or pass an
OIDC access token instead and need no proxy.
"""

import contextlib
import json
from collections.abc import AsyncIterator

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

SETTINGS_PATH = "/api/v1/settings"
# Hop-by-hop headers and those that describe the upstream body, which we re-frame.
_DROPPED = frozenset({"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
                      "proxy-authorization", "proxy-authenticate", "content-length",
                      "content-encoding"})


def include_codec_credentials(body: bytes) -> bytes:
    """The UI's settings with `Codec.IncludeCredentials` on (left alone without a codec)."""
    settings = json.loads(body)
    codec = settings.get("Codec") or {}
    if codec.get("Endpoint"):
        codec["IncludeCredentials"] = True
    return json.dumps(settings).encode()


def create_app(upstream: str) -> Starlette:
    """Forwards every request to the dev server's UI at `upstream`, answering the settings
    with credentials included. Bodies are small (UI assets, API JSON), so they are buffered."""
    client = httpx.AsyncClient(base_url=upstream, timeout=httpx.Timeout(60, connect=5))

    async def forward(request: Request) -> Response:
        headers = [(k, v) for k, v in request.headers.items()
                   if k not in _DROPPED and k != "accept-encoding"]
        reply = await client.request(
            request.method, httpx.URL(path=request.url.path, query=request.url.query.encode()),
            headers=headers, content=await request.body())
        body = reply.content
        if request.url.path == SETTINGS_PATH and reply.status_code == 200:
            body = include_codec_credentials(body)
        response = Response(body, status_code=reply.status_code)
        for key, value in reply.headers.multi_items():
            if key not in _DROPPED:
                response.headers.append(key, value)
        return response

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await client.aclose()

    methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)], lifespan=lifespan)
