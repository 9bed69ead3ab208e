"""Serving an ASGI app inside the running event loop: the relay, the sandbox provider and
the worker's health endpoint share one loop with the Temporal worker in `refunds dev`."""

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import uvicorn
from starlette.types import ASGIApp

#  How long a server keeps an idle connection open. Longer than the clients' own reuse window
#  (httpx 5 s, a reverse proxy's 60 s): when both give up at once, a request sent on the
#  closing connection fails with a read error the caller cannot tell from a lost answer.
#  uvicorn's default is 5 s, httpx's too.
KEEP_ALIVE_SECONDS = 75


class _QuietServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to its owner (several share a loop)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def reserve_port(host: str) -> socket.socket:
    """A socket bound to a free port and held until a server serves on it: unlike asking for
    a free port number and binding later, no other process can take the port in between."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    return sock


class AppServer:
    """Serves an ASGI app inside the running event loop (relay, sandbox provider). Port 0,
    or a socket from `reserve_port`, serves on a port held from the start."""

    def __init__(self, app: ASGIApp, host: str, port: int, *, sock: socket.socket | None = None,
                 forwarded_allow_ips: str | None = None) -> None:
        if sock is None and port == 0:
            sock = reserve_port(host)
        self._sock = sock
        if sock is not None:
            port = int(sock.getsockname()[1])
        self.url = f"http://{host}:{port}"
        self._server = _QuietServer(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                   lifespan="auto", access_log=False,
                                                   timeout_graceful_shutdown=5,
                                                   timeout_keep_alive=KEEP_ALIVE_SECONDS,
                                                   # None: uvicorn reads $FORWARDED_ALLOW_IPS, else loopback
                                                   forwarded_allow_ips=forwarded_allow_ips))
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(
            self._server.serve(sockets=[self._sock] if self._sock is not None else None))
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError(f"server at {self.url} stopped while starting")
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        await self._task
        self._task = None
