"""The remote codec protocol of the Temporal UI and CLI (`POST /codec/encode|decode`).

Bodies are `{"payloads": [...]}` in protobuf JSON (metadata values and data base64), as
the UI's "codec endpoint" setting and `temporal workflow show --codec-endpoint` send
them. The relay mounts it twice: at /codec behind its bearer-token auth (CLI; with OIDC
configured also the Temporal UI's access token), and at /console/codec behind the console's
session cookie (the UI with "include cross-origin credentials", as `refunds dev` serves it);
either way only auditors, ops and admins see decrypted history, and only ops and admins
encode (an encoded payload is what a workflow would accept as ours).
"""

import json
from typing import Any, Literal

from fastapi import HTTPException, Request
from google.protobuf import json_format
from temporalio.api.common.v1 import Payloads
from temporalio.client import Client
from temporalio.converter import PayloadCodec

from adapters.codec import CodecError
from adapters.db import Principal
from adapters.db.access import AccessRepository
from adapters.oidc import AccessTokenVerifier, InvalidAccessToken, KeysUnavailable
from domain.permissions import Permission

Direction = Literal["encode", "decode"]
CODEC_USES: dict[str, tuple[Permission, str]] = {
    "decode": (Permission.DECODE_PAYLOADS, "decoding payloads"),
    "encode": (Permission.ENCODE_PAYLOADS, "encoding payloads"),
}
"""Per direction: the permission it needs, and the action named in a refusal."""


async def transcode(codec: PayloadCodec, direction: Direction, body: dict[str, Any]) -> dict[str, Any]:
    """Encodes or decodes every payload of a protobuf-JSON `Payloads` body; CodecError names
    a body that is not one, or a payload that cannot be opened."""
    try:
        payloads = json_format.ParseDict(body, Payloads())
    except json_format.ParseError as exc:
        raise CodecError(f"not a Payloads message: {exc}") from None
    run = codec.encode if direction == "encode" else codec.decode
    result = Payloads(payloads=await run(payloads.payloads))
    return json_format.MessageToDict(result)


def sent_as_json(request: Request) -> None:
    """Refuses (415) a body not declared JSON before anything else: a page of another port of
    the site can send the console's cookie with a body no preflight checks (no Content-Type,
    or text/plain), and its role check would record a refusal under the person's name."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise HTTPException(415, "send the payloads as application/json")


async def answer(client: Client, direction: Direction, request: Request) -> dict[str, Any]:
    """The endpoint's answer with the client's codec, for a caller already let in: its body
    is read only now (up to 4 MiB of JSON: read before asking who sent it, anyone could make
    the relay parse it). 404 without a codec, 400 for a body that is not a Payloads object or
    a payload sealed with a key we do not hold, 422 for JSON no parser here reads."""
    payload_codec = client.data_converter.payload_codec
    if payload_codec is None:
        raise HTTPException(404, "this relay has no payload codec")
    try:
        body = json.loads(await request.body())
    except json.JSONDecodeError as exc:
        raise HTTPException(400, f"the body is not JSON: {exc}") from None
    except (ValueError, RecursionError) as exc:
        raise HTTPException(422, f"the JSON body cannot be read: {str(exc)[:120]}") from None
    if not isinstance(body, dict):
        raise HTTPException(400, "not a Payloads message: the body is not a JSON object")
    try:
        return await transcode(payload_codec, direction, body)
    except CodecError as exc:
        raise HTTPException(400, str(exc)) from None


async def oidc_principal(verifier: AccessTokenVerifier, access: AccessRepository,
                         token: str) -> Principal:
    """The product user behind a Temporal UI access token, through the identity link of its
    user claim (roles: those of the user's live API tokens): 401 for a token that is not
    valid, 403 for a person not linked (or without a live token), 503 without the keys."""
    try:
        subject = await verifier.subject(token)
    except KeysUnavailable as exc:
        raise HTTPException(503, str(exc)) from None
    except InvalidAccessToken as exc:
        raise HTTPException(401, f"invalid access token: {exc}",
                            headers={"WWW-Authenticate": "Bearer"}) from None
    found = await access.principal_for("oidc", subject)
    if found is None:
        raise HTTPException(403, f"{verifier.settings.user_claim} {subject!r} is not linked to a "
                                 "user with a live token (refunds integrations link --oidc)")
    return found
