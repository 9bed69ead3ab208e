"""What a chat webhook's answer says about delivery. A redirect (a moved webhook, a proxy's
login page) is not a delivery: the notice was posted nowhere. A legacy Office 365 connector
answers 200 to a message it dropped (throttled, too large) and `1` only to one it posted."""

from collections.abc import AsyncIterator

import pytest
from fastapi import FastAPI, Request, Response
from fastapi.responses import PlainTextResponse, RedirectResponse

from adapters.http_server import AppServer
from adapters.notify.chat import WebhookChat
from adapters.notify.delivery import DeliveryFailed
from adapters.notify.message import Message

LEGACY_TEAMS = "/webhookb2/0000@1111/IncomingWebhook/2222/3333"


def hook_app(posted: list[str]) -> FastAPI:
    app = FastAPI()

    @app.post("/moved/{name}")
    async def moved(name: str) -> Response:
        return RedirectResponse("https://login.example/sso", status_code=302)

    @app.post(LEGACY_TEAMS + "/{answer}")
    async def legacy(answer: str, request: Request) -> Response:
        if answer == "posted":
            posted.append((await request.body()).decode())
            return PlainTextResponse("1")
        return PlainTextResponse("Microsoft Teams endpoint returned HTTP error 429 with ContextId "
                                 "tcid=0,server=msgapi-canary-eus2-0,cv=0.")

    @app.post("/workflows/{name}")
    async def workflows(name: str, request: Request) -> Response:
        posted.append((await request.body()).decode())
        return Response(status_code=202)

    return app


@pytest.fixture
async def hooks() -> AsyncIterator[tuple[str, list[str]]]:
    posted: list[str] = []
    server = AppServer(hook_app(posted), "127.0.0.1", 0)
    await server.start()
    try:
        yield server.url, posted
    finally:
        await server.stop()


def notice() -> Message:
    return Message(notice_id=7, kind="refund_failed", audience="ops", case_id="rr-7",
                   title="Refund rr-7 failed", text="The provider declined it.", facts=(),
                   link=None, buttons=False, ticket=None, customer=False, email_to=None)


@pytest.mark.parametrize("name", ["slack", "teams"])
async def test_a_redirect_is_not_a_delivery(hooks: tuple[str, list[str]], name: str) -> None:
    url, _ = hooks
    with pytest.raises(DeliveryFailed) as failed:
        await WebhookChat(name, f"{url}/moved/{name}", 5.0).send(notice())
    assert failed.value.status == 302


async def test_a_legacy_teams_connector_delivers_only_what_it_answers_1_to(
        hooks: tuple[str, list[str]]) -> None:
    url, posted = hooks
    with pytest.raises(DeliveryFailed, match="error 429"):
        await WebhookChat("teams", f"{url}{LEGACY_TEAMS}/throttled", 5.0).send(notice())
    assert posted == []
    await WebhookChat("teams", f"{url}{LEGACY_TEAMS}/posted", 5.0).send(notice())
    await WebhookChat("teams", f"{url}/workflows/hook", 5.0).send(notice())  # Workflows: 202, no body
    assert len(posted) == 2 and all("Refund rr-7 failed" in body for body in posted)
