"""Health checks shared by the relay's and the worker's /readyz and by `refunds doctor`.

Each check returns a sentence naming what is wrong (and what to do), or None when fine.
"""

import asyncio
import logging
from datetime import timedelta
from importlib import resources

import psycopg
from starlette.responses import JSONResponse
from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from adapters.db import Store

CHECK_SECONDS = 5
UNANSWERED = f"did not answer within {CHECK_SECONDS} s"
log = logging.getLogger(__name__)


def packaged_migrations() -> list[str]:
    """Versions of the SQL migrations shipped with this build, in order."""
    return sorted(f.name.removesuffix(".sql") for f in resources.files("adapters.migrations").iterdir()
                  if f.name.endswith(".sql"))


async def temporal_problem(client: Client) -> str | None:
    """Temporal answers and the client's namespace exists.

    With the client's own retries, bounded by CHECK_SECONDS as a whole: a raw service call
    retries nothing by default, and the server rotates connections (at its max connection age,
    5 minutes in the dev server), so a call caught in the switch fails CANCELLED while Temporal
    is fine.
    """
    target = client.service_client.config.target_host
    try:
        await asyncio.wait_for(client.workflow_service.describe_namespace(
            DescribeNamespaceRequest(namespace=client.namespace), retry=True,
            timeout=timedelta(seconds=CHECK_SECONDS)),
            CHECK_SECONDS)
    except TimeoutError:
        return f"Temporal at {target} {UNANSWERED}"
    except RPCError as exc:
        if exc.status is RPCStatusCode.NOT_FOUND:
            return f"namespace {client.namespace!r} does not exist at Temporal {target}"
        return f"Temporal at {target} answered {exc.status.name}: {exc.message}"
    return None


async def applied_migrations(store: Store) -> set[str]:
    """Versions recorded in schema_migrations; none before the first `refunds migrate`."""
    async with store.database.transaction() as conn:
        exists = await (await conn.execute(
            "SELECT to_regclass('schema_migrations') IS NOT NULL AS ok")).fetchone()
        if not (exists and exists["ok"]):
            return set()
        rows = await (await conn.execute("SELECT version FROM schema_migrations")).fetchall()
        return {str(r["version"]) for r in rows}


async def database_problem(store: Store) -> str | None:
    """PostgreSQL answers within CHECK_SECONDS (the pool's own checkout wait is 30 s, longer
    than a probe waits) and every shipped migration is applied."""
    try:
        applied = await asyncio.wait_for(applied_migrations(store), CHECK_SECONDS)
    except TimeoutError:
        return f"PostgreSQL {UNANSWERED} (no free pooled connection, or the server is stuck)"
    except (psycopg.Error, OSError) as exc:
        return f"PostgreSQL query failed: {exc}"
    missing = [v for v in packaged_migrations() if v not in applied]
    if missing:
        return f"PostgreSQL lacks migrations {', '.join(missing)}: run `refunds migrate`"
    return None


class DatabaseNotReady(RuntimeError):
    """The database lacks a migration of this release, or does not answer: a process refuses
    to start on it (the CLI exits 3 with the message)."""


async def require_migrated(store: Store) -> None:
    """Every command but `migrate` refuses such a database, the relay and the worker too: a
    release rolled out before its migrations would run new code against the old schema."""
    if (problem := await database_problem(store)) is not None:
        raise DatabaseNotReady(problem)


async def readiness(client: Client, store: Store, *extra: str) -> JSONResponse:
    """A /readyz answer: 200 when nothing is wrong, 503 otherwise, every problem logged. The two
    checks run at once, so the answer comes within one CHECK_SECONDS, inside a probe's timeout."""
    found = await asyncio.gather(temporal_problem(client), database_problem(store))
    problems = [*extra, *(p for p in found if p)]
    if problems:  # the probe's caller (anyone) sees only the status; the reasons, which name
        log.warning("not ready: %s", "; ".join(problems))  # hosts and users, go to the log
    return JSONResponse({"status": "unready" if problems else "ready"},
                        status_code=503 if problems else 200)
