"""The worker's small HTTP endpoint (loopback unless REFUNDS_BIND_HOST says otherwise):
/healthz for liveness, /readyz for readiness, /metrics for Prometheus (with
REFUNDS_METRICS_TOKEN as a bearer token outside loopback).

A worker takes no HTTP traffic; this exists for the orchestrator's probes and scrapes.
"""

from fastapi import Depends, FastAPI, Response
from fastapi.responses import JSONResponse
from temporalio.client import Client
from temporalio.worker import Worker

from adapters import metrics
from adapters.config import Settings
from adapters.db import Store
from adapters.health import readiness
from adapters.telemetry import server_telemetry


def health_app(worker: Worker, client: Client, store: Store, settings: Settings) -> FastAPI:
    """Probes (open: the kubelet calls them) and metrics (behind the settings' scrape guard)
    for one worker process."""
    app = FastAPI(title="Refund Orchestrator worker", docs_url=None, redoc_url=None, openapi_url=None,
                  telemetry=server_telemetry())

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness: the event loop answers."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """Ready while polling, with Temporal and PostgreSQL (migrated) reachable."""
        polling = worker.is_running and not worker.is_shutdown
        return await readiness(client, store, *([] if polling else ["worker is not polling"]))

    @app.get("/metrics", dependencies=[Depends(metrics.scrape_guard(settings))])
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    return app
