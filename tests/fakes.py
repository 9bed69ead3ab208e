"""The outside world on loopback: one HTTP app answering like Slack's and Teams' incoming
webhooks, ServiceNow's Table API, Jira Cloud's REST API and an OpenAI-compatible
chat-completions endpoint (shapes as documented), and a real SMTP server (aiosmtpd).
Each records what it received and can be told to fail, so tests see the wire."""

import asyncio
import base64
import contextlib
import itertools
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message as EmailMessage
from typing import Any

from aiosmtpd.controller import Controller
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from temporalio.client import Client

from adapters.db import Store
from adapters.http_server import AppServer
from starters.dev.stack import TemporalDevServer
from starters.ports import free_port
from tests.harness import Stack, open_stack

SN_USER, SN_PASSWORD = "svc-refunds", "sn-pass"
JIRA_EMAIL, JIRA_TOKEN = "bot@example.test", "jira-token"


@dataclass
class World:
    """What the fakes received, and the faults they are told to inject."""

    url: str = ""
    slack: list[dict[str, Any]] = field(default_factory=list)
    teams: list[dict[str, Any]] = field(default_factory=list)
    slack_failures: int = 0
    slack_failure: tuple[int, str] = (500, "rollup_error")
    """What Slack answers while it fails: a hiccup by default; (404, "no_service") for a
    webhook that was revoked."""
    servicenow: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    servicenow_calls: list[tuple[str, str]] = field(default_factory=list)
    servicenow_lost_creates: int = 0
    jira: list[dict[str, Any]] = field(default_factory=list)
    jira_comments: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    llm_requests: list[dict[str, Any]] = field(default_factory=list)
    llm_answer: str = "{}"
    llm_mode: str = "answer"
    mail: list[EmailMessage] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def settings(self, smtp_port: int) -> dict[str, Any]:
        """Settings overrides that point every integration at this world."""
        return {
            "slack_webhook_url": f"{self.url}/slack/T000/B000/secret", "slack_signing_secret": "slack-sign",
            "slack_team_id": "T000",
            "teams_webhook_url": f"{self.url}/teams/workflows/hook",
            "smtp_host": "127.0.0.1", "smtp_port": smtp_port, "smtp_from": "refunds@example.test",
            "ops_email": "ops@example.test", "approvers_email": "approvers@example.test",
            "servicenow_url": self.url, "servicenow_user": SN_USER, "servicenow_password": SN_PASSWORD,
            "servicenow_inbound_secret": "sn-sign", "jira_url": self.url, "jira_email": JIRA_EMAIL,
            "jira_api_token": JIRA_TOKEN, "jira_project": "REF",
        }


def _basic(request: Request, user: str, password: str) -> bool:
    expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    return request.headers.get("authorization") == expected


def outside_app(world: World) -> FastAPI:
    app = FastAPI()
    numbers = itertools.count(1001)

    @app.post("/slack/{team}/{bot}/{token}")
    async def slack_webhook(request: Request) -> Response:
        payload = await request.json()
        if world.slack_failures > 0:
            world.slack_failures -= 1
            status, text = world.slack_failure
            return PlainTextResponse(text, status_code=status)
        if not payload.get("text") and not payload.get("blocks"):
            return PlainTextResponse("no_text", status_code=400)
        world.slack.append(payload)
        return PlainTextResponse("ok")

    @app.post("/teams/workflows/hook")
    async def teams_webhook(request: Request) -> Response:
        payload = await request.json()
        cards = [a for a in payload.get("attachments", [])
                 if a.get("contentType") == "application/vnd.microsoft.card.adaptive"]
        if payload.get("type") != "message" or not cards:
            return JSONResponse({"error": {"code": "InvalidRequestContent"}}, status_code=400)
        world.teams.append(payload)
        return Response(status_code=202)

    def sn_denied() -> JSONResponse:
        return JSONResponse({"error": {"message": "User Not Authenticated",
                                       "detail": "Required to provide Auth information"},
                             "status": "failure"}, status_code=401)

    @app.get("/api/now/table/{table}")
    async def sn_query(table: str, request: Request) -> Response:
        if not _basic(request, SN_USER, SN_PASSWORD):
            return sn_denied()
        world.servicenow_calls.append(("GET", table))
        name, _, value = request.query_params.get("sysparm_query", "").partition("=")
        rows = [r for r in world.servicenow.get(table, []) if r.get(name) == value]
        limit = int(request.query_params.get("sysparm_limit", "10000"))
        return JSONResponse({"result": rows[:limit]})

    @app.post("/api/now/table/{table}")
    async def sn_create(table: str, request: Request) -> Response:
        if not _basic(request, SN_USER, SN_PASSWORD):
            return sn_denied()
        world.servicenow_calls.append(("POST", table))
        fields = await request.json()
        prefix = "INC" if table == "incident" else "RR"
        record = {**fields, "sys_id": uuid.uuid4().hex, "number": f"{prefix}{next(numbers):07d}",
                  "work_notes_history": []}
        world.servicenow.setdefault(table, []).append(record)
        if world.servicenow_lost_creates > 0:  # created, but the answer never makes it back
            world.servicenow_lost_creates -= 1
            return JSONResponse({"error": {"message": "upstream timeout"}, "status": "failure"},
                                status_code=502)
        return JSONResponse({"result": record}, status_code=201)

    @app.patch("/api/now/table/{table}/{sys_id}")
    async def sn_update(table: str, sys_id: str, request: Request) -> Response:
        if not _basic(request, SN_USER, SN_PASSWORD):
            return sn_denied()
        world.servicenow_calls.append(("PATCH", table))
        found = [r for r in world.servicenow.get(table, []) if r["sys_id"] == sys_id]
        if not found:
            return JSONResponse({"error": {"message": "No Record found"}, "status": "failure"},
                                status_code=404)
        changes = await request.json()
        if "work_notes" in changes:
            found[0]["work_notes_history"].append(changes.pop("work_notes"))
        found[0].update(changes)
        return JSONResponse({"result": found[0]})

    def jira_denied() -> JSONResponse:
        return JSONResponse({"errorMessages": ["You are not authenticated."]}, status_code=401)

    @app.post("/rest/api/3/issue")
    async def jira_create(request: Request) -> Response:
        if not _basic(request, JIRA_EMAIL, JIRA_TOKEN):
            return jira_denied()
        fields = (await request.json())["fields"]
        errors = {name: f"{name} is required." for name in ("project", "issuetype", "summary")
                  if not fields.get(name)}
        if fields.get("description", {}).get("type") != "doc":
            errors["description"] = "Operation value must be an Atlassian Document."
        if errors:
            return JSONResponse({"errorMessages": [], "errors": errors}, status_code=400)
        issue_id = str(10000 + uuid.uuid4().int % 10**9)  # unique across the session's worlds, as Jira's are
        key = f"{fields['project']['key']}-{len(world.jira) + 1}"
        world.jira.append({"id": issue_id, "key": key, "fields": fields})
        return JSONResponse({"id": issue_id, "key": key, "self": f"{world.url}/rest/api/3/issue/{issue_id}"},
                            status_code=201)

    @app.get("/rest/api/3/search/jql")
    async def jira_search(request: Request) -> Response:
        if not _basic(request, JIRA_EMAIL, JIRA_TOKEN):
            return jira_denied()
        jql = request.query_params["jql"]
        label = jql.split('labels = "', 1)[1].split('"', 1)[0]
        issues = [{"id": i["id"], "key": i["key"], "fields": {"summary": i["fields"]["summary"]}}
                  for i in world.jira if label in i["fields"]["labels"]]
        return JSONResponse({"issues": issues[:int(request.query_params.get("maxResults", "50"))],
                             "isLast": True})

    @app.post("/rest/api/3/issue/{key}/comment")
    async def jira_comment(key: str, request: Request) -> Response:
        if not _basic(request, JIRA_EMAIL, JIRA_TOKEN):
            return jira_denied()
        if not any(i["key"] == key for i in world.jira):
            return JSONResponse({"errorMessages": ["Issue does not exist"]}, status_code=404)
        body = (await request.json())["body"]
        world.jira_comments.setdefault(key, []).append(body)
        return JSONResponse({"id": str(len(world.jira_comments[key])), "body": body}, status_code=201)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        world.llm_requests.append(await request.json())
        if world.llm_mode == "hang":
            await world.release.wait()
        if world.llm_mode == "error":
            return JSONResponse({"error": {"message": "overloaded", "type": "server_error"}},
                                status_code=503)
        return JSONResponse({
            "id": "chatcmpl-1", "object": "chat.completion", "model": "fake-model",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": world.llm_answer}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

    return app


class _MailHandler:
    def __init__(self, world: World) -> None:
        self._world = world

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        mail = message_from_bytes(envelope.original_content)
        mail["X-Envelope-To"] = ",".join(envelope.rcpt_tos)
        self._world.mail.append(mail)
        return "250 Message accepted for delivery"


@contextlib.asynccontextmanager
async def outside_world() -> AsyncIterator[tuple[World, int]]:
    """The fake services and an SMTP server; yields the world and the SMTP port."""
    world = World()
    server = AppServer(outside_app(world), "127.0.0.1", 0)
    world.url = server.url
    smtp = Controller(_MailHandler(world), hostname="127.0.0.1", port=free_port())
    await server.start()
    smtp.start()
    try:
        yield world, smtp.port
    finally:
        world.release.set()
        smtp.stop()
        await server.stop()


@contextlib.asynccontextmanager
async def connected_stack(store: Store, client: Client, temporal: TemporalDevServer, *,
                          with_llm: bool = False, **overrides: Any) -> AsyncIterator[tuple[Stack, World]]:
    """A test stack whose integrations all point at a fresh outside world (and its model
    endpoint, when asked: otherwise the offline advisor)."""
    async with outside_world() as (world, smtp_port):
        llm = {"llm_url": f"{world.url}/v1"} if with_llm else {}
        stack = await open_stack(store, client, temporal.address,
                                 **{**world.settings(smtp_port), **llm, **overrides})
        try:
            yield stack, world
        finally:
            await stack.close()


async def eventually(probe: Any, timeout: float = 30) -> Any:
    """Polls an async probe until it returns something truthy (no timing assertions)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{probe.__name__} never became true")
        await asyncio.sleep(0.1)


def llm_advice(**fields: Any) -> str:
    """A model's answer: the JSON object the advisor asks for."""
    return json.dumps(fields)
