"""The ops console over plain HTTP: sessions, CSRF, role checks shared with the API,
banners, filters, coverage, and token revocation reaching console sessions at once."""

import html
import json
import logging
import re
import uuid

import httpx
import pytest
from psycopg.types.json import Jsonb
from temporalio.client import Client

from adapters.db import Store, hash_token
from domain.models import (
    CaseEventInput,
    CaseStatus,
    PolicyDecision,
    RefundReason,
    RefundRequest,
    RoleRequirement,
)
from starters.dev.stack import TemporalDevServer
from tests.harness import Stack, open_stack
from tests.test_cli import run
from tests.test_reissue import failed_case


async def console(stack: Stack, user: str) -> httpx.AsyncClient:
    """A browser-like client signed in as `user` (cookies kept, redirects not followed)."""
    client = httpx.AsyncClient(base_url=stack.relay_url, timeout=60)
    form = await client.get("/console/sign-in")
    signed = await client.post("/console/sign-in", data={"token": stack.tokens[user],
                                                         "form_token": field(form.text, "form_token")})
    assert signed.status_code == 303, signed.text
    return client


def field(page: str, name: str) -> str:
    found = re.search(rf'name="{name}" value="([^"]*)"', page)
    assert found is not None, f"no {name} field in the page"
    return html.unescape(found.group(1))


async def post_form(client: httpx.AsyncClient, path: str, data: dict[str, str],
                    csrf: bool = True) -> httpx.Response:
    """Posts like the page's form does: with the session's CSRF token unless told not to."""
    if csrf:
        data = {**data, "csrf": field((await client.get("/console/cases")).text, "csrf")}
    return await client.post(path, data=data)


async def refusals(stack: Stack, chain: str, action: str) -> list[dict]:  # type: ignore[type-arg]
    async with stack.store.database.transaction() as conn:
        cur = await conn.execute("SELECT actor, detail FROM audit_events WHERE chain = %s AND action = %s"
                                 " ORDER BY id", (chain, action))
        return list(await cur.fetchall())


async def test_sign_in_makes_a_strict_http_only_session_and_sign_out_ends_it(stack: Stack) -> None:
    anonymous = httpx.AsyncClient(base_url=stack.relay_url, timeout=30)
    first = await anonymous.get("/console/cases")
    assert first.status_code == 303 and first.headers["location"] == "/console/sign-in"
    form = await anonymous.get("/console/sign-in")
    wrong = f"t-wrong-{uuid.uuid4().hex}"
    bad = await anonymous.post("/console/sign-in", data={"token": wrong,
                                                         "form_token": field(form.text, "form_token")})
    assert bad.status_code == 401 and "not valid" in bad.text
    assert not [r for r in await refusals(stack, "", "access_refused")  # counted, not chained
                if r["detail"].get("token_fingerprint") == hash_token(wrong)[:12]]
    forged = httpx.AsyncClient(base_url=stack.relay_url, timeout=30)  # no form cookie: another site
    refused = await forged.post("/console/sign-in", data={"token": stack.tokens["bob"], "form_token": "x"})
    assert refused.status_code == 403 and "rfo_session" not in refused.headers.get("set-cookie", "")

    bob = anonymous
    signed = await bob.post("/console/sign-in", data={
        "token": stack.tokens["bob"], "form_token": field((await bob.get("/console/sign-in")).text,
                                                          "form_token")})
    assert signed.status_code == 303 and signed.headers["location"] == "/console/cases"
    header = next(h for h in signed.headers.get_list("set-cookie") if h.startswith("rfo_session="))
    assert "HttpOnly" in header and "SameSite=strict" in header and "Path=/console" in header
    cookie = bob.cookies["rfo_session"]
    cases = await bob.get("/console/cases")
    assert cases.status_code == 200 and 'data-testid="user">bob<' in cases.text
    assert cases.headers["x-frame-options"] == "DENY"
    assert "form-action 'self'" in cases.headers["content-security-policy"]
    assert "strict-transport-security" not in cases.headers  # plain http: the loopback dev stack
    out = await post_form(bob, "/console/sign-out", {})
    assert out.status_code == 303
    replay = httpx.AsyncClient(base_url=stack.relay_url, timeout=30, cookies={"rfo_session": cookie})
    assert (await replay.get("/console/cases")).status_code == 303  # dead on the server, not just forgotten


async def test_an_identity_behind_a_case_is_not_offered_its_approval(stack: Stack) -> None:
    """Bob opened the ticket this case came from (a trigger identity): the workflow refuses
    his approval, so the console neither lists the case as his to approve nor tells him his
    approval would count; Carol, an approver apart from it, is offered it."""
    charge = await stack.charge(20_000)
    case_id = await stack.open_case("alice", charge, 9_000, trigger_identities=("bob",))
    await stack.wait_for_status(case_id, "awaiting_approval")
    bob = await console(stack, "bob")
    assert case_id not in (await bob.get("/console/cases", params={"mine": "1"})).text
    page = await bob.get(f"/console/cases/{case_id}")
    assert ("Your approval would not count: an identity behind the triggering event cannot approve"
            in page.text)
    refused = await post_form(bob, f"/console/cases/{case_id}/approval", {"decision": "approve"})
    assert refused.status_code == 403 and "triggering event" in refused.text
    carol = await console(stack, "carol")
    assert case_id in (await carol.get("/console/cases", params={"mine": "1"})).text


async def test_requester_is_refused_csrf_is_checked_and_a_second_user_approves(stack: Stack) -> None:
    stack.tokens["rita"] = await stack.store.access.create_token(
        "rita", ["requester", "approver"], token=f"t-rita-{uuid.uuid4().hex}", by="test")
    charge = await stack.charge(20_000)
    case_id = await stack.request_refund("rita", charge, 9_000)  # above 50.00: one approver
    await stack.wait_for_status(case_id, "awaiting_approval")
    path = f"/console/cases/{case_id}"
    rita = await console(stack, "rita")
    page = await rita.get(path)
    assert "Still needs approval from: <strong>approver</strong>" in page.text
    assert "Your approval would not count: the requester cannot approve their own refund" in page.text
    assert "90.00 USD" in page.text
    refused = await post_form(rita, f"{path}/approval", {"decision": "approve", "reason": "mine"})
    assert refused.status_code == 403 and "requester cannot approve their own refund" in refused.text
    mine = await rita.get("/console/cases", params={"mine": "1"})
    assert case_id not in mine.text

    bob, dave = await console(stack, "bob"), await console(stack, "dave")
    forged = await post_form(bob, f"{path}/approval", {"decision": "approve"}, csrf=False)
    assert forged.status_code == 403 and "CSRF" in forged.text
    assert [r["actor"] for r in await refusals(stack, "", "csrf_refused")
            if r["detail"]["action"] == f"POST {path}/approval"] == ["bob"]
    auditor = await post_form(dave, f"{path}/approval", {"decision": "approve"})
    assert auditor.status_code == 403 and "needs one of the roles" in auditor.text
    nonsense = await post_form(bob, f"{path}/approval", {"decision": "maybe"})
    assert nonsense.status_code == 422 and "invalid decision" in nonsense.text
    assert (await stack.store.cases.get(case_id))["status"] == "awaiting_approval"  # type: ignore[index]
    assert case_id in (await bob.get("/console/cases", params={"mine": "1"})).text

    approved = await post_form(bob, f"{path}/approval", {"decision": "approve", "reason": "order checked"})
    assert approved.status_code == 303 and approved.headers["location"] == f"{path}?notice=approve"
    await stack.wait_for_status(case_id, "succeeded")
    trail = await stack.store.audit.trail(case_id)
    by_action = {(e["action"], e["actor"], e["detail"].get("via")) for e in trail}
    assert ("approval_refused", "rita", "console") in by_action
    assert ("access_refused", "dave", "console") in by_action
    assert ("action_refused", "bob", "console") in by_action  # the invalid decision
    assert ("approval_granted", "bob", None) in by_action
    assert [r["amount"] for r in await stack.provider_refunds(charge)] == [9_000]


async def test_a_refusal_for_a_case_nobody_made_begins_no_trail_of_it(stack: Stack) -> None:
    """Anyone signed in could post a form or read a page naming any id: the refusal was
    recorded under that id's chain before the case was looked up, so an invented id began
    an audit chain (a future refund's id would then open on a trail someone else began) and
    a requester's refusals joined cases they may not even read. A refusal naming no case we
    hold goes to the global trail, naming the id it asked for."""
    invented = f"rr-nobody-{uuid.uuid4().hex[:8]}"
    rita = await console(stack, "alice")  # a requester: no payout role
    invalid = await post_form(rita, f"/console/cases/{invented}/approval", {"decision": "x"})
    assert invalid.status_code in (404, 422), invalid.text
    read = await rita.get(f"/console/payouts/{invented}")
    assert read.status_code == 403, read.text
    payout_form = await post_form(rita, f"/console/payouts/{invented}/approval", {"decision": "x"})
    assert payout_form.status_code in (403, 404, 422), payout_form.text
    async with stack.api("alice") as api:
        approved = await api.post(f"/v1/refund-requests/{invented}/approvals", json={"decision": "approve"})
    assert approved.status_code in (403, 404), approved.text
    begun = "SELECT 1 FROM audit_heads WHERE chain = %s"
    assert await stack.store.database.fetch_all(begun, (invented,)) == []
    named = [r for action in ("action_refused", "access_refused") for r in await refusals(stack, "", action)
             if r["actor"] == "alice" and r["detail"].get("case_id") == invented]
    assert len(named) >= 4, named


async def test_failed_refund_banner_reissue_by_bank_transfer_and_confirmation(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    stack = await open_stack(store, client, temporal_server.address,
                             temporal_ui_url="http://127.0.0.1:8233")
    try:
        case_id, charge = await failed_case(stack)
        path = f"/console/cases/{case_id}"
        olga, dave, bob, admin = [await console(stack, u) for u in ("olga", "dave", "bob", "admin")]
        page = await olga.get(path)
        assert 'data-testid="banner"' in page.text and "Refund failed" in page.text
        assert "card_account_closed" in page.text and 'data-testid="reissue-form"' in page.text
        assert f"http://127.0.0.1:8233/namespaces/default/workflows/{case_id}" in page.text
        assert 'data-testid="reissue-form"' not in (await dave.get(path)).text
        assert (await post_form(dave, f"{path}/reissue", {"method": "provider"})).status_code == 403
        cheque = await post_form(olga, f"{path}/reissue", {"method": "cheque"})
        assert cheque.status_code == 422 and not await stack.store.cases.children(case_id)

        made = await post_form(olga, f"{path}/reissue", {"method": "bank_transfer",
                                                         "reason": "card closed"})
        assert made.status_code == 303
        child_id = f"{case_id}-r1"
        assert made.headers["location"] == f"/console/cases/{child_id}?notice=reissued"
        again = await post_form(olga, f"{path}/reissue", {"method": "bank_transfer"})  # double click
        assert again.headers["location"] == f"/console/cases/{child_id}?notice=reissue_open"
        alice = await console(stack, "alice")  # her case's reissue is ops' request: not hers to open
        link = f'href="/console/cases/{child_id}"'
        assert link in (await olga.get(path)).text and link not in (await alice.get(path)).text
        await stack.wait_for_status(child_id, "awaiting_approval")
        child_path = f"/console/cases/{child_id}"
        assert (await post_form(bob, f"{child_path}/approval", {"decision": "approve"})).status_code == 303
        await stack.wait_for_status(child_id, "pending")
        form = re.search(r'data-testid="confirm-form".*?</form>', (await olga.get(child_path)).text, re.S)
        # Enter in a one-line reason would send the first button, "It was paid": a text area
        assert form is not None and '<textarea name="reason"' in form.group(0)
        own = await post_form(olga, f"{child_path}/manual-confirmation", {"paid": "true"})
        assert own.status_code == 403 and "cannot confirm their own refund" in own.text
        paid = await post_form(admin, f"{child_path}/manual-confirmation",
                               {"paid": "true", "reason": "SEPA ref 9"})
        assert paid.status_code == 303
        await stack.wait_for_status(child_id, "succeeded")
        assert len(await stack.provider_refunds(charge)) == 1  # the provider was not asked again
        assert 'data-testid="banner"' not in (await olga.get(child_path)).text
    finally:
        await stack.close()


async def test_case_list_filters_search_and_bad_filters(stack: Stack) -> None:
    charge = await stack.charge(50_000)
    small = await stack.request_refund("alice", charge, 1_000)
    row = await stack.wait_for_status(small, "succeeded")
    large = await stack.request_refund("alice", charge, 9_000)
    await stack.wait_for_status(large, "awaiting_approval")
    bob = await console(stack, "bob")

    async def listed(**params: str) -> set[str]:
        response = await bob.get("/console/cases", params=params)
        assert response.status_code == 200, response.text
        return {c for c in (small, large) if f'data-case="{c}"' in response.text}

    assert await listed(q=charge) == {small, large}
    assert await listed(q=row["provider_refund_id"]) == {small}
    assert await listed(q=large) == {large}
    ticket = f"RR{uuid.uuid4().hex[:7]}"
    async with stack.store.database.transaction() as conn:
        await conn.execute("INSERT INTO case_tickets (refund_request_id, system, purpose, external_id,"
                           " number) VALUES (%s, 'servicenow', 'request', %s, %s)",
                           (small, uuid.uuid4().hex, ticket))
    assert await listed(q=ticket) == {small}
    assert await listed(q=charge, status="awaiting_approval") == {large}
    assert await listed(q=charge, currency="usd", min="50.00", max="100.00") == {large}
    assert await listed(q=charge, currency="USD", max="10.00") == {small}
    assert await listed(q=charge, newer_than="1h") == {small, large}
    assert await listed(q=charge, older_than="1h") == set()
    assert await listed(q=charge, provider="sandbox", mine="1") == {large}
    for params, why in (({"min": "5"}, "choose a currency"),
                        ({"currency": "USD", "min": "1.001"}, "decimals"),
                        ({"status": "lost"}, "unknown status"), ({"older_than": "soon"}, "duration")):
        response = await bob.get("/console/cases", params=params)
        assert response.status_code == 422 and why in response.text, params
    assert len([r for r in await refusals(stack, "", "action_refused")
                if r["actor"] == "bob" and r["detail"]["action"] == "filtering cases"]) >= 4


async def test_a_refusal_records_what_was_asked_for_within_bounds(stack: Stack) -> None:
    """What a person sends (a filter in the query, which no path limit bounds) is written into
    the refusal's audit row under their name: a 12,000-character status was written whole,
    twice over (the value and the refusal quoting it), each time it was sent. Clipped in the
    row, saying how long it was; the refusal still names what was asked for."""
    bob = await console(stack, "bob")
    marker = f"long-{uuid.uuid4().hex[:8]}"
    asked = marker + "x" * 12_000
    response = await bob.get("/console/cases", params={"status": asked})
    assert response.status_code == 422, response.text
    [refused] = [e for e in await stack.store.audit.trail("") if e["actor"] == "bob"
                 and marker in str(e["detail"].get("refusal", ""))]
    assert len(json.dumps(refused["detail"])) < 1_500, len(json.dumps(refused["detail"]))
    assert refused["detail"]["refusal"].endswith(f"({len(f'unknown status {asked!r}')} characters)")


async def test_revoking_a_token_ends_its_api_access_and_console_session_at_once(
        stack: Stack, postgres_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    user = f"tess-{uuid.uuid4().hex[:6]}"
    stack.tokens[user] = await stack.store.access.create_token(user, ["ops"], by="test",
                                                               token=f"t-{user}-{uuid.uuid4().hex}")
    tess = await console(stack, user)
    assert (await tess.get("/console/cases")).status_code == 200
    env = {"REFUNDS_DATABASE_URL": postgres_dsn}
    listing = await run("token", "list", env=env)
    assert listing.returncode == 0, listing.stderr
    line = next(line for line in listing.stdout.splitlines() if f" {user} " in line)
    assert "ops" in line and stack.tokens[user] not in listing.stdout
    token_id = line.split()[0]
    csrf = field((await tess.get("/console/cases")).text, "csrf")

    revoked = await run("token", "revoke", token_id, env=env)
    assert revoked.returncode == 0 and f"revoked token {token_id}" in revoked.stdout
    caplog.set_level(logging.WARNING, logger="relay.refusals")
    async with stack.api(user) as api:
        assert (await api.get("/v1/webhook-receipts", params={"provider": "sandbox"})).status_code == 401
    assert (await tess.get("/console/cases")).status_code == 303
    late = await tess.post("/console/sign-out", data={"csrf": csrf})
    assert late.status_code == 401 and "Sign in again" in late.text
    assert (await run("token", "revoke", token_id, env=env)).returncode == 1
    assert f" {user} " not in (await run("token", "list", env=env)).stdout
    assert f" {user} " in (await run("token", "list", "--all", env=env)).stdout
    fingerprint = line.split()[3]  # an unauthenticated refusal is logged (sampled), not audited
    assert any("invalid or revoked token" in r.getMessage() and "GET /v1/webhook-receipts" in r.getMessage()
               and fingerprint in r.getMessage() for r in caplog.records if r.name == "relay.refusals")


async def test_coverage_shows_unhandled_types_and_refused_deliveries_to_ops_only(stack: Stack) -> None:
    mystery = f"refund.mystery_{uuid.uuid4().hex[:6]}"
    async with stack.sandbox() as sb:
        await sb.post("/_sandbox/events", json={"type": mystery, "object": {"id": "re_x"}})
    async with httpx.AsyncClient(base_url=stack.relay_url) as raw:
        forged = await raw.post("/webhooks/sandbox", content=b'{"id": "evt_forged"}',
                                headers={"sandbox-signature": "t=1,v1=00"})
    assert forged.status_code == 401
    dave, alice = await console(stack, "dave"), await console(stack, "alice")
    page = await dave.get("/console/coverage")
    assert page.status_code == 200
    # The session's database is shared: other providers' panels may list their own unknown types.
    unhandled = re.search(r'data-provider="sandbox">\s*<h2>sandbox</h2>\s*'
                          r'<div class="alert error" role="alert">Unhandled event types received: ([^<]*)<',
                          page.text)
    assert unhandled is not None and mystery in unhandled.group(1).split(", ")
    assert re.search(rf"{re.escape(mystery)}</td>\s*<td><span class=\"pill bad\">no handler", page.text)
    assert re.search(r'<span class="pill wait">bad signature</span></td>\s*'
                     r"<td>No signatures found matching the expected signature", page.text)
    assert (await alice.get("/console/coverage")).status_code == 403
    assert (await alice.get("/console/reconciliation")).status_code == 403
    assert "Reconciliation reports" in (await dave.get("/console/reconciliation")).text
    assert any(r["actor"] == "alice" and r["detail"]["action"] == "reading webhook coverage"
               for r in await refusals(stack, "", "access_refused"))


async def test_api_tier_approvers_read_cases_and_bad_input_is_recorded(stack: Stack) -> None:
    charge = await stack.charge(10_000)
    case_id = await stack.request_refund("alice", charge, 1_000)
    async with stack.api("frank") as api:  # a finance_manager must see what they sign
        assert (await api.get(f"/v1/refund-requests/{case_id}")).status_code == 200
        bad = await api.post(f"/v1/refund-requests/{case_id}/approvals", json={"decision": "maybe"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "decision"]
    assert {"action": f"POST /v1/refund-requests/{case_id}/approvals", "via": "api",
            "refusal": "invalid body.decision: Input should be 'approve' or 'deny'"} in [
        r["detail"] for r in await refusals(stack, "", "action_refused") if r["actor"] == "frank"]


async def test_every_state_that_needs_a_person_has_a_red_banner(stack: Stack) -> None:
    """Cases put straight into each state (no workflow): the page must say what went wrong."""
    olga = await console(stack, "olga")
    expected = {CaseStatus.REFUND_CANCELED: "Refund canceled",
                CaseStatus.EXECUTED_LEDGER_PENDING: "Executed, ledger pending",
                CaseStatus.OPS_REVIEW: "Needs ops review", CaseStatus.SUCCEEDED: None}
    for status, title in expected.items():
        body = stack.refund_body("ch_banner", 700)
        await stack.store.cases.create(RefundRequest.model_validate(body), "alice")
        await stack.store.cases.record_event(CaseEventInput(
            refund_request_id=body["refund_request_id"], action="test_state", actor="test", status=status))
        page = (await olga.get(f"/console/cases/{body['refund_request_id']}")).text
        banner = re.search(r'data-testid="banner">\s*<strong>([^<]*)</strong>', page)
        assert (banner.group(1) if banner else None) == title, status
        assert "7.00 USD" in page


async def test_case_page_shows_the_advice_labelled_advisory(stack: Stack) -> None:
    charge = await stack.charge(10_000)
    case_id = await stack.request_refund("alice", charge, 1_000)
    await stack.wait_for_status(case_id, "succeeded")
    dave = await console(stack, "dave")
    page = await dave.get(f"/console/cases/{case_id}")
    assert page.status_code == 200
    assert 'data-testid="advice"' in page.text and "advisory only" in page.text
    assert "10.00 USD" in page.text.split('data-testid="advice"', 1)[1]


async def test_reconciliation_page_lists_breaks_and_acknowledges_them_by_the_api_rule(
        stack: Stack) -> None:
    from tests.reconciliation_kit import break_awaiting_approval, wait_for_breaks

    case_id, found = await break_awaiting_approval(stack, moved_to="canceled", requester="alice", days_ago=2)
    olga, bob = await console(stack, "olga"), await console(stack, "bob")
    listing = await olga.get("/console/reconciliation")
    assert listing.status_code == 200
    assert f'data-break="{found["id"]}"' in listing.text and case_id in listing.text
    assert "needs an approver" in listing.text  # ops read; they cannot approve money
    # what an approval books, beside the button: the provider's amount alone did not say
    # which way the ledger moves, nor by how much (the provider canceled a refund we booked)
    row = listing.text.split(f'data-break="{found["id"]}"', 1)[1].split("</tr>", 1)[0]
    entry = re.search(r'data-testid="entry">([^<]*)<', row)
    assert entry is not None and entry.group(1).strip() == "refund reversed 20.00 USD", row
    page = await bob.get("/console/reconciliation")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert csrf is not None
    forged = await bob.post(f"/console/reconciliation/breaks/{found['id']}",
                            data={"decision": "approve", "csrf": "wrong"})
    assert forged.status_code == 403
    done = await bob.post(f"/console/reconciliation/breaks/{found['id']}",
                          data={"decision": "approve", "reason": "provider canceled it",
                                "reopened": "0", "csrf": csrf.group(1)})
    assert done.status_code == 303
    [resolved] = await wait_for_breaks(stack, [found["object_id"]], "resolved")
    assert resolved["resolution"]["outcome"]["posting_key"].startswith(f"{case_id}:refund_reversed")


async def test_reconciliation_page_shows_approvers_their_breaks_not_the_runs_and_keeps_its_words(
        stack: Stack) -> None:
    """An approver reads the breaks waiting for them, not the runs (the API refuses them
    those); the decision's reason is a text area (Enter in a one-line field would send the
    form's first button: approve); a refused form is recorded under the approver; and the
    page's confirmation says only what the console itself says."""
    from tests.reconciliation_kit import break_awaiting_approval

    _, found = await break_awaiting_approval(stack, moved_to="canceled", requester="alice", days_ago=2)
    bob = await console(stack, "bob")
    page = await bob.get("/console/reconciliation")
    assert page.status_code == 200 and f'data-break="{found["id"]}"' in page.text
    assert "<h2>Runs</h2>" not in page.text and found["first_run_id"] not in page.text
    form = re.search(rf'action="/console/reconciliation/breaks/{found["id"]}".*?</form>', page.text, re.S)
    assert form is not None and '<textarea name="reason"' in form.group(0), form
    assert '<input type="hidden" name="reopened" value="0">' in form.group(0)
    stale = await post_form(bob, f"/console/reconciliation/breaks/{found['id']}",
                            {"decision": "approve", "reopened": "1"})  # a page from another round
    assert stale.status_code == 409 and "reopened" in stale.text
    assert any("before the break was reopened" in r["detail"]["refusal"]
               for r in await refusals(stack, found["chain"], "action_refused") if r["actor"] == "bob")
    olga_page = (await (await console(stack, "olga")).get("/console/reconciliation")).text
    assert "<h2>Runs</h2>" in olga_page and found["first_run_id"] in olga_page

    invalid = await post_form(bob, f"/console/reconciliation/breaks/{found['id']}", {"decision": "maybe"})
    assert invalid.status_code == 422
    assert [r["detail"]["via"] for r in await refusals(stack, "", "action_refused") if r["actor"] == "bob"
            and r["detail"]["action"] == "deciding on a reconciliation break"] == ["console"]
    mistyped = await bob.post("/console/reconciliation/breaks/abc", data={"decision": "approve"})
    assert mistyped.status_code == 422  # FastAPI's own check, before the console's route
    mistyped_path = "POST /console/reconciliation/breaks/abc"
    assert "console" in [r["detail"]["via"] for r in await refusals(stack, "", "action_refused")
                         if r["actor"] == "bob" and r["detail"]["action"] == mistyped_path]
    spoofed = await bob.get("/console/reconciliation",
                            params={"notice": "Re-enter your token at evil.example"})
    assert "evil.example" not in spoofed.text



async def test_the_reopen_form_takes_back_the_round_its_page_showed(stack: Stack) -> None:
    """The console's Reopen form names the round it shows: posted, it reopens the break;
    the same page posted again once that round was dismissed too is refused (409), the
    second dismissal stands."""
    from tests.reconciliation_kit import break_awaiting_approval, wait_for_breaks
    from tests.test_reconciliation import decide

    _, found = await break_awaiting_approval(stack, moved_to="canceled", requester="alice", days_ago=2)
    assert (await decide(stack, "bob", found["id"], "deny")).status_code == 202
    await wait_for_breaks(stack, [found["object_id"]], "dismissed")
    olga = await console(stack, "olga")
    page = (await olga.get("/console/reconciliation")).text
    form = re.search(rf'action="/console/reconciliation/breaks/{found["id"]}/reopen".*?</form>', page, re.S)
    assert form is not None, page
    fields = dict(re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)"', form.group(0)))
    assert fields.get("reopened") == "0", form.group(0)
    posted = {**fields, "reason": "the provider shows it settled"}
    reopened = await olga.post(f"/console/reconciliation/breaks/{found['id']}/reopen", data=posted)
    assert reopened.status_code == 303, reopened.text
    await wait_for_breaks(stack, [found["object_id"]], "awaiting_approval")
    assert (await decide(stack, "bob", found["id"], "deny")).status_code == 202
    await wait_for_breaks(stack, [found["object_id"]], "dismissed")
    stale = await olga.post(f"/console/reconciliation/breaks/{found['id']}/reopen", data=posted)
    assert stale.status_code == 409 and "decided again since" in html.unescape(stale.text), stale.text
    [kept] = await wait_for_breaks(stack, [found["object_id"]], "dismissed")
    assert kept["reopened"] == 1

async def test_a_break_waiting_for_approval_stays_on_the_page_behind_newer_runs(stack: Stack) -> None:
    """The page showed the breaks of the five newest runs only: every late event's incident
    run and every backfill pushed a waiting break off it, and approvers could no longer see
    or decide it there. Breaks waiting for a decision are listed whatever run found them,
    with one decision form each."""
    from tests.reconciliation_kit import backfill, break_awaiting_approval

    _, found = await break_awaiting_approval(stack, moved_to="canceled", requester="alice", days_ago=2)
    for _ in range(6):
        await backfill(stack, since_days=0.01)
    page = (await (await console(stack, "bob")).get("/console/reconciliation")).text
    waiting = page.split('data-testid="waiting-breaks"', 1)
    assert len(waiting) == 2 and f'data-break="{found["id"]}"' in waiting[1].split("</section>", 1)[0]
    assert page.count(f'action="/console/reconciliation/breaks/{found["id"]}"') == 1


async def test_needs_my_approval_finds_an_older_case_behind_a_page_that_needs_others(stack: Stack) -> None:
    """A full page (200) of newer waiting cases bob may not approve (his own requests) lies
    before one that needs him: "needs my approval" reads on past them and shows it."""
    provider = f"p{uuid.uuid4().hex[:6]}"  # this test's cases only, in a shared database
    ids = [f"rr-mine-{uuid.uuid4().hex[:10]}" for _ in range(202)]
    for n, case_id in enumerate(ids):
        request = RefundRequest(refund_request_id=case_id, provider=provider, charge_id="ch_mine",
                                amount=5_000, currency="USD", merchant_account="acct_1",
                                reason=RefundReason.OTHER)
        await stack.store.cases.create(request, "alice" if n == 0 else "bob")
    await stack.store.database.execute(
        "UPDATE refund_cases SET status = 'awaiting_approval', decision = %s,"
        " created_at = now() - make_interval(secs => %s - array_position(%s::text[], refund_request_id))"
        " WHERE refund_request_id = ANY(%s)",
        (Jsonb(PolicyDecision(auto_approve=False, rules_fired=("amount_over_threshold",), policy_version="t",
                              tier="approver", requirements=(RoleRequirement(role="approver"),)
                              ).model_dump(mode="json")), len(ids), ids, ids))
    bob = await console(stack, "bob")
    try:
        page = await bob.get("/console/cases", params={"mine": "1", "provider": provider})
    finally:  # closed, so no other test's sweep or simulation reads rows no workflow runs
        await stack.store.database.execute(
            "UPDATE refund_cases SET status = 'expired' WHERE refund_request_id = ANY(%s)", (ids,))
    assert page.status_code == 200
    assert f'data-case="{ids[0]}"' in page.text  # alice's, the oldest: it needs bob
    assert not any(f'data-case="{case_id}"' in page.text for case_id in ids[1:])


async def test_over_https_the_console_cookies_are_host_only_so_no_sibling_host_plants_them(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    """Behind TLS the console's cookies carry the `__Host-` prefix (Secure, Path=/, no
    Domain): a browser takes such a cookie only from the host itself, so another host of the
    same site cannot plant a sign-in form cookie (signing a victim into its own account) or a
    session. An unprefixed cookie of the same name is not read."""
    secure = await open_stack(store, client, temporal_server.address, console_secure_cookie=True)
    try:
        http = httpx.AsyncClient(base_url=secure.relay_url, timeout=30)
        form = await http.get("/console/sign-in")
        [form_cookie] = [h for h in form.headers.get_list("set-cookie")
                         if h.startswith("__Host-rfo_sign_in=")]
        assert "Secure" in form_cookie and "Path=/;" in form_cookie + ";" and "Domain" not in form_cookie
        # browsers keep to TLS for the host from then on: no plain-http sign-in form to fake
        assert form.headers["strict-transport-security"] == "max-age=31536000"
        form_token = field(form.text, "form_token")
        planted = await http.post("/console/sign-in", data={"token": secure.tokens["bob"], "form_token": "x"},
                                  headers={"Cookie": "rfo_sign_in=x"})
        assert planted.status_code == 403  # a cookie without the prefix is no form cookie
        signed = await http.post("/console/sign-in",
                                 data={"token": secure.tokens["bob"], "form_token": form_token},
                                 headers={"Cookie": f"__Host-rfo_sign_in={form_token}"})
        assert signed.status_code == 303, signed.text
        [session] = [h for h in signed.headers.get_list("set-cookie") if h.startswith("__Host-rfo_session=")]
        assert "Secure" in session and "Path=/;" in session + ";" and "HttpOnly" in session
        value = session.split(";", 1)[0].split("=", 1)[1]
        cases = await http.get("/console/cases", headers={"Cookie": f"__Host-rfo_session={value}"})
        assert cases.status_code == 200 and 'data-testid="user">bob<' in cases.text
        unprefixed = await http.get("/console/cases", headers={"Cookie": f"rfo_session={value}"})
        assert unprefixed.status_code == 303
        await http.aclose()
    finally:
        await secure.close()


SIBLING_IMAGE = {"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "image"}
"""What a browser sends with an <img> that a page on another host or port of the site loads."""


async def test_a_request_another_host_of_the_site_makes_writes_nothing_under_the_signed_in_name(
        stack: Stack) -> None:
    """The session cookie is SameSite=Strict, which another host or port of the same site
    still gets sent: its page could make a signed-in browser write text it chose into the
    trail under that person's name (an unknown status, a case id, a NUL the input guard
    refuses, a form without the CSRF token). Such a request is served as no session's (sent
    to sign in, counted, nobody named); the person's own navigation, a link they click on
    another host included, still is theirs."""
    olga = await console(stack, "olga")
    marker = f"planted-{uuid.uuid4().hex[:8]}"
    for path in (f"/console/cases?status={marker}", f"/console/cases/{marker}",
                 f"/console/payouts?status={marker}", f"/console/cases?q={marker}%00"):
        planted = await olga.get(path, headers=SIBLING_IMAGE)
        assert planted.status_code in (303, 422) and marker not in planted.text, (path, planted.status_code)
    posted = await olga.post("/console/sign-out", data={"note": marker}, headers={
        "Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"})
    assert posted.status_code == 401, posted.text
    written = [e for e in await stack.store.audit.trail("") if e["actor"] == "olga"
               and (marker in json.dumps(e["detail"]) or e["action"] == "csrf_refused")]
    assert written == [], written
    clicked = await olga.get(f"/console/cases?status={marker}", headers={
        "Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document",
        "Sec-Fetch-User": "?1"})
    assert clicked.status_code == 422 and marker in clicked.text, clicked.status_code
    assert (await olga.get("/console/cases", headers={"Sec-Fetch-Site": "same-origin"})).status_code == 200


async def test_signing_in_again_ends_the_session_the_browser_held(stack: Stack) -> None:
    """A browser signed in again (as the same person or another) gets a new session; the one
    its cookie named before ends then, rather than living on to its expiry for whoever
    copied that cookie."""
    browser = await console(stack, "olga")
    name = next(iter(browser.cookies.keys()))
    before = browser.cookies[name]
    form = await browser.get("/console/sign-in")
    again = await browser.post("/console/sign-in", data={"token": stack.tokens["dave"],
                                                        "form_token": field(form.text, "form_token")})
    assert again.status_code == 303 and browser.cookies[name] != before
    assert (await browser.get("/console/cases")).status_code == 200
    async with httpx.AsyncClient(base_url=stack.relay_url, cookies={name: before}) as copied:
        assert (await copied.get("/console/cases")).status_code == 303
    ended = [e["action"] for e in await stack.store.audit.trail("") if e["actor"] == "olga"
             and e["action"].startswith("console_s")]
    assert ended[-1:] == ["console_session_replaced"], ended
