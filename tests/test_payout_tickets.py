"""Runbook step C files a real ticket: ServiceNow and Jira (loopback fakes at the HTTP
boundary) get exactly one ticket per payout case, also when ServiceNow's create answer is
lost; the reissue updates it; the rollback branch opens it at high priority; the case
records the ticket's reference on its row and timeline."""

import contextlib

import pytest
from temporalio.client import Client

import adapters.tickets.base as tickets_base
from activities.integrations import IntegrationActivities
from adapters.db import Store
from adapters.tickets.base import correlation_key
from domain.payouts import payout_case_id
from starters.dev.stack import TemporalDevServer
from tests.fakes import World, connected_stack
from tests.harness import Stack
from tests.payouts_kit import (
    add_payout_approvers,
    ask_reissue,
    decide,
    move_payout,
    paid_payout,
    wait_for_actions,
    wait_for_case,
)
from tests.test_payouts import approve_while_the_ledger_is_locked

TICKET_PURPOSE = "incident:payout_exception_ticket"


def creates(world: World) -> tuple[int, int]:
    """Tickets created in ServiceNow (create calls) and in Jira."""
    return world.servicenow_calls.count(("POST", "incident")), len(world.jira)


async def sweep(stack: Stack, case_id: str) -> None:
    """What the worker's outbox sweeper does later, for this test's case only: the session
    shares one database, and other tests' undelivered notices must not reach this world."""
    async with stack.store.database.transaction() as conn:
        keys = [r["dedup_key"] for r in await (await conn.execute(
            "SELECT dedup_key FROM notices WHERE refund_request_id = %s AND delivered_at IS NULL"
            " ORDER BY id", (case_id,))).fetchall()]
    delivery = IntegrationActivities(stack.store, stack.settings)
    for key in keys:
        with contextlib.suppress(Exception):  # as the sweeper: a failing channel is recorded
            await delivery.deliver(key)


async def test_p10492_files_one_ticket_in_order_records_its_reference_and_the_reissue_updates_it(
        store: Store, client: Client, temporal_server: TemporalDevServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tickets_base, "LOST_CREATE_RECHECK_SECONDS", 0.5)
    async with connected_stack(store, client, temporal_server) as (stack, world):
        await add_payout_approvers(stack)
        world.servicenow_lost_creates = 1  # ServiceNow creates the incident, its answer is lost
        payout = await paid_payout(stack, 1_250_000, payout_id=f"P-10492-{stack.new_id('t')}")
        await move_payout(stack, payout.provider_payout_id, "settlement_failed",
                          failure_code="bank_rejection")
        case_id = payout_case_id("sandbox", payout.provider_payout_id)
        await wait_for_case(stack, case_id, "awaiting_approval")
        assert (await decide(stack, "fiona", case_id)).status_code == 202
        assert (await decide(stack, "cora", case_id)).status_code == 202
        row = await wait_for_case(stack, case_id, "remediated")

        [incident] = world.servicenow["incident"]
        [issue] = world.jira
        assert creates(world) == (1, 1)
        assert row["ticket_ref"] == f"jira {issue['key']}; servicenow {incident['number']}"
        assert incident["correlation_id"] == correlation_key(case_id, TICKET_PURPOSE)
        assert incident["short_description"] == f"Payout exception {case_id}"
        assert "12500.00 USD" in incident["description"] and "urgency" not in incident
        assert stack.settings.case_url(case_id, payout=True) in incident["description"]
        assert "priority" not in issue["fields"]

        trail = await stack.store.audit.trail(case_id)
        actions = [e["action"] for e in trail]
        steps = ("payout_held", "ledger_posted", "ticket_opened", "ticket_ref_recorded", "runbook_completed")
        assert [actions.count(a) for a in steps] == [1, 1, 1, 1, 1]
        notice = next(i for i, e in enumerate(trail) if e["action"] == "notice_queued"
                      and e["detail"]["kind"] == "payout_exception_remediated")
        order = [actions.index(a) for a in steps[:4]] + [notice, actions.index("runbook_completed")]
        assert order == sorted(order)
        [recorded] = [e["detail"] for e in trail if e["action"] == "ticket_ref_recorded"]
        assert {t["system"] for t in recorded["tickets"]} == {"servicenow", "jira"}
        deliveries = {d["channel"]: d for d in await stack.store.outbox.deliveries(case_id)
                      if d["kind"] == "payout_exception_ticket"}
        assert deliveries["servicenow"]["attempts"] == 1  # its own search past the lag found it
        # the ticket's filing is the ticketing systems' alone: chat and mail carry step D's notice
        assert set(deliveries) == {"servicenow", "jira"}
        completed = next(e for e in trail if e["action"] == "runbook_completed")
        assert completed["detail"]["ticket_ref"] == row["ticket_ref"]
        remediated = next(n for n in await stack.store.outbox.notices(case_id)
                          if n["kind"] == "payout_exception_remediated")
        assert remediated["detail"]["ticket_ref"] == row["ticket_ref"]

        assert (await ask_reissue(stack, "omar", case_id)).status_code == 202
        assert (await decide(stack, "fiona", case_id)).status_code == 202
        assert (await decide(stack, "cora", case_id)).status_code == 202
        await wait_for_case(stack, case_id, "reissued")
        assert creates(world) == (1, 1)  # updated, not created again
        [note] = incident["work_notes_history"]
        assert f"reissued as {payout.reissue_id()}" in note
        [comment] = world.jira_comments[issue["key"]]
        assert payout.reissue_id() in str(comment)
        actions = [e["action"] for e in await stack.store.audit.trail(case_id)]
        assert actions.count("ticket_updated") == 1 and actions.count("ticket_ref_recorded") == 1

        await sweep(stack, case_id)  # the approval round's notices file no refund-request ticket
        assert creates(world) == (1, 1) and "u_refund_request" not in world.servicenow


async def test_the_rollback_branch_opens_one_high_priority_ticket(
        store: Store, client: Client, temporal_server: TemporalDevServer, postgres_dsn: str) -> None:
    async with connected_stack(store, client, temporal_server,
                               ledger_pending_after_seconds=2) as (stack, world):
        await add_payout_approvers(stack)
        case_id = await approve_while_the_ledger_is_locked(stack, postgres_dsn, "rolled_back")
        row = await wait_for_case(stack, case_id, "rolled_back")

        [incident] = world.servicenow["incident"]
        [issue] = world.jira
        assert creates(world) == (1, 1)
        assert (incident["impact"], incident["urgency"]) == ("1", "2")  # priority 2 - High
        assert issue["fields"]["priority"] == {"name": "High"}
        assert incident["short_description"] == f"Payout exception {case_id}"
        assert "Priority: high; occasion: ledger_failed" in incident["description"]
        assert row["ticket_ref"] == f"jira {issue['key']}; servicenow {incident['number']}"
        await wait_for_actions(stack, case_id, "ticket_ref_recorded")

