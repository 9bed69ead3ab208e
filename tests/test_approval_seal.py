"""Approvals carry the relay's authority (issue 19, item 3): a verdict sent straight to
Temporal, however many roles it claims, or with a seal that does not match it, is refused
and audited and the case keeps waiting; the relay's own path still approves; keys rotate."""

import asyncio
import hashlib
import hmac
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from temporalio import client as temporal
from temporalio.api.common import v1 as temporal_common
from temporalio.api.workflowservice import v1 as temporal_service
from temporalio.client import Client, WorkflowUpdateFailedError
from temporalio.common import WorkflowIDReusePolicy
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from activities.reconciliation import ReconciliationActivities
from adapters.approval_seal import ApprovalKeys, sealed_at, sealing_client
from adapters.db import Store
from adapters.db.reconciliation import break_case
from adapters.notify.message import render
from adapters.policy_file import load_policy
from domain.models import ApprovalSignal, Decision
from domain.payouts import ReissueAsk
from domain.reconciliation import BreakOutcome, BreakSettlement, BreakState, break_workflow_id
from starters.dev.stack import TemporalDevServer
from tests.harness import APPROVAL_KEYS, Stack, open_stack, sealed_signal, with_seal
from tests.payouts_kit import add_payout_approvers, ask_reissue, remediated
from tests.reconciliation_kit import (
    backfill,
    break_awaiting_approval,
    history,
    move_at_provider,
    reopen,
    seed_case,
    seed_provider,
    wait_for_breaks,
)
from tests.test_reconciliation import decide
from workflows.approvals import UNSEALED
from workflows.payout import PayoutReversalWorkflow
from workflows.reconciliation import ReconciliationBreakWorkflow
from workflows.refund import RefundWorkflow

CLAIMED_ROLES = ("admin", "approver", "finance_manager", "ops")
"""Whatever roles an outsider claims: the seal, not the claim, is what counts."""


def _verdict(approver: str, roles: tuple[str, ...] = CLAIMED_ROLES) -> ApprovalSignal:
    return ApprovalSignal(approver=approver, roles=roles, decision=Decision.APPROVE, reason="lgtm")


async def _refusals(stack: Stack, case_id: str, approver: str, count: int) -> list[str]:
    """The audited refusals of verdicts naming one approver, once `count` of them are
    recorded (a hang detector of 60 s, not a timing assertion). One whose seal did not hold
    is written by `temporal`, the name it gave as `named`: nobody authenticated that person."""
    deadline = asyncio.get_running_loop().time() + 60
    while True:
        refused = [e["detail"]["refusal"] for e in await stack.store.audit.trail(case_id)
                   if e["action"] == "approval_refused"
                   and approver in (e["actor"], e["detail"].get("named"))]
        if len(refused) >= count:
            return refused
        assert asyncio.get_running_loop().time() < deadline, f"{approver}'s verdict never audited"
        await asyncio.sleep(0.1)


async def _awaiting_case(stack: Stack) -> str:
    case_id = await stack.request_refund("alice", await stack.charge(20_000), 9_000)
    await stack.wait_for_status(case_id, "awaiting_approval")
    return case_id


async def _approve_via_api(stack: Stack, user: str, case_id: str) -> httpx.Response:
    async with stack.api(user) as api:
        return await api.post(f"/v1/refund-requests/{case_id}/approvals",
                              json={"decision": "approve", "reason": "ok"})


async def test_an_approval_sent_straight_to_temporal_is_refused_and_audited(
        stack: Stack, client: Client) -> None:
    case_id = await _awaiting_case(stack)
    handle = client.get_workflow_handle(case_id)  # the session client holds no approval key
    await handle.signal(RefundWorkflow.approve, _verdict("mallory"))
    with pytest.raises(WorkflowUpdateFailedError) as refused:
        await handle.execute_update(RefundWorkflow.submit_approval, _verdict("trudy"))
    assert isinstance(refused.value.cause, ApplicationError) and refused.value.cause.type == UNSEALED
    assert await _refusals(stack, case_id, "mallory", 1) == ["approval not sealed by the relay"]
    assert await _refusals(stack, case_id, "trudy", 1) == ["approval not sealed by the relay"]
    # the names an unsealed verdict gives are its sender's word: no row is written as theirs
    written = [e for e in await stack.store.audit.trail(case_id) if e["action"] == "approval_refused"]
    assert sorted((e["actor"], e["detail"]["named"]) for e in written) == [
        ("temporal", "mallory"), ("temporal", "trudy")]
    row = await stack.store.cases.get(case_id)
    assert row is not None and row["status"] == "awaiting_approval"
    assert "approval_granted" not in await stack.actions(case_id)
    # the relay's path still approves (the Slack and ServiceNow signals: test_integrations)
    assert (await _approve_via_api(stack, "bob", case_id)).status_code == 202
    await stack.wait_for_status(case_id, "succeeded")
    assert [e["actor"] for e in await stack.store.audit.trail(case_id)
            if e["action"] == "approval_granted"] == ["bob"]


async def test_a_seal_over_other_roles_from_another_key_or_used_twice_is_refused(
        stack: Stack, client: Client) -> None:
    case_id = await _awaiting_case(stack)
    honest = _verdict("eve", roles=("requester",))
    chain = (await client.get_workflow_handle(case_id).describe()).run_id
    seal = ApprovalKeys([APPROVAL_KEYS]).seal(case_id, honest, chain=chain, now=datetime.now(UTC))
    replaying = with_seal(client, seal).get_workflow_handle(case_id)
    await replaying.signal(RefundWorkflow.approve, _verdict("eve"))  # the seal's verdict, other roles
    await replaying.signal(RefundWorkflow.approve, honest)  # sealed, refused for its role only
    await replaying.signal(RefundWorkflow.approve, honest)  # the same seal again
    stranger = sealing_client(client, ApprovalKeys(["a-key-the-worker-does-not-hold"]))
    await stranger.get_workflow_handle(case_id).signal(RefundWorkflow.approve, _verdict("oscar"))
    # recorded by two writers at once (refused seals beside the case, the round's own refusal),
    # so in either order
    refused = sorted(await _refusals(stack, case_id, "eve", 3))
    assert refused[:2] == ["approval seal does not match this verdict", "approval seal was already used"]
    assert "seal" not in refused[2]  # the seal held; eve is no approver
    assert await _refusals(stack, case_id, "oscar", 1) == ["approval seal does not match this verdict"]
    row = await stack.store.cases.get(case_id)
    assert row is not None and row["status"] == "awaiting_approval"


async def test_a_sealed_denial_taken_past_its_window_still_denies(stack: Stack) -> None:
    """A worker away longer than a seal's window (15 minutes): a ServiceNow rejection the
    relay sealed and signalled (answered "signalled"; ServiceNow sends it once) waited in
    history and was refused as stale when the worker came back; another approver's approval
    then moved the money against it (reproduced with seals made 20 minutes before). A denial
    moves no money: taken late, it still denies. A late approval still counts for nothing."""
    case_id = await _awaiting_case(stack)
    long_ago = datetime.now(UTC) - timedelta(minutes=20)
    approval = ApprovalSignal(approver="bob", roles=("approver",), decision=Decision.APPROVE,
                              reason="looked fine", verdict_id=uuid.uuid4().hex)
    await sealed_signal(stack.client, case_id, approval, issued_at=long_ago)
    assert await _refusals(stack, case_id, "bob", 1) == ["approval seal is outside its 900 s window"]
    denial = ApprovalSignal(approver="carol", roles=("approver",), decision=Decision.DENY,
                            reason="not like this", verdict_id=uuid.uuid4().hex)
    await sealed_signal(stack.client, case_id, denial, issued_at=long_ago)
    row = await stack.wait_for_status(case_id, "denied")
    assert row["reserved_amount"] == 0 and await stack.provider_refunds(row["charge_id"]) == []
    trail = await stack.store.audit.trail(case_id)
    assert [e["actor"] for e in trail if e["action"] == "approval_denied"] == ["carol"]


def test_keys_rotate_the_first_seals_every_one_verifies() -> None:
    now = datetime.now(UTC)
    verdict = _verdict("bob", roles=("approver",))
    old, rotated, retired = ApprovalKeys(["k-old"]), ApprovalKeys(["k-new", "k-old"]), ApprovalKeys(["k-new"])
    before_rotation = old.seal("rr-1", verdict, chain="run-a", now=now)
    after_rotation = rotated.seal("rr-1", verdict, chain="run-a", now=now)
    assert rotated.check("rr-1", verdict, before_rotation, chain="run-a", now=now)[0] == ""
    assert retired.check("rr-1", verdict, after_rotation, chain="run-a", now=now)[0] == ""
    mismatch = "approval seal does not match this verdict"
    assert old.check("rr-1", verdict, after_rotation, chain="run-a", now=now)[0] == mismatch
    assert rotated.check("rr-2", verdict, after_rotation, chain="run-a", now=now)[0] == mismatch
    assert rotated.check("rr-1", verdict, after_rotation, chain="run-a",
                         now=now + timedelta(hours=1))[0].startswith("approval seal is outside")
    unsigned = after_rotation.rsplit(".", 1)[0]
    for forged in ("v1." + "9" * 5000 + ".n.m", "v9." + after_rotation[3:], unsigned, "",
                   after_rotation.replace(".run-a.", "..")):
        assert rotated.check("rr-1", verdict, forged, chain="run-a", now=now)[0] in (
            "approval seal is malformed", "approval not sealed by the relay")


def test_a_seal_is_for_one_run_chain_and_cannot_be_moved_to_another() -> None:
    """A reopened break or a case started again under its id is a new chain: a seal made
    for the earlier one is refused there, and its chain cannot be rewritten or dropped."""
    now, keys, verdict = datetime.now(UTC), ApprovalKeys(["k"]), _verdict("bob", roles=("approver",))
    sealed = keys.seal("rr-1", verdict, chain="run-a", now=now)
    assert keys.check("rr-1", verdict, sealed, chain="run-a", now=now)[0] == ""
    assert keys.check("rr-1", verdict, sealed, chain="run-b", now=now)[0].startswith(
        "approval was sealed for an earlier run")
    version, issued, nonce, _, mac = sealed.split(".")
    for moved in (f"{version}.{issued}.{nonce}.run-b.{mac}", f"v1.{issued}.{nonce}.{mac}"):
        assert keys.check("rr-1", verdict, moved, chain="run-b", now=now)[0] == (
            "approval seal does not match this verdict")


def test_a_seal_covers_the_verdict_id_and_one_made_before_ids_still_verifies() -> None:
    """The id decides which copy of a verdict counts, so it cannot be swapped under a seal;
    seals in histories recorded before ids or chains (no id, no chain in the message) still
    verify."""
    now, keys = datetime.now(UTC), ApprovalKeys(["k"])
    with_id = _verdict("bob", roles=("approver",)).model_copy(update={"verdict_id": "a" * 32})
    sealed = keys.seal("rr-1", with_id, chain="run-a", now=now)
    assert keys.check("rr-1", with_id, sealed, chain="run-a", now=now)[0] == ""
    for swapped in ("b" * 32, ""):
        assert keys.check("rr-1", with_id.model_copy(update={"verdict_id": swapped}), sealed,
                          chain="run-a", now=now)[0] == "approval seal does not match this verdict"
    issued, nonce = int(now.timestamp()), "n0nce"
    before_ids = json.dumps({"v": "v1", "workflow_id": "rr-1", "decision": "approve", "approver": "bob",
                             "roles": ["approver"], "reason": "lgtm", "issued_at": issued, "nonce": nonce},
                            sort_keys=True, separators=(",", ":")).encode()
    legacy = f"v1.{issued}.{nonce}.{hmac.new(b'k', before_ids, hashlib.sha256).hexdigest()}"
    assert keys.check("rr-1", _verdict("bob", roles=("approver",)), legacy, chain="run-a", now=now) == (
        "", nonce)


def test_a_seal_says_when_it_was_made_and_one_made_to_the_second_still_verifies() -> None:
    """The money gate judges an approver's token as of the seal (`sealed_at`): a seal says it
    to the millisecond; `v2` seals, in histories recorded before, said it to the second and
    still verify."""
    now, keys = datetime(2026, 12, 7, 10, 0, 0, 123_456, tzinfo=UTC), ApprovalKeys(["k"])
    verdict = _verdict("bob", roles=("approver",))
    sealed = keys.seal("rr-1", verdict, chain="run-a", now=now)
    assert sealed.startswith("v3.") and sealed_at(sealed) == now.replace(microsecond=123_000)
    assert keys.check("rr-1", verdict, sealed, chain="run-a", now=now)[0] == ""
    issued, nonce = int(now.timestamp()), "n0nce"
    covered = json.dumps({"v": "v2", "workflow_id": "rr-1", "decision": "approve", "approver": "bob",
                          "roles": ["approver"], "reason": "lgtm", "issued_at": issued, "nonce": nonce,
                          "chain": "run-a"}, sort_keys=True, separators=(",", ":")).encode()
    in_seconds = f"v2.{issued}.{nonce}.run-a.{hmac.new(b'k', covered, hashlib.sha256).hexdigest()}"
    assert keys.check("rr-1", verdict, in_seconds, chain="run-a", now=now) == ("", nonce)
    assert sealed_at(in_seconds) == now.replace(microsecond=0)
    assert keys.check("rr-1", verdict, in_seconds.replace("v2.", "v3.", 1), chain="run-a", now=now)[0] == (
        "approval seal does not match this verdict")


async def test_a_worker_holding_a_new_and_the_old_key_counts_an_old_seal(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    rotated = await open_stack(store, client, temporal_server.address,
                               approval_keys=f"k-new,{APPROVAL_KEYS}")
    try:
        case_id = await _awaiting_case(rotated)
        relay_before_rotation = sealing_client(client, ApprovalKeys([APPROVAL_KEYS]))
        await relay_before_rotation.get_workflow_handle(case_id).signal(
            RefundWorkflow.approve, _verdict("bob", roles=("approver",)))
        row = await rotated.wait_for_status(case_id, "succeeded")
        assert row["status"] == "succeeded"
        actions = [e["action"] for e in await rotated.store.audit.trail(case_id)]
        assert "approval_granted" in actions and "approval_refused" not in actions  # the old seal counted
    finally:
        await rotated.close()


async def _sealed_update_in_history(client: Client, workflow_id: str, approver: str
                                    ) -> tuple[temporal_common.Payloads, temporal_common.Header]:
    """An approver's verdict exactly as the relay sent it, read from the case's history (what
    anyone who may read histories, the Temporal UI's users, can capture)."""
    async for event in client.get_workflow_handle(workflow_id).fetch_history_events():
        if event.HasField("workflow_execution_update_accepted_event_attributes"):
            request = event.workflow_execution_update_accepted_event_attributes.accepted_request
            verdict = (await client.data_converter.decode(request.input.args.payloads, [ApprovalSignal]))[0]
            if verdict.approver == approver:
                return request.input.args, request.input.header
    raise AssertionError(f"no verdict of {approver} in {workflow_id}'s history")


async def test_a_sealed_verdict_replayed_into_a_reopened_break_counts_nowhere(stack: Stack) -> None:
    """A reopened break is a new run under the same workflow id. Carol's approval from the
    round that was dismissed, replayed from history within its seal's window, must not be
    one of the reopened round's two approvals: Frank's approval alone leaves it waiting."""
    refund = history(f"ch_{uuid.uuid4().hex[:8]}", 60_000, days_ago=3)  # approver and finance manager
    await seed_provider(stack, [refund])
    case_id = await seed_case(stack, refund, requester="bob")
    await move_at_provider(stack, refund["id"], "canceled")
    await backfill(stack, since_days=30)
    [found] = await wait_for_breaks(stack, [refund["id"]], "awaiting_approval")
    workflow_id = break_workflow_id(found["id"])
    assert (await decide(stack, "carol", found["id"])).status_code == 202
    args, header = await _sealed_update_in_history(stack.client, workflow_id, "carol")
    assert (await decide(stack, "frank", found["id"], "deny")).status_code == 202
    await wait_for_breaks(stack, [refund["id"]], "dismissed")
    await reopen(stack, "olga", found, "the bank confirmed the cancel")

    replayed = temporal_service.SignalWorkflowExecutionRequest(
        namespace=stack.client.namespace, workflow_execution=temporal_common.WorkflowExecution(
            workflow_id=workflow_id), signal_name="approve", input=args, header=header, identity="replayer")
    for attempt in range(3):  # the dev server cancelled this call once in CI, just after the reopen
        try:
            await stack.client.workflow_service.signal_workflow_execution(replayed)
            break
        except RPCError as err:
            if err.status is not RPCStatusCode.CANCELLED or attempt == 2:
                raise
            await asyncio.sleep(0.5)
    carol = await _break_verdicts(stack, case_id, "carol", 2)
    assert carol[0] == "reconciliation_approval_granted" and carol[1] == "reconciliation_approval_refused"
    second = await decide(stack, "frank", found["id"])
    assert (second.status_code, second.json()["missing_roles"]) == (202, ["approver"]), second.text
    [waiting] = await wait_for_breaks(stack, [refund["id"]], "awaiting_approval")
    assert waiting["resolution"] is None
    assert [e["template"] for e in await stack.store.ledger.entries(case_id)] == ["refund_settled"] * 2


async def _break_verdicts(stack: Stack, case_id: str, approver: str, count: int) -> list[str]:
    """The recorded break verdicts naming an approver (granted or refused; a refused one
    whose seal did not hold written as `temporal`'s, naming them), once `count` are recorded
    (a hang detector of 60 s, not a timing assertion)."""
    deadline = asyncio.get_running_loop().time() + 60
    while True:
        verdicts = [e["action"] for e in await stack.store.audit.trail(case_id)
                    if approver in (e["actor"], e["detail"].get("named"))
                    and e["action"] in ("reconciliation_approval_granted", "reconciliation_approval_refused")]
        if len(verdicts) >= count:
            return verdicts
        assert asyncio.get_running_loop().time() < deadline, f"{approver}'s verdicts never audited"
        await asyncio.sleep(0.1)


async def test_a_reissue_request_sent_straight_to_temporal_is_refused_and_audited(stack: Stack) -> None:
    """Whoever asks for a payout to be paid again may not approve that reissue: the request
    names its requester, so it carries the relay's authority as a verdict does. Sent straight
    to Temporal naming someone else, it would let one person both ask and approve; it is
    refused and audited, and the case still takes the relay's request."""
    await add_payout_approvers(stack)
    _, case_id = await remediated(stack, 120_000)
    forged = ReissueAsk(requester="someone-else", roles=("ops",), reason="pay again")
    with pytest.raises(WorkflowUpdateFailedError) as refused:
        await stack.client.get_workflow_handle(case_id).execute_update(
            PayoutReversalWorkflow.request_reissue, forged)
    assert isinstance(refused.value.cause, ApplicationError) and refused.value.cause.type == UNSEALED
    trail = await stack.store.audit.trail(case_id)
    # the requester it names is its sender's word: the row is not written as theirs
    assert [(e["actor"], e["detail"]["named"]) for e in trail
            if e["action"] == "reissue_request_refused"] == [("temporal", "someone-else")]
    assert [e for e in trail if e["action"] == "reissue_requested"] == []
    asked = await ask_reissue(stack, "omar", case_id)  # the relay's request still counts
    assert asked.status_code == 202, asked.text
    assert [e["actor"] for e in await stack.store.audit.trail(case_id)
            if e["action"] == "reissue_requested"] == ["omar"]


def test_a_reissue_seal_covers_the_requester_and_is_no_verdict_s() -> None:
    keys, now = ApprovalKeys(["k1"]), datetime.now(UTC)
    ask = ReissueAsk(requester="omar", roles=("ops",), reason="bank details confirmed")
    seal = keys.seal("case-1", ask, chain="run-1", now=now)
    assert keys.check("case-1", ask, seal, chain="run-1", now=now)[0] == ""
    assert keys.check("case-1", ask.model_copy(update={"requester": "mallory"}), seal, chain="run-1",
                      now=now)[0] == "approval seal does not match this verdict"
    verdict = ApprovalSignal(approver="omar", roles=("ops",), decision=Decision.APPROVE,
                             reason="bank details confirmed")
    assert keys.check("case-1", verdict, seal, chain="run-1", now=now)[0] != ""  # not a verdict's seal
    assert keys.check("case-1", ask, keys.seal("case-1", verdict, chain="run-1", now=now), chain="run-1",
                      now=now)[0] != ""


async def _run_again(stack: Stack, found: dict[str, Any],
                     **forged: Any) -> temporal.WorkflowHandle[Any, BreakOutcome]:
    """The break's exception workflow terminated and started again under its id, as someone
    with Temporal write access (no approval keys) would, its input changed by `forged`."""
    workflow_id = break_workflow_id(found["id"])
    await stack.client.get_workflow_handle(workflow_id).terminate("terminated in the Temporal UI")
    row = await stack.store.reconciliation.get_break(found["id"])
    assert row is not None
    return await stack.client.start_workflow(
        ReconciliationBreakWorkflow.run, break_case(row, stack.settings.timings()).model_copy(update=forged),
        id=workflow_id, task_queue=stack.settings.task_queue,
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE)


async def test_a_break_workflow_started_again_with_forged_terms_acts_on_the_break_as_stored(
        stack: Stack) -> None:
    """With Temporal write access but no approval keys: the break's workflow terminated and
    started again under its id with nobody barred and a one-cent delta (one approver's tier).
    Bob, the refund's requester, approved alone, under his own seal, and the full amount was
    compensated (the settlement's check then caught it, below). Since
    `break-acts-on-its-row-1` the run reads its break as stored: bob is barred, and the tier
    is the full amount's (approver and finance manager)."""
    case_id, found = await break_awaiting_approval(stack, moved_to="canceled", requester="bob", amount=60_000)
    handle = await _run_again(stack, found, conflicted=(), ledger_delta=1)
    refused = await decide(stack, "bob", found["id"])
    assert refused.status_code == 403 and "behind" in refused.json()["detail"], refused.text
    approved = await decide(stack, "carol", found["id"])
    assert (approved.status_code, approved.json()["missing_roles"]) == (202, ["finance_manager"]), \
        approved.text
    assert [e["template"] for e in await stack.store.ledger.entries(case_id)] == ["refund_settled"] * 2
    await handle.terminate("test over")


async def test_a_settlement_whose_approvals_miss_the_break_as_stored_settles_nothing(stack: Stack) -> None:
    """The settlement's own check, for runs that still take their start input as true (those
    started before `break-acts-on-its-row-1`): an approved settlement naming bob, the refund's
    requester, whose grant a forged run counted, goes to ops review, nothing posted, ops told
    who is behind the break and which roles are missing."""
    case_id, found = await break_awaiting_approval(stack, moved_to="canceled", requester="bob", amount=60_000)
    await stack.client.get_workflow_handle(break_workflow_id(found["id"])).terminate("a forged run's turn")
    await stack.store.audit.record(found["chain"], "bob", "reconciliation_approval_granted",
                                   {"break_id": found["id"], "roles": ["approver"], "reason": "forged run"})
    activities = ReconciliationActivities(stack.store, stack.providers, stack.client, load_policy(),
                                          timings=stack.settings.timings(),
                                          reports_dir=stack.settings.reports_folder(),
                                          reissue_window=timedelta(days=30))
    outcome = await activities.settle_break(BreakSettlement(break_id=found["id"], state=BreakState.RESOLVED,
                                                            approvers=("bob",), round=found["reopened"]))
    assert outcome.state.value == "ops_review"
    [settled] = await wait_for_breaks(stack, [found["object_id"]], "ops_review")
    assert settled["resolution"]["approval_unmet"] == {"behind_the_break": ["bob"],
                                                       "missing_roles": ["approver", "finance_manager"]}
    assert [e["template"] for e in await stack.store.ledger.entries(case_id)] == ["refund_settled"] * 2
    [notice] = await stack.store.database.fetch_all(
        "SELECT * FROM notices WHERE refund_request_id = %s AND kind = 'reconciliation_break_approval_unmet'",
        (case_id,))
    message = render(notice, await stack.store.cases.get(case_id), None, case_url=None, email_to=None)
    assert "behind the break" in message.text and "bob" in message.text and "finance_manager" in message.text


async def test_a_break_run_a_reopen_starts_reads_the_break_as_the_reopen_commits_it(stack: Stack) -> None:
    """A reopen starts the break's next run inside its transaction, before the commit (so a
    start that fails reopens nothing). The run's read of the break took the row as committed
    before: the earlier round, its reopener not barred; it then settled as a round past,
    writing nothing, and the break stayed awaiting approval for good (reproduced at the
    read). The read waits for the reopen's commit."""
    _, found = await break_awaiting_approval(stack, moved_to="canceled", requester="bob")
    row = await stack.store.reconciliation.get_break(found["id"])
    assert row is not None
    activities = ReconciliationActivities(stack.store, stack.providers, stack.client, load_policy(),
                                          timings=stack.settings.timings(),
                                          reports_dir=stack.settings.reports_folder(),
                                          reissue_window=timedelta(days=30))
    async with stack.store.database.transaction() as conn:  # the reopen, its start in flight
        await conn.execute("UPDATE reconciliation_breaks SET reopened = reopened + 1, evidence = jsonb_set("
                           "evidence, '{reopened_by}', '[\"rhea\"]'::jsonb) WHERE id = %s", (found["id"],))
        read = asyncio.create_task(activities.load_break_case(break_case(row, stack.settings.timings())))
        await asyncio.sleep(1)
    loaded = await read
    assert (loaded.reopened, "rhea" in loaded.conflicted) == (found["reopened"] + 1, True), loaded


async def test_one_approver_approving_in_two_runs_of_a_break_counts_once(stack: Stack) -> None:
    """Max holds both roles a large break needs and approves: one of its two slots. With
    Temporal access, the run is started again with a one-cent delta (one approver's tier)
    and he approves again: the second run reads the break as stored (two slots), and he
    fills one of them, never both."""
    stack.tokens["max"] = await stack.store.access.create_token(
        "max", ["approver", "finance_manager"], token=f"t-max-{uuid.uuid4().hex}", by="test")
    case_id, found = await break_awaiting_approval(stack, moved_to="canceled", requester="alice",
                                                   amount=60_000)
    first = await decide(stack, "max", found["id"])
    assert (first.status_code, len(first.json()["missing_roles"])) == (202, 1), first.text
    handle = await _run_again(stack, found, ledger_delta=1)
    again = await decide(stack, "max", found["id"])
    assert (again.status_code, len(again.json()["missing_roles"])) == (202, 1), again.text
    assert [e["template"] for e in await stack.store.ledger.entries(case_id)] == ["refund_settled"] * 2
    await handle.terminate("test over")


async def test_an_unknown_refund_is_adopted_only_with_approvals_that_meet_its_break(stack: Stack) -> None:
    """A refund unknown to us, large enough for two roles: its break's workflow started again
    with a one-cent delta (one approver's tier) and carol approved alone: the refund was
    adopted (a tracking case holding 600.00 against the charge) though nobody validly
    approved it. The run reads the break as stored: carol's approval leaves a role missing,
    and nothing is adopted."""
    unknown = history(f"ch_{uuid.uuid4().hex[:8]}", 60_000, days_ago=4)
    await seed_provider(stack, [unknown])
    await backfill(stack, since_days=30)
    [found] = await wait_for_breaks(stack, [unknown["id"]], "awaiting_approval")
    handle = await _run_again(stack, found, ledger_delta=1)
    approved = await decide(stack, "carol", found["id"])
    assert (approved.status_code, len(approved.json()["missing_roles"])) == (202, 1), approved.text
    assert await stack.store.cases.get(f"sandbox-refund-{unknown['id']}") is None
    await handle.terminate("test over")
