"""Serving an ASGI app inside the running event loop: the relay, the sandbox provider and
the worker's health endpoint share one loop with the Temporal worker in `refunds dev`."""

import asyncio
import contextlib
from collections.abc import Iterator

import uvicorn
from starlette.types import ASGIApp


class _QuietServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to its owner (several share a loop)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class AppServer:
    """Serves an ASGI app inside the running event loop (relay, sandbox provider)."""

    def __init__(self, app: ASGIApp, host: str, port: int) -> None:
        self.url = f"http://{host}:{port}"
        self._server = _QuietServer(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                   lifespan="auto", access_log=False,
                                                   timeout_graceful_shutdown=5))
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve())
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
