"""Cancel and terminate at every stage leave nothing stuck (issue 18, item 4): a cancelled
case releases its reservation, or follows a refund the provider holds to the ledger; a case
whose workflow was terminated is found by the sweep, handed to ops with a reconciliation
break, and released only where the provider holds no refund."""

import asyncio
import copy
from collections.abc import AsyncIterator
from typing import Any, cast

import psycopg
import pytest
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

import workers.case_sweep
from adapters.db import CaseCreation, Store
from adapters.notify.message import render
from adapters.providers.base import ProviderAdapter
from domain.models import ProviderRefund, RefundRequest
from starters.dev.stack import TemporalDevServer
from tests.harness import (
    Stack,
    foreign_refund_event,
    holding_records_of,
    open_stack,
    stack_with,
    unsealing,
    write_held,
)
from workers.case_sweep import sweep_cases_once
from workflows.refund import RefundWorkflow

STAGES = ("validating", "awaiting_approval", "executing", "verifying", "succeeded_watching")
SMALL, LARGE = 1_000, 9_000  # auto-approved; needs an approver


@pytest.fixture
async def quick(store: Store, client: Client, temporal_server: TemporalDevServer) -> AsyncIterator[Stack]:
    """A stack without a worker yet (the validating stage starts it late), short horizons."""
    opened = await open_stack(store, client, temporal_server.address, worker=False,
                              submit_timeout_seconds=3, late_failure_window_seconds=60)
    yield opened
    await opened.close()


async def _fault(stack: Stack, **fault: Any) -> None:
    async with stack.sandbox() as sb:
        (await sb.post("/_sandbox/faults", json=fault)).raise_for_status()


async def _to_stage(stack: Stack, stage: str) -> tuple[str, str]:
    """A case held at `stage`; returns (case id, charge id)."""
    charge = await stack.charge(20_000)
    if stage != "validating":
        await stack.start_worker()
    if stage == "executing":  # the refund is made, its answer comes after the client gave up
        await _fault(stack, mode="timeout_after_success", seconds=2.5)
    if stage == "verifying":  # every create fails before a refund exists: verify, wait, again
        await _fault(stack, mode="error_before", times=100)
    case_id = await stack.request_refund("alice", charge, LARGE if stage == "awaiting_approval" else SMALL)
    if stage == "awaiting_approval":
        await stack.wait_for_status(case_id, "awaiting_approval")
    elif stage == "executing":
        await stack.wait_for_audit(case_id, "provider_submit_started")
    elif stage == "verifying":
        await stack.wait_for_audit(case_id, "verify_state")
    elif stage == "succeeded_watching":
        await stack.wait_for_status(case_id, "succeeded")
    return case_id, charge


async def _break(stack: Stack, case_id: str) -> dict[str, Any] | None:
    async with stack.store.database.transaction() as conn:
        cur = await conn.execute("SELECT * FROM reconciliation_breaks WHERE refund_request_id = %s"
                                 " AND break_class = 'workflow_closed'", (case_id,))
        return await cur.fetchone()


async def _answer(stack: Stack, user: str, path: str, body: dict[str, Any]) -> tuple[int, str]:
    async with stack.api(user) as api:
        response = await api.post(path, json=body)
    return response.status_code, response.text


@pytest.mark.parametrize("stage", STAGES)
async def test_cancel_at_each_stage(quick: Stack, stage: str) -> None:
    case_id, charge = await _to_stage(quick, stage)
    handle = quick.client.get_workflow_handle(case_id)
    await handle.cancel()
    if stage == "validating":
        await quick.start_worker()
    await handle.result()
    row = await quick.store.cases.get(case_id)
    assert row is not None
    refunds = await quick.provider_refunds(charge)
    if stage in ("executing", "succeeded_watching"):  # the provider holds a refund: followed, posted
        assert row["status"] == "succeeded" and len(refunds) == 1
        assert row["provider_refund_id"] == refunds[0]["id"]
        assert {e["template"] for e in await quick.store.ledger.entries(case_id)} == {"refund_settled"}
        assert "cancel_after_provider_refund" in await quick.actions(case_id)
    else:
        assert (row["status"], row["reserved_amount"], refunds) == ("canceled_by_ops", 0, [])
        assert await quick.store.ledger.entries(case_id) == []
        assert "canceled_by_ops" in await quick.actions(case_id)


@pytest.mark.parametrize("stage", STAGES)
async def test_terminate_at_each_stage_is_swept_to_ops(quick: Stack, stage: str) -> None:
    case_id, charge = await _to_stage(quick, stage)
    before = await quick.store.cases.get(case_id)
    assert before is not None
    await quick.client.get_workflow_handle(case_id).terminate("terminated in the Temporal UI")
    if stage == "awaiting_approval":  # before the sweep: a clear 409, not a 500
        status, text = await _answer(quick, "bob", f"/v1/refund-requests/{case_id}/approvals",
                                     {"decision": "approve"})
        assert status == 409 and "workflow has ended (terminated)" in text, text
    swept = await sweep_cases_once(quick.store, quick.client, quick.providers, idle_seconds=0)
    row = await quick.store.cases.get(case_id)
    assert row is not None
    found = await _break(quick, case_id)
    if stage == "succeeded_watching":  # final already: nothing to hand over
        assert case_id not in swept and found is None
        assert row["status"] == "succeeded"
        return
    assert case_id in swept and row["status"] == "ops_review"
    assert found is not None and found["state"] == "ops_review"
    assert found["evidence"]["workflow_status"] == "TERMINATED"
    refunds = await quick.provider_refunds(charge)
    if stage == "executing":  # the provider holds the refund: the reservation stays
        assert len(refunds) == 1 and row["reserved_amount"] == SMALL
        assert found["evidence"]["provider_holds_refund"] is True
    else:
        assert refunds == [] and row["reserved_amount"] == 0
    assert "workflow_closed_case_swept" in await quick.actions(case_id)
    notice = await quick.store.outbox.notice(f"{case_id}:workflow_closed")
    assert notice is not None
    told = render(notice, row, None, case_url=None, email_to=None)  # what ops read: the facts
    assert ("TERMINATED" in told.text and f"break {found['id']}" in told.text
            and told.ticket == "incident"), told
    assert ("provider holds" in told.text) and str(found["evidence"]["provider_holds_refund"]) in told.text
    for user, path, body in (("bob", f"/v1/refund-requests/{case_id}/approvals", {"decision": "approve"}),
                             ("olga", f"/v1/refund-requests/{case_id}/reissue", {"reason": "retry"})):
        status, text = await _answer(quick, user, path, body)
        assert status == 409 and "ops_review" in text, (path, text)
    assert case_id not in await sweep_cases_once(quick.store, quick.client, quick.providers, idle_seconds=0)


async def test_a_cancel_waits_out_a_create_that_lands_after_the_client_gave_up(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    """Cancelled while the create is at the provider: the client gives up (2 s), and the
    provider acts on it 4.8 s after it arrived, inside the horizon (the call's end plus a
    3 s margin). The last lookup comes after that horizon (8 s after the cancel; before,
    after the 3 s submit timeout), so the refund is found, followed and booked, not left at
    the provider under a case released as `canceled_by_ops`."""
    async with stack_with(store, client, temporal_server.address, submit_timeout_seconds=3,
                          resubmit_margin_seconds=3) as quick:
        charge, case_id = await _cancelled_while_the_create_lands(quick)
        refunds = await quick.provider_refunds(charge)
        for _ in range(150):  # the provider acts 4.8 s after the create came, whatever we did
            if refunds:
                break
            await asyncio.sleep(0.1)
            refunds = await quick.provider_refunds(charge)
        row = await quick.store.cases.get(case_id)
        assert row is not None and len(refunds) == 1, (row, refunds)
        assert (row["status"], row["provider_refund_id"]) == ("succeeded", refunds[0]["id"])
        assert {e["template"] for e in await quick.store.ledger.entries(case_id)} == {"refund_settled"}
        assert "cancel_after_provider_refund" in await quick.actions(case_id)


async def test_a_cancel_follows_the_refund_its_webhook_reported_when_the_lookup_misses_it(
        quick: Stack) -> None:
    """Cancelled while the create is at the provider: the provider made the refund and its
    webhook reached the case while it waited out the horizon, but the one lookup after it
    missed the refund (a list that lags the write). The case was released as
    `canceled_by_ops` with the money gone and nothing booked, the event in hand unread.
    The refund the case was told of is followed and booked."""
    charge = await quick.charge(20_000)
    await quick.start_worker()
    await _fault(quick, mode="timeout_after_success", seconds=2.5)
    await _fault(quick, mode="lookup_empty", times=50, charge=charge)
    case_id = await quick.request_refund("alice", charge, SMALL)
    await quick.wait_for_audit(case_id, "provider_submit_started")
    await quick.wait_for_signalled(case_id)  # the webhook is in the case's inbox before the cancel
    handle = quick.client.get_workflow_handle(case_id)
    await handle.cancel()
    await handle.result()
    row = await quick.store.cases.get(case_id)
    refunds = await quick.provider_refunds(charge)
    assert row is not None and len(refunds) == 1, (row, refunds)
    assert (row["status"], row["provider_refund_id"]) == ("succeeded", refunds[0]["id"])
    assert {e["template"] for e in await quick.store.ledger.entries(case_id)} == {"refund_settled"}
    actions = await quick.actions(case_id)
    assert "provider_notification_received" in actions and "canceled_by_ops" not in actions, actions


async def test_a_refund_reported_as_the_cancelled_run_ends_is_followed(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    """As above, but the refund's webhook comes once `canceled_by_ops` is written, while the
    run waits for its last writes before it ends (here a refused forgery's record): the
    workflow is running, so the relay signals it, and the run ended with the event unread:
    released, nothing booked, the money gone. A run that ends without a refund after a
    submit takes a refund its inbox reports and follows it."""
    async with stack_with(store, client, temporal_server.address, submit_timeout_seconds=3,
                          late_failure_window_seconds=60) as stack:
        case_id, charge = await reported_as_the_cancelled_run_ends(stack)
        row = await stack.store.cases.get(case_id)
        refunds = await stack.provider_refunds(charge)
        entries = {e["template"] for e in await stack.store.ledger.entries(case_id)}
    assert row is not None and len(refunds) == 1, (row, refunds)
    assert (row["status"], row["provider_refund_id"]) == ("succeeded", refunds[0]["id"]), row
    assert row["reserved_amount"] == SMALL  # the cancel released it: the refund holds it again
    assert entries == {"refund_settled"}


async def reported_as_the_cancelled_run_ends(stack: Stack) -> tuple[str, str]:
    """A create the provider makes while its answer is lost and the lookups miss it; the case
    cancelled; its webhook held until `canceled_by_ops` is written and delivered while the
    run waits for a forgery's refused record; the run ended: (case id, charge)."""
    charge = await stack.charge(20_000)
    await _fault(stack, mode="timeout_after_success", seconds=2.5)
    await _fault(stack, mode="lookup_empty", times=50, charge=charge)
    async with stack.sandbox() as sb:
        (await sb.post("/_sandbox/config", json={"hold_webhooks": True})).raise_for_status()
    case_id = await stack.request_refund("alice", charge, SMALL)
    await stack.wait_for_audit(case_id, "provider_submit_started")
    handle = stack.client.get_workflow_handle(case_id)
    async with holding_records_of(stack, "provider_event_refused") as (release, held):
        forged = foreign_refund_event("sandbox", case_id, charge, SMALL, "USD")
        forger = unsealing(stack.client).get_workflow_handle(case_id)
        await forger.signal(RefundWorkflow.provider_event, forged)
        await asyncio.wait_for(held.wait(), 60)
        await handle.cancel()
        await stack.wait_for_audit(case_id, "canceled_by_ops")
        async with stack.sandbox() as sb:
            assert (await sb.post("/_sandbox/release-webhooks")).json()["released"] >= 1
        await stack.wait_for_signalled(case_id)
        release.set()
        await asyncio.wait_for(handle.result(), 60)
    async with stack.sandbox() as sb:
        (await sb.post("/_sandbox/config", json={"hold_webhooks": False})).raise_for_status()
    return case_id, charge


async def _cancelled_while_the_create_lands(quick: Stack) -> tuple[str, str]:
    """A create the provider acts on 4.8 s after it came, its case cancelled once the submit
    began, the workflow ended: (charge, case id)."""
    charge = await quick.charge(20_000)
    await _fault(quick, mode="acts_after_give_up", seconds=4.8)
    case_id = await quick.request_refund("alice", charge, SMALL)
    await quick.wait_for_audit(case_id, "provider_submit_started")
    handle = quick.client.get_workflow_handle(case_id)
    await handle.cancel()
    await handle.result()
    return charge, case_id


async def test_a_repeat_of_a_request_already_handed_to_ops_starts_nothing(stack: Stack) -> None:
    """The relay stored a request and died before its workflow started; the sweep handed the
    case to ops (no workflow, reservation released). The caller's retry, or any later start
    of the same id, must not run it behind ops' back: only a case no workflow ever moved
    (`requested`) is started."""
    charge = await stack.charge(10_000)
    body = stack.refund_body(charge, 1_500)
    case_id = body["refund_request_id"]
    created, _ = await stack.store.cases.create(RefundRequest.model_validate(
        {**body, "source": "api"}), "alice")
    assert created is CaseCreation.CREATED
    await stack.store.database.execute(  # idle since long before the sweep looks
        "UPDATE refund_cases SET updated_at = now() - interval '2 hours' WHERE refund_request_id = %s",
        (case_id,))
    assert case_id in await sweep_cases_once(stack.store, stack.client, stack.providers, idle_seconds=60)
    async with stack.api("alice") as api:
        again = await api.post("/v1/refund-requests", json=body)
    assert again.status_code == 200 and again.json()["status"] == "ops_review", again.text
    with pytest.raises(RPCError):  # no workflow: ops decide what happens to the request
        await stack.client.get_workflow_handle(case_id).describe()
    row = await stack.store.cases.get(case_id)
    assert row is not None and (row["status"], row["reserved_amount"]) == ("ops_review", 0)
    assert await stack.provider_refunds(charge) == []


async def test_a_request_whose_start_found_temporal_away_waits_for_its_retry(stack: Stack) -> None:
    """The relay stored a request, its start found Temporal away (503: "send the same request
    again"). Once Temporal answers, the sweep found the case idle past its five minutes with
    no workflow and handed it to ops, so the caller's retry started nothing (every request
    of the outage became an ops ticket; reproduced). A case no workflow ever moved waits an
    hour for its retry; the retry starts it."""
    charge = await stack.charge(10_000)
    body = stack.refund_body(charge, 1_500)
    case_id = body["refund_request_id"]
    await stack.store.cases.create(RefundRequest.model_validate({**body, "source": "api"}), "alice")
    await stack.store.database.execute(  # the outage lasted ten minutes
        "UPDATE refund_cases SET updated_at = now() - interval '10 minutes' WHERE refund_request_id = %s",
        (case_id,))
    assert case_id not in await sweep_cases_once(stack.store, stack.client, stack.providers, idle_seconds=60)
    async with stack.api("alice") as api:
        again = await api.post("/v1/refund-requests", json=body)
    assert again.status_code == 200, again.text
    await stack.wait_for_status(case_id, "succeeded")
    assert [r["amount"] for r in await stack.provider_refunds(charge)] == [1_500]


class LookupBreaksOn:
    """The sandbox adapter, whose lookup of one charge's refund fails in a way no adapter
    names (a bug, an unreadable answer)."""

    def __init__(self, provider: ProviderAdapter, charge_id: str) -> None:
        self._provider, self._charge_id = provider, charge_id

    async def find_refund(self, request: RefundRequest) -> ProviderRefund | None:
        if request.charge_id == self._charge_id:
            raise RuntimeError("unexpected answer")
        return await self._provider.find_refund(request)


async def executing_case(stack: Stack, hours_idle: int, *, submitted: bool) -> dict[str, Any]:
    """A case left `executing` `hours_idle` ago with no workflow (its submit started then, or
    none): what the sweep hands to ops. Returns its request body."""
    body = stack.refund_body(await stack.charge(10_000), 1_000)
    await stack.store.cases.create(RefundRequest.model_validate({**body, "source": "api"}), "alice")
    await stack.store.database.execute(
        "UPDATE refund_cases SET status = 'executing',"
        " submission_started_at = CASE WHEN %s THEN now() - %s * interval '1 hour' END,"
        " updated_at = now() - %s * interval '1 hour' WHERE refund_request_id = %s",
        (submitted, hours_idle, hours_idle, body["refund_request_id"]))
    return body


async def test_a_lookup_that_fails_unexpectedly_hands_the_case_to_ops_as_cannot_tell(stack: Stack) -> None:
    """Two executing cases whose workflows are gone; the provider's lookup of the first fails
    in a way no adapter names (a bug, an unreadable answer). It was left for the next pass,
    every pass: a dead case holding its reservation, no break, no notice (reproduced). Its
    workflow is gone either way: ops get it, the provider's word unknown, the hold kept."""
    broken, readable = [await executing_case(stack, hours, submitted=True) for hours in (3, 2)]
    await stack.store.database.execute(  # its hold, as its validation took it
        "UPDATE refund_cases SET reserved_amount = amount WHERE refund_request_id = %s",
        (broken["refund_request_id"],))
    providers = {**stack.providers, "sandbox": cast(ProviderAdapter, LookupBreaksOn(
        stack.providers["sandbox"], broken["charge_id"]))}
    swept = await sweep_cases_once(stack.store, stack.client, providers, idle_seconds=60)
    assert {broken["refund_request_id"], readable["refund_request_id"]} <= set(swept)
    row = await stack.store.cases.get(broken["refund_request_id"])
    assert row is not None and (row["status"], row["reserved_amount"]) == ("ops_review", 1_000)
    found = await _break(stack, broken["refund_request_id"])
    assert found is not None and found["evidence"]["provider_holds_refund"] is None


async def test_a_case_the_sweep_cannot_write_holds_up_no_other(
        stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two executing cases whose workflows are gone; handing the first to ops fails (a
    database error on its row). The second is still handed to ops in that pass (before, the
    pass ended at the first, and every pass after it again: no case behind it was swept)."""
    broken, readable = [(await executing_case(stack, hours, submitted=False))["refund_request_id"]
                        for hours in (3, 2)]
    sweep_closed = stack.store.cases.sweep_closed

    async def fails_for_broken(case_id: str, **kwargs: Any) -> bool:
        if case_id == broken:
            raise psycopg.errors.QueryCanceled("canceling statement due to statement timeout")
        return await sweep_closed(case_id, **kwargs)

    monkeypatch.setattr(stack.store.cases, "sweep_closed", fails_for_broken)
    swept = await sweep_cases_once(stack.store, stack.client, stack.providers, idle_seconds=60)
    assert readable in swept and broken not in swept
    row = await stack.store.cases.get(broken)
    assert row is not None and row["status"] == "executing"  # left for a later pass


RATE_LIMITED = RPCError("rate limited", RPCStatusCode.RESOURCE_EXHAUSTED, b"")


class DescribeFailsFor:
    """A Temporal client whose describe of one workflow (None: every one) fails: rate
    limited (by default), or with an answer the SDK cannot read (a status newer than it,
    such as a paused workflow's)."""

    def __init__(self, client: Client, workflow_id: str | None,
                 error: Exception = RATE_LIMITED) -> None:
        self._client, self._workflow_id, self._error = client, workflow_id, error

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def get_workflow_handle(self, workflow_id: str, **kwargs: Any) -> Any:
        handle = self._client.get_workflow_handle(workflow_id, **kwargs)
        if self._workflow_id not in (None, workflow_id):
            return handle
        failing = copy.copy(handle)

        async def describe(*_: Any, **__: Any) -> Any:
            raise self._error

        failing.describe = describe  # type: ignore[method-assign]
        return failing


@pytest.mark.parametrize("error", [RATE_LIMITED, ValueError("8 is not a valid WorkflowExecutionStatus")],
                         ids=["rate_limited", "status_the_sdk_cannot_read"])
async def test_a_case_temporal_cannot_describe_holds_up_no_other(
        stack: Stack, monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    """Temporal refuses one case's describe (rate limited), or answers with a status the SDK
    cannot read (a paused workflow, newer than it): that case waits for the next pass, the
    cases behind it are still swept. The failure left the generator and ended the pass, every
    pass (payout cases were then never reached; reproduced for both: the readable case was
    not swept)."""
    refused, readable = [(await executing_case(stack, hours, submitted=False))["refund_request_id"]
                         for hours in (3, 2)]
    swept = await sweep_cases_once(stack.store, cast(Client, DescribeFailsFor(stack.client, refused, error)),
                                   stack.providers, idle_seconds=60)
    assert readable in swept and refused not in swept
    row = await stack.store.cases.get(refused)
    assert row is not None and row["status"] == "executing"  # left for a later pass
    # describes failing in a row say Temporal is away: the pass ends (one case is left here)
    monkeypatch.setattr(workers.case_sweep, "FAILED_DESCRIBES_END_A_PASS", 1)
    with pytest.raises(RPCError):
        await sweep_cases_once(stack.store, cast(Client, DescribeFailsFor(stack.client, None)),
                               stack.providers, idle_seconds=60)


async def test_a_stopping_worker_s_sweep_hands_over_no_more_cases(stack: Stack) -> None:
    """The worker was told to stop: the pass in hand ends before its next case (a long pass
    ran on, holding up the worker's shutdown past its grace period)."""
    body = await executing_case(stack, 2, submitted=False)
    stop = asyncio.Event()
    stop.set()
    stopped = await sweep_cases_once(stack.store, stack.client, stack.providers, idle_seconds=60, stop=stop)
    assert stopped == []
    row = await stack.store.cases.get(body["refund_request_id"])
    assert row is not None and row["status"] == "executing"
    assert body["refund_request_id"] in await sweep_cases_once(stack.store, stack.client, stack.providers,
                                                               idle_seconds=60)


async def test_a_case_two_workers_sweep_is_handed_to_ops_once(stack: Stack) -> None:
    """Every worker runs the sweep: the second to reach a closed case (its row lock waits for
    the first) finds the break already opened and writes nothing more."""
    body = stack.refund_body(await stack.charge(10_000), 1_000)
    await stack.store.cases.create(RefundRequest.model_validate({**body, "source": "api"}), "alice")
    seen = await stack.store.cases.get(body["refund_request_id"])
    assert seen is not None
    sweeps = [await stack.store.cases.sweep_closed(body["refund_request_id"], workflow_status="TERMINATED",
                                                   provider_holds=False, found=None,
                                                   seen_updated_at=seen["updated_at"])
              for _ in range(2)]
    assert sweeps == [True, False]
    assert (await stack.actions(body["refund_request_id"])).count("workflow_closed_case_swept") == 1


async def test_a_case_its_workflow_left_to_ops_stays_unswept_past_retention(stack: Stack) -> None:
    """A refund workflow that completed with its case in ops review (a duplicate or
    mismatched refund) left it there on purpose; once Temporal's retention has dropped the
    workflow, the sweep (which finds none) must not take it for a workflow that ended."""
    body = stack.refund_body(await stack.charge(10_000), 1_000)
    case_id = body["refund_request_id"]
    await stack.store.cases.create(RefundRequest.model_validate({**body, "source": "api"}), "alice")
    await stack.store.database.execute(  # as its workflow left it, long ago (none in Temporal)
        "UPDATE refund_cases SET status = 'ops_review', updated_at = now() - interval '1 hour'"
        " WHERE refund_request_id = %s", (case_id,))
    assert case_id not in await sweep_cases_once(stack.store, stack.client, stack.providers, idle_seconds=60)
    assert "workflow_closed_case_swept" not in await stack.actions(case_id)


async def test_a_case_that_moved_on_under_its_submit_moves_no_money_and_its_workflow_ends(
        stack: Stack) -> None:
    """Its hold was released while it waited (a denial a killed worker left recorded while a
    retried task approved, as the chaos schedule found): the approved submit is refused, and
    the workflow ends as the row says, the approval recorded, instead of resubmitting (each
    refused) until ops review overwrote the row."""
    charge = await stack.charge(20_000)
    case_id = await stack.request_refund("alice", charge, 9_000)
    await stack.wait_for_status(case_id, "awaiting_approval")
    await stack.store.database.execute(
        "UPDATE refund_cases SET reserved_amount = 0 WHERE refund_request_id = %s", (case_id,))
    async with stack.api("bob") as api:
        assert (await api.post(f"/v1/refund-requests/{case_id}/approvals",
                               json={"decision": "approve"})).status_code == 202
    async with asyncio.timeout(60):  # guards against a hang, not a measured wait
        await stack.client.get_workflow_handle(case_id).result()
    assert await stack.provider_refunds(charge) == []
    actions = await stack.actions(case_id)
    assert {"approval_granted", "submit_refused_case_moved_on"} <= set(actions), actions
    assert "execution_started" not in actions and "resubmits_exhausted" not in actions


async def expiry_under_a_cancel(stack: Stack) -> tuple[str, str]:
    """A case that needs an approver expires, and ops cancel it while the expiry is being
    written; the run ends: (case, charge)."""
    with write_held(stack.store, "approval_expired") as held:
        charge = await stack.charge(20_000)
        case_id = await stack.request_refund("alice", charge, 9_000)  # above 50.00: one approver
        await asyncio.wait_for(held.wait(), 60)
        handle = stack.client.get_workflow_handle(case_id)
        await handle.cancel()
    await handle.result()
    return case_id, charge


async def test_an_expiry_a_cancel_interrupts_is_still_written(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    """Nobody approved in time and the case was writing its expiry (status, hold released)
    when ops cancelled it. The run took the expiry as done (its status was set before the
    write) and ended: the row stayed `awaiting_approval`, its reservation held, with no
    workflow left to move it. The cancel writes the closing step it interrupted."""
    async with stack_with(store, client, temporal_server.address, approval_timeout_seconds=2) as stack:
        case_id, charge = await expiry_under_a_cancel(stack)
        row = await stack.store.cases.get(case_id)
        assert row is not None and (row["status"], row["reserved_amount"]) == ("expired", 0), row
        assert await stack.provider_refunds(charge) == []
