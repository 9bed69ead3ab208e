"""The relay's webhook endpoints: provider deliveries (receipt first, then verify, dedup,
route; 2xx only after the workflow was reached, `webhook_desk.WebhookDesk`), and for ops
the stored receipts, coverage, replay and re-drive."""

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from domain.permissions import Permission
from starters.actions.front import Door
from starters.relay.auth import Caller
from starters.relay.limits import read_limited
from starters.relay.webhook_desk import WebhookDesk


class ReplayBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    receipt_id: int | None = None
    since: AwareDatetime | None = None
    after_receipt_id: int = Field(default=0, ge=0)
    """With `since`: go on after this original receipt (the last page's highest `replay_of`)."""
    limit: int = Field(default=100, ge=1, le=1000)
    """With `since`: at most this many deliveries a call."""


class WebhookAck(BaseModel):
    receipt_id: int
    verdict: str
    workflow_id: str | None = None


async def webhook_desk(request: Request) -> WebhookDesk:
    """The application's desk (it also runs the periodic re-drive, see `app.create_app`);
    async, so FastAPI calls it on the event loop, not in a worker thread."""
    desk: WebhookDesk = request.app.state.webhooks
    return desk


Desk = Annotated[WebhookDesk, Depends(webhook_desk)]

router = APIRouter()


@router.get("/v1/webhook-receipts")
async def list_receipts(provider: str, caller: Caller, door: Door, event_id: str | None = None,
                        after: int = 0, limit: int = 500) -> list[dict[str, Any]]:
    """A provider's stored deliveries (of one event, when named; duplicates and rejections
    included), oldest first, a page at a time: up to `limit` (1 to 500) after receipt
    `after` (kept receipts grow for good, and anyone may add refused ones)."""
    await door.actions.require(caller, Permission.READ_WEBHOOKS, "reading webhook receipts", via="api")
    return [{**r, "processed_at": r.processed_at.isoformat() if r.processed_at else None}
            for r in await door.store.receipts.find(provider, event_id, after=after,
                                                    limit=min(max(limit, 1), 500))]


@router.post("/webhooks/{provider_name}", response_model=WebhookAck)
async def webhook(provider_name: str, request: Request, door: Door, desk: Desk) -> Response:
    """Verify, store the receipt, dedup, then start or signal; 2xx only after that."""
    headers = {k.lower(): v for k, v in request.headers.items()}
    body = await read_limited(request, door.settings.webhook_max_body_bytes)
    result = await desk.ingest(provider_name, headers, body, now=time.time(),
                               peer=request.client.host if request.client else "")
    if result.acknowledgement is not None:  # the provider reads the body, not the status
        return PlainTextResponse(result.acknowledgement, status_code=result.status_code,
                                 headers={"x-receipt-id": str(result.receipt_id),
                                          "x-webhook-verdict": result.verdict})
    return JSONResponse(result.body(), status_code=result.status_code)


@router.get("/v1/webhooks/coverage")
async def coverage(caller: Caller, door: Door, desk: Desk) -> dict[str, Any]:
    """Which event types arrived per provider, which have a handler, what was refused."""
    await door.actions.require(caller, Permission.READ_WEBHOOKS, "reading webhook coverage", via="api")
    return await desk.coverage()


@router.post("/v1/webhook-receipts/replay")
async def replay(body: ReplayBody, caller: Caller, door: Door, desk: Desk) -> list[dict[str, Any]]:
    """Re-feeds stored receipts through the webhook path (idempotent: events act once)."""
    action = "replaying webhook receipts"
    await door.actions.require(caller, Permission.REPLAY_WEBHOOKS, action, via="api")
    if (body.receipt_id is None) == (body.since is None):
        await door.actions.refuse(caller, None, 422, action, "give exactly one of receipt_id and since",
                                  via="api")
    if body.receipt_id is not None:
        one = await desk.replay(body.receipt_id)
        if one is None:
            await door.actions.refuse(caller, None, 404, action,
                                      f"no webhook receipt {body.receipt_id} (Slack and ServiceNow calls are "
                                      "not replayed: their sender sends them again)", via="api")
        results = [one]
    else:
        assert body.since is not None
        results = await desk.replay_since(body.since, after_id=body.after_receipt_id,
                                          limit=body.limit)
    await door.store.audit.record(None, caller.user, "webhooks_replayed",
                                  {**body.model_dump(mode="json"),
                                   "receipts": [r.receipt_id for r in results]})
    return [{**r.body(), "status_code": r.status_code} for r in results]


@router.post("/v1/webhook-receipts/redrive")
async def redrive(caller: Caller, door: Door, desk: Desk) -> list[dict[str, Any]]:
    """Re-drives accepted receipts whose workflow was never reached."""
    await door.actions.require(caller, Permission.REPLAY_WEBHOOKS, "re-driving webhook receipts", via="api")
    return [{**r.body(), "status_code": r.status_code} for r in await desk.redrive()]
