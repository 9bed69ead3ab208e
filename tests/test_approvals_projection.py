"""The approvals a case shows come from the `case_approvals` projection, written in the
same transaction as each approval step's audit row, not parsed back out of the trail; the
migration that made the table fills it from the trail, so older cases keep theirs."""

from importlib import resources
from typing import Any

from tests.harness import Stack
from tests.test_approvals import case_view, decide

PROJECTION = "0760_approvals_projection.sql"


async def projected(stack: Stack, case_id: str) -> list[dict[str, Any]]:
    """The case's projection rows beside the audit rows they were written with."""
    async with stack.store.database.transaction() as conn:
        cur = await conn.execute(
            "SELECT p.approver, p.action, p.reason, p.occurred_at, e.actor, e.action AS audited,"
            " e.occurred_at AS audited_at FROM case_approvals p"
            " LEFT JOIN audit_events e ON e.chain = p.chain AND e.seq = p.seq"
            " WHERE p.chain = %s ORDER BY p.seq", (case_id,))
        return list(await cur.fetchall())


def shown(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [(r["approver"], r["action"], r["reason"]) for r in rows if r["action"] != "approval_requested"]


async def view_approvals(stack: Stack, case_id: str) -> list[tuple[str, str, str]]:
    """The approvals the API shows for the case."""
    return [(a["approver"], a["action"], a["reason"]) for a in (await case_view(stack, case_id))["approvals"]]


async def test_the_approvals_shown_are_the_projection_of_the_audit_rows(stack: Stack) -> None:
    charge = await stack.charge(20_000)
    case_id = await stack.request_refund("alice", charge, 9_000)
    await stack.wait_for_status(case_id, "awaiting_approval")
    # the requester, holding the approver role: refused by the workflow, audited by the relay
    dual = await stack.store.access.create_token("alice", ["requester", "approver"], by="test")
    refused = await decide(stack, "alice", case_id, "approve", token=dual)
    assert refused.status_code == 403, refused.text
    granted = await decide(stack, "bob", case_id, "approve", "customer called")
    assert granted.status_code == 202, granted.text
    await stack.wait_for_status(case_id, "succeeded")

    rows = await projected(stack, case_id)
    assert [r["action"] for r in rows] == ["approval_requested", "approval_refused", "approval_granted"]
    for row in rows:  # each one is the audit row it was written with
        assert (row["approver"], row["action"], row["occurred_at"]) == (
            row["actor"], row["audited"], row["audited_at"])
    assert shown(rows)[-1] == ("bob", "approval_granted", "customer called")
    assert await view_approvals(stack, case_id) == shown(rows)

    # The view reads the projection: without its rows the case shows no approvals ...
    async with stack.store.database.transaction() as conn:
        await conn.execute("DELETE FROM case_approvals WHERE chain = %s", (case_id,))
    assert await view_approvals(stack, case_id) == []
    # ... and the migration's backfill from the trail brings them back as they were.
    async with stack.store.database.transaction() as conn:
        await conn.execute(resources.files("adapters.migrations").joinpath(PROJECTION).read_text())
    assert await projected(stack, case_id) == rows
    assert await view_approvals(stack, case_id) == shown(rows)
