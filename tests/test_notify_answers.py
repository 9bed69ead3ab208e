"""What a chat webhook's answer says about delivery. A redirect (a moved webhook, a proxy's
login page) is not a delivery: the notice was posted nowhere. A legacy Office 365 connector
answers 200 to a message it dropped (throttled, too large) and `1` only to one it posted."""

import asyncio
from collections.abc import AsyncIterator

import pytest
from fastapi import FastAPI, Request, Response
from fastapi.responses import PlainTextResponse, RedirectResponse

from adapters.http_server import AppServer
from adapters.notify.chat import WebhookChat
from adapters.notify.delivery import DeliveryFailed, DeliveryUncertain
from adapters.notify.message import Message
from adapters.tickets.base import TicketRef, refused_outright
from adapters.tickets.jira import Jira
from adapters.tickets.servicenow import ServiceNow

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


async def answering_raw(answer: bytes) -> tuple[asyncio.Server, list[bytes]]:
    """A loopback peer that reads one request head and answers `answer` verbatim (an egress
    proxy refusing a tunnel, a hook whose 200 carries a broken body)."""
    heads: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(answer)
        await writer.drain()
        writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0), heads


PROXY_REFUSALS = {"407": b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n",
                  "502": b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n"}


@pytest.mark.parametrize("refusal", list(PROXY_REFUSALS.values()), ids=list(PROXY_REFUSALS))
async def test_a_proxy_refusing_the_tunnel_is_a_failure_to_send_again(
        monkeypatch: pytest.MonkeyPatch, refusal: bytes) -> None:
    """Behind an egress proxy (`HTTPS_PROXY`, honoured as httpx does), a proxy refusing the
    CONNECT means nothing reached the chat: the notice is sent again. It was taken as an
    answer lost after sending (`DeliveryUncertain`): marked delivered, never resent."""
    proxy, heads = await answering_raw(refusal)
    port = proxy.sockets[0].getsockname()[1]
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{port}")
    try:
        with pytest.raises(DeliveryFailed):
            await WebhookChat("slack", "https://hooks.slack.example/services/T0/B0/x", 5.0).send(notice())
    finally:
        proxy.close()
    assert heads and heads[0].startswith(b"CONNECT hooks.slack.example:443 "), heads


@pytest.mark.parametrize(("status", "uncertain"), [(b"200 OK", True), (b"502 Bad Gateway", False)])
async def test_a_body_that_cannot_be_decoded_leaves_the_status_to_decide(
        status: bytes, uncertain: bool) -> None:
    """A 2xx whose body fails to decode (a broken gzip) was posted: never resent (before, the
    raw decoding error counted as a failure and the message was posted again); an error
    status with such a body is still a failure to send again."""
    broken = (b"HTTP/1.1 " + status + b"\r\nContent-Encoding: gzip\r\nContent-Length: 9\r\n"
              b"Connection: close\r\n\r\nnot gzip!")
    hook, heads = await answering_raw(broken)
    port = hook.sockets[0].getsockname()[1]
    try:
        with pytest.raises(DeliveryUncertain if uncertain else DeliveryFailed):
            await WebhookChat("slack", f"http://127.0.0.1:{port}/services/T0/B0/x", 5.0).send(notice())
    finally:
        hook.close()
    assert len(heads) == 1


def ticket_system(system: str, url: str) -> Jira | ServiceNow:
    if system == "jira":
        return Jira(url, "ops@example.com", "token", project="OPS", issue_type="Task", timeout=5.0)
    return ServiceNow(url, "ops", "secret", request_table="sc_request", incident_table="incident",
                      timeout=5.0)


@pytest.mark.parametrize("system", ["jira", "servicenow"])
async def test_a_ticket_call_answered_2xx_without_its_record_is_a_failure_a_create_looks_for(
        system: str) -> None:
    """A 2xx whose body is not the record (an SSO proxy's or a hibernating instance's HTML
    page, a record without `result`) is a failure carrying its status: a note is sent again
    (nothing may have reached the system), and a create's status is one the ticket channel
    looks for again past the search's lag before another create (`refused_outright`); it was
    a failure without a status, read as "nothing was made", so the retry's search could miss
    a ticket the create had made and make a second."""
    answer = (b"HTTP/1.1 201 Created\r\nContent-Type: text/html\r\nContent-Length: 13\r\n"
              b"Connection: close\r\n\r\n<html></html>")
    peer, heads = await answering_raw(answer)
    made = ticket_system(system, f"http://127.0.0.1:{peer.sockets[0].getsockname()[1]}")
    try:
        with pytest.raises(DeliveryFailed) as create:
            await made.create(True, "refund-orchestrator-rr-7-incident", notice())
        with pytest.raises(DeliveryFailed) as note:
            await made.note(True, TicketRef("abc", "INC0001", None), notice())
    finally:
        peer.close()
    assert create.value.status == note.value.status == 201
    assert not refused_outright(create.value.status)
    assert len(heads) == 2 and all(head.split(b" ")[0] in (b"POST", b"PATCH") for head in heads), heads
