"""PostgreSQL store: cases and reservations, receipts, ledger, audit, API tokens.

Audit rows are written in the same transaction as the business rows they describe, so
the trail can never disagree with the state (rocket-rides' pattern).
"""

import hashlib
import json
import logging
import secrets
import select
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from importlib import resources
from typing import Any

import psycopg
from psycopg import AsyncConnection, sql
from psycopg.rows import DictRow, dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from adapters.telemetry import trace_connection
from domain.audit import GENESIS, canonical_detail, chain_hash
from domain.ledger import ledger_lines
from domain.models import (
    CLOSED_STATUSES,
    ROLES,
    CaseEventInput,
    CaseStatus,
    ChargeSnapshot,
    LedgerInput,
    LedgerResult,
    NoticeInput,
    ProviderRefund,
    RefundRequest,
    ValidationResult,
)
from domain.reconciliation import BreakClass

log = logging.getLogger("store")

SETTLED_STATUSES = CLOSED_STATUSES | {CaseStatus.SUCCEEDED}
"""Statuses no workflow moves any more; a case in any other one needs its workflow."""

Conn = AsyncConnection[DictRow]

def request_from_row(row: dict[str, Any]) -> RefundRequest:
    """The request a stored case was made from."""
    return RefundRequest(
        refund_request_id=row["refund_request_id"], provider=row["provider"],
        charge_id=row["charge_id"], amount=int(row["amount"]), currency=row["currency"],
        merchant_account=row["merchant_account"], reason=row["reason"], evidence=row["evidence"],
        source=row["source"], method=row["method"],
        parent_refund_request_id=row["parent_refund_request_id"],
        trigger_identities=tuple(row.get("trigger_identities") or ()))


class CaseCreation(StrEnum):
    CREATED = "created"
    IDENTICAL = "identical"
    CONFLICT = "conflict"


@dataclass(frozen=True)
class Principal:
    """An authenticated caller of the relay."""

    user: str
    roles: frozenset[str]


@dataclass(frozen=True)
class ConsoleSession:
    """A signed-in console user; `csrf_token` must come back in every form they post."""

    session_id: int
    principal: Principal
    csrf_token: str


@dataclass(frozen=True)
class StoredReceipt:
    """Where a delivery landed; a duplicate of an unprocessed first receipt must re-drive it."""

    receipt_id: int
    verdict: str
    first_receipt_id: int | None
    first_processed: bool = True
    case_creation: CaseCreation | None = None
    """Set when the first delivery of a refund request opened (or met) its case in the
    receipt's own transaction."""


def hash_token(token: str) -> str:
    """Tokens are stored only as SHA-256: a leaked table grants nothing."""
    return hashlib.sha256(token.encode()).hexdigest()


async def check_if_server_spoke(conn: Conn) -> None:
    """The pool's checkout check without a round trip per transaction: an idle connection's
    socket has nothing to read unless the server closed it or spoke out of turn (a restart, an
    administrator's terminate, an idle timeout), and only then is it probed; a dead one
    raises, and the pool replaces it instead of handing it out."""
    idle_socket = select.poll()
    idle_socket.register(conn.fileno(), select.POLLIN)
    if idle_socket.poll(0):
        await AsyncConnectionPool.check_connection(conn)


async def open_incident_run(conn: Conn, run_id: str, provider: str, requested_by: str) -> None:
    """The completed `incident` run a break raised outside a reconciliation run is found by
    (a break needs the run that found it); once per id."""
    await conn.execute(
        "INSERT INTO reconciliation_runs (id, provider, task_queue, kind, window_start, window_end,"
        " requested_by, state, finished_at) VALUES (%s,%s,'','incident', now() - interval '1 second',"
        " now(), %s, 'completed', now()) ON CONFLICT (id) DO NOTHING",
        (run_id, provider, requested_by))


def _json(value: Any) -> Jsonb:
    return Jsonb(canonical_detail(value) if isinstance(value, dict) else json.loads(json.dumps(value)))


class Store:
    """All SQL of the product; one instance per process, backed by a connection pool."""

    def __init__(self, pool: AsyncConnectionPool[Conn]) -> None:
        self._pool = pool

    @classmethod
    async def open(cls, dsn: str, *, min_size: int = 1, max_size: int = 10) -> "Store":
        pool: AsyncConnectionPool[Conn] = AsyncConnectionPool(
            dsn, min_size=min_size, max_size=max_size, open=False,
            kwargs={"row_factory": dict_row, "autocommit": True},
            # a connection that died with a restarted server is replaced, not handed out
            check=check_if_server_spoke,
            configure=trace_connection,
        )
        await pool.open(wait=True, timeout=30)
        return cls(pool)

    async def close(self) -> None:
        await self._pool.close()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Conn]:
        async with self._pool.connection() as conn, conn.transaction():
            yield conn

    # -- migrations -----------------------------------------------------------------

    async def migrate(self, runtime_role: str | None = None) -> list[str]:
        """Applies the packaged SQL files in name order, each once, under an advisory lock.

        Run as the role that owns the schema. `runtime_role` is the role relay and worker
        connect as: it gets the rows it works with and nothing more (not the owner, so it
        cannot alter tables or disable their append-only triggers)."""
        files = sorted(
            (f for f in resources.files("adapters.migrations").iterdir() if f.name.endswith(".sql")),
            key=lambda f: f.name,
        )
        applied: list[str] = []
        async with self.transaction() as conn:
            await conn.execute("SELECT pg_advisory_xact_lock(727274)")
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (version TEXT PRIMARY KEY,"
                " applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            done = {r["version"] for r in await (await conn.execute(
                "SELECT version FROM schema_migrations")).fetchall()}
            for f in files:
                version = f.name.removesuffix(".sql")
                if version in done:
                    continue
                await conn.execute(f.read_text())
                await conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
                applied.append(version)
            if runtime_role is not None:
                await self._grant_runtime(conn, runtime_role)
        return applied

    @staticmethod
    async def _grant_runtime(conn: Conn, role: str) -> None:
        """Grants the services' role row access to every table (re-run on every migrate, so
        new tables are covered), minus changing what is append-only or the migration record.
        A role that could disable the triggers anyway (superuser, or the owner) is refused."""
        found = await (await conn.execute(
            "SELECT rolsuper, rolname = current_user AS is_owner, current_schema() AS schema"
            " FROM pg_roles WHERE rolname = %s", (role,))).fetchone()
        if found is None:
            raise ValueError(f"runtime role {role!r} does not exist: create it (LOGIN, no superuser)")
        if found["rolsuper"] or found["is_owner"]:
            raise ValueError(f"runtime role {role!r} is a superuser or the schema owner: the services "
                             "must run as a role that cannot disable triggers")
        grantee, schema = sql.Identifier(role), sql.Identifier(found["schema"])
        for statement in (
            "GRANT USAGE ON SCHEMA {schema} TO {grantee}",
            "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO {grantee}",
            "GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA {schema} TO {grantee}",
            "REVOKE UPDATE, DELETE, TRUNCATE ON audit_events, ledger_entries, ledger_lines FROM {grantee}",
            "REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON schema_migrations FROM {grantee}",
        ):
            await conn.execute(sql.SQL(statement).format(schema=schema, grantee=grantee))

    # -- audit ----------------------------------------------------------------------

    @staticmethod
    async def _audit(conn: Conn, case_id: str | None, actor: str, action: str,
                     detail: dict[str, Any]) -> None:
        """Appends to the case's hash chain; the head row lock serialises one chain only."""
        chain = case_id or ""
        # Two round trips, not four: the no-op upsert creates the head if needed and locks it.
        cur = await conn.execute(
            "INSERT INTO audit_heads (chain, seq, hash) VALUES (%s, 0, %s)"
            " ON CONFLICT (chain) DO UPDATE SET chain = EXCLUDED.chain RETURNING seq, hash",
            (chain, GENESIS))
        head = await cur.fetchone()
        assert head is not None
        seq, occurred_at, stored = int(head["seq"]) + 1, datetime.now(UTC), canonical_detail(detail)
        digest = chain_hash(head["hash"], chain=chain, seq=seq, refund_request_id=case_id,
                            occurred_at=occurred_at, actor=actor, action=action, detail=stored)
        await conn.execute(
            "WITH appended AS (INSERT INTO audit_events (chain, seq, refund_request_id, occurred_at,"
            " actor, action, detail, prev_hash, hash) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s))"
            " UPDATE audit_heads SET seq = %s, hash = %s WHERE chain = %s",
            (chain, seq, case_id, occurred_at, actor, action, Jsonb(stored), head["hash"], digest,
             seq, digest, chain))

    async def audit_heads(self) -> dict[str, tuple[int, str]]:
        """Every chain's committed head (seq, hash): what the checkpoints record."""
        async with self._pool.connection() as conn:
            return {r["chain"]: (int(r["seq"]), r["hash"]) for r in await (await conn.execute(
                "SELECT chain, seq, hash FROM audit_heads")).fetchall()}

    async def verify_audit(
            self, checkpoints: Mapping[str, Mapping[int, str]] | None = None) -> tuple[int, list[str]]:
        """Recomputes every chain; returns rows checked and the problems found.

        Heads and rows are read in one REPEATABLE READ snapshot, so appends committed while
        it runs are not mistaken for deletions. `checkpoints` (chain -> {seq: hash}, recorded
        outside the database) catch what the chain alone cannot: a tail cut off together with
        a rewound head, or a chain rewritten from some row on."""
        problems: list[str] = []
        checked = 0
        points = {chain: dict(marks) for chain, marks in (checkpoints or {}).items()}
        async with self._pool.connection() as conn:
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
            finally:
                await conn.set_isolation_level(None)
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

    async def append_audit(self, case_id: str | None, actor: str, action: str,
                           detail: dict[str, Any]) -> None:
        async with self.transaction() as conn:
            await self._audit(conn, case_id, actor, action, detail)

    async def audit_trail(self, case_id: str) -> list[dict[str, Any]]:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT id, seq, occurred_at, actor, action, detail, hash FROM audit_events"
                " WHERE chain = %s ORDER BY seq", (case_id,))
            return list(await cur.fetchall())

    # -- cases ----------------------------------------------------------------------

    async def create_case(self, request: RefundRequest,
                          requester: str) -> tuple[CaseCreation, dict[str, Any]]:
        """Inserts the case once; a repeat is identical or a conflict, decided by params hash."""
        async with self.transaction() as conn:
            return await self._create_case(conn, request, requester)

    async def _create_case(self, conn: Conn, request: RefundRequest,
                           requester: str) -> tuple[CaseCreation, dict[str, Any]]:
        params = request.params_hash()
        cur = await conn.execute(
            "INSERT INTO refund_cases (refund_request_id, provider, charge_id, amount, currency,"
            " merchant_account, reason, evidence, source, requester, params_hash, status,"
            " method, parent_refund_request_id, trigger_identities)"
            " VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)"
            " ON CONFLICT (refund_request_id) DO NOTHING RETURNING *",
            (request.refund_request_id, request.provider, request.charge_id, request.amount,
             request.currency, request.merchant_account, request.reason.value,
             _json(request.evidence), request.source.value, requester, params,
             CaseStatus.REQUESTED.value, request.method.value, request.parent_refund_request_id,
             list(request.trigger_identities)),
        )
        row = await cur.fetchone()
        if row is not None:
            await self._audit(conn, request.refund_request_id, requester, "request_received",
                              {"source": request.source.value, "params_hash": params,
                               "amount": request.amount, "currency": request.currency})
            return CaseCreation.CREATED, row
        cur = await conn.execute(
            "SELECT * FROM refund_cases WHERE refund_request_id = %s", (request.refund_request_id,))
        existing = await cur.fetchone()
        assert existing is not None
        same = existing["params_hash"] == params
        await self._audit(conn, request.refund_request_id, requester,
                          "request_repeated" if same else "request_conflict",
                          {"source": request.source.value, "params_hash": params})
        return (CaseCreation.IDENTICAL if same else CaseCreation.CONFLICT), existing

    async def get_case(self, case_id: str) -> dict[str, Any] | None:
        async with self._pool.connection() as conn:
            cur = await conn.execute("SELECT * FROM refund_cases WHERE refund_request_id = %s", (case_id,))
            return await cur.fetchone()

    async def case_by_provider_refund(self, provider: str, refund_id: str) -> dict[str, Any] | None:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT * FROM refund_cases WHERE provider = %s AND provider_refund_id = %s",
                (provider, refund_id))
            return await cur.fetchone()

    async def open_tracking_case(self, case_id: str, refund: ProviderRefund,
                                 merchant_account: str | None, event_type: str) -> bool:
        """Records a refund the provider made without us as a `tracking` case that holds its
        amount against the charge (so later requests see less refundable). Once per id."""
        async with self.transaction() as conn:
            # Its hold is a reservation like any other: taken under the charge's lock.
            await self._lock_charge(conn, refund.provider, refund.charge_id, refund.currency)
            cur = await conn.execute(
                "INSERT INTO refund_cases (refund_request_id, provider, charge_id, amount, currency,"
                " merchant_account, reason, evidence, source, requester, params_hash, status,"
                " reserved_amount, provider_refund_id, provider_status)"
                " VALUES (%s,%s,%s,%s,%s,%s,'other','{}','webhook',%s,'',%s,%s,%s,%s)"
                " ON CONFLICT (refund_request_id) DO NOTHING RETURNING refund_request_id",
                (case_id, refund.provider, refund.charge_id, refund.amount, refund.currency,
                 merchant_account or "", f"provider:{refund.provider}", CaseStatus.TRACKING.value,
                 refund.amount, refund.refund_id, refund.status.value))
            if await cur.fetchone() is None:
                return False
            await self._audit(conn, case_id, f"provider:{refund.provider}", "tracking_opened",
                              {**refund.model_dump(mode="json"), "event_type": event_type})
            return True

    @staticmethod
    async def _lock_charge(conn: Conn, provider: str, charge_id: str, currency: str,
                           amount_captured: int | None = None) -> None:
        """Locks the charge's row (created if new) for the transaction: every change to the
        reservations held on a charge is made under it, so none is decided on a stale sum.
        `amount_captured`, when known, is stored as the provider reported it."""
        await conn.execute(
            "INSERT INTO charges (provider, charge_id, currency, amount_captured)"
            " VALUES (%s,%s,%s,%s) ON CONFLICT (provider, charge_id) DO UPDATE"
            " SET amount_captured = coalesce(%s, charges.amount_captured), updated_at = now()",
            (provider, charge_id, currency, amount_captured or 0, amount_captured))
        await conn.execute(
            "SELECT 1 FROM charges WHERE provider = %s AND charge_id = %s FOR UPDATE",
            (provider, charge_id))

    async def reserve(self, request: RefundRequest, charge: ChargeSnapshot) -> ValidationResult:
        """Takes the case's reservation against the charge, atomically with every other
        entry point: remaining = captured - all reservations held on the charge."""
        case_id = request.refund_request_id
        async with self.transaction() as conn:
            await self._lock_charge(conn, charge.provider, charge.charge_id, charge.currency,
                                    charge.amount_captured)
            cur = await conn.execute(
                "SELECT refund_request_id, reserved_amount FROM refund_cases"
                " WHERE provider = %s AND charge_id = %s AND reserved_amount > 0",
                (charge.provider, charge.charge_id))
            holds = {r["refund_request_id"]: int(r["reserved_amount"]) for r in await cur.fetchall()}
            prior = len([k for k in holds if k != case_id])
            if case_id in holds:  # a retried activity: the reservation is already ours
                remaining = charge.amount_captured - sum(holds.values()) + holds[case_id]
                return ValidationResult(ok=True, remaining_before=remaining, prior_refund_count=prior,
                                        amount_captured=charge.amount_captured,
                                        dispute_count=charge.dispute_count)
            # What the provider reports refunded is mostly held by our cases already (tracking
            # cases included), so the larger of the two counts, never their sum.
            remaining = charge.amount_captured - max(sum(holds.values()), charge.amount_refunded)
            if request.amount > remaining:
                result = ValidationResult(
                    ok=False, remaining_before=remaining, prior_refund_count=prior,
                    amount_captured=charge.amount_captured,
                    reason=f"amount {request.amount} exceeds remaining refundable {remaining}")
                await self._set_status(conn, case_id, CaseStatus.REJECTED)
                await self._audit(conn, case_id, "system", "validation_rejected", result.model_dump())
                return result
            await conn.execute(
                "UPDATE refund_cases SET reserved_amount = %s, status = %s, updated_at = now()"
                " WHERE refund_request_id = %s",
                (request.amount, CaseStatus.VALIDATING.value, case_id))
            result = ValidationResult(ok=True, remaining_before=remaining, prior_refund_count=prior,
                                      amount_captured=charge.amount_captured,
                                      dispute_count=charge.dispute_count)
            await self._audit(conn, case_id, "system", "validation_passed",
                              {**result.model_dump(), "reserved": request.amount})
            return result

    async def reject_case(self, case_id: str, reason: str) -> None:
        async with self.transaction() as conn:
            await self._set_status(conn, case_id, CaseStatus.REJECTED, release=True)
            await self._audit(conn, case_id, "system", "validation_rejected", {"reason": reason})

    async def prior_refunds(self, provider: str, charge_id: str, exclude: str) -> list[dict[str, Any]]:
        """Refunds on the charge that hold money (reserved, pending or succeeded)."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT refund_request_id, amount, status FROM refund_cases"
                " WHERE provider = %s AND charge_id = %s AND refund_request_id <> %s"
                " AND reserved_amount > 0", (provider, charge_id, exclude))
            return list(await cur.fetchall())

    @staticmethod
    async def _set_status(conn: Conn, case_id: str, status: CaseStatus,
                          release: bool = False) -> None:
        await conn.execute(
            "UPDATE refund_cases SET status = %s, updated_at = now(),"
            " reserved_amount = CASE WHEN %s THEN 0 ELSE reserved_amount END"
            " WHERE refund_request_id = %s", (status.value, release, case_id))

    async def record_case_event(self, event: CaseEventInput) -> None:
        async with self.transaction() as conn:
            refund = event.provider_refund
            if refund is not None:
                await conn.execute(
                    "UPDATE refund_cases SET provider_refund_id = %s, provider_status = %s,"
                    " failure_reason = %s, updated_at = now() WHERE refund_request_id = %s",
                    (refund.refund_id, refund.status.value, refund.failure_reason,
                     event.refund_request_id))
            if event.status is not None:
                await self._set_status(conn, event.refund_request_id, event.status,
                                       event.release_reservation)
            await self._audit(conn, event.refund_request_id, event.actor, event.action,
                              {**event.detail, **({"status": event.status.value} if event.status else {}),
                               **({"reservation_released": True} if event.release_reservation else {})})

    async def idle_open_cases(self, idle_seconds: float, limit: int,
                              after: tuple[datetime, str] | None = None) -> list[dict[str, Any]]:
        """Cases whose workflow still has to move them, untouched for `idle_seconds` and not
        swept yet (refunds the provider made without us are left to reconciliation), by last
        update then id, from `after` on: what the closed-workflow sweep asks Temporal about."""
        async with self.transaction() as conn:
            cur = await conn.execute(
                "SELECT * FROM refund_cases c WHERE status <> ALL(%s)"
                " AND updated_at < now() - make_interval(secs => %s)"
                " AND NOT (provider_refund_id IS NOT NULL"
                "          AND refund_request_id = provider || '-refund-' || provider_refund_id)"
                " AND NOT EXISTS (SELECT 1 FROM reconciliation_breaks b"
                "                 WHERE b.refund_request_id = c.refund_request_id AND b.break_class = %s)"
                " AND (updated_at, refund_request_id) > (%s, %s)"
                " ORDER BY updated_at, refund_request_id LIMIT %s",
                ([s.value for s in SETTLED_STATUSES], idle_seconds, BreakClass.WORKFLOW_CLOSED.value,
                 *(after or (datetime.min.replace(tzinfo=UTC), "")), limit))
            return list(await cur.fetchall())

    async def sweep_closed_case(self, case_id: str, *, workflow_status: str, provider_holds: bool | None,
                                found: ProviderRefund | None) -> bool:
        """A case whose workflow closed while it was open, in one transaction: `ops_review`,
        a reconciliation break for ops (its own completed run, `ops_review`, never dispatched
        to a workflow), the audit row and the ops notice; the reservation is released only
        when the provider certainly holds no refund (`provider_holds` False). False when the
        case reached a final status meanwhile."""
        async with self.transaction() as conn:
            cur = await conn.execute("SELECT * FROM refund_cases WHERE refund_request_id = %s FOR UPDATE",
                                     (case_id,))
            row = await cur.fetchone()
            if row is None or row["status"] in {s.value for s in SETTLED_STATUSES}:
                return False
            run_id = f"case-sweep-{case_id}"
            await open_incident_run(conn, run_id, row["provider"], "case-sweep")
            provider_status = found.status.value if found else row["provider_status"] or "none"
            evidence = {"workflow_status": workflow_status, "case_status": row["status"],
                        "reserved_amount": row["reserved_amount"], "provider_holds_refund": provider_holds,
                        "provider_refund_id": found.refund_id if found else row["provider_refund_id"]}
            cur = await conn.execute(
                "INSERT INTO reconciliation_breaks (provider, object_id, break_class, refund_request_id,"
                " chain, charge_id, amount, currency, provider_status, raw_status, failure_reason,"
                " case_status, object_created_at, evidence, first_run_id, state)"
                " VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,'ops_review')"
                " ON CONFLICT DO NOTHING RETURNING id",
                (row["provider"], case_id, BreakClass.WORKFLOW_CLOSED.value, case_id, case_id,
                 row["charge_id"], row["amount"], row["currency"], provider_status,
                 found.raw_status if found else provider_status, row["failure_reason"], row["status"],
                 row["created_at"], _json(evidence), run_id))
            opened = await cur.fetchone()
            release = provider_holds is False
            await self._set_status(conn, case_id, CaseStatus.OPS_REVIEW, release=release)
            detail = {**evidence, "break_id": opened["id"] if opened else None,
                      **({"reservation_released": True} if release else {})}
            await self._audit(conn, case_id, "case-sweep", "workflow_closed_case_swept", detail)
            await self.queue_notice_in(conn, NoticeInput(
                refund_request_id=case_id, kind="workflow_closed", audience="operator",
                dedup_key=f"{case_id}:workflow_closed", detail=detail))
            return True

    async def record_decision(self, case_id: str, decision: dict[str, Any]) -> None:
        async with self.transaction() as conn:
            await conn.execute(
                "UPDATE refund_cases SET decision = %s, updated_at = now() WHERE refund_request_id = %s",
                (_json(decision), case_id))
            await self._audit(conn, case_id, "policy", "policy_decision", decision)

    async def begin_submission(self, case_id: str, idempotency_key: str) -> bool:
        """Records the intent to call the provider before the call; returns True when an
        earlier attempt already started, so the caller must look before it leaps."""
        async with self.transaction() as conn:
            cur = await conn.execute(
                "SELECT submission_started_at FROM refund_cases WHERE refund_request_id = %s FOR UPDATE",
                (case_id,))
            row = await cur.fetchone()
            started = row is not None and row["submission_started_at"] is not None
            if not started:
                await conn.execute(
                    "UPDATE refund_cases SET submission_started_at = now(), status = %s,"
                    " updated_at = now() WHERE refund_request_id = %s",
                    (CaseStatus.EXECUTING.value, case_id))
            await self._audit(conn, case_id, "system", "provider_submit_started",
                              {"idempotency_key": idempotency_key, "earlier_attempt": started})
            return started

    async def record_provider_refund(self, case_id: str, refund: ProviderRefund, action: str,
                                     detail: dict[str, Any] | None = None) -> None:
        """Stores what the provider reported for the case's refund, with its audit row."""
        async with self.transaction() as conn:
            await conn.execute(
                "UPDATE refund_cases SET provider_refund_id = %s, provider_status = %s,"
                " failure_reason = %s, updated_at = now() WHERE refund_request_id = %s",
                (refund.refund_id, refund.status.value, refund.failure_reason, case_id))
            await self._audit(conn, case_id, f"provider:{refund.provider}", action,
                              {**refund.model_dump(mode="json"), **(detail or {})})

    # -- ledger ---------------------------------------------------------------------

    async def post_ledger(self, posting: LedgerInput) -> LedgerResult:
        """Posts a balanced two-line entry once per posting key."""
        async with self.transaction() as conn:
            await conn.execute("SET LOCAL lock_timeout = '5s'")  # fail fast, let Temporal retry
            return await self.post_ledger_in(conn, posting)

    @classmethod
    async def post_ledger_in(cls, conn: Conn, posting: LedgerInput) -> LedgerResult:
        """`post_ledger` inside the caller's transaction (a compensating entry commits with
        the decision that approved it)."""
        key = posting.posting_key()
        cur = await conn.execute(
            "INSERT INTO ledger_entries (posting_key, refund_request_id, template)"
            " VALUES (%s,%s,%s) ON CONFLICT (posting_key) DO NOTHING RETURNING id",
            (key, posting.refund_request_id, posting.kind.value))
        row = await cur.fetchone()
        if row is None:
            cur = await conn.execute("SELECT id FROM ledger_entries WHERE posting_key = %s", (key,))
            existing = await cur.fetchone()
            assert existing is not None
            return LedgerResult(posting_key=key, entry_id=existing["id"], newly_posted=False)
        entry_id = int(row["id"])
        await conn.cursor().executemany(
            "INSERT INTO ledger_lines (entry_id, account, debit, credit, currency)"
            " VALUES (%s,%s,%s,%s,%s)",
            [(entry_id, line.account, line.debit, line.credit, line.currency)
             for line in ledger_lines(posting)])
        await cls._audit(conn, posting.refund_request_id, "ledger", "ledger_posted",
                         {"posting_key": key, "entry_id": entry_id,
                          "template": posting.kind.value, "amount": posting.amount,
                          "currency": posting.currency,
                          "provider_refund_id": posting.provider_refund_id})
        return LedgerResult(posting_key=key, entry_id=entry_id, newly_posted=True)

    async def ledger_entries(self, case_id: str) -> list[dict[str, Any]]:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT e.posting_key, e.template, l.account, l.debit, l.credit, l.currency"
                " FROM ledger_entries e JOIN ledger_lines l ON l.entry_id = e.id"
                " WHERE e.refund_request_id = %s ORDER BY e.id, l.id", (case_id,))
            return list(await cur.fetchall())

    # -- webhook receipts -------------------------------------------------------------

    async def store_receipt(self, *, provider: str, event_id: str | None, event_type: str | None,
                            body: bytes | None, body_sha256: str, headers: dict[str, str],
                            verdict: str, error: str | None, replay_of: int | None = None,
                            opens: tuple[RefundRequest, str] | None = None) -> StoredReceipt:
        """Stores every delivery (and every replay of a stored one); an accepted one passes
        the (provider, event_id) gate once, later ones are recorded as duplicates of the first.

        `opens` (request, requester) creates the case with the first delivery in the same
        commit, one disk flush instead of two on the relay's hottest path. If that commit
        fails, the receipt is stored again alone (nothing of the failed one remains) and
        routing opens the case: the receipt never depends on its case.

        Pipelined and without savepoints: BEGIN, writes whose result is not read and COMMIT
        take no round trip of their own beyond the last one; every statement is a syscall or
        two and a wake-up on each side, the relay's main cost per delivery."""
        gated = verdict == "accepted" and event_id is not None
        try:
            async with self._pool.connection() as conn, conn.pipeline(), conn.transaction():
                # One statement: the receipt, and (accepted ones) its claim on the event id.
                cur = await conn.execute(
                    "WITH receipt AS (INSERT INTO webhook_receipts (provider, event_id, event_type, body,"
                    " body_sha256, headers, verdict, error, replay_of)"
                    " VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s) RETURNING id),"
                    " claim AS (INSERT INTO webhook_events (provider, event_id, first_receipt_id)"
                    " SELECT %s, %s, id FROM receipt WHERE %s ON CONFLICT DO NOTHING"
                    " RETURNING first_receipt_id)"
                    " SELECT receipt.id, claim.first_receipt_id AS claimed"
                    " FROM receipt LEFT JOIN claim ON true",
                    (provider, event_id, event_type, body, body_sha256, _json(headers), verdict, error,
                     replay_of, provider, event_id, gated))
                row = await cur.fetchone()
                assert row is not None
                receipt_id = int(row["id"])
                if not gated:
                    return StoredReceipt(receipt_id, verdict, None)
                if row["claimed"] is not None:
                    creation = (await self._create_case(conn, *opens))[0] if opens is not None else None
                    return StoredReceipt(receipt_id, "accepted", receipt_id, case_creation=creation)
                # The claim's conflict waited for the first receipt's commit, so this statement's
                # snapshot sees it.
                cur = await conn.execute(
                    "WITH marked AS (UPDATE webhook_receipts SET verdict = 'duplicate', processed_at = now()"
                    " WHERE id = %s)"
                    " SELECT r.id, r.processed_at FROM webhook_events e"
                    " JOIN webhook_receipts r ON r.id = e.first_receipt_id"
                    " WHERE e.provider = %s AND e.event_id = %s", (receipt_id, provider, event_id))
                first = await cur.fetchone()
                assert first is not None
                return StoredReceipt(receipt_id, "duplicate", int(first["id"]),
                                     first_processed=first["processed_at"] is not None)
        except psycopg.Error:
            if opens is None:
                raise
            log.exception("case %s not opened with its receipt; storing the receipt alone,"
                          " routing opens it", opens[0].refund_request_id)
            return await self.store_receipt(provider=provider, event_id=event_id,
                                            event_type=event_type, body=body,
                                            body_sha256=body_sha256, headers=headers,
                                            verdict=verdict, error=error, replay_of=replay_of)

    async def mark_receipt_processed(self, receipt_id: int, workflow_id: str | None) -> None:
        """Marks the receipt done without waiting for the disk: if a crash loses the mark,
        re-drive starts or signals again, which acts once anyway (workflow id, event id).
        One statement, its own transaction: set_config(..., true) makes that transaction's
        commit asynchronous without a BEGIN, a SET and a COMMIT around it."""
        async with self._pool.connection() as conn:
            await conn.execute(
                "UPDATE webhook_receipts SET processed_at = now(), workflow_id = %s"
                " FROM (SELECT set_config('synchronous_commit', 'off', true)) AS asynchronous_commit"
                " WHERE id = %s", (workflow_id, receipt_id))

    async def prune_refused_receipts(self, older_than: timedelta, limit: int = 1000) -> int:
        """Deletes up to `limit` receipts older than `older_than` that were refused without
        proof of who sent them; returns how many. Accepted, duplicate, unknown_type and
        unexpected_status receipts (signed deliveries) stay. The verdict list is the
        predicate of the partial index webhook_receipts_prunable (migration 0730)."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "DELETE FROM webhook_receipts WHERE id IN (SELECT id FROM webhook_receipts"
                " WHERE verdict IN ('bad_signature', 'stale', 'malformed', 'too_large',"
                " 'unknown_provider', 'forbidden_source') AND received_at < now() - %s"
                " ORDER BY received_at LIMIT %s)", (older_than, limit))
            return cur.rowcount

    async def receipts(self, provider: str, event_id: str | None = None) -> list[dict[str, Any]]:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT id, provider, event_id, event_type, verdict, error, workflow_id, processed_at"
                " FROM webhook_receipts WHERE provider = %s AND (%s::text IS NULL OR event_id = %s)"
                " ORDER BY id", (provider, event_id, event_id))
            return list(await cur.fetchall())

    # -- tokens -----------------------------------------------------------------------

    async def create_token(self, user: str, roles: Sequence[str], token: str | None = None, *,
                           by: str, expires_in: timedelta | None = None) -> str:
        """Makes a bearer token; only its hash is stored, the plaintext is shown once. `by`
        is whoever made it (the audit names them), `expires_in` an optional lifetime."""
        unknown = set(roles) - ROLES
        if unknown or not roles:
            raise ValueError(f"unknown roles {sorted(unknown)}; known: {sorted(ROLES)}")
        if expires_in is not None and expires_in <= timedelta(0):
            raise ValueError("a token's lifetime must be positive")
        plaintext = token or f"rfo_{secrets.token_urlsafe(32)}"
        async with self.transaction() as conn:
            await conn.execute(
                "INSERT INTO api_tokens (user_name, roles, token_hash, expires_at)"
                " VALUES (%s, %s, %s, now() + %s) ON CONFLICT (token_hash) DO NOTHING",
                (user, sorted(set(roles)), hash_token(plaintext), expires_in))
            await self._audit(conn, None, by, "token_created",
                              {"user": user, "roles": sorted(set(roles)),
                               "expires_in_seconds": expires_in.total_seconds() if expires_in else None})
        return plaintext

    async def authenticate(self, token: str) -> Principal | None:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT user_name, roles FROM live_api_tokens WHERE token_hash = %s",
                (hash_token(token),))
            row = await cur.fetchone()
        return Principal(row["user_name"], frozenset(row["roles"])) if row else None

    async def list_tokens(self) -> list[dict[str, Any]]:
        """Every token with its owner, roles and state; a short hash prefix tells tokens
        apart (it matches `token_fingerprint` in refusals) and never the secret itself."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT id, user_name, roles, created_at, revoked_at, expires_at,"
                " substr(token_hash, 1, 12) AS fingerprint FROM api_tokens ORDER BY id")
            return list(await cur.fetchall())

    async def revoke_tokens(self, *, by: str, token_id: int | None = None,
                            user: str | None = None) -> list[int]:
        """Revokes one token, or every token of a user; their console sessions end in the
        same transaction, so nothing made from them works a moment later."""
        if (token_id is None) == (user is None):
            raise ValueError("revoke either one token id or one user's tokens")
        async with self.transaction() as conn:
            cur = await conn.execute(
                "UPDATE api_tokens SET revoked_at = now() WHERE revoked_at IS NULL"
                " AND (id = %s OR user_name = %s) RETURNING id, user_name", (token_id, user))
            revoked = list(await cur.fetchall())
            ids = [int(r["id"]) for r in revoked]
            if ids:
                await conn.execute("UPDATE console_sessions SET ended_at = now()"
                                   " WHERE token_id = ANY(%s) AND ended_at IS NULL", (ids,))
                await self._audit(conn, None, by, "token_revoked",
                                  {"token_ids": ids, "users": sorted({r["user_name"] for r in revoked})})
        return ids

    # -- console sessions -----------------------------------------------------------------

    async def open_session(self, token: str, lifetime: timedelta) -> str | None:
        """Exchanges a valid API token for a console session; returns the session id (shown
        once, to be put in a cookie; only its hash is stored), None for a bad token."""
        session_id, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        async with self.transaction() as conn:
            cur = await conn.execute(
                "INSERT INTO console_sessions (session_hash, token_id, csrf_token, expires_at)"
                " SELECT %s, id, %s, now() + %s FROM live_api_tokens"
                " WHERE token_hash = %s RETURNING id, token_id",
                (hash_token(session_id), csrf, lifetime, hash_token(token)))
            made = await cur.fetchone()
            if made is None:
                return None
            cur = await conn.execute("SELECT user_name, roles FROM api_tokens WHERE id = %s",
                                     (made["token_id"],))
            owner = await cur.fetchone()
            assert owner is not None
            await self._audit(conn, None, owner["user_name"], "console_signed_in",
                              {"session": int(made["id"]), "token_id": int(made["token_id"])})
        return session_id

    async def console_session(self, session_id: str) -> ConsoleSession | None:
        """The live session behind a cookie: not ended, not expired, its token not revoked."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT s.id, s.csrf_token, t.user_name, t.roles FROM console_sessions s"
                " JOIN live_api_tokens t ON t.id = s.token_id"
                " WHERE s.session_hash = %s AND s.ended_at IS NULL AND s.expires_at > now()",
                (hash_token(session_id),))
            row = await cur.fetchone()
        if row is None:
            return None
        return ConsoleSession(int(row["id"]), Principal(row["user_name"], frozenset(row["roles"])),
                              row["csrf_token"])

    async def end_session(self, session: ConsoleSession) -> None:
        async with self.transaction() as conn:
            await conn.execute("UPDATE console_sessions SET ended_at = now()"
                               " WHERE id = %s AND ended_at IS NULL", (session.session_id,))
            await self._audit(conn, None, session.principal.user, "console_signed_out",
                              {"session": session.session_id})

    # -- notices and manual refunds -----------------------------------------------------

    async def queue_notice(self, notice: NoticeInput) -> bool:
        """Puts a notice in the outbox once per dedup key; returns whether it is new."""
        async with self.transaction() as conn:
            return await self.queue_notice_in(conn, notice)

    @classmethod
    async def queue_notice_in(cls, conn: Conn, notice: NoticeInput) -> bool:
        """`queue_notice` inside the caller's transaction."""
        cur = await conn.execute(
            "INSERT INTO notices (dedup_key, refund_request_id, kind, audience, detail)"
            " VALUES (%s,%s,%s,%s,%s) ON CONFLICT (dedup_key) DO NOTHING RETURNING id",
            (notice.dedup_key, notice.refund_request_id, notice.kind, notice.audience,
             _json(notice.detail)))
        if await cur.fetchone() is None:
            return False
        await cls._audit(conn, notice.refund_request_id, "system", "notice_queued",
                         {"kind": notice.kind, "audience": notice.audience})
        return True

    async def notices(self, case_id: str) -> list[dict[str, Any]]:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT kind, audience, detail, delivered_at FROM notices"
                " WHERE refund_request_id = %s ORDER BY id", (case_id,))
            return list(await cur.fetchall())

    async def create_manual_refund(self, request: RefundRequest) -> dict[str, Any]:
        """The instruction ops carry out; one per request, whatever the retries."""
        async with self.transaction() as conn:
            cur = await conn.execute(
                "INSERT INTO manual_refunds (id, refund_request_id, charge_id, amount, currency,"
                " method, status) VALUES (%s,%s,%s,%s,%s,%s,'pending')"
                " ON CONFLICT (refund_request_id) DO NOTHING RETURNING *",
                (f"man_{request.refund_request_id}", request.refund_request_id, request.charge_id,
                 request.amount, request.currency, request.method.value))
            row = await cur.fetchone()
            if row is not None:
                await self._audit(conn, request.refund_request_id, "system", "manual_refund_instructed",
                                  {"method": request.method.value, "amount": request.amount,
                                   "currency": request.currency})
                return row
        found = await self.manual_refund(request.refund_request_id)
        assert found is not None
        return found

    async def manual_refund(self, case_id: str) -> dict[str, Any] | None:
        async with self._pool.connection() as conn:
            cur = await conn.execute("SELECT * FROM manual_refunds WHERE refund_request_id = %s",
                                     (case_id,))
            return await cur.fetchone()

    async def confirm_manual_refund(self, case_id: str, *, succeeded: bool, by: str,
                                    reason: str) -> dict[str, Any] | None:
        """Ops confirm they paid (or could not); only a pending instruction moves."""
        async with self.transaction() as conn:
            cur = await conn.execute(
                "UPDATE manual_refunds SET status = %s, failure_reason = %s, confirmed_by = %s,"
                " confirmed_at = now() WHERE refund_request_id = %s AND status = 'pending'"
                " RETURNING *",
                ("succeeded" if succeeded else "failed", None if succeeded else reason, by, case_id))
            row = await cur.fetchone()
            if row is not None:
                await self._audit(conn, case_id, by, "manual_refund_confirmed",
                                  {"status": row["status"], "reason": reason})
            return row

    async def decisions_since(self, since: datetime) -> list[dict[str, Any]]:
        """Cases with a stored policy decision, newest last (for policy simulation)."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT * FROM refund_cases WHERE decision IS NOT NULL AND created_at >= %s"
                " ORDER BY created_at", (since,))
            return list(await cur.fetchall())

    async def children(self, case_id: str) -> list[dict[str, Any]]:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT * FROM refund_cases WHERE parent_refund_request_id = %s ORDER BY created_at",
                (case_id,))
            return list(await cur.fetchall())
