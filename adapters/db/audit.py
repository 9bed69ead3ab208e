"""The audit log: per-case hash chains, written in the same transaction as the business
rows they describe (rocket-rides' pattern), so the trail can never disagree with the state.

Approval steps are also written to the `case_approvals` projection in that transaction:
the approvals a case shows are read from there, never parsed back out of the trail.
"""

from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from adapters.db.database import Conn, Database
from adapters.db.rows import ApprovalStep
from domain.audit import GENESIS, bounded, canonical_detail, chain_hash, is_approval_step


class AuditLog:
    """Appends to the chains, reads a case's trail and verifies every chain."""

    def __init__(self, database: Database) -> None:
        self._db = database

    @staticmethod
    async def append(conn: Conn, case_id: str | None, actor: str, action: str,
                     detail: dict[str, Any]) -> None:
        """Appends to the case's hash chain inside the caller's transaction; the head row
        lock serialises one chain only."""
        chain = case_id or ""
        # Two round trips, not four: the head's upsert locks it, then one statement appends.
        head = await AuditLog._locked_head(conn, chain)
        seq, occurred_at, stored = int(head["seq"]) + 1, datetime.now(UTC), canonical_detail(detail)
        digest = chain_hash(head["hash"], chain=chain, seq=seq, refund_request_id=case_id,
                            occurred_at=occurred_at, actor=actor, action=action, detail=stored)
        await conn.execute(
            "WITH appended AS (INSERT INTO audit_events (chain, seq, refund_request_id, occurred_at,"
            " actor, action, detail, prev_hash, hash) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s))"
            " UPDATE audit_heads SET seq = %s, hash = %s WHERE chain = %s",
            (chain, seq, case_id, occurred_at, actor, action, Jsonb(stored), head["hash"], digest,
             seq, digest, chain))
        if is_approval_step(action):
            # the same columns the migration's backfill reads out of older rows
            await conn.execute(
                "INSERT INTO case_approvals (chain, seq, approver, action, roles, reason, occurred_at)"
                " VALUES (%s,%s,%s,%s,%s,%s,%s)",
                (chain, seq, actor, action, [str(r) for r in stored.get("roles") or ()],
                 str(stored.get("reason") or stored.get("refusal") or ""), occurred_at))

    @staticmethod
    async def _locked_head(conn: Conn, chain: str) -> dict[str, Any]:
        """The chain's head, created if needed and locked until the transaction ends (a
        no-op upsert): what serialises one chain's writers."""
        cur = await conn.execute(
            "INSERT INTO audit_heads (chain, seq, hash) VALUES (%s, 0, %s)"
            " ON CONFLICT (chain) DO UPDATE SET chain = EXCLUDED.chain RETURNING seq, hash",
            (chain, GENESIS))
        head = await cur.fetchone()
        assert head is not None
        return head

    @staticmethod
    def opening_entry(source: str) -> sql.Composed:
        """A case's first entry as CTEs of the caller's statement (params from
        `opening_entry_values`), written when the CTE `source` returns a row: one statement,
        where `append` takes two round trips. Only for a chain not begun: if it has, inserting
        its head fails, and the caller's whole statement with it (the caller then writes
        through `append`)."""
        return sql.SQL(
            "audit_head AS (INSERT INTO audit_heads (chain, seq, hash)"
            " SELECT %(audit_chain)s, 1, %(audit_hash)s FROM {source} RETURNING chain),"
            " audit_entry AS (INSERT INTO audit_events (chain, seq, refund_request_id, occurred_at,"
            " actor, action, detail, prev_hash, hash) SELECT chain, 1, chain, %(audit_at)s,"
            " %(audit_actor)s, %(audit_action)s, %(audit_detail)s, %(audit_prev)s, %(audit_hash)s"
            " FROM audit_head)").format(source=sql.Identifier(source))

    @staticmethod
    def opening_entry_values(chain: str, actor: str, action: str, detail: dict[str, Any]) -> dict[str, Any]:
        """The `opening_entry` of `chain`: its first row, hashed from the genesis."""
        assert not is_approval_step(action), "approval steps also go to case_approvals: use append"
        occurred_at, stored = datetime.now(UTC), canonical_detail(detail)
        digest = chain_hash(GENESIS, chain=chain, seq=1, refund_request_id=chain,
                            occurred_at=occurred_at, actor=actor, action=action, detail=stored)
        return {"audit_chain": chain, "audit_hash": digest, "audit_at": occurred_at, "audit_actor": actor,
                "audit_action": action, "audit_detail": Jsonb(stored), "audit_prev": GENESIS}

    async def record(self, case_id: str | None, actor: str, action: str, detail: dict[str, Any]) -> None:
        """`append` in a transaction of its own: an event with no business row beside it."""
        async with self._db.transaction() as conn:
            await self.append(conn, case_id, actor, action, detail)

    async def record_refusal(self, chain: str | None, actor: str, action: str,
                             detail: dict[str, Any]) -> None:
        """A refusal on the trail it names when that trail was begun; one naming a chain nobody
        began (an invented or mistyped id, a case not made yet) goes to the global trail,
        naming it (`case_id`): a request someone may not make never begins a case's trail.
        What the caller sent is kept `bounded`."""
        async with self._db.transaction() as conn:
            if chain and await (await conn.execute("SELECT 1 FROM audit_heads WHERE chain = %s",
                                                   (chain,))).fetchone() is None:
                chain, detail = None, {**detail, "case_id": chain}
            await self.append(conn, chain, actor, action, bounded(detail))

    async def record_once_opened(self, case_id: str, actor: str, action: str, detail: dict[str, Any], *,
                                 opened_by: str, closed_by: str,
                                 also: Callable[[Conn], Awaitable[None]] | None = None
                                 ) -> dict[str, Any] | None:
        """Appends `action` only while the chain's latest of `opened_by`, `closed_by` and
        `action` is `opened_by`, under the chain's lock: two callers never both act on one
        opening. `also` writes with it, in its transaction. None when appended; else that
        latest entry (actor, action, detail), or an empty dict when it never opened."""
        async with self._db.transaction() as conn:
            await self._locked_head(conn, case_id)
            latest = await (await conn.execute(
                "SELECT actor, action, detail FROM audit_events WHERE chain = %s AND action = ANY(%s)"
                " ORDER BY seq DESC LIMIT 1", (case_id, [opened_by, closed_by, action]))).fetchone()
            if latest is None or latest["action"] != opened_by:
                return dict(latest) if latest else {}
            if also is not None:
                await also(conn)
            await self.append(conn, case_id, actor, action, detail)
            return None

    async def trail(self, case_id: str) -> list[dict[str, Any]]:
        return await self._db.fetch_all(
            "SELECT id, seq, occurred_at, actor, action, detail, hash FROM audit_events"
            " WHERE chain = %s ORDER BY seq", (case_id,))

    async def last_of(self, case_id: str, actions: Iterable[str]) -> dict[str, Any] | None:
        """The detail of the case's latest entry with one of these actions (one indexed
        lookup, not the whole trail), or None."""
        row = await self._db.fetch_one(
            "SELECT detail FROM audit_events WHERE chain = %s AND action = ANY(%s) ORDER BY seq DESC LIMIT 1",
            (case_id, list(actions)))
        return dict(row["detail"]) if row else None

    async def last_at(self, case_id: str, action: str) -> datetime | None:
        """When the case's latest entry with `action` was written (one indexed lookup), or None."""
        row = await self._db.fetch_one(
            "SELECT occurred_at FROM audit_events WHERE chain = %s AND action = %s ORDER BY seq DESC LIMIT 1",
            (case_id, action))
        return row["occurred_at"] if row else None

    async def actors_of(self, case_id: str, actions: Iterable[str]) -> list[str]:
        """Who did any of `actions` on the case's chain, once each, earliest first."""
        rows = await self._db.fetch_all(
            "SELECT actor FROM audit_events WHERE chain = %s AND action = ANY(%s) ORDER BY seq",
            (case_id, list(actions)))
        return list(dict.fromkeys(str(r["actor"]) for r in rows))

    async def has_action(self, case_id: str, action: str, actor: str | None = None,
                         detail: Mapping[str, Any] | None = None) -> bool:
        """Whether the case's chain records `action` at least once (by `actor`, when named;
        its detail holding `detail`'s fields, when given; one indexed lookup, not the whole
        trail)."""
        holding = Jsonb(dict(detail)) if detail is not None else None
        row = await self._db.fetch_one(
            "SELECT EXISTS (SELECT 1 FROM audit_events WHERE chain = %s AND action = %s"
            " AND (%s::text IS NULL OR actor = %s) AND (%s::jsonb IS NULL OR detail @> %s::jsonb)) AS found",
            (case_id, action, actor, actor, holding, holding))
        return bool(row and row["found"])

    async def approvals(self, case_ids: list[str]) -> dict[str, list[ApprovalStep]]:
        """Every approval step per case, in chain order (the projection, not the trail)."""
        steps: dict[str, list[ApprovalStep]] = {c: [] for c in case_ids}
        async with self._db.connection() as conn:
            cur = await conn.execute(
                "SELECT chain, approver, action, roles, reason, occurred_at FROM case_approvals"
                " WHERE chain = ANY(%s) ORDER BY chain, seq", (case_ids,))
            for row in await cur.fetchall():
                steps[row["chain"]].append(ApprovalStep(
                    approver=row["approver"], action=row["action"], roles=frozenset(row["roles"]),
                    reason=row["reason"], occurred_at=row["occurred_at"]))
        return steps

    async def approvals_of(self, case_id: str) -> list[ApprovalStep]:
        return (await self.approvals([case_id]))[case_id]

    async def heads(self) -> dict[str, tuple[int, str]]:
        """Every chain's committed head (seq, hash): what the checkpoints record."""
        async with self._db.connection() as conn:
            return {r["chain"]: (int(r["seq"]), r["hash"]) for r in await (await conn.execute(
                "SELECT chain, seq, hash FROM audit_heads")).fetchall()}

    async def uncheckpointed(self, checkpoints: Mapping[str, Mapping[int, str]],
                             written_before: datetime) -> list[tuple[str, int, datetime]]:
        """Chains with a row written before `written_before` past every checkpoint of the
        chain (chain, that row's seq, when it was written): a checkpointer that stopped (it
        cannot write its folder, no worker runs it) leaves every later cut undetectable, and
        verification would otherwise vouch for them."""
        rows = await self._db.fetch_all(
            "SELECT chain, max(seq) AS seq, max(occurred_at) AS at FROM audit_events"
            " WHERE occurred_at < %s GROUP BY chain ORDER BY chain", (written_before,))
        return [(r["chain"], int(r["seq"]), r["at"]) for r in rows
                if int(r["seq"]) > max(checkpoints.get(r["chain"], {0: ""}), default=0)]

    @staticmethod
    async def _projection_problems(conn: Conn) -> list[str]:
        """Approval projection rows (what cases show as their approvals) that their trail
        does not hold as an approval step (no row, or another action, approver or roles:
        inserted on their own; the runtime role may insert), and approval steps of the trail
        the projection lacks. Every approval step has its row (one per chain and seq), so a
        forged row can only sit on a trail row that is no approval step: reported."""
        rows = await (await conn.execute(
            "SELECT p.chain, p.seq, p.approver, p.action FROM case_approvals p"
            " LEFT JOIN audit_events e ON e.chain = p.chain AND e.seq = p.seq"
            " WHERE e.id IS NULL OR NOT starts_with(p.action, 'approval_') OR e.action <> p.action"
            " OR e.actor <> p.approver"
            " OR p.roles IS DISTINCT FROM ARRAY(SELECT jsonb_array_elements_text(CASE"
            "   WHEN jsonb_typeof(e.detail->'roles') = 'array' THEN e.detail->'roles' ELSE '[]' END))"
            " UNION ALL SELECT e.chain, e.seq, e.actor, e.action FROM audit_events e"
            " WHERE starts_with(e.action, 'approval_') AND NOT EXISTS (SELECT 1 FROM case_approvals p"
            "   WHERE p.chain = e.chain AND p.seq = e.seq)"
            " ORDER BY 1, 2")).fetchall()
        return [f"chain {r['chain'] or '(global)'} approval {r['action']} by {r['approver']} "
                f"(seq {r['seq']}): the approvals shown and the trail disagree (a projection row "
                "added, changed or lost)" for r in rows]

    async def verify(
            self, checkpoints: Mapping[str, Mapping[int, str]] | None = None) -> tuple[int, list[str]]:
        """Recomputes every chain; returns rows checked and the problems found.

        Heads and rows are read in one REPEATABLE READ snapshot, so appends committed while
        it runs are not mistaken for deletions. `checkpoints` (chain -> {seq: hash}, recorded
        outside the database) catch what the chain alone cannot: a tail cut off together with
        a rewound head, or a chain rewritten from some row on."""
        problems: list[str] = []
        checked = 0
        points = {chain: dict(marks) for chain, marks in (checkpoints or {}).items()}
        async with self._db.connection() as conn:
            await conn.set_isolation_level(psycopg.IsolationLevel.REPEATABLE_READ)
            try:
                async with conn.transaction():
                    await conn.execute("SET TRANSACTION READ ONLY")
                    heads = {r["chain"]: (int(r["seq"]), r["hash"]) for r in await (await conn.execute(
                        "SELECT chain, seq, hash FROM audit_heads")).fetchall()}
                    last: dict[str, tuple[int, str]] = {}
                    async with conn.cursor(name="audit_verify") as cur:
                        await cur.execute("SELECT * FROM audit_events ORDER BY chain, seq")
                        async for row in cur:
                            checked += 1
                            chain = row["chain"]
                            seq, prev = last.get(chain, (0, GENESIS))
                            where = f"chain {chain or '(global)'} row {row['id']} (seq {row['seq']})"
                            if row["seq"] != seq + 1:
                                problems.append(f"{where}: expected seq {seq + 1}: a row is missing")
                            if row["prev_hash"] != prev:
                                problems.append(f"{where}: prev_hash does not match the row before")
                            expected = chain_hash(row["prev_hash"], chain=chain, seq=row["seq"],
                                                  refund_request_id=row["refund_request_id"],
                                                  occurred_at=row["occurred_at"], actor=row["actor"],
                                                  action=row["action"], detail=row["detail"])
                            if row["hash"] != expected:
                                problems.append(f"{where}: content does not match its hash (edited)")
                            marked = points.get(chain, {}).pop(int(row["seq"]), None)
                            if marked is not None and marked != row["hash"]:
                                problems.append(f"{where}: differs from the checkpointed hash "
                                                "(chain rewritten)")
                            last[chain] = (int(row["seq"]), row["hash"])
                    problems += await self._projection_problems(conn)
            finally:
                await conn.set_isolation_level(None)
        for chain in last.keys() - heads.keys():
            problems.append(f"chain {chain or '(global)'}: rows end at seq {last[chain][0]} but it has no "
                            "head: the head was deleted (every later append to it fails)")
        for chain, head in heads.items():
            if last.get(chain, (0, GENESIS)) != head:
                problems.append(f"chain {chain or '(global)'}: head is seq {head[0]} but the rows "
                                f"end at seq {last.get(chain, (0, GENESIS))[0]}: rows were deleted")
        for chain, missing in points.items():
            if missing:
                problems.append(f"chain {chain or '(global)'}: checkpointed seq {max(missing)} is gone "
                                f"(head at seq {heads.get(chain, (0, ''))[0]}): the tail was cut "
                                "and the head rewound")
        return checked, problems
