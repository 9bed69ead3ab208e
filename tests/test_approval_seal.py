"""Approvals carry the relay's authority (issue 19, item 3): a verdict sent straight to
Temporal, however many roles it claims, or with a seal that does not match it, is refused
and audited and the case keeps waiting; the relay's own path still approves; keys rotate."""

import asyncio
import dataclasses
import hashlib
import hmac
import json
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from temporalio import client as temporal
from temporalio.client import Client, WorkflowUpdateFailedError
from temporalio.converter import PayloadConverter
from temporalio.exceptions import ApplicationError

from adapters.approval_seal import SEAL_HEADER, ApprovalKeys, sealing_client
from adapters.db import Store
from domain.models import ApprovalSignal, Decision
from starters.dev.stack import TemporalDevServer
from tests.harness import APPROVAL_KEYS, Stack, open_stack
from workflows.approvals import UNSEALED
from workflows.refund import RefundWorkflow

CLAIMED_ROLES = ("admin", "approver", "finance_manager", "ops")
"""Whatever roles an outsider claims: the seal, not the claim, is what counts."""


def _verdict(approver: str, roles: tuple[str, ...] = CLAIMED_ROLES) -> ApprovalSignal:
    return ApprovalSignal(approver=approver, roles=roles, decision=Decision.APPROVE, reason="lgtm")


async def _refusals(stack: Stack, case_id: str, approver: str, count: int) -> list[str]:
    """The audited refusals of one approver, once `count` of them are recorded (a hang
    detector of 60 s, not a timing assertion)."""
    deadline = asyncio.get_running_loop().time() + 60
    while True:
        refused = [e["detail"]["refusal"] for e in await stack.store.audit.trail(case_id)
                   if e["action"] == "approval_refused" and e["actor"] == approver]
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
    row = await stack.store.cases.get(case_id)
    assert row is not None and row["status"] == "awaiting_approval"
    assert "approval_granted" not in await stack.actions(case_id)
    # the relay's path still approves (the Slack and ServiceNow signals: test_integrations)
    assert (await _approve_via_api(stack, "bob", case_id)).status_code == 202
    await stack.wait_for_status(case_id, "succeeded")
    assert [e["actor"] for e in await stack.store.audit.trail(case_id)
            if e["action"] == "approval_granted"] == ["bob"]


class _FixedSeal(temporal.Interceptor):
    """A caller who captured a genuine seal and sends it with whatever verdict they like."""

    def __init__(self, seal: str) -> None:
        self.header = PayloadConverter.default.to_payloads([seal])[0]

    def intercept_client(self, next: temporal.OutboundInterceptor) -> temporal.OutboundInterceptor:
        header = self.header

        class Resend(temporal.OutboundInterceptor):
            async def signal_workflow(self, input: temporal.SignalWorkflowInput) -> None:
                await super().signal_workflow(dataclasses.replace(input, headers={SEAL_HEADER: header}))

        return Resend(next)


async def test_a_seal_over_other_roles_from_another_key_or_used_twice_is_refused(
        stack: Stack, client: Client) -> None:
    case_id = await _awaiting_case(stack)
    honest = _verdict("eve", roles=("requester",))
    config = client.config()
    seal = ApprovalKeys([APPROVAL_KEYS]).seal(case_id, honest, now=datetime.now(UTC))
    config["interceptors"] = [*config["interceptors"], _FixedSeal(seal)]
    replaying = Client(**config).get_workflow_handle(case_id)
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


def test_keys_rotate_the_first_seals_every_one_verifies() -> None:
    now = datetime.now(UTC)
    verdict = _verdict("bob", roles=("approver",))
    old, rotated, retired = ApprovalKeys(["k-old"]), ApprovalKeys(["k-new", "k-old"]), ApprovalKeys(["k-new"])
    before_rotation = old.seal("rr-1", verdict, now=now)
    after_rotation = rotated.seal("rr-1", verdict, now=now)
    assert rotated.check("rr-1", verdict, before_rotation, now=now)[0] == ""
    assert retired.check("rr-1", verdict, after_rotation, now=now)[0] == ""
    mismatch = "approval seal does not match this verdict"
    assert old.check("rr-1", verdict, after_rotation, now=now)[0] == mismatch
    assert rotated.check("rr-2", verdict, after_rotation, now=now)[0] == mismatch
    assert rotated.check("rr-1", verdict, after_rotation,
                         now=now + timedelta(hours=1))[0].startswith("approval seal is outside")
    unsigned = after_rotation.rsplit(".", 1)[0]
    for forged in ("v1." + "9" * 5000 + ".n.m", "v2." + after_rotation[3:], unsigned, ""):
        assert rotated.check("rr-1", verdict, forged, now=now)[0] in (
            "approval seal is malformed", "approval not sealed by the relay")


def test_a_seal_covers_the_verdict_id_and_one_made_before_ids_still_verifies() -> None:
    """The id decides which copy of a verdict counts, so it cannot be swapped under a seal;
    seals in histories recorded before ids (no id in the message) still verify."""
    now, keys = datetime.now(UTC), ApprovalKeys(["k"])
    with_id = _verdict("bob", roles=("approver",)).model_copy(update={"verdict_id": "a" * 32})
    sealed = keys.seal("rr-1", with_id, now=now)
    assert keys.check("rr-1", with_id, sealed, now=now)[0] == ""
    for swapped in ("b" * 32, ""):
        assert keys.check("rr-1", with_id.model_copy(update={"verdict_id": swapped}), sealed,
                          now=now)[0] == "approval seal does not match this verdict"
    issued, nonce = int(now.timestamp()), "n0nce"
    before_ids = json.dumps({"v": "v1", "workflow_id": "rr-1", "decision": "approve", "approver": "bob",
                             "roles": ["approver"], "reason": "lgtm", "issued_at": issued, "nonce": nonce},
                            sort_keys=True, separators=(",", ":")).encode()
    legacy = f"v1.{issued}.{nonce}.{hmac.new(b'k', before_ids, hashlib.sha256).hexdigest()}"
    assert keys.check("rr-1", _verdict("bob", roles=("approver",)), legacy, now=now) == ("", nonce)


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
