"""The servers keep an idle connection open longer than a client keeps it for reuse: when
both sides give up at the same moment, a request sent on the closing connection fails with
a read error that the caller cannot tell from a lost answer (CI saw it as httpx.ReadError)."""

import asyncio

import httpx
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from adapters.http_server import KEEP_ALIVE_SECONDS, AppServer

REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
#  httpx's default keep-alive expiry; a reverse proxy's idle time-out (60 s) is met by the
#  constant itself, which the test cannot wait out.
CLIENT_IDLE_SECONDS = httpx.Limits().keepalive_expiry or 0.0


async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    writer.write(REQUEST)
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
    await asyncio.wait_for(reader.readexactly(2), timeout=10)  # the body, "ok"
    return head


async def test_an_idle_connection_outlives_the_clients_keep_alive() -> None:
    assert KEEP_ALIVE_SECONDS > 60 > CLIENT_IDLE_SECONDS
    server = AppServer(Starlette(routes=[Route("/", lambda _: PlainTextResponse("ok"))]),
                       "127.0.0.1", 0)
    await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", int(server.url.rsplit(":", 1)[1]))
        assert (await answer(reader, writer)).startswith(b"HTTP/1.1 200")
        await asyncio.sleep(CLIENT_IDLE_SECONDS + 1)
        assert (await answer(reader, writer)).startswith(b"HTTP/1.1 200"), \
            "the server closed the connection the client still holds for reuse"
        writer.close()
    finally:
        await server.stop()
