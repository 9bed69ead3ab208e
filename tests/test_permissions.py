"""The permission table (`domain/permissions.py`) against every front end that guards with
it. Each route and page of the relay and the console is named here with the permission it
checks, or as unguarded with the reason; a route named nowhere fails. Then, for every role,
a person holding only that role calls each guarded route: the call is refused, with the
refusal audited as needing the table's roles for that permission, exactly when the table
leaves the role out."""

import asyncio
import importlib
import pkgutil
import uuid
from dataclasses import dataclass
from typing import Any, cast

import httpx
from fastapi import APIRouter
from fastapi.routing import APIRoute

import starters.console
import starters.relay
from adapters.config import Settings
from domain.models import ROLES as TOKEN_ROLES
from domain.permissions import PERMISSIONS, ROLES, Permission, roles_for
from starters.relay import create_app
from tests.harness import Stack
from tests.test_console import field

NO_CASE = "rr-no-such-case"
NO_PAYOUT_CASE = "payout-no-such-case"
NO_BREAK = 999_999_999
UNGUARDED = {
    ("GET", "/healthz"): "liveness",
    ("GET", "/readyz"): "readiness",
    ("GET", "/metrics"): "its own scrape token (tests/test_metrics_access.py)",
    ("POST", "/webhooks/{provider_name}"): "the provider's signature",
    ("POST", "/integrations/slack/actions"): "Slack's signature; the linked person's roles "
                                               "(APPROVE_REFUND) in tests/test_inbound.py",
    ("POST", "/integrations/servicenow/refund-requests"): "ServiceNow's signature; REQUEST_REFUND "
                                                           "for the opener in tests/test_inbound.py",
    ("POST", "/integrations/servicenow/approvals"): "ServiceNow's signature; APPROVE_REFUND",
    ("GET", "/console"): "a redirect",
    ("GET", "/console/static/console.css"): "the stylesheet",
    ("GET", "/console/sign-in"): "signing in",
    ("POST", "/console/sign-in"): "signing in",
    ("POST", "/console/sign-out"): "signing out",
}


@dataclass(frozen=True)
class Call:
    """One request a person makes: the route it exercises and the permission it needs."""

    method: str
    route: str
    permission: Permission
    url: str
    json: dict[str, Any] | None = None
    form: dict[str, str] | None = None


def api_calls() -> list[Call]:
    refund = "/v1/refund-requests/{refund_request_id}"
    breaks = "/v1/reconciliation/breaks/{break_id}"
    return [
        Call("POST", "/v1/refund-requests", Permission.REQUEST_REFUND, "/v1/refund-requests", json={
            # a valid body the rules then refuse (ids of the provider's own), so nothing starts
            "refund_request_id": "sandbox-permission-check", "provider": "sandbox",
            "charge_id": "ch_1", "amount": 100, "currency": "USD", "merchant_account": "acct_1",
            "reason": "requested_by_customer"}),
        Call("GET", refund, Permission.READ_CASE, f"/v1/refund-requests/{NO_CASE}"),
        Call("GET", f"{refund}/audit", Permission.READ_CASE, f"/v1/refund-requests/{NO_CASE}/audit"),
        Call("POST", f"{refund}/approvals", Permission.APPROVE_REFUND,
             f"/v1/refund-requests/{NO_CASE}/approvals", json={"decision": "approve"}),
        Call("POST", f"{refund}/reissue", Permission.REISSUE_REFUND,
             f"/v1/refund-requests/{NO_CASE}/reissue", json={}),
        Call("POST", f"{refund}/provider-wait", Permission.RESOLVE_PROVIDER_WAIT,
             f"/v1/refund-requests/{NO_CASE}/provider-wait",
             json={"provider_shows": "not_refunded", "reason": "check"}),
        Call("POST", "/v1/manual-refunds/{refund_request_id}/confirmation",
             Permission.CONFIRM_MANUAL_REFUND, f"/v1/manual-refunds/{NO_CASE}/confirmation",
             json={"paid": True}),
        Call("GET", "/v1/webhook-receipts", Permission.READ_WEBHOOKS,
             "/v1/webhook-receipts?provider=sandbox&event_id=none"),
        Call("GET", "/v1/webhooks/coverage", Permission.READ_WEBHOOKS, "/v1/webhooks/coverage"),
        Call("POST", "/v1/webhook-receipts/replay", Permission.REPLAY_WEBHOOKS,
             "/v1/webhook-receipts/replay", json={"receipt_id": NO_BREAK}),
        Call("POST", "/v1/webhook-receipts/redrive", Permission.REPLAY_WEBHOOKS,
             "/v1/webhook-receipts/redrive"),
        Call("POST", "/v1/payouts", Permission.REGISTER_PAYOUT, "/v1/payouts", json={
            "id": "po-permission-check", "provider": "not-configured", "provider_payout_id": "po_1",
            "beneficiary_id": "b-1", "amount": 100, "currency": "USD"}),
        Call("GET", "/v1/payouts", Permission.READ_PAYOUTS, "/v1/payouts?limit=1"),
        Call("GET", "/v1/payouts/{payout_id}", Permission.READ_PAYOUTS, "/v1/payouts/po-no-such"),
        Call("GET", "/v1/payout-exceptions/{case_id}", Permission.READ_PAYOUTS,
             f"/v1/payout-exceptions/{NO_PAYOUT_CASE}"),
        Call("POST", "/v1/payout-exceptions/{case_id}/approvals", Permission.APPROVE_PAYOUT_EXCEPTION,
             f"/v1/payout-exceptions/{NO_PAYOUT_CASE}/approvals",
             json={"decision": "approve", "awaiting": "awaiting_approval"}),
        Call("POST", "/v1/payout-exceptions/{case_id}/reissue", Permission.REISSUE_PAYOUT,
             f"/v1/payout-exceptions/{NO_PAYOUT_CASE}/reissue", json={"reason": "check"}),
        Call("POST", "/v1/payout-exceptions/{case_id}/beneficiary-hold/release",
             Permission.RELEASE_BENEFICIARY_HOLD,
             f"/v1/payout-exceptions/{NO_PAYOUT_CASE}/beneficiary-hold/release", json={"reason": "check"}),
        Call("POST", "/v1/reconciliation/runs", Permission.START_RECONCILIATION,
             "/v1/reconciliation/runs", json={"provider": "not-configured",
                                              "since": "2026-01-01T00:00:00Z"}),
        Call("GET", "/v1/reconciliation/runs", Permission.READ_RECONCILIATION_RUNS,
             "/v1/reconciliation/runs?limit=1"),
        Call("GET", "/v1/reconciliation/runs/{run_id}", Permission.READ_RECONCILIATION_RUNS,
             "/v1/reconciliation/runs/no-such-run"),
        Call("GET", breaks, Permission.READ_RECONCILIATION_BREAKS, f"/v1/reconciliation/breaks/{NO_BREAK}"),
        Call("POST", f"{breaks}/approvals", Permission.APPROVE_RECONCILIATION_BREAK,
             f"/v1/reconciliation/breaks/{NO_BREAK}/approvals", json={"decision": "approve", "reopened": 0}),
        Call("POST", f"{breaks}/reopen", Permission.REOPEN_RECONCILIATION_BREAK,
             f"/v1/reconciliation/breaks/{NO_BREAK}/reopen", json={"reason": "check", "reopened": 0}),
        Call("POST", "/codec/{direction}", Permission.DECODE_PAYLOADS, "/codec/decode",
             json={"payloads": []}),
        Call("POST", "/codec/{direction}", Permission.ENCODE_PAYLOADS, "/codec/encode",
             json={"payloads": []}),
    ]


def console_calls(case_id: str) -> list[Call]:
    """The console's pages and forms, on a refund case that has succeeded (so an allowed
    person's form is refused by the case's state, not by the table)."""
    case = "/console/cases/{case_id}"
    breaks = "/console/reconciliation/breaks/{break_id}"
    return [
        Call("GET", "/console/cases", Permission.READ_CASE, "/console/cases"),
        Call("GET", case, Permission.READ_CASE, f"/console/cases/{case_id}"),
        Call("POST", f"{case}/approval", Permission.APPROVE_REFUND, f"/console/cases/{case_id}/approval",
             form={"decision": "approve"}),
        Call("POST", f"{case}/reissue", Permission.REISSUE_REFUND, f"/console/cases/{case_id}/reissue",
             form={"method": "provider", "reason": "check"}),
        Call("POST", f"{case}/manual-confirmation", Permission.CONFIRM_MANUAL_REFUND,
             f"/console/cases/{case_id}/manual-confirmation", form={"paid": "true"}),
        Call("POST", f"{case}/provider-wait", Permission.RESOLVE_PROVIDER_WAIT,
             f"/console/cases/{case_id}/provider-wait",
             form={"provider_shows": "not_refunded", "reason": "check"}),
        Call("GET", "/console/coverage", Permission.READ_WEBHOOKS, "/console/coverage"),
        Call("GET", "/console/reconciliation", Permission.READ_RECONCILIATION_BREAKS,
             "/console/reconciliation"),
        Call("POST", breaks, Permission.APPROVE_RECONCILIATION_BREAK,
             f"/console/reconciliation/breaks/{NO_BREAK}", form={"decision": "approve", "reopened": "0"}),
        Call("POST", f"{breaks}/reopen", Permission.REOPEN_RECONCILIATION_BREAK,
             f"/console/reconciliation/breaks/{NO_BREAK}/reopen", form={"reason": "check", "reopened": "0"}),
        Call("GET", "/console/payouts", Permission.READ_PAYOUTS, "/console/payouts"),
        Call("GET", "/console/payouts/{case_id}", Permission.READ_PAYOUTS,
             f"/console/payouts/{NO_PAYOUT_CASE}"),
        Call("POST", "/console/payouts/{case_id}/approval", Permission.APPROVE_PAYOUT_EXCEPTION,
             f"/console/payouts/{NO_PAYOUT_CASE}/approval",
             form={"decision": "approve", "awaiting": "awaiting_approval"}),
        Call("POST", "/console/codec/{direction}", Permission.DECODE_PAYLOADS, "/console/codec/decode",
             json={"payloads": []}),
        Call("POST", "/console/codec/{direction}", Permission.ENCODE_PAYLOADS, "/console/codec/encode",
             json={"payloads": []}),
    ]


def declared_routes() -> set[tuple[str, str]]:
    """Every route of every router module of the relay and the console, read from the
    routers themselves (a new module's router is found too)."""
    found: set[tuple[str, str]] = set()
    for package in (starters.relay, starters.console):
        for info in pkgutil.iter_modules(package.__path__, f"{package.__name__}."):
            for value in vars(importlib.import_module(info.name)).values():
                if isinstance(value, APIRouter):
                    found |= {(method, route.path) for route in value.routes
                              if isinstance(route, APIRoute) for method in route.methods or ()}
    return found


def test_every_route_is_in_the_table_or_unguarded_for_a_stated_reason() -> None:
    named = {(c.method, c.route) for c in [*api_calls(), *console_calls("x")]} | set(UNGUARDED)
    assert declared_routes() == named
    served = create_app(cast(Any, None), cast(Any, None), {}, Settings()).openapi()["paths"]
    assert {(m.upper(), path) for path, item in served.items() for m in item} <= declared_routes()
    used = {c.permission for c in [*api_calls(), *console_calls("x")]}
    assert set(PERMISSIONS) - used == {Permission.READ_EVERY_CASE}  # the case reads below
    assert ROLES == TOKEN_ROLES  # every role a token may carry can do something, and no other


async def person(stack: Stack, role: str) -> str:
    user = f"p-{role}-{uuid.uuid4().hex[:6]}"
    stack.tokens[user] = await stack.store.access.create_token(user, [role], by="test")
    return user


async def table_refusals(stack: Stack, user: str) -> list[list[str]]:
    """The roles each refusal of `user` said were needed, in order."""
    async with stack.store.database.transaction() as conn:
        cur = await conn.execute("SELECT detail FROM audit_events WHERE actor = %s AND action = "
                                 "'access_refused' AND detail ? 'needs_one_of' ORDER BY id", (user,))
        return [list(row["detail"]["needs_one_of"]) for row in await cur.fetchall()]


async def send(client: httpx.AsyncClient, call: Call, csrf: str) -> httpx.Response:
    if call.form is not None:
        return await client.post(call.url, data={**call.form, "csrf": csrf})
    return await client.request(call.method, call.url, json=call.json)


async def refusals_of_one_role(stack: Stack, role: str, case_id: str) -> list[str]:
    """Every call of the API and the console by a person holding only `role`: where the
    front end's answer differs from the table's."""
    wrong: list[str] = []
    user = await person(stack, role)
    async with stack.api(user) as api, httpx.AsyncClient(base_url=stack.relay_url, timeout=30) as console:
        sign_in = await console.get("/console/sign-in")
        signed = await console.post("/console/sign-in", data={
            "token": stack.tokens[user], "form_token": field(sign_in.text, "form_token")})
        assert signed.status_code == 303, signed.text
        csrf = field((await console.get("/console/cases")).text, "csrf")
        for client, calls in ((api, api_calls()), (console, console_calls(case_id))):
            for call in calls:
                before = await table_refusals(stack, user)
                response = await send(client, call, csrf)
                refusal = sorted(roles_for(call.permission))
                refused = refusal in (await table_refusals(stack, user))[len(before):]
                expected = role not in PERMISSIONS[call.permission]
                if refused != expected or (client is api and (response.status_code == 403) != expected):
                    wrong.append(f"{role} {call.method} {call.url}: {response.status_code}, "
                                 f"refused {refused}, the table says {expected}")
        own = await api.get(f"/v1/refund-requests/{case_id}")  # alice's, not theirs
        if (own.status_code == 200) != (role in PERMISSIONS[Permission.READ_EVERY_CASE]):
            wrong.append(f"{role} reading another's case: {own.status_code}")
    return wrong


async def test_each_front_end_refuses_exactly_the_roles_the_table_leaves_out(stack: Stack) -> None:
    case_id = await stack.request_refund("alice", await stack.charge(5_000), 1_000)
    await stack.wait_for_status(case_id, "succeeded")
    found = await asyncio.gather(*(refusals_of_one_role(stack, role, case_id) for role in sorted(ROLES)))
    assert [line for lines in found for line in lines] == []
