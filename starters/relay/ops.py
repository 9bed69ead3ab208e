"""The relay's operational endpoints: liveness, readiness, Prometheus metrics, and the
Temporal remote codec for the UI and the CLI."""

from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from adapters import metrics
from adapters.health import readiness
from starters.actions.codec import CODEC_USES, Direction, answer, sent_as_json
from starters.actions.front import Door
from starters.relay.auth import CodecCaller

router = APIRouter()


async def scrape_guard(request: Request) -> None:
    """The app's /metrics check (`adapters.metrics.scrape_guard`, built from its settings)."""
    await request.app.state.scrape_guard(request)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(door: Door) -> JSONResponse:
    """Readiness: PostgreSQL (with migrations) and Temporal (with the namespace) answer."""
    return await readiness(door.client, door.store)


@router.get("/metrics", dependencies=[Depends(scrape_guard)])
async def prometheus_metrics(door: Door) -> Response:
    """Prometheus text, for REFUNDS_METRICS_TOKEN's bearer (or anyone on a loopback bind)."""
    await metrics.refresh_case_gauges(door.store)
    body, content_type = metrics.exposition(metrics.CASE_REGISTRY)
    return Response(body, media_type=content_type)


@router.post("/codec/{direction}")
async def codec(direction: Direction, request: Request, caller: CodecCaller,
                door: Door) -> dict[str, Any]:
    """Temporal's remote codec protocol, for the UI and `temporal --codec-endpoint`; the
    body is read once the caller is let in."""
    sent_as_json(request)
    await door.actions.require(caller, *CODEC_USES[direction], via="api")
    return await answer(door.client, direction, request)
