"""Audit chain heads checkpointed outside PostgreSQL, so the database's own user cannot
rewrite history unnoticed.

The hash chains in `audit_events` prove that no row was edited or removed *between* the
first row and the head, but whoever can write the database can also cut a chain's tail and
rewind `audit_heads` to match. So the worker periodically writes each changed head (chain,
seq, hash) to a file in a folder the database cannot reach (an append-only volume, a bucket
with object lock), sealed with an HMAC whose key the database never holds. `refunds audit
verify` then checks every checkpointed row is still there with the same hash.
"""

import hashlib
import hmac
import json
import os
import uuid
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from pydantic import SecretStr

Heads = Mapping[str, tuple[int, str]]


def _mac(key: bytes, taken_at: str, heads: Any) -> str:
    body = json.dumps({"taken_at": taken_at, "heads": heads}, sort_keys=True, separators=(",", ":"))
    return hmac.new(key, body.encode(), hashlib.sha256).hexdigest()


class CheckpointBook:
    """A folder of sealed head checkpoints: each file is written once, never changed.

    Files hold only the heads that changed since the writer's previous file (its first file:
    all heads), so a checkpoint stays small; the reader keeps every (seq, hash) it finds per
    chain, so a chain cut back and grown again past its checkpoint is still caught."""

    def __init__(self, folder: Path, keys: list[bytes]) -> None:
        if not keys:
            raise ValueError("an audit checkpoint folder needs at least one key")
        self.folder = folder
        self._keys = keys

    def write(self, heads: Heads, taken_at: datetime) -> Path:
        """Seals and stores one checkpoint; a temporary name and a rename make it appear whole."""
        self.folder.mkdir(parents=True, exist_ok=True)
        stamp = taken_at.isoformat()
        listed = {chain: [seq, digest] for chain, (seq, digest) in heads.items()}
        document = {"taken_at": stamp, "heads": listed, "mac": _mac(self._keys[0], stamp, listed)}
        name = f"{taken_at:%Y%m%dT%H%M%S%fZ}-{uuid.uuid4().hex[:8]}.json"
        partial = self.folder / f".{name}.partial"
        with partial.open("x") as out:
            json.dump(document, out, sort_keys=True)
            out.flush()
            os.fsync(out.fileno())
        final = self.folder / name
        partial.rename(final)
        return final

    def read(self) -> tuple[dict[str, dict[int, str]], list[str]]:
        """Every checkpointed (seq, hash) per chain, and the files that fail their seal."""
        points: dict[str, dict[int, str]] = {}
        problems: list[str] = []
        for path in sorted(self.folder.glob("[!.]*.json")) if self.folder.is_dir() else []:
            try:
                document = json.loads(path.read_text())
                stamp, listed, mac = document["taken_at"], document["heads"], document["mac"]
            except (ValueError, KeyError, TypeError):
                problems.append(f"checkpoint {path.name}: unreadable")
                continue
            if not any(hmac.compare_digest(_mac(key, stamp, listed), str(mac)) for key in self._keys):
                problems.append(f"checkpoint {path.name}: its seal does not match (forged or edited)")
                continue
            for chain, (seq, digest) in listed.items():
                known = points.setdefault(chain, {}).setdefault(int(seq), digest)
                if known != digest:
                    problems.append(f"checkpoint {path.name}: chain {chain or '(global)'} seq {seq} "
                                    "was checkpointed with another hash before (chain rewritten)")
        return points, problems

    def count(self) -> int:
        return len(list(self.folder.glob("[!.]*.json"))) if self.folder.is_dir() else 0


def checkpoint_book(folder: Path | None, keys: SecretStr | None) -> CheckpointBook | None:
    """The configured book, or None when checkpoints are off; a folder without a key refuses
    to start (an unsealed checkpoint proves nothing)."""
    if folder is None:
        return None
    parsed = [k.strip().encode() for k in (keys.get_secret_value() if keys else "").split(",") if k.strip()]
    if not parsed:
        raise ValueError("REFUNDS_AUDIT_CHECKPOINT_DIR is set but REFUNDS_AUDIT_CHECKPOINT_KEYS is empty")
    return CheckpointBook(folder, parsed)
