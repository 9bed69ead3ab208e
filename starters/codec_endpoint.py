"""The remote codec protocol of the Temporal UI and CLI (`POST /codec/encode|decode`).

Bodies are `{"payloads": [...]}` in protobuf JSON (metadata values and data base64), as
the UI's "codec endpoint" setting and `temporal workflow show --codec-endpoint` send
them. The relay mounts it twice: at /codec behind its bearer-token auth (CLI), and at
/console/codec behind the console's session cookie (the UI, with "include cross-origin
credentials" on); either way only auditors, ops and admins see decrypted history, and
only ops and admins encode (an encoded payload is what a workflow would accept as ours).
"""

from typing import Any, Literal

from fastapi import HTTPException
from google.protobuf import json_format
from temporalio.api.common.v1 import Payloads
from temporalio.client import Client
from temporalio.converter import PayloadCodec

from adapters.codec import CodecError

Direction = Literal["encode", "decode"]
CODEC_USES: dict[str, tuple[frozenset[str], str]] = {
    "decode": (frozenset({"auditor", "ops", "admin"}), "decoding payloads"),
    "encode": (frozenset({"ops", "admin"}), "encoding payloads"),
}
"""Per direction: who may, and the action named in a refusal."""


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


async def answer(client: Client, direction: Direction, body: dict[str, Any]) -> dict[str, Any]:
    """The endpoint's answer with the client's codec: 404 without one, 400 for a body that
    is not Payloads or a payload sealed with a key we do not hold."""
    payload_codec = client.data_converter.payload_codec
    if payload_codec is None:
        raise HTTPException(404, "this relay has no payload codec")
    try:
        return await transcode(payload_codec, direction, body)
    except CodecError as exc:
        raise HTTPException(400, str(exc)) from None
