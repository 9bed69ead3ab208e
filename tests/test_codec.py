"""Encrypted payloads: customer data never sits in Temporal history in clear, keys rotate,
and only authorised users can decode through the relay's codec endpoint."""

import base64
import json
import time
import uuid
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from google.protobuf import json_format
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from temporalio.api.common.v1 import Payload, Payloads
from temporalio.api.enums.v1 import EventType
from temporalio.api.history.v1 import History
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from adapters.codec import CodecError, EncryptionCodec, generate_key_spec, parse_keys
from adapters.config import Settings
from adapters.db import Store
from adapters.http_server import AppServer
from adapters.oidc import AccessTokenVerifier, InvalidAccessToken, KeysUnavailable
from domain.models import RefundWorkflowInput
from starters.dev.stack import TemporalDevServer
from tests.harness import Stack, open_stack
from tests.test_cli import run
from tests.test_console import console
from tests.test_deploy_manifests import compose, container_env, of_kind

CANARIES = {
    "customer_email": "jane.canary@example.org",
    "card": "last4 4242 cardholder Janet Canarywood",
    "iban": "DE89370400440532013000",
}
UI_ORIGIN = "http://127.0.0.1:8233"
ISSUER, AUDIENCE = "https://login.example.test/realms/ops", "temporal-ui"


def _payload(text: str) -> Payload:
    return Payload(metadata={"encoding": b"json/plain"}, data=f'"{text}"'.encode())


async def test_first_key_seals_every_key_opens_and_unknown_keys_are_named() -> None:
    old, new = generate_key_spec("old"), generate_key_spec("new")
    sealed = await EncryptionCodec(parse_keys(old)).encode([_payload(CANARIES["iban"])])
    assert CANARIES["iban"].encode() not in sealed[0].SerializeToString()
    assert sealed[0].metadata["encryption-key-id"] == b"old"

    rotated = EncryptionCodec(parse_keys(f"{new},{old}"))
    assert rotated.sealing_key_id == "new"
    assert (await rotated.decode(sealed))[0].data == f'"{CANARIES["iban"]}"'.encode()
    with pytest.raises(CodecError, match="'old', which is not among the configured keys"):
        await EncryptionCodec(parse_keys(new)).decode(sealed)

    tampered = Payload()
    tampered.CopyFrom(sealed[0])
    tampered.data = tampered.data[:-1] + bytes([tampered.data[-1] ^ 1])
    with pytest.raises(CodecError, match="failed authentication"):
        await rotated.decode([tampered])
    for cut in (0, 7, 12, 27):  # shorter than a nonce and a tag: refused the same way, never a 500
        short = Payload()
        short.CopyFrom(sealed[0])
        short.data = short.data[:cut]
        with pytest.raises(CodecError, match="failed authentication"):
            await rotated.decode([short])


@pytest.mark.parametrize(("spec", "complaint"), [
    ("", "no payload keys"),
    ("nokey", "expected 'kid:base64key'"),
    ("k1:not-base64!", "not valid base64"),
    (f"k1:{base64.b64encode(b'short').decode()}", "is 5 bytes"),
])
def test_bad_key_specs_say_what_is_wrong(spec: str, complaint: str) -> None:
    with pytest.raises(CodecError, match=complaint):
        parse_keys(spec)


def test_a_key_entry_without_its_id_is_refused_without_the_key() -> None:
    """An entry written as the key alone (or `key:kid`, the wrong way round) took the whole
    key for its id, and the refusal printed it: to `refunds doctor`'s output and every
    service's log, where it opens every history."""
    key = base64.b64encode(bytes(range(32))).decode()
    for spec in (key, f"{key}:k1", f"k1:{key},{key}"):
        with pytest.raises(CodecError, match="expected 'kid:base64key'") as refused:
            parse_keys(spec)
        assert key[:12] not in str(refused.value) and key[-12:] not in str(refused.value), refused.value


async def test_history_holds_no_canary_in_clear_and_decodes_with_the_codec(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    stack = await open_stack(store, client, temporal_server.address, codec_cors_origins=[UI_ORIGIN])
    try:
        charge = await stack.charge(10_000)
        async with stack.sandbox() as sb:  # one failed submit puts a failure into history too
            await sb.post("/_sandbox/faults", json={"mode": "error_before"})
        body = stack.refund_body(charge, 2_000, evidence={"order_id": "ord-7", **CANARIES})
        case_id = body["refund_request_id"]
        async with stack.api("alice") as api:
            assert (await api.post("/v1/refund-requests", json=body)).status_code == 202
        await stack.wait_for_status(case_id, "succeeded")

        raw_client = await Client.connect(temporal_server.address)  # no codec: what the server holds
        raw = await raw_client.get_workflow_handle(case_id).fetch_history()
        raw_bytes = History(events=raw.events).SerializeToString()
        for canary in CANARIES.values():
            assert canary.encode() not in raw_bytes
        plain = await pydantic_data_converter.encode([RefundWorkflowInput.model_validate(
            {"request": body, "requester": "alice"})])
        assert CANARIES["iban"].encode() in plain[0].SerializeToString()  # the check can fail

        failures = [e.activity_task_failed_event_attributes.failure for e in raw.events
                    if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED]
        assert failures and all(f.message == "Encoded failure" for f in failures)
        assert b"HTTP 503" not in raw_bytes

        started = raw.events[0].workflow_execution_started_event_attributes.input.payloads
        assert started[0].metadata["encoding"] == b"binary/encrypted"
        [decoded] = await client.data_converter.decode(started, [RefundWorkflowInput])
        assert decoded.request.evidence == body["evidence"]

        wire = json_format.MessageToDict(Payloads(payloads=started))
        async with stack.api("dave") as auditor:
            response = await auditor.post("/codec/decode", json=wire)
        assert response.status_code == 200, response.text
        opened = json_format.ParseDict(response.json(), Payloads()).payloads[0]
        assert CANARIES["card"].encode() in opened.data
        foreign = await EncryptionCodec(parse_keys(generate_key_spec("elsewhere"))).encode([_payload("x")])
        async with stack.api("dave") as auditor:
            refused = await auditor.post("/codec/decode", json=json_format.MessageToDict(
                Payloads(payloads=foreign)))
        assert refused.status_code == 400 and "'elsewhere'" in refused.json()["detail"]
        async with stack.api("alice") as requester:
            assert (await requester.post("/codec/decode", json=wire)).status_code == 403
        async with httpx.AsyncClient(base_url=stack.relay_url) as anonymous:
            assert (await anonymous.post("/codec/decode", json=wire)).status_code == 401
            preflight = await anonymous.options("/codec/decode", headers={
                "Origin": UI_ORIGIN, "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type,x-namespace"})
            assert preflight.headers["access-control-allow-origin"] == UI_ORIGIN
            other = await anonymous.options("/codec/decode", headers={
                "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
            assert "access-control-allow-origin" not in other.headers
        # the UI sends the console's session cookie instead (same site, another port)
        auditor_ui = await console(stack, "dave")
        via_cookie = await auditor_ui.post("/console/codec/decode", json=wire,
                                           headers={"Origin": UI_ORIGIN})
        assert via_cookie.status_code == 200, via_cookie.text
        assert via_cookie.headers["access-control-allow-origin"] == UI_ORIGIN
        assert CANARIES["card"].encode() in json_format.ParseDict(
            via_cookie.json(), Payloads()).payloads[0].data
        requester_ui = await console(stack, "alice")
        assert (await requester_ui.post("/console/codec/decode", json=wire)).status_code == 403
        # a page of another port of the site can send the cookie with a body no preflight
        # checks (no Content-Type, or text/plain): not read as JSON, so refused before any
        # role check could record a refusal under the signed-in person's name
        async def refused_decodes() -> int:
            row = await stack.store.database.fetch_one(
                "SELECT count(*) AS n FROM audit_events WHERE chain = '' AND actor = 'alice'"
                " AND action = 'access_refused' AND detail->>'action' = 'decoding payloads'")
            assert row is not None
            return int(row["n"])

        refused_before = await refused_decodes()
        for headers in ({}, {"Content-Type": "text/plain"}):
            simple = await requester_ui.post("/console/codec/decode", content=json.dumps(wire).encode(),
                                             headers=headers)
            assert simple.status_code in (415, 422), (headers, simple.text)
        assert await refused_decodes() == refused_before
        # the UI's origin may call the codec, nothing else: its scripts cannot read a console
        # page (and its CSRF token) or the API with the session's cookie
        for path in ("/console/cases", "/v1/refund-requests"):
            page = await auditor_ui.get(path, headers={"Origin": UI_ORIGIN})
            assert "access-control-allow-origin" not in page.headers, path
        form = await auditor_ui.options("/console/sign-out", headers={
            "Origin": UI_ORIGIN, "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in form.headers
    finally:
        await stack.close()


def _rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _access_token(key: rsa.RSAPrivateKey, kid: str, **claims: Any) -> str:
    now = int(time.time())
    return jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "iat": now, "exp": now + 300, **claims},
                      key, algorithm="RS256", headers={"kid": kid})


async def test_tokens_naming_unknown_keys_do_not_make_the_relay_fetch_the_issuer_s_keys_each_time() -> None:
    """Anyone can send a JWT-shaped token naming a random key id: each may not cost a fetch
    from the issuer (and a thread for its timeout). After a key rotation one fetch finds
    the new key; more unknown ids within the cooldown are refused from the cached set."""
    key, kid = _rsa_key(), f"k-{uuid.uuid4().hex[:6]}"
    public = {**jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": kid, "use": "sig"}
    fetches = 0

    def key_set(_: Any) -> JSONResponse:
        nonlocal fetches
        fetches += 1
        return JSONResponse({"keys": [public]})

    jwks = AppServer(Starlette(routes=[Route("/jwks", key_set)]), "127.0.0.1", 0)
    await jwks.start()
    try:
        verifier = AccessTokenVerifier.from_settings(Settings(
            oidc_issuer=ISSUER, oidc_audience=AUDIENCE, oidc_jwks_url=f"{jwks.url}/jwks"))
        assert verifier is not None
        assert await verifier.subject(_access_token(key, kid, sub="olga")) == "olga"
        for _ in range(10):
            with pytest.raises(InvalidAccessToken):
                await verifier.subject(_access_token(_rsa_key(), f"k-{uuid.uuid4().hex[:6]}", sub="olga"))
        assert fetches == 1
    finally:
        await jwks.stop()


async def test_the_temporal_ui_access_token_of_a_linked_ops_person_decodes_and_bad_tokens_are_refused(
        store: Store, client: Client, temporal_server: TemporalDevServer, postgres_dsn: str) -> None:
    key, kid = _rsa_key(), f"k-{uuid.uuid4().hex[:6]}"
    public = {**jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": kid, "use": "sig"}
    keys = Starlette(routes=[Route("/jwks", lambda _: JSONResponse({"keys": [public]}))])
    jwks = AppServer(keys, "127.0.0.1", 0)  # the issuer's key set, on loopback
    await jwks.start()
    stack = await open_stack(store, client, temporal_server.address, worker=False,
                             codec_cors_origins=[UI_ORIGIN], oidc_issuer=ISSUER, oidc_audience=AUDIENCE,
                             oidc_jwks_url=f"{jwks.url}/jwks")
    try:
        ops, requester = f"olga-{uuid.uuid4().hex[:8]}", f"alice-{uuid.uuid4().hex[:8]}"
        linked = await run("integrations", "link", "--user", "olga", "--oidc", ops,
                           env={"REFUNDS_DATABASE_URL": postgres_dsn})
        assert linked.returncode == 0, linked.stderr
        await store.access.link_identity("oidc", requester, "alice")
        assert client.data_converter.payload_codec is not None
        sealed = await client.data_converter.payload_codec.encode([_payload(CANARIES["iban"])])
        wire = json_format.MessageToDict(Payloads(payloads=sealed))
        expired = int(time.time()) - 3600

        async def decode(token: str) -> httpx.Response:
            async with httpx.AsyncClient(base_url=stack.relay_url, timeout=30) as ui:
                return await ui.post("/codec/decode", json=wire, headers={
                    "Authorization": f"Bearer {token}", "Origin": UI_ORIGIN, "X-Namespace": "default"})

        valid = await decode(_access_token(key, kid, sub=ops))
        assert valid.status_code == 200, valid.text
        assert valid.headers["access-control-allow-origin"] == UI_ORIGIN
        opened = json_format.ParseDict(valid.json(), Payloads()).payloads[0]
        assert opened.data == f'"{CANARIES["iban"]}"'.encode()

        refusals = {
            "expired": _access_token(key, kid, sub=ops, iat=expired - 300, exp=expired),
            "foreign issuer": _access_token(key, kid, sub=ops, iss="https://elsewhere.example"),
            "wrong audience": _access_token(key, kid, sub=ops, aud="another-app"),
            "foreign key": _access_token(_rsa_key(), kid, sub=ops),
            "no user claim": _access_token(key, kid),
        }
        for why, token in refusals.items():
            refused = await decode(token)
            assert refused.status_code == 401, (why, refused.text)
            assert "invalid access token" in refused.json()["detail"], why
        unlinked = await decode(_access_token(key, kid, sub=f"nobody-{uuid.uuid4().hex[:8]}"))
        assert unlinked.status_code == 403 and "is not linked" in unlinked.json()["detail"]
        assert (await decode(_access_token(key, kid, sub=requester))).status_code == 403
        async with stack.api("olga") as cli:  # the CLI's relay token still works beside OIDC
            assert (await cli.post("/codec/decode", json=wire)).status_code == 200
        asked = "authorization,authorization-extras,content-type,x-namespace"  # what the UI sends
        async with httpx.AsyncClient(base_url=stack.relay_url) as browser:
            preflight = await browser.options("/codec/decode", headers={
                "Origin": UI_ORIGIN, "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": asked})
        assert preflight.status_code == 200, preflight.text
        assert preflight.headers["access-control-allow-origin"] == UI_ORIGIN
        by_email = AccessTokenVerifier.from_settings(
            stack.settings.model_copy(update={"oidc_user_claim": "email"}))
        assert by_email is not None
        mail = f"{ops}@example.com"
        assert await by_email.subject(_access_token(key, kid, email=mail, email_verified=True)) == mail
        for unverified in ({"email_verified": False}, {}):  # an address anyone could have typed
            with pytest.raises(InvalidAccessToken, match="email_verified"):
                await by_email.subject(_access_token(key, kid, email=mail, **unverified))
        await jwks.stop()  # the issuer's keys out of reach: nobody can be authenticated
        verifier = AccessTokenVerifier.from_settings(stack.settings)
        assert verifier is not None
        with pytest.raises(KeysUnavailable, match="cannot fetch the issuer's keys"):
            await verifier.subject(_access_token(key, kid, sub=ops))
    finally:
        await stack.close()
        await jwks.stop()


def test_an_oidc_issuer_without_its_audience_or_keys_refuses_to_start() -> None:
    with pytest.raises(ValueError, match="REFUNDS_OIDC_ISSUER needs REFUNDS_OIDC_AUDIENCE"):
        Settings(oidc_issuer=ISSUER, oidc_jwks_url="http://127.0.0.1:1/jwks")


def test_compose_and_kubernetes_uis_pass_the_oidc_access_token_to_a_relay_that_checks_it() -> None:
    services = compose()["services"]
    deployments = {name: container_env(d["spec"]["template"]["spec"]["containers"][0])
                   for name, d in of_kind("Deployment").items()}
    for ui, relay in ((services["temporal-ui"]["environment"], services["relay"]["environment"]),
                      (deployments["temporal-ui"], deployments["refunds-relay"])):
        assert ui["TEMPORAL_AUTH_ENABLED"] == "true" and ui["TEMPORAL_CODEC_PASS_ACCESS_TOKEN"] == "true"
        assert str(ui["TEMPORAL_CODEC_ENDPOINT"]).endswith("/codec")
        assert {"REFUNDS_OIDC_ISSUER", "REFUNDS_OIDC_AUDIENCE", "REFUNDS_OIDC_JWKS_URL"} <= set(relay)
        assert ui["TEMPORAL_CORS_ORIGINS"] in relay["REFUNDS_CODEC_CORS_ORIGINS"]
    assert services["temporal-ui"]["environment"]["TEMPORAL_AUTH_PROVIDER_URL"] == services["relay"][
        "environment"]["REFUNDS_OIDC_ISSUER"]
    k8s_ui, k8s_relay = deployments["temporal-ui"], deployments["refunds-relay"]
    assert k8s_ui["TEMPORAL_AUTH_PROVIDER_URL"] == {
        "configMapKeyRef": {"name": "refunds-config", "key": "REFUNDS_OIDC_ISSUER"}}
    assert k8s_ui["TEMPORAL_CODEC_ENDPOINT"].startswith("https://")  # the UI sends tokens to https only
    assert k8s_ui["TEMPORAL_AUTH_CLIENT_SECRET"]["secretKeyRef"]["name"] == "temporal-ui-oidc"
    oidc = {k.removeprefix("REFUNDS_").lower(): v for k, v in k8s_relay.items()
            if k.startswith("REFUNDS_OIDC")}
    assert AccessTokenVerifier.from_settings(Settings(**oidc)) is not None


@pytest.mark.parametrize("path", ["/codec/decode", "/console/codec/decode"])
async def test_a_codec_call_is_refused_for_want_of_credentials_before_its_body_is_read(
        stack: Stack, path: str) -> None:
    """The codec takes bodies up to 4 MiB (a history's payloads) and read them as JSON before
    asking who sent them: anyone could make the relay parse 4 MiB twice (a list of empty
    objects is ~100 MB in memory) per request. A body no parser here reads (nested past the
    recursion limit) shows the order: 401, not the 422 the body's reading answers."""
    nested = b"[" * 100_000 + b"]" * 100_000
    as_json = {"Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=stack.relay_url, timeout=30) as anonymous:
        response = await anonymous.post(path, content=nested, headers=as_json)
    assert response.status_code == 401, response.text
    async with stack.api("dave") as auditor:
        read = await auditor.post("/codec/decode", content=nested, headers=as_json)
        not_an_object = await auditor.post("/codec/decode", json=[{"payloads": []}])
    assert read.status_code in (400, 422), read.text
    assert not_an_object.status_code in (400, 422), not_an_object.text


@pytest.mark.parametrize("origin", ["*", "null", "https://ui.example/path", "temporal-ui"])
def test_a_codec_origin_that_is_no_single_origin_is_refused_at_start(origin: str) -> None:
    """The codec answers the Temporal UI with credentials (the console's session): `*` made
    the CORS layer reflect any origin with credentials allowed, so any page of the site read
    decoded histories with a signed-in person's cookie. An origin is a scheme and a host."""
    with pytest.raises(ValueError, match="REFUNDS_CODEC_CORS_ORIGINS"):
        Settings(codec_cors_origins=[origin])
    assert Settings(codec_cors_origins=["https://temporal.example.com", "http://127.0.0.1:8233",
                                        "http://[::1]:8233"])
