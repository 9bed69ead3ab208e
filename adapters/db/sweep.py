"""What the closed-workflow sweep of refund cases and of payout cases share: finding the
cases idle long enough to ask Temporal about, and the `incident` run a swept case's break
is filed under."""

from datetime import UTC, datetime
from typing import Any

from psycopg import sql

from adapters.db.database import Conn
from domain.reconciliation import BreakClass


async def idle_unswept(conn: Conn, *, table: str, key: str, still_open: sql.Composable,
                       open_values: list[str], idle_seconds: float, limit: int,
                       after: tuple[datetime, str] | None) -> list[dict[str, Any]]:
    """Rows of `table` that `still_open` (its `%s` is `open_values`) keeps open, untouched for
    `idle_seconds`, without a `workflow_closed` break yet and not seen left as they should be
    since they last moved (`mark_end_seen`), by last update then `key`, from `after` on (the
    sweep's page cursor)."""
    query = sql.SQL(
        "SELECT * FROM {table} c WHERE {still_open}"
        " AND updated_at < now() - make_interval(secs => %s)"
        " AND workflow_end_seen_at IS DISTINCT FROM updated_at"
        " AND NOT EXISTS (SELECT 1 FROM reconciliation_breaks b"
        "                 WHERE b.refund_request_id = c.{key} AND b.break_class = %s)"
        " AND (updated_at, {key}) > (%s, %s)"
        " ORDER BY updated_at, {key} LIMIT %s").format(
            table=sql.Identifier(table), key=sql.Identifier(key), still_open=still_open)
    cur = await conn.execute(query, (open_values, idle_seconds, BreakClass.WORKFLOW_CLOSED.value,
                                     *(after or (datetime.min.replace(tzinfo=UTC), "")), limit))
    return list(await cur.fetchall())


async def mark_end_seen(conn: Conn, *, table: str, key: str, case_id: str, seen_updated_at: datetime) -> None:
    """The case's workflow ended leaving it as it should be: the sweep does not ask about it
    again until it moves. The mark is the `updated_at` the sweep saw (not a time: a write
    that began before the mark and commits after it stamps an earlier `now()`, yet differs);
    not marked when the case moved since the sweep read it."""
    await conn.execute(sql.SQL(
        "UPDATE {table} SET workflow_end_seen_at = updated_at WHERE {key} = %s AND updated_at = %s").format(
            table=sql.Identifier(table), key=sql.Identifier(key)), (case_id, seen_updated_at))


async def open_incident_run(conn: Conn, run_id: str, provider: str, requested_by: str) -> None:
    """The completed `incident` run a break raised outside a reconciliation run is found by
    (a break needs the run that found it); once per id."""
    await conn.execute(
        "INSERT INTO reconciliation_runs (id, provider, task_queue, kind, window_start, window_end,"
        " requested_by, state, finished_at) VALUES (%s,%s,'','incident', now() - interval '1 second',"
        " now(), %s, 'completed', now()) ON CONFLICT (id) DO NOTHING",
        (run_id, provider, requested_by))
