"""The sandbox provider's books: charges, refunds and payouts in SQLite (so a restarted dev
stack still knows them), paged newest first as Stripe's lists are."""

import json
import secrets
import sqlite3
import time
from typing import Any, Literal

SCHEMA = """
CREATE TABLE IF NOT EXISTS charges (id TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS refunds (id TEXT PRIMARY KEY, charge TEXT NOT NULL,
    idempotency_key TEXT, body TEXT NOT NULL, seq INTEGER NOT NULL, created INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS payouts (id TEXT PRIMARY KEY, body TEXT NOT NULL, seq INTEGER NOT NULL,
    created INTEGER NOT NULL);
"""
# Lists page newest first by creation time, as Stripe's do.
INDEXES = """
CREATE INDEX IF NOT EXISTS refunds_created ON refunds (created, seq);
CREATE INDEX IF NOT EXISTS payouts_created ON payouts (created, seq);
"""
ListedTable = Literal["refunds", "payouts"]
MAX_PAGE = 100



def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


class SandboxBank:
    """Charges and refunds in SQLite; every method is quick and synchronous."""

    def __init__(self, path: str) -> None:
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.executescript(SCHEMA)
        for table in ("refunds", "payouts"):
            columns = {r[1] for r in self._db.execute(f"PRAGMA table_info({table})")}
            if "created" not in columns:  # a data folder from before lists had a creation time
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN created INTEGER NOT NULL DEFAULT 0")
                self._db.execute(f"UPDATE {table} SET created = seq / 1000000000")  # noqa: S608
        self._db.executescript(INDEXES)

    def put(self, table: Literal["charges", "refunds"], obj: dict[str, Any], **extra: Any) -> None:
        if table == "charges":
            self._db.execute("INSERT OR REPLACE INTO charges VALUES (?, ?)", (obj["id"], json.dumps(obj)))
        else:
            self.put_refunds([obj], idempotency_key=extra.get("idempotency_key"))

    def put_refunds(self, refunds: list[dict[str, Any]], idempotency_key: str | None = None) -> None:
        """Inserts refunds (their `created` is kept) or updates their body, in one transaction."""
        seq = time.time_ns()
        self._db.execute("BEGIN")
        self._db.executemany(
            "INSERT INTO refunds VALUES (?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (id) DO UPDATE SET body = excluded.body",
            [(r["id"], r["charge"], idempotency_key, json.dumps(r), seq + i, r["created"])
             for i, r in enumerate(refunds)])
        self._db.execute("COMMIT")

    def page(self, table: ListedTable, *, since: int | None, until: int | None, starting_after: str | None,
             limit: int, charge: str | None = None) -> tuple[list[dict[str, Any]], bool]:
        """One page, newest first, of refunds or payouts created in [since, until) after the cursor.
        Only the filters given go into the query, so SQLite seeks the (created, seq) index
        instead of scanning it: a page costs the same deep into a large window."""
        where: list[str] = ["1 = 1"]
        params: list[int | str] = []
        if starting_after is not None:
            found = self._db.execute(f"SELECT created, seq FROM {table} WHERE id = ?",  # noqa: S608
                                     (starting_after,)).fetchone()
            if found is None:
                raise KeyError(starting_after)
            where.append("(created, seq) < (?, ?)")
            params += [int(found[0]), int(found[1])]
        for clause, value in (("created >= ?", since), ("created < ?", until), ("charge = ?", charge)):
            if value is not None:
                where.append(clause)
                params.append(value)
        rows = self._db.execute(
            f"SELECT body FROM {table} WHERE {' AND '.join(where)}"  # noqa: S608 (clauses are ours)
            " ORDER BY created DESC, seq DESC LIMIT ?", (*params, limit + 1)).fetchall()
        return [json.loads(r[0]) for r in rows[:limit]], len(rows) > limit

    def put_payout(self, obj: dict[str, Any]) -> None:
        """Inserts a payout (its `created` is kept) or updates its body."""
        self._db.execute("INSERT INTO payouts VALUES (?, ?, ?, ?)"
                         " ON CONFLICT (id) DO UPDATE SET body = excluded.body",
                         (obj["id"], json.dumps(obj), time.time_ns(), obj["created"]))

    def payouts(self) -> list[dict[str, Any]]:
        rows = self._db.execute("SELECT body FROM payouts ORDER BY seq").fetchall()
        return [json.loads(r[0]) for r in rows]

    def charge(self, charge_id: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT body FROM charges WHERE id = ?", (charge_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def refund(self, refund_id: str) -> dict[str, Any] | None:
        row = self._db.execute("SELECT body FROM refunds WHERE id = ?", (refund_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def refunds(self, charge: str | None = None, idempotency_key: str | None = None) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT body FROM refunds WHERE (? IS NULL OR charge = ?)"
            " AND (? IS NULL OR idempotency_key = ?) ORDER BY seq",
            (charge, charge, idempotency_key, idempotency_key)).fetchall()
        return [json.loads(r[0]) for r in rows]
