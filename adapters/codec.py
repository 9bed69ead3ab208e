"""Payload encryption: customer data never sits in Temporal history in clear.

Every workflow and activity payload, and the message and stack trace of every failure, is
sealed with AES-GCM before it leaves the process. The key id travels in the payload's
metadata, so keys rotate without re-encrypting history: the first configured key seals,
every configured key opens. Keys come only from the environment
(`REFUNDS_PAYLOAD_KEYS="kid1:<base64 key>,kid2:<base64 key>"`); there is no default key.
"""

import base64
import binascii
import dataclasses
import os
import secrets
from collections.abc import Mapping, Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.converter import DataConverter, DefaultFailureConverterWithEncodedAttributes, PayloadCodec

ENCODING = b"binary/encrypted"
KEY_ID_METADATA = "encryption-key-id"
NONCE_BYTES = 12
KEY_ID_SHOWN = 20
"""The longest key id a refusal names: shorter than any key's base64 (24 characters)."""
_KEY_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


class CodecError(ValueError):
    """A payload that cannot be opened, or keys that cannot be used; the message says which."""


def parse_keys(spec: str) -> dict[str, bytes]:
    """`kid:base64key,…` into an ordered {kid: key}; the first entry is the sealing key."""
    keys: dict[str, bytes] = {}
    for number, item in enumerate((part.strip() for part in spec.split(",")), start=1):
        if not item:
            continue
        kid, sep, encoded = item.partition(":")
        valid_id = bool(kid) and set(kid) <= _KEY_ID_CHARS
        # named by position, and by id only when it is short: an entry written the wrong way
        # round has the key where its id should be, and a refusal must never print a key
        shown = f" ({kid!r})" if valid_id and len(kid) <= KEY_ID_SHOWN else ""
        entry = f"payload key entry {number}{shown}"
        if not sep or not valid_id:
            raise CodecError(f"{entry}: expected 'kid:base64key' with a key id of letters, digits, "
                             "'.', '_' or '-'")
        try:
            key = base64.b64decode(encoded, validate=True)
        except binascii.Error:
            raise CodecError(f"{entry}: the key is not valid base64") from None
        if len(key) not in (16, 24, 32):
            raise CodecError(f"{entry}: the key is {len(key)} bytes; AES-GCM needs 16, 24 or 32")
        if kid in keys:
            raise CodecError(f"{entry}: its key id appears twice")
        keys[kid] = key
    if not keys:
        raise CodecError("no payload keys: set REFUNDS_PAYLOAD_KEYS='kid:<base64 32-byte key>'")
    return keys


def generate_key_spec(kid: str) -> str:
    """A fresh `kid:base64key` entry (the dev stack's generated secret; tests' throwaway key)."""
    return f"{kid}:{base64.b64encode(secrets.token_bytes(32)).decode()}"


class EncryptionCodec(PayloadCodec):
    """AES-GCM per payload, random 96-bit nonce, the key id bound in as associated data."""

    def __init__(self, keys: Mapping[str, bytes]) -> None:
        if not keys:
            raise CodecError("an encryption codec needs at least one key")
        self._ciphers = {kid: AESGCM(key) for kid, key in keys.items()}
        self.sealing_key_id = next(iter(keys))

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        cipher = self._ciphers[self.sealing_key_id]
        kid = self.sealing_key_id.encode()
        sealed = []
        for payload in payloads:
            nonce = os.urandom(NONCE_BYTES)
            data = nonce + cipher.encrypt(nonce, payload.SerializeToString(), kid)
            sealed.append(Payload(metadata={"encoding": ENCODING, KEY_ID_METADATA: kid}, data=data))
        return sealed

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        """Opens sealed payloads; plaintext ones (older history, recorded fixtures) pass through."""
        return [self._open(p) if p.metadata.get("encoding") == ENCODING else p for p in payloads]

    def _open(self, payload: Payload) -> Payload:
        kid = payload.metadata.get(KEY_ID_METADATA, b"").decode(errors="replace")
        cipher = self._ciphers.get(kid)
        if cipher is None:
            raise CodecError(f"payload sealed with key {kid!r}, which is not among the configured "
                             f"keys {sorted(self._ciphers)}")
        nonce, sealed = payload.data[:NONCE_BYTES], payload.data[NONCE_BYTES:]
        try:
            plain = cipher.decrypt(nonce, sealed, kid.encode())
        except (InvalidTag, ValueError):  # ValueError: shorter than a nonce (a caller's bytes)
            raise CodecError(f"payload sealed with key {kid!r} failed authentication") from None
        opened = Payload()
        opened.ParseFromString(plain)
        return opened


def data_converter(codec: PayloadCodec | None) -> DataConverter:
    """Pydantic payloads, failure messages and traces moved into (encrypted) attributes.

    Worker, relay, CLI, replay and tests all build their converter here, so they agree.
    """
    return dataclasses.replace(pydantic_data_converter, payload_codec=codec,
                               failure_converter_class=DefaultFailureConverterWithEncodedAttributes)
