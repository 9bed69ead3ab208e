"""The database handle: the connection pool, transactions and the schema's migrations.

One per process. The repositories (`adapters/db/*.py`) share it; none holds a pool of
its own.
"""

import json
import select
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from importlib import resources
from typing import Any, LiteralString

from psycopg import AsyncConnection, sql
from psycopg.abc import Params
from psycopg.rows import DictRow, dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from adapters.config import connection_parts
from adapters.telemetry import trace_connection
from domain.audit import canonical_detail

Conn = AsyncConnection[DictRow]
Statement = LiteralString | sql.SQL | sql.Composed


def jsonb(value: Any) -> Jsonb:
    """A value for a `jsonb` column, canonical (sorted keys) when it is a mapping: the
    audit chain hashes details in this form."""
    return Jsonb(canonical_detail(value) if isinstance(value, dict) else json.loads(json.dumps(value)))


async def check_if_server_spoke(conn: Conn) -> None:
    """The pool's checkout check without a round trip per transaction: an idle connection's
    socket has nothing to read unless the server closed it or spoke out of turn (a restart, an
    administrator's terminate, an idle timeout), and only then is it probed; a dead one
    raises, and the pool replaces it instead of handing it out."""
    idle_socket = select.poll()
    idle_socket.register(conn.fileno(), select.POLLIN)
    if idle_socket.poll(0):
        await AsyncConnectionPool.check_connection(conn)


class Database:
    """The pool every repository draws its connections from."""

    def __init__(self, pool: AsyncConnectionPool[Conn]) -> None:
        self._pool = pool

    @classmethod
    async def open(cls, dsn: str, *, min_size: int = 1, max_size: int = 10) -> "Database":
        connection_parts(dsn, "the database URL")  # unreadable: refused here, never quoted by the pool's log
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

    def connection(self) -> AbstractAsyncContextManager[Conn]:
        """A connection in autocommit: each statement its own transaction."""
        return self._pool.connection()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Conn]:
        async with self._pool.connection() as conn, conn.transaction():
            yield conn

    async def execute(self, query: Statement, params: Params | None = None) -> int:
        """Runs one statement on its own (autocommit: one round trip); the rows it touched."""
        async with self._pool.connection() as conn:
            return (await conn.execute(query, params)).rowcount

    async def fetch_all(self, query: Statement, params: Params | None = None) -> list[dict[str, Any]]:
        """The rows of one statement, run on its own (autocommit: one round trip)."""
        async with self._pool.connection() as conn:
            return list(await (await conn.execute(query, params)).fetchall())

    async def fetch_one(self, query: Statement, params: Params | None = None) -> dict[str, Any] | None:
        """The first row of one statement, run on its own; None when there is none."""
        async with self._pool.connection() as conn:
            return await (await conn.execute(query, params)).fetchone()

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
            # a head deleted wedges its chain; the approvals projection the duty checks read;
            # the (provider, event id) gate that makes a redelivery act once
            "REVOKE DELETE, TRUNCATE ON audit_heads, webhook_events FROM {grantee}",
            "REVOKE UPDATE, DELETE, TRUNCATE ON case_approvals FROM {grantee}",
            "REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON schema_migrations FROM {grantee}",
        ):
            await conn.execute(sql.SQL(statement).format(schema=schema, grantee=grantee))


class Repository:
    """One aggregate's SQL over the shared database."""

    def __init__(self, database: Database) -> None:
        self._db = database
