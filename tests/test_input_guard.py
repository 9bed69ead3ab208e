"""Input refused before any route parses it: text PostgreSQL cannot store (a NUL) is a 422
and an oversized body a 413, on every route (JSON API, codec, console forms, sign-in);
the refusal is recorded and nothing about the case moves."""

import asyncio
import json
import secrets
import string
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from starters.relay.limits import API_MAX_BODY_BYTES, CODEC_MAX_BODY_BYTES
from tests.harness import Stack
from tests.test_bad_input import assert_untouched
from tests.test_console import console, post_form

HANG = 15.0
"""Only a bound that detects a hang (the update a NUL left waiting forever), not a timing."""


async def waiting_case(stack: Stack) -> str:
    charge = await stack.charge(20_000)
    case_id = await stack.request_refund("alice", charge, 9_000)  # above 50.00: one approver
    await stack.wait_for_status(case_id, "awaiting_approval")
    return case_id


async def test_nul_in_an_approval_reason_is_422_and_the_case_still_takes_approvals(stack: Stack) -> None:
    case_id = await waiting_case(stack)
    path = f"/v1/refund-requests/{case_id}/approvals"
    async with stack.api("bob") as api:
        refused = await asyncio.wait_for(api.post(path, json={"decision": "approve",
                                                              "reason": "ok\x00"}), HANG)
        assert refused.status_code == 422 and "NUL" in refused.text, refused.text
        assert (await stack.store.cases.get(case_id))["status"] == "awaiting_approval"  # type: ignore[index]
        approved = await asyncio.wait_for(api.post(path, json={"decision": "approve",
                                                               "reason": "ok"}), HANG)
        assert approved.status_code == 202, approved.text
    await stack.wait_for_status(case_id, "succeeded")
    assert [e for e in await stack.store.audit.trail("") if e["actor"] == "bob"
            and e["detail"].get("action") == f"POST {path}" and "NUL" in e["detail"]["refusal"]]


async def test_nul_in_evidence_or_in_an_id_is_422(stack: Stack) -> None:
    charge = await stack.charge(10_000)
    body = stack.refund_body(charge, 1_000, evidence={"order_id": "o-1\x00"})
    async with stack.api("alice") as api:
        assert (await api.post("/v1/refund-requests", json=body)).status_code == 422
        assert (await api.get("/v1/refund-requests/rr-1%00x")).status_code == 422
        assert (await api.get("/v1/refund-requests/rr-1%00x/audit")).status_code == 422
    await assert_untouched(stack, body["refund_request_id"], charge)
    text = stack.refund_body(charge, 1_000, evidence={"note": "a literal \\u0000 is text",
                                                      "discount": "100%00 off"})
    async with stack.api("alice") as api:
        assert (await api.post("/v1/refund-requests", json=text)).status_code == 202


async def test_nul_in_a_console_form_or_filter_is_422(stack: Stack) -> None:
    case_id = await waiting_case(stack)
    bob = await console(stack, "bob")
    try:
        form = await post_form(bob, f"/console/cases/{case_id}/approval",
                               {"decision": "approve", "reason": "fine\x00"})
        assert form.status_code == 422, form.text
        listing = await asyncio.wait_for(bob.get("/console/cases", params={"q": "rr\x00"}), HANG)
        assert listing.status_code == 422
    finally:
        await bob.aclose()
    assert (await stack.store.cases.get(case_id))["status"] == "awaiting_approval"  # type: ignore[index]


async def chunks(total: int) -> AsyncIterator[bytes]:
    """A chunked body (no Content-Length): the limit is counted, not read from a header."""
    for _ in range(total // 65_536 + 1):
        yield b" " * 65_536


@pytest.mark.parametrize(("path", "limit", "as_user"), [
    ("/v1/refund-requests", API_MAX_BODY_BYTES, "alice"),
    ("/v1/webhook-receipts/replay", API_MAX_BODY_BYTES, "olga"),
    ("/codec/encode", CODEC_MAX_BODY_BYTES, "olga"),
    ("/console/sign-in", API_MAX_BODY_BYTES, None),
], ids=["refund_request", "replay", "codec", "sign_in"])
async def test_every_route_limits_its_body_before_parsing(stack: Stack, path: str, limit: int,
                                                          as_user: str | None) -> None:
    headers: dict[str, Any] = {"Authorization": f"Bearer {stack.tokens[as_user]}"} if as_user else {}
    async with httpx.AsyncClient(base_url=stack.relay_url, timeout=HANG, headers=headers) as http:
        declared = await http.post(path, content=b"{" + b" " * limit + b"}",
                                   headers={"Content-Type": "application/json"})
        chunked = await http.post(path, content=chunks(limit),
                                  headers={"Content-Type": "application/json"})
    assert (declared.status_code, chunked.status_code) == (413, 413), (declared.text, chunked.text)
    assert "exceeds" in declared.json()["detail"]


async def test_console_forms_are_limited_too(stack: Stack) -> None:
    case_id = await waiting_case(stack)
    bob = await console(stack, "bob")
    try:
        big = await post_form(bob, f"/console/cases/{case_id}/approval",
                              {"decision": "approve", "reason": "x" * API_MAX_BODY_BYTES})
    finally:
        await bob.aclose()
    assert big.status_code == 413
    assert (await stack.store.cases.get(case_id))["status"] == "awaiting_approval"  # type: ignore[index]
    assert [e["detail"]["via"] for e in await stack.store.audit.trail("") if e["actor"] == "bob"
            and e["detail"].get("action") == f"POST /console/cases/{case_id}/approval"] == ["console"]


async def test_a_lone_surrogate_is_422_and_a_pair_is_text(stack: Stack) -> None:
    """PostgreSQL stores UTF-8: half of a surrogate pair cannot be stored, a whole pair can."""
    charge = await stack.charge(10_000)

    async def post(evidence: str) -> int:
        body = stack.refund_body(charge, 1_000, evidence={})
        raw = json.dumps(body).replace('"evidence": {}', f'"evidence": {{"note": "{evidence}"}}')
        async with stack.api("alice") as api:
            response = await api.post("/v1/refund-requests", content=raw.encode(),
                                      headers={"Content-Type": "application/json"})
        return response.status_code

    assert await post("x\\ud800y") == 422
    assert await post("x\\udc00") == 422
    assert await post("\\\\ud800 is text") == 202
    assert await post("smile \\ud83d\\ude00") == 202
    # an escaped backslash, then text that reads like a high half, then a real low half: the
    # low half is alone (it was stored as a 500)
    assert await post("\\\\ud800\\udc00") == 422


async def test_json_past_what_a_parser_reads_is_refused_and_recorded(stack: Stack) -> None:
    """A number of more digits than Python parses (4,300), or arrays nested past its
    recursion limit: the route's parser failed with a bare 400 nobody recorded."""
    charge = await stack.charge(10_000)
    body = json.dumps(stack.refund_body(charge, 1_000))
    huge = body.replace('"amount": 1000', '"amount": ' + "9" * 5_000)
    deep = "[" * 100_000 + "]" * 100_000
    async with stack.api("alice") as api:
        for raw in (huge, deep):
            refused = await api.post("/v1/refund-requests", content=raw.encode(),
                                     headers={"Content-Type": "application/json"})
            assert refused.status_code == 422 and "JSON" in refused.json()["detail"], refused.text
    assert len([e for e in await stack.store.audit.trail("") if e["actor"] == "alice"
                and e["detail"].get("action") == "POST /v1/refund-requests"
                and "JSON" in str(e["detail"].get("refusal"))]) >= 2


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400"])
async def test_a_number_json_does_not_have_is_refused_and_recorded(stack: Stack, number: str) -> None:
    """Python's parser reads NaN and Infinity (no JSON numbers) and a number past a float's
    range as infinity: validation refused the value, but its error, which quotes it, could
    not be written as JSON, and the caller got a 500 the trail called a 422."""
    charge = await stack.charge(10_000)
    sent = stack.refund_body(charge, 1_000)
    body = json.dumps(sent).replace('"amount": 1000', f'"amount": {number}')
    async with stack.api("alice") as api:
        refused = await api.post("/v1/refund-requests", content=body.encode(),
                                 headers={"Content-Type": "application/json"})
    assert refused.status_code == 422 and number.lstrip("-") in refused.json()["detail"], refused.text
    assert [e for e in await stack.store.audit.trail("") if e["actor"] == "alice"
            and e["detail"].get("refusal") == refused.json()["detail"]]
    await assert_untouched(stack, sent["refund_request_id"], charge)


async def test_a_refusal_records_the_caller_s_field_names_cut_short(stack: Stack) -> None:
    """A name the caller chose (an unknown field, an evidence key) is where validation
    failed: the refusal quoted it whole, so each request could grow the shared trail by
    the body's limit. It is cut as the guard cuts names (64 characters)."""
    charge = await stack.charge(10_000)
    long_name = "x" * 200_000
    for sent in (stack.refund_body(charge, 1_000, **{long_name: 1}),
                 stack.refund_body(charge, 1_000, evidence={long_name: {"a": [1]}})):
        async with stack.api("alice") as api:
            refused = await api.post("/v1/refund-requests", json=sent)
        assert refused.status_code == 422, refused.text[:200]
        await assert_untouched(stack, sent["refund_request_id"], charge)
    recorded = [str(e["detail"]["refusal"]) for e in await stack.store.audit.trail("")
                if e["actor"] == "alice" and "x" * 64 in str(e["detail"].get("refusal"))]
    assert len(recorded) == 2 and all(len(r) < 1_000 for r in recorded), [r[:120] for r in recorded]


async def test_only_the_codec_endpoints_take_the_codec_s_allowances(stack: Stack) -> None:
    """A case whose id is `codec` is no codec endpoint: its approvals are checked as any
    JSON body (a name given twice refused: which value counts is up to each reader)."""
    twice = b'{"decision": "deny", "reason": "x", "decision": "approve"}'
    async with stack.api("bob") as api:
        refused = await api.post("/v1/refund-requests/codec/approvals", content=twice,
                                 headers={"Content-Type": "application/json"})
    assert refused.status_code == 400 and "twice" in refused.text, refused.text


async def test_a_body_is_checked_as_its_parser_reads_it(stack: Stack) -> None:
    """The guard and the route must read one body the same way: two Content-Type headers
    (the guard read the last, the route the first), a charset the form parser decodes NULs
    and lone surrogates from (UTF-7), a media type no route parses, and raw bytes that are
    not UTF-8 (JSON decodes a raw surrogate) are each refused, so a NUL cannot reach the
    case and wedge it."""
    case_id = await waiting_case(stack)
    path = f"/v1/refund-requests/{case_id}/approvals"
    nul_reason = b'{"decision": "approve", "reason": "\\u0000"}'
    async with stack.api("bob") as api:
        doubled = await asyncio.wait_for(api.post(path, content=nul_reason, headers=[
            ("Content-Type", "application/json"),
            ("Content-Type", "application/x-www-form-urlencoded")]), HANG)
        assert doubled.status_code == 400 and "Content-Type" in doubled.text, doubled.text
        utf7 = await asyncio.wait_for(api.post(
            path, content=b'{"decision": "approve", "reason": "+AAA-"}',
            headers={"Content-Type": "application/json; charset=utf-7"}), HANG)
        assert utf7.status_code == 415, utf7.text
        plain = await api.post(path, content=b"approve", headers={"Content-Type": "text/plain"})
        assert plain.status_code == 415, plain.text
        # no Content-Type: the route read the JSON as bytes and answered "not an object"
        unnamed = await api.post(path, content=b'{"decision": "approve", "reason": "ok"}')
        assert unnamed.status_code == 415 and "Content-Type" in unnamed.json()["detail"], unnamed.text
    assert (await stack.store.cases.get(case_id))["status"] == "awaiting_approval"  # type: ignore[index]
    refused = [e["detail"]["refusal"] for e in await stack.store.audit.trail("")
               if e["actor"] == "bob" and e["detail"].get("action") == f"POST {path}"]
    assert len(refused) == 4 and "Content-Type" in refused[-1], refused

    charge = await stack.charge(10_000)
    body = stack.refund_body(charge, 1_000, evidence={"note": "SURROGATE"})
    raw = json.dumps(body).encode().replace(b"SURROGATE", b"x\xed\xa0\x80y")
    async with stack.api("alice") as api:
        surrogate = await api.post("/v1/refund-requests", content=raw,
                                   headers={"Content-Type": "application/json"})
    assert surrogate.status_code == 400 and "UTF-8" in surrogate.text, surrogate.text
    await assert_untouched(stack, body["refund_request_id"], charge)

    multipart = (b'--b\r\nContent-Disposition: form-data; name="form_token"\r\n\r\n+3AA-\r\n--b--\r\n')
    async with httpx.AsyncClient(base_url=stack.relay_url, timeout=HANG) as anonymous:
        sign_in = await anonymous.post("/console/sign-in", content=multipart, headers={
            "Content-Type": "multipart/form-data; boundary=b; charset=utf-7",
            "Cookie": "rfo_sign_in=x"})
    assert sign_in.status_code == 415, sign_in.text

    async with stack.api("bob") as api:  # the case still takes a well-formed approval
        approved = await api.post(path, json={"decision": "approve", "reason": "ok"})
    assert approved.status_code == 202, approved.text
    await stack.wait_for_status(case_id, "succeeded")


async def test_an_overlong_path_is_414_before_any_route_or_store(stack: Stack) -> None:
    """A path longer than any id of ours would reach an index (a receipt's provider, an
    audit chain's key) PostgreSQL cannot build past 2,704 bytes: refused up front, on the
    signed endpoints too."""
    long = "".join(secrets.choice(string.ascii_letters) for _ in range(3_000))  # incompressible
    async with httpx.AsyncClient(base_url=stack.relay_url, timeout=HANG) as anonymous:
        webhook = await anonymous.post(f"/webhooks/{long}", content=b"{}")
    async with stack.api("dave") as api:
        approval = await api.post(f"/v1/refund-requests/{long}/approvals", json={"decision": "approve"})
        payout = await api.get(f"/v1/payout-exceptions/{long}")
    assert (webhook.status_code, approval.status_code, payout.status_code) == (414, 414, 414), (
        webhook.text, approval.text, payout.text)


async def test_a_json_body_naming_a_field_twice_is_refused(stack: Stack) -> None:
    """`{"amount": 100, ..., "amount": 900000}`: JSON leaves a repeated name to the reader
    (ours took the last, a proxy, a log or a WAF may read the first), so what was checked is
    not surely what is asked. Refused 400 before any route, recorded, nothing opened."""
    charge = await stack.charge(10_000)
    body = stack.refund_body(charge, 100)
    raw = json.dumps(body).encode()[:-1] + b', "amount": 9000}'
    inner = json.dumps({**body, "evidence": {}}).encode().replace(b'"evidence": {}',
                                                                  b'"evidence": {"a": "1", "a": "2"}')
    as_json = {"Content-Type": "application/json"}
    async with stack.api("alice") as api:
        doubled = await api.post("/v1/refund-requests", content=raw, headers=as_json)
        nested = await api.post("/v1/refund-requests", content=inner, headers=as_json)
    assert doubled.status_code == 400 and "'amount'" in doubled.text, doubled.text
    assert nested.status_code == 400 and "'a'" in nested.text, nested.text
    await assert_untouched(stack, body["refund_request_id"], charge)
    refused = [e["detail"]["refusal"] for e in await stack.store.audit.trail("")
               if e["actor"] == "alice" and "twice" in str(e["detail"].get("refusal"))]
    assert len(refused) >= 2


async def test_a_console_session_is_no_one_s_name_for_refusals_outside_the_console(stack: Stack) -> None:
    """Behind TLS the session cookie is `Path=/` and goes with any same-site request: a page on
    another port of the site could make a signed-in person's browser send refused input to the
    API as often as it likes. The API never took the session as a caller, so such refusals are
    not recorded under the person's name; inside the console they are."""
    bob = await console(stack, "bob")
    unique = f"rr-{secrets.token_hex(6)}"

    async def refused() -> list[str]:
        return [e["detail"]["action"] for e in await stack.store.audit.trail("")
                if e["actor"] == "bob" and e["action"] == "action_refused"]

    in_console = (await refused()).count("GET /console/cases")
    try:
        [session] = [c.value for c in bob.cookies.jar]
        async with httpx.AsyncClient(base_url=stack.relay_url, timeout=30) as browser:
            cookie = {"cookie": f"rfo_session={session}"}
            assert (await browser.get(f"/v1/refund-requests/{unique}%00x", headers=cookie)).status_code == 422
            assert (await browser.post(f"/v1/refund-requests/{unique}/approvals", json={"decision": "maybe"},
                                       headers=cookie)).status_code in (401, 422)
        assert (await bob.get("/console/cases", params={"q": "rr\x00"})).status_code == 422
    finally:
        await bob.aclose()
    actions = await refused()
    assert not [a for a in actions if unique in a], actions
    assert actions.count("GET /console/cases") > in_console
