"""Every relay route runs on the event loop: FastAPI hands a sync endpoint or dependency to a
worker thread on each request, and two such hops (the front door and the webhook desk, plain
attribute reads) were about a fifth of what a duplicate webhook delivery costs the relay
(issue 21's target 4, docs/BENCHMARKS.md section 2)."""

import inspect
from collections.abc import Callable, Iterator
from typing import Any, cast

from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute

from adapters.config import Settings
from starters.relay import create_app


def api_routes(routes: list[BaseRoute]) -> Iterator[APIRoute]:
    """Every API route, also inside included routers (FastAPI 0.165 keeps an included router
    whole, as `original_router`; the route count below fails loudly should that change)."""
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        elif (included := getattr(route, "original_router", None)) is not None:
            yield from api_routes(included.routes)


def calls(dependant: Dependant) -> Iterator[Callable[..., Any]]:
    """The endpoint and every dependency FastAPI calls for a route, sub-dependencies first."""
    for sub in dependant.dependencies:
        yield from calls(sub)
    if dependant.call is not None:
        yield dependant.call


def on_the_loop(call: Callable[..., Any]) -> bool:
    """Whether FastAPI awaits `call` (a coroutine function, or an object whose `__call__` is
    one, as the security schemes') rather than running it in its thread pool."""
    return inspect.iscoroutinefunction(call) or inspect.iscoroutinefunction(type(call).__call__)


def test_the_check_tells_a_sync_callable_from_an_async_one() -> None:
    async def awaited() -> None: ...

    def threaded() -> None: ...

    assert on_the_loop(awaited) and not on_the_loop(threaded)


def test_no_relay_route_runs_its_endpoint_or_a_dependency_in_a_worker_thread() -> None:
    app = create_app(cast(Any, None), cast(Any, None), {}, Settings())
    routes = list(api_routes(app.routes))
    threaded = sorted({f"{route.path}: {call.__qualname__}"
                       for route in routes for call in calls(route.dependant) if not on_the_loop(call)})
    assert len(routes) > 30 and threaded == []
