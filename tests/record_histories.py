"""Over 400 lines: one scenario per recorded branch, in the one table (SCENARIOS) that
tests/test_replay.py checks against its branches.

Records tests/histories/*.json, the workflow histories the replay test replays: one
scenario per branch of the case workflows (tests/test_replay.py names what each must hold).

    .venv/bin/python -m tests.record_histories [scenario ...]

Run it after a deliberate, versioned change to a workflow. It never overwrites a history
(running workflows may still be on the code that recorded it, and every file is replayed):
a scenario whose file exists is written to the first free `<name>_v<n>.json`, so name the
scenarios whose workflow changed. (Of the first versions, `refund_auto_approved_v1` is older
than `refund_auto_approved`; `_v2` on are recorded in order.) Delete a file only once no
workflow can be on its code. It
starts its own Temporal dev server and PostgreSQL in a temporary folder and plays each
scenario through the relay on a stack of its own (settings with tiny timings, the provider's
API behind a lossy proxy for faults). Histories are recorded with the product's converter
minus the codec, so the committed files hold no key material and need none: the worker's
codec passes plaintext payloads through on replay. A workflow that continued as new is
written run by run: `<name>.json` for the first, `<name>_run<k>.json` for the k-th.
"""

import asyncio
import json
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
from temporalio.client import (
    Client,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowHistory,
    WorkflowUpdateFailedError,
)
from temporalio.contrib.opentelemetry import TracingInterceptor

from adapters.approval_seal import ApprovalKeys, NewsSealing, sealing_client
from adapters.codec import data_converter
from adapters.db import Principal, Store
from adapters.http_server import AppServer
from domain.events import tracking_case_id
from domain.models import ApprovalSignal, CaseWrites, CaseWritten, Decision, ProviderRefundStatus
from domain.payouts import PayoutSnapshot, PayoutStatus, ReissueAsk, payout_case_id
from domain.reconciliation import break_workflow_id
from starters.actions.approving import new_verdict
from starters.dev.stack import EmbeddedPostgres, TemporalDevServer
from starters.ports import free_port
from tests.adyen_fake import FakeAdyen
from tests.harness import APPROVAL_KEYS, Stack, foreign_refund_event, open_stack, sealed_signal, unsealing
from tests.lossy_proxy import LossyProxy
from tests.payouts_kit import (
    add_payout_approvers,
    ask_reissue,
    decide,
    move_payout,
    paid_payout,
    remediated,
    wait_for_actions,
    wait_for_case,
)
from tests.reconciliation_kit import (
    ago,
    backfill,
    history,
    landed_unknown_to_its_case,
    move_at_provider,
    seed_case,
    seed_provider,
    wait_for_breaks,
)
from tests.test_adyen import (
    MERCHANT,
    AdyenRig,
    adyen_rig,
    other_refund_while_following,
    post_notification,
    unique_psp,
)
from tests.test_adyen import notification as adyen_notification
from tests.test_adyen_waits import (
    not_refunded_heard_with_adyen_s_success,
    notification_taken_under_a_cancel,
    ops_read_then_adyen_says,
    past_the_create_s_horizon,
    resolution_after_adyen_s_word,
)
from tests.test_case_lifecycle import expiry_under_a_cancel, reported_as_the_cancelled_run_ends
from tests.test_duplicate_refunds import duplicate_heard_with_a_cancel
from tests.test_news_seal import failure_heard_while_finishing
from tests.test_payouts import keep_holds_policy, reversal_answered_late
from tests.test_provider_states import contradiction_under_a_cancel
from tests.test_reconciliation_finish import provider_payout, seed_payouts
from tests.test_tracking import (
    Dashboard,
    failure_heard_while_the_tracking_run_ends,
    heard_while_the_watch_ends,
)
from workflows.payout import PayoutReversalWorkflow
from workflows.refund import RefundWorkflow

HISTORIES = Path(__file__).parent / "histories"
SEALED_SCENARIO = "refund-approval-sealed"


@dataclass
class Recording:
    """What a scenario plays on: its stack, the lossy proxy in front of its provider's API,
    the database's address (a fault the ledger sees) and, for Adyen, the fake Checkout API."""

    stack: Stack
    proxy: LossyProxy
    dsn: str
    adyen: FakeAdyen | None = None


@dataclass(frozen=True)
class Scenario:
    """A scenario: how to play it (returns its workflow's id), the stack it needs
    (`settings` for a sandbox stack, or `adyen` for the Adyen rig, which takes only the rig's
    own settings) and whether its workflow ends failed."""

    play: Callable[[Recording], Awaitable[str]]
    settings: dict[str, Any] = field(default_factory=dict)
    adyen: bool = False
    fails: bool = False


# -- helpers the scenarios share ---------------------------------------------------------------

async def requested(rig: Recording, amount: int, charged: int = 10_000, **body: Any) -> tuple[str, str]:
    """A refund of a new sandbox charge requested through the API: (case id, charge id)."""
    charge = await rig.stack.charge(charged)
    return await rig.stack.request_refund("alice", charge, amount, **body), charge


async def sandbox(rig: Recording, path: str, **body: Any) -> None:
    """One of the sandbox provider's controls (`/_sandbox/config`, `/_sandbox/faults`)."""
    async with rig.stack.sandbox() as sb:
        (await sb.post(path, json=body)).raise_for_status()


async def approval(rig: Recording, user: str, case_id: str, decision: str) -> None:
    async with rig.stack.api(user) as api:
        (await api.post(f"/v1/refund-requests/{case_id}/approvals",
                        json={"decision": decision, "reason": "recorded scenario"})).raise_for_status()


async def awaiting_approval(rig: Recording) -> str:
    """A refund above the auto-approval threshold, waiting for its approver."""
    case_id, _ = await requested(rig, 9_000, charged=20_000)
    await rig.stack.wait_for_status(case_id, "awaiting_approval")
    return case_id


async def provider_refund_id(rig: Recording, case_id: str, *statuses: str) -> str:
    row = await rig.stack.wait_for_status(case_id, *statuses)
    return str(row["provider_refund_id"])


async def cancel(rig: Recording, case_id: str) -> str:
    """Ops cancel the case's workflow (as from the Temporal UI or CLI)."""
    await rig.stack.client.get_workflow_handle(case_id).cancel()
    return case_id


# -- refund scenarios --------------------------------------------------------------------------

async def auto_approved(rig: Recording) -> str:
    """A small, evidenced first refund: validate, policy auto-approves, submit, ledger, watch."""
    case_id, _ = await requested(rig, 3_000)
    return case_id


async def with_approval(rig: Recording) -> str:
    """Above the threshold: waits for an approver's signal, then executes."""
    case_id = await awaiting_approval(rig)
    await approval(rig, "bob", case_id, "approve")
    return case_id


async def denied(rig: Recording) -> str:
    """An approver denies: the reservation is released, no money moves."""
    case_id = await awaiting_approval(rig)
    await approval(rig, "bob", case_id, "deny")
    return case_id


async def verdicts_committed(rig: Recording) -> str:
    """A verdict without the relay's seal is refused, then an approver denies: each verdict's
    step written by an activity once its workflow task completed (`verdict-steps-committed-1`)."""
    case_id = await awaiting_approval(rig)
    await rig.stack.client.get_workflow_handle(case_id).signal(RefundWorkflow.approve, ApprovalSignal(
        approver="mallory", roles=("approver",), decision=Decision.APPROVE))
    await rig.stack.wait_for_audit(case_id, "approval_refused")
    await approval(rig, "bob", case_id, "deny")
    return case_id


async def late_denial(rig: Recording) -> str:
    """A denial the relay sealed 20 minutes before the workflow took it (a worker away past
    the seal's window): it still denies (`approval-late-denials-1`)."""
    case_id = await awaiting_approval(rig)
    await sealed_signal(rig.stack.client, case_id, ApprovalSignal(
        approver="bob", roles=("approver",), decision=Decision.DENY, reason="not like this",
        verdict_id="v-late-denial"), issued_at=datetime.now(UTC) - timedelta(minutes=20))
    await rig.stack.wait_for_status(case_id, "denied")
    return case_id


async def verdict_after_deadline(rig: Recording) -> str:
    """A two-approver tier: bob's approval is written while the deadline passes and frank's
    is queued meanwhile; taken after the deadline, frank's is refused and the round expires
    (`approval-verdict-taking-1`)."""
    stack, write = rig.stack, rig.stack.store.cases.write_case_steps
    held = asyncio.Event()

    async def slow_write(steps: CaseWrites, step_key: str | None = None, **options: Any) -> CaseWritten:
        if any(w.event is not None and w.event.action == "approval_granted" for w in steps.writes):
            held.set()
            await asyncio.sleep(3)  # past the round's deadline
        return await write(steps, step_key, **options)

    stack.store.cases.write_case_steps = slow_write  # type: ignore[method-assign]
    case_id, _ = await requested(rig, 60_000, charged=100_000)
    await stack.wait_for_status(case_id, "awaiting_approval")
    bob = asyncio.create_task(approval(rig, "bob", case_id, "approve"))
    await held.wait()
    async with stack.api("frank") as api:
        late = await api.post(f"/v1/refund-requests/{case_id}/approvals", json={"decision": "approve"})
    assert late.status_code == 409, late.text
    await bob
    return case_id


async def moved_on_under_the_submit(rig: Recording) -> str:
    """The case's hold was released under it while it waited (a denial a killed worker left
    recorded while a retried task approved): the approved submit is refused, nothing moves."""
    case_id = await awaiting_approval(rig)
    await rig.stack.store.database.execute(
        "UPDATE refund_cases SET reserved_amount = 0 WHERE refund_request_id = %s", (case_id,))
    await approval(rig, "bob", case_id, "approve")
    return case_id


async def expired(rig: Recording) -> str:
    """Nobody answers within the approval timeout: the case expires, released."""
    return await awaiting_approval(rig)


async def rejected(rig: Recording) -> str:
    """Validation at the provider refuses it (another currency than the charge's)."""
    case_id, _ = await requested(rig, 3_000, currency="EUR")
    return case_id


async def declined(rig: Recording) -> str:
    """The provider declines the create (a 400): the case fails, released."""
    rig.proxy.refuse_next("POST", "/v1/refunds", 400)
    case_id, _ = await requested(rig, 1_400)
    return case_id


async def failed_at_provider(rig: Recording) -> str:
    """A pending refund the provider then fails: released, announced."""
    await sandbox(rig, "/_sandbox/config", refund_initial_status="pending")
    case_id, _ = await requested(rig, 1_600)
    refund_id = await provider_refund_id(rig, case_id, "pending")
    await rig.stack.set_provider_status(refund_id, "failed", failure_reason="lost_or_stolen_card")
    return case_id


async def verify_then_found(rig: Recording) -> str:
    """The create's answer is lost after the provider made the refund: verify-state finds it
    and nothing is submitted again."""
    rig.proxy.lose_next("POST", "/v1/refunds")
    case_id, _ = await requested(rig, 2_000)
    return case_id


async def verify_then_resubmit(rig: Recording) -> str:
    """The first create fails before a refund exists: verify-state finds none, the horizon
    is waited out and the second create is made."""
    await sandbox(rig, "/_sandbox/faults", mode="error_before", times=1)
    case_id, _ = await requested(rig, 2_100)
    return case_id


async def ledger_pending_and_recovered(rig: Recording) -> str:
    """The ledger is locked when the provider confirms: the case shows executed, ledger
    pending (incident) until the posting lands."""
    async with await psycopg.AsyncConnection.connect(rig.dsn) as blocker:
        async with blocker.transaction():
            await blocker.execute("LOCK TABLE ledger_entries IN ACCESS EXCLUSIVE MODE")
            case_id, _ = await requested(rig, 1_200)
            await rig.stack.wait_for_status(case_id, "executed_ledger_pending", timeout=90)
    return case_id


async def unexpected_status(rig: Recording) -> str:
    """A pending refund the provider later shows in a status we cannot map: ops review
    (still asking), then the provider shows it succeeded."""
    await sandbox(rig, "/_sandbox/config", refund_initial_status="pending")
    case_id, _ = await requested(rig, 2_200)
    refund_id = await provider_refund_id(rig, case_id, "pending")
    await rig.stack.set_provider_status(refund_id, "partially_reversed", send_webhook=False)
    await rig.stack.wait_for_status(case_id, "ops_review")
    await rig.stack.set_provider_status(refund_id, "succeeded", send_webhook=False)
    return case_id


async def refused_credentials(rig: Recording) -> str:
    """The provider refuses our key while validating (401) and on the create (403): ops
    review each time, and the case resumes once the key works again."""
    charge = await rig.stack.charge(10_000)
    rig.proxy.refuse_next("GET", f"/v1/charges/{charge}", 401)
    rig.proxy.refuse_next("POST", "/v1/refunds", 403)
    return await rig.stack.request_refund("alice", charge, 1_000)


async def cancel_while_validation_refused(rig: Recording) -> str:
    """The provider keeps refusing our key while validating: the case waits in ops review,
    and ops cancel it there (nothing reserved, `canceled_by_ops`)."""
    charge = await rig.stack.charge(10_000)
    rig.proxy.refuse_next("GET", f"/v1/charges/{charge}", *[401] * 1_000)
    case_id = await rig.stack.request_refund("alice", charge, 1_000)
    await rig.stack.wait_for_audit(case_id, "provider_configuration_refused")
    return await cancel(rig, case_id)


async def reads_exhausted(rig: Recording) -> str:
    """Validation's and verify-state's reads fail past their bounded retries (503s): ops
    review each time, and the case resumes when the provider answers again."""
    charge = await rig.stack.charge(10_000)
    rig.proxy.refuse_next("GET", f"/v1/charges/{charge}", 503, 503)
    rig.proxy.lose_next("POST", "/v1/refunds")
    rig.proxy.refuse_next("GET", "/v1/refunds", 503, 503)
    return await rig.stack.request_refund("alice", charge, 1_500)


async def adyen_wait_resolved(rig: Recording) -> str:
    """Adyen (no status lookup) answers the create with a 500: the case waits for the
    notification, escalates to ops review, and ops resolve it (Adyen shows no refund)."""
    assert rig.adyen is not None
    psp = rig.adyen.payment(10_000, "EUR", MERCHANT)
    rig.adyen.unavailable += 1
    case_id = await rig.stack.request_refund("alice", psp, 900, provider="adyen", currency="EUR",
                                             merchant_account=MERCHANT)
    await rig.stack.wait_for_audit(case_id, "no_status_lookup_escalated")
    return await resolved_not_refunded(rig, case_id)


async def resolved_not_refunded(rig: Recording, case_id: str) -> str:
    """Ops end a case's wait for its notification once it shows ops review: Adyen's
    dashboard shows no refund."""
    await rig.stack.wait_for_status(case_id, "ops_review")
    await past_the_create_s_horizon(rig.stack, case_id)
    async with rig.stack.api("olga") as api:
        (await api.post(f"/v1/refund-requests/{case_id}/provider-wait",
                        json={"provider_shows": "not_refunded",
                              "reason": "recorded scenario"})).raise_for_status()
    return case_id


async def adyen_other_charge_ignored(rig: Recording) -> str:
    """Waiting for Adyen's notification, the case is sent a refund of another payment that
    carries its reference: not its refund (`charge-scoped-notification-1`); ops then resolve
    the wait (Adyen shows no refund)."""
    assert rig.adyen is not None
    psp, other = rig.adyen.payment(10_000, "EUR", MERCHANT), rig.adyen.payment(10_000, "EUR", MERCHANT)
    rig.adyen.unavailable += 1
    case_id = await rig.stack.request_refund("alice", psp, 900, provider="adyen", currency="EUR",
                                             merchant_account=MERCHANT)
    await rig.stack.wait_for_audit(case_id, "awaiting_provider_notification")
    foreign = adyen_notification("REFUND", pspReference=unique_psp(), originalReference=other,
                                 merchantReference=case_id, amount={"currency": "EUR", "value": 900})
    async with httpx.AsyncClient(base_url=rig.stack.relay_url, timeout=30) as http:
        (await http.post("/webhooks/adyen", content=foreign,
                         headers={"content-type": "application/json"})).raise_for_status()
    return await resolved_not_refunded(rig, case_id)


async def adyen_follow_other_refund(rig: Recording) -> str:
    """Following its refund, the case waits at its poll for Adyen's notification and hears of
    another refund carrying its reference, failed: a duplicate, not its refund's word
    (`follow-wait-takes-followed-refund-1`); its own refund's success is then booked."""
    assert rig.adyen is not None
    case_id, followed, _ = await other_refund_while_following(rig.stack, rig.adyen, 900)
    row = await rig.stack.store.cases.get(case_id)
    assert row is not None
    own = adyen_notification("REFUND", pspReference=followed, originalReference=row["charge_id"],
                             merchantReference=case_id, amount={"currency": "EUR", "value": 900})
    (await post_notification(rig.stack, own)).raise_for_status()
    return case_id


async def adyen_taken_under_cancel(rig: Recording) -> str:
    """Ops cancel while the case records the notification it took: the event goes back on the
    inbox and the cancel's look takes it (`cancel-keeps-taken-notification-1`): the refund
    is followed and booked."""
    assert rig.adyen is not None
    case_id, _ = await notification_taken_under_a_cancel(AdyenRig(rig.stack, rig.adyen, rig.proxy), 700)
    await rig.stack.wait_for_status(case_id, "succeeded")
    return case_id


async def adyen_resolution_superseded(rig: Recording) -> str:
    """Ops' "not refunded" reaches the case after Adyen's own success ended the wait: recorded
    as superseded, not applied (`ops-resolution-superseded-1`); the window then ends."""
    assert rig.adyen is not None
    case_id, _ = await resolution_after_adyen_s_word(AdyenRig(rig.stack, rig.adyen, rig.proxy), 800,
                                                     refund_known=True)
    await rig.stack.wait_for_audit(case_id, "provider_wait_resolution_superseded")
    return case_id


async def adyen_other_money_than_ops_read(rig: Recording) -> str:
    """Ops read Adyen's refund for the case's amount; Adyen's own REFUND for it names another
    amount: the mismatch check, ops review (`held-refund-other-money-1`)."""
    assert rig.adyen is not None
    case_id, _ = await ops_read_then_adyen_says(AdyenRig(rig.stack, rig.adyen, rig.proxy), 800, 600)
    await rig.stack.wait_for_audit(case_id, "provider_refund_mismatch")
    return case_id


async def adyen_success_after_ops_not_refunded(rig: Recording) -> str:
    """Ops read "no refund" for the refund the case follows and Adyen's REFUND:true for it
    reaches the case before its run ends: reconciled as after the close, a break
    (`ops-read-contradicted-1`)."""
    assert rig.adyen is not None
    case_id, _ = await not_refunded_heard_with_adyen_s_success(AdyenRig(rig.stack, rig.adyen, rig.proxy), 900)
    return case_id


async def adyen_success_after_ops_none(rig: Recording) -> str:
    """Ops read "no refund" for the case whose create answer was lost (the create landed)
    and Adyen's REFUND:true for that create's refund reaches the case before its run ends:
    reconciled as after the close, a break, not a second refund (`ops-none-contradicted-1`)."""
    assert rig.adyen is not None
    case_id, _ = await not_refunded_heard_with_adyen_s_success(AdyenRig(rig.stack, rig.adyen, rig.proxy), 900,
                                                               answered=False)
    return case_id


async def expiry_under_cancel(rig: Recording) -> str:
    """Ops cancel while the case writes its expiry: the cancel writes it again
    (`cancel-rewrites-interrupted-step-1`): expired, released."""
    case_id, _ = await expiry_under_a_cancel(rig.stack)
    return case_id


async def contradiction_under_cancel(rig: Recording) -> str:
    """Ops cancel while the case writes its provider's contradiction: the cancel writes it
    again (`cancel-rewrites-interrupted-step-1`): ops review, ops told."""
    return await contradiction_under_a_cancel(rig.stack)


async def duplicate_refund(rig: Recording) -> str:
    """Someone refunds again at the provider with our reference while the case watches its
    succeeded refund: an incident (ops review, a reconciliation break), own refund posted."""
    case_id, charge = await requested(rig, 2_000)
    await rig.stack.wait_for_status(case_id, "succeeded")
    async with rig.stack.sandbox() as sb:
        (await sb.post("/v1/refunds", json={"charge": charge, "amount": 2_000, "metadata": {
            "refund_request_id": case_id}})).raise_for_status()
    return case_id


async def cancel_reads_news(rig: Recording) -> str:
    """A succeeded case hears of a second refund with its reference and is cancelled in the
    same task (its worker was down): the cancel reports the duplicate before the run ends."""
    case_id, _ = await duplicate_heard_with_a_cancel(rig.stack)
    return case_id


async def foreign_event_ignored(rig: Recording) -> str:
    """While the case watches its succeeded refund, another provider's event names the case
    (signalled straight to the workflow, as the relay never would): it is ignored, not
    raised as a duplicate refund."""
    case_id, charge = await requested(rig, 2_000)
    await rig.stack.wait_for_status(case_id, "succeeded")
    foreign = foreign_refund_event("stripe", case_id, charge, 2_000, "USD")
    await rig.stack.client.get_workflow_handle(case_id).signal(RefundWorkflow.provider_event, foreign)
    return case_id


async def bank_transfer_confirmed(rig: Recording) -> str:
    """A refund the provider failed, reissued as a bank transfer (the reissue keeps the
    parent's provider), approved, and confirmed by ops: the manual executor's event moves
    the reissue at once (its status poll is a minute away)."""
    await sandbox(rig, "/_sandbox/config", refund_initial_status="pending")
    parent, _ = await requested(rig, 2_500)
    refund_id = await provider_refund_id(rig, parent, "pending")
    await rig.stack.set_provider_status(refund_id, "failed", failure_reason="card_account_closed")
    await rig.stack.wait_for_status(parent, "refund_failed")
    async with rig.stack.api("olga") as api:
        asked = await api.post(f"/v1/refund-requests/{parent}/reissue",
                               json={"method": "bank_transfer", "reason": "recorded scenario"})
    child = str(asked.raise_for_status().json()["refund_request_id"])
    await rig.stack.wait_for_status(child, "awaiting_approval")
    await approval(rig, "bob", child, "approve")
    await rig.stack.wait_for_status(child, "pending")
    async with rig.stack.api("admin") as api:
        (await api.post(f"/v1/manual-refunds/{child}/confirmation",
                        json={"paid": True, "reason": "recorded scenario"})).raise_for_status()
    await rig.stack.wait_for_status(child, "succeeded")
    return child


async def verify_finds_duplicates(rig: Recording) -> str:
    """Two refunds with our reference already exist (the sandbox ignores idempotency keys,
    their webhooks are held) when the case's unanswered create is verified: the lookup's
    second refund is a duplicate-refund incident, and the case follows its own to the ledger."""
    charge = await rig.stack.charge(10_000)
    case_id = rig.stack.new_id()
    await rig.stack.made_elsewhere(charge, case_id, 1_500, 1_500)
    return await rig.stack.request_refund("alice", charge, 1_500, refund_request_id=case_id)


async def refund_mismatch(rig: Recording) -> str:
    """A refund with our reference for another amount exists (its webhook held) when the
    case's unanswered create is verified: the case books what the provider reports and goes
    to ops review."""
    charge = await rig.stack.charge(10_000)
    case_id = rig.stack.new_id()
    await rig.stack.made_elsewhere(charge, case_id, 1_400)
    return await rig.stack.request_refund("alice", charge, 1_500, refund_request_id=case_id)


async def late_failure(rig: Recording) -> str:
    """Succeeded, then failed within the late-failure window: a compensating entry."""
    case_id, _ = await requested(rig, 1_800)
    refund_id = await provider_refund_id(rig, case_id, "succeeded")
    await rig.stack.set_provider_status(refund_id, "failed", failure_reason="expired_or_canceled_card")
    return case_id


async def provider_contradicts(rig: Recording) -> str:
    """Succeeded, then reported canceled within the late-failure window: ops review and a
    notice, nothing reversed."""
    case_id, _ = await requested(rig, 1_800)
    refund_id = await provider_refund_id(rig, case_id, "succeeded")
    await rig.stack.set_provider_status(refund_id, "canceled")
    await rig.stack.wait_for_status(case_id, "ops_review")
    return case_id


async def news_unsealed(rig: Recording) -> str:
    """Succeeded; a failure signalled straight to Temporal without the seal is refused and
    recorded (nothing reversed), and the watch ends with the refund succeeded."""
    case_id, charge = await requested(rig, 1_300)
    refund_id = await provider_refund_id(rig, case_id, "succeeded")
    forged = foreign_refund_event("sandbox", case_id, charge, 1_300, "USD").model_copy(
        update={"refund_id": refund_id, "status": ProviderRefundStatus.FAILED, "raw_status": "failed",
                "failure_reason": "card_account_closed"})
    handle = unsealing(rig.stack.client).get_workflow_handle(case_id)
    await handle.signal(RefundWorkflow.provider_event, forged)
    await rig.stack.wait_for_audit(case_id, "provider_event_refused")
    return case_id


async def cancel_before_submit(rig: Recording) -> str:
    """Cancelled while awaiting approval: released, `canceled_by_ops`."""
    return await cancel(rig, await awaiting_approval(rig))


async def cancel_while_submitting(rig: Recording) -> str:
    """Cancelled while a create the provider makes is unanswered: the horizon is waited out,
    the provider asked, and its refund followed to the ledger."""
    await sandbox(rig, "/_sandbox/faults", mode="timeout_after_success", seconds=2.5)
    case_id, _ = await requested(rig, 1_000)
    await rig.stack.wait_for_audit(case_id, "provider_submit_started")
    return await cancel(rig, case_id)


async def finish_reads_news(rig: Recording) -> str:
    """A late failure the relay signals while the finished watch waits for a refused
    forgery's record: read before the run ends (the reversal posted, the case failed)."""
    case_id, charge = await requested(rig, 1_500)
    await failure_heard_while_finishing(rig.stack, case_id, charge)
    return case_id


async def cancel_finish_takes_notified(rig: Recording) -> str:
    """A refund reported once `canceled_by_ops` was written, while the run waited for a
    forgery's refused record: taken and followed before the run ends."""
    return (await reported_as_the_cancelled_run_ends(rig.stack))[0]


async def cancel_takes_notified(rig: Recording) -> str:
    """As above, but the lookup after the horizon misses the refund: the one its webhook
    reported while the cancel waited is followed to the ledger."""
    charge = await rig.stack.charge(10_000)
    await sandbox(rig, "/_sandbox/faults", mode="timeout_after_success", seconds=2.5)
    await sandbox(rig, "/_sandbox/faults", mode="lookup_empty", times=50, charge=charge)
    case_id = await rig.stack.request_refund("alice", charge, 1_050)
    await rig.stack.wait_for_audit(case_id, "provider_submit_started")
    await rig.stack.wait_for_signalled(case_id)
    return await cancel(rig, case_id)


async def cancel_after_success(rig: Recording) -> str:
    """Cancelled while watching a succeeded refund for a late failure: it stays followed."""
    case_id, _ = await requested(rig, 1_100)
    await rig.stack.wait_for_status(case_id, "succeeded")
    return await cancel(rig, case_id)


async def continued_as_new(rig: Recording) -> str:
    """A pending refund past the (tiny) history threshold: the follow loop continues as new
    carrying the case, and the next run posts the success."""
    await sandbox(rig, "/_sandbox/config", refund_initial_status="pending")
    case_id, _ = await requested(rig, 2_300)
    refund_id = await provider_refund_id(rig, case_id, "pending")
    await continued(rig.stack.client.get_workflow_handle(case_id))  # at its first follow turn
    await rig.stack.set_provider_status(refund_id, "succeeded")
    return case_id


async def resubmits_exhausted(rig: Recording) -> str:
    """Every create fails before a refund exists: after `max_submit_attempts` the case goes
    to ops review (reservation kept) and only looks; ops then cancel it."""
    await sandbox(rig, "/_sandbox/faults", mode="error_before", times=100)
    case_id, _ = await requested(rig, 1_300)
    await rig.stack.wait_for_audit(case_id, "resubmits_exhausted")
    return await cancel(rig, case_id)


async def tracked_dashboard_refund(rig: Recording) -> str:
    """A refund made in the provider's dashboard (no case of ours): a tracking case follows
    it from pending to succeeded and posts it."""
    charge = await rig.stack.charge(20_000)
    await sandbox(rig, "/_sandbox/config", refund_initial_status="pending")
    async with rig.stack.sandbox() as sb:
        made = await sb.post("/v1/refunds", json={"charge": charge, "amount": 700, "currency": "usd"})
    refund_id = str(made.raise_for_status().json()["id"])
    case_id = tracking_case_id("sandbox", refund_id)
    await rig.stack.wait_for_status(case_id, "pending")
    await rig.stack.set_provider_status(refund_id, "succeeded")
    return case_id


async def tracked_refund_reported_otherwise(rig: Recording) -> str:
    """A dashboard refund succeeded, then reported failed for another amount: reversed as
    reported, ops told of the change and of the failure, the case in ops review."""
    refund = Dashboard(rig.stack)
    await refund.reports("succeeded")
    await rig.stack.wait_for_status(refund.case_id, "succeeded")
    await refund.reports("failed", amount=400, failure_reason="card_account_closed")
    await rig.stack.wait_for_audit(refund.case_id, "refund_failed_after_success")
    return refund.case_id


async def tracked_refund_heard_at_watch_end(rig: Recording) -> str:
    """A pending dashboard refund's watch ends; its success, heard while that end is
    recorded, is applied and posted."""
    return (await heard_while_the_watch_ends(rig.stack)).case_id


async def tracked_refund_left_pending(rig: Recording) -> str:
    """A dashboard refund reported pending and never again: its watch ends, ops are told."""
    refund = Dashboard(rig.stack)
    await refund.reports("pending")
    await rig.stack.client.get_workflow_handle(refund.case_id).result()
    return refund.case_id


async def tracked_failure_heard_at_finish(rig: Recording) -> str:
    """A dashboard refund's failure signalled while the finished watch waits for a refused
    forgery's record: read before the run ends (reversed, ops told)."""
    return (await failure_heard_while_the_tracking_run_ends(rig.stack)).case_id


async def approval_sealed(rig: Recording) -> str:
    """An approval sent straight to Temporal (no relay seal) is refused and audited; the
    relay's sealed approval then counts (`approval-relay-seal-1`). The case id is the
    scenario's name: a seal binds the workflow id, and the replay test names each history's
    workflow after its file (so this scenario is recorded once, never as a `_v<n>`)."""
    stack = rig.stack
    body = stack.refund_body(await stack.charge(20_000), 9_000, refund_request_id=SEALED_SCENARIO)
    case_id = str(body["refund_request_id"])
    async with stack.api("alice") as api:
        (await api.post("/v1/refund-requests", json=body)).raise_for_status()
    await stack.wait_for_status(case_id, "awaiting_approval")
    await stack.client.get_workflow_handle(case_id).signal(RefundWorkflow.approve, ApprovalSignal(
        approver="mallory", roles=("admin", "approver"), decision=Decision.APPROVE))
    await stack.wait_for_audit(case_id, "approval_refused")
    await approval(rig, "bob", case_id, "approve")
    return case_id


async def approval_unsealed_unnamed(rig: Recording) -> str:
    """An approval sent straight to Temporal naming someone is refused and written as
    `temporal`'s, naming them (`approval-unsealed-unnamed-1`); nobody else answers, and the
    round expires (no sealed verdict: the case id may be any)."""
    case_id = await awaiting_approval(rig)
    await rig.stack.client.get_workflow_handle(case_id).signal(RefundWorkflow.approve, ApprovalSignal(
        approver="mallory", roles=("admin", "approver"), decision=Decision.APPROVE))
    await rig.stack.wait_for_audit(case_id, "approval_refused")
    return case_id


async def verdict_resent(rig: Recording) -> str:
    """The relay stopped waiting for an update the case then took, and sent the same verdict
    (same id) again as the `approve` signal: the copy is dropped, neither counted nor refused.
    Verdict ids need no patch: a history from before them has none."""
    case_id = await awaiting_approval(rig)
    relay = sealing_client(rig.stack.client, ApprovalKeys([APPROVAL_KEYS])).get_workflow_handle(case_id)
    verdict = new_verdict(Principal("bob", frozenset({"approver"})), Decision.APPROVE, "recorded scenario")
    assert (await relay.execute_update(RefundWorkflow.submit_approval, verdict)).accepted
    await relay.signal(RefundWorkflow.approve, verdict)
    return case_id


# -- payout and reconciliation scenarios -------------------------------------------------------

async def failed_payout_case(rig: Recording, beneficiary: str | None = None) -> str:
    """A paid payout the provider reports failed: its exception case awaits approval."""
    await add_payout_approvers(rig.stack)
    payout = await paid_payout(rig.stack, 150_000, beneficiary=beneficiary)
    await move_payout(rig.stack, payout.provider_payout_id, "failed", failure_code="insufficient_funds")
    case_id = payout_case_id("sandbox", payout.provider_payout_id)
    await wait_for_case(rig.stack, case_id, "awaiting_approval")
    return case_id


async def payout_reissued(rig: Recording, before_approval: Callable[[], None] = lambda: None,
                          decision: str = "approve", beneficiary: str | None = None) -> str:
    """A paid payout fails at the provider: the case opens, is approved, held, reversed,
    ticketed and announced; then a reissue request is decided (`before_approval` arms a
    fault for the reissue) and, approved, paid once."""
    case_id = await failed_payout_case(rig, beneficiary)
    (await decide(rig.stack, "lena", case_id)).raise_for_status()
    await wait_for_case(rig.stack, case_id, "remediated")
    (await ask_reissue(rig.stack, "omar", case_id)).raise_for_status()
    before_approval()
    (await decide(rig.stack, "lena", case_id, decision)).raise_for_status()
    return case_id


async def payout_reversed_and_reissued(rig: Recording) -> str:
    return await payout_reissued(rig)


async def payout_reissue_key_refused(rig: Recording) -> str:
    """The reissue's lookup is refused (401): ops are told, and the reissue is made once the
    key works again."""
    return await payout_reissued(rig, lambda: rig.proxy.refuse_next("GET", "/v1/payouts", 401))


async def payout_reissue_landed_late(rig: Recording) -> str:
    """The reissue's one attempt gets no answer and the provider pays after our client gave
    up: past the horizon the reissue is looked up once more and booked
    (`payout-reissue-looked-up-late-1`)."""
    return await payout_reissued(rig, lambda: rig.proxy.act_late("POST", "/v1/payouts", after_seconds=3))


async def payout_reissue_canceled(rig: Recording) -> str:
    """Ops cancel the case while the approved reissue's attempt looks the payout up (nothing
    sent): once the attempt could no longer land (its start-to-close and the horizon) the
    reissue is looked up once, creating nothing, and the case goes to ops review
    (`payout-reissue-cancel-1`)."""
    case_id = await payout_reissued(rig, lambda: rig.proxy.lose_next("GET", "/v1/payouts"))
    await wait_for_actions(rig.stack, case_id, "reissue_started")
    await asyncio.sleep(1)
    await rig.stack.client.get_workflow_handle(case_id).cancel()
    await wait_for_case(rig.stack, case_id, "ops_review", timeout=120)  # the attempt's 60 s, the horizon
    return case_id


async def payout_reissue_waited_for_hold(rig: Recording) -> str:
    """Another failed payout's case holds the same beneficiary: the approved reissue waits
    (ops told once) until ops release that case's hold, then pays
    (`payout-reissue-waits-for-holds-1`)."""
    await add_payout_approvers(rig.stack)
    beneficiary = f"ben-{uuid.uuid4().hex[:8]}"
    _, holder = await remediated(rig.stack, 20_000, beneficiary=beneficiary)
    case_id = await payout_reissued(rig, beneficiary=beneficiary)
    await wait_for_actions(rig.stack, case_id, "reissue_waiting_for_beneficiary_hold")
    async with rig.stack.api("olga") as api:
        (await api.post(f"/v1/payout-exceptions/{holder}/beneficiary-hold/release",
                        json={"reason": "recorded scenario"})).raise_for_status()
    return case_id


async def payout_reissue_denied(rig: Recording) -> str:
    """The reversed payout's reissue is denied: nothing is paid again."""
    return await payout_reissued(rig, decision="deny")


async def payout_reissue_verdict_for_the_reversal(rig: Recording) -> str:
    """A verdict the relay sealed for the reversal's round reaches the case as a signal once
    the reissue round is open: refused there (`approval-verdict-round-1`); the approver's
    verdict on the reissue then pays it once."""
    case_id = await failed_payout_case(rig)
    (await decide(rig.stack, "lena", case_id)).raise_for_status()
    await wait_for_case(rig.stack, case_id, "remediated")
    (await ask_reissue(rig.stack, "omar", case_id)).raise_for_status()
    await wait_for_case(rig.stack, case_id, "awaiting_reissue_approval")
    await sealed_signal(rig.stack.client, case_id, ApprovalSignal(
        approver="lena", roles=("payments_ops_lead",), decision=Decision.APPROVE, reason="recorded scenario",
        verdict_id=uuid.uuid4().hex, awaiting="awaiting_approval"), issued_at=datetime.now(UTC))
    await wait_for_actions(rig.stack, case_id, "approval_refused")
    (await decide(rig.stack, "lena", case_id)).raise_for_status()
    await wait_for_case(rig.stack, case_id, "reissued")
    return case_id


async def payout_reissue_unsealed(rig: Recording) -> str:
    """A reissue request sent straight to Temporal (no relay seal, naming someone else) is
    refused and audited (`payout-reissue-sealed-1`; written as `temporal`'s, naming them, since
    `payout-reissue-unsealed-unnamed-1`); the relay's request then counts, and the reissue is
    denied."""
    case_id = await failed_payout_case(rig)
    (await decide(rig.stack, "lena", case_id)).raise_for_status()
    await wait_for_case(rig.stack, case_id, "remediated")
    forged = ReissueAsk(requester="someone-else", roles=("ops",), reason="recorded scenario")
    try:
        await rig.stack.client.get_workflow_handle(case_id).execute_update(
            PayoutReversalWorkflow.request_reissue, forged)
    except WorkflowUpdateFailedError:
        pass
    else:
        raise AssertionError("an unsealed reissue request was taken")
    (await ask_reissue(rig.stack, "omar", case_id)).raise_for_status()
    (await decide(rig.stack, "lena", case_id, "deny")).raise_for_status()
    return case_id


async def payout_continued_as_new(rig: Recording) -> str:
    """A second failure reported in the reissue window of a case past the (tiny) history
    threshold: the window continues as new carrying the case, and the next run takes the
    reissue request and pays once."""
    case_id = await failed_payout_case(rig)
    (await decide(rig.stack, "lena", case_id)).raise_for_status()
    await wait_for_case(rig.stack, case_id, "remediated")
    handle = rig.stack.client.get_workflow_handle(case_id)
    payout = (await handle.query(PayoutReversalWorkflow.state)).payout
    assert payout is not None
    await move_payout(rig.stack, payout.provider_payout_id, "failed", failure_code="account_closed")
    await continued(handle)  # at the event's turn
    (await ask_reissue(rig.stack, "omar", case_id)).raise_for_status()
    (await decide(rig.stack, "lena", case_id)).raise_for_status()
    return case_id


async def failed_payout_case_and_payout(rig: Recording) -> tuple[str, PayoutSnapshot]:
    """`failed_payout_case` and the payout as its workflow holds it."""
    case_id = await failed_payout_case(rig)
    payout = (await rig.stack.client.get_workflow_handle(case_id).query(PayoutReversalWorkflow.state)).payout
    assert payout is not None
    return case_id, payout


async def payout_events_while_approving(rig: Recording) -> str:
    """Events land while each approval round waits (a reversal and a stale `paid` in the
    remediation's, a second failure in the reissue's): each goes through the gate before
    the verdict; the reissue is then denied."""
    case_id, payout = await failed_payout_case_and_payout(rig)
    await move_payout(rig.stack, payout.provider_payout_id, "reversed", failure_code="account_closed")
    await move_payout(rig.stack, payout.provider_payout_id, "paid")
    await wait_for_actions(rig.stack, case_id, "payout_status_stale_ignored")
    await wait_for_actions(rig.stack, case_id, "payout_event_joined")
    (await decide(rig.stack, "lena", case_id)).raise_for_status()
    await wait_for_case(rig.stack, case_id, "remediated")
    (await ask_reissue(rig.stack, "omar", case_id)).raise_for_status()
    await wait_for_case(rig.stack, case_id, "awaiting_reissue_approval")
    await move_payout(rig.stack, payout.provider_payout_id, "failed", failure_code="bank_rejection")
    await wait_for_actions(rig.stack, case_id, "payout_event_joined", 2)
    (await decide(rig.stack, "lena", case_id, "deny")).raise_for_status()
    return case_id


async def events_landed_while_approving(rig: Recording) -> str:
    """A failed payout's case awaiting approval, with a reversal (a closed account) and a
    stale `paid` landed on its workflow meanwhile (received: admitted or still queued)."""
    case_id, payout = await failed_payout_case_and_payout(rig)
    await move_payout(rig.stack, payout.provider_payout_id, "reversed", failure_code="account_closed")
    await move_payout(rig.stack, payout.provider_payout_id, "paid")
    handle = rig.stack.client.get_workflow_handle(case_id)
    async with asyncio.timeout(60):
        while (await handle.query(PayoutReversalWorkflow.state)).events_seen < 3:
            await asyncio.sleep(0.1)
    return case_id


async def payout_events_at_bound_while_approving(rig: Recording) -> str:
    """Past the (tiny) history bound when the remediation's round opens: a reversal and a
    stale `paid` that land meanwhile wait for the round's end (a round cannot continue as
    new), then go through the gate; the reissue is then denied."""
    case_id = await events_landed_while_approving(rig)
    (await decide(rig.stack, "lena", case_id)).raise_for_status()
    await wait_for_case(rig.stack, case_id, "remediated")
    await wait_for_actions(rig.stack, case_id, "payout_status_stale_ignored")
    (await ask_reissue(rig.stack, "omar", case_id)).raise_for_status()
    await wait_for_case(rig.stack, case_id, "awaiting_reissue_approval")
    (await decide(rig.stack, "lena", case_id, "deny")).raise_for_status()
    return case_id


async def payout_denied_with_events_at_bound(rig: Recording) -> str:
    """Past the (tiny) history bound while the remediation awaits approval: a reversal and
    a stale `paid` wait for the round's end; it is denied, and they go through the gate in a
    run continued as new before the case finishes."""
    case_id = await events_landed_while_approving(rig)
    (await decide(rig.stack, "lena", case_id, "deny")).raise_for_status()
    return case_id


async def payout_advice_refreshed(rig: Recording) -> str:
    """The recommendation follows the failures that join: a reversal naming a closed account
    lands while the remediation awaits approval (advised again at once), a bank rejection in
    the reissue window (advised again as the reissue round opens); the reissue is denied."""
    case_id, payout = await failed_payout_case_and_payout(rig)
    await move_payout(rig.stack, payout.provider_payout_id, "reversed", failure_code="account_closed")
    await wait_for_actions(rig.stack, case_id, "ai_recommendation_recorded", 2)
    (await decide(rig.stack, "lena", case_id)).raise_for_status()
    await wait_for_case(rig.stack, case_id, "remediated")
    await move_payout(rig.stack, payout.provider_payout_id, "failed", failure_code="bank_rejection")
    await wait_for_actions(rig.stack, case_id, "payout_event_joined", 2)
    (await ask_reissue(rig.stack, "omar", case_id)).raise_for_status()
    await wait_for_case(rig.stack, case_id, "awaiting_reissue_approval")
    await wait_for_actions(rig.stack, case_id, "ai_recommendation_recorded", 3)
    (await decide(rig.stack, "lena", case_id, "deny")).raise_for_status()
    return case_id


async def payout_ledger_failed(rig: Recording) -> str:
    """The ledger is locked when the approved remediation posts its reversal: the entry
    gives up, the hold is rolled back and a high-priority ticket raised."""
    case_id = await failed_payout_case(rig)
    async with await psycopg.AsyncConnection.connect(rig.dsn) as blocker:
        async with blocker.transaction():
            await blocker.execute("LOCK TABLE ledger_entries IN ACCESS EXCLUSIVE MODE")
            (await decide(rig.stack, "lena", case_id)).raise_for_status()
            await wait_for_case(rig.stack, case_id, "rolled_back", timeout=90)
    return case_id


async def payout_reversal_landed_late(rig: Recording) -> str:
    """Policy keeps the hold when step B fails; its entry commits but answers after the
    case's deadline: the case finds it landed and the runbook goes on."""
    stack = rig.stack
    assert stack.worker is not None
    await stack.worker.shutdown()
    stack.settings = stack.settings.model_copy(
        update={"policy_file": keep_holds_policy(Path(tempfile.mkdtemp(prefix="keep-holds-")))})
    await stack.start_worker()
    await add_payout_approvers(stack)
    async with reversal_answered_late(stack) as case_id:
        await wait_for_case(stack, case_id, "remediated", timeout=60)
    return case_id


async def payout_denied(rig: Recording) -> str:
    """The failed payout's remediation is denied: nothing is held or reversed."""
    case_id = await failed_payout_case(rig)
    (await decide(rig.stack, "lena", case_id, "deny")).raise_for_status()
    return case_id


async def payout_paid_at_provider(rig: Recording) -> str:
    """The bank corrects the failed payout to paid before its reversal is approved: the
    approved case reads it at the provider and goes to ops review, nothing held or booked
    back (`payout-read-before-reversal-1`)."""
    case_id = await failed_payout_case(rig)
    await move_payout(rig.stack, case_id.removeprefix("sandbox-payout-"), "paid")
    (await decide(rig.stack, "lena", case_id)).raise_for_status()
    return case_id


async def backfilled_cancellation(rig: Recording) -> tuple[str, str]:
    """A refund shown refunded that the provider canceled, its case long closed, and a
    backfill that finds it: (the backfill's run id, the refund's id)."""
    refund = history(f"ch_{rig.stack.new_id('hist')}", 1_000, days_ago=2)
    await seed_provider(rig.stack, [refund])
    await seed_case(rig.stack, refund)
    await move_at_provider(rig.stack, refund["id"], "canceled")
    report = await backfill(rig.stack, since_days=30)
    return str(report["run_id"]), str(refund["id"])


async def canceled_refund_break(rig: Recording) -> str:
    """The backfill's break opens an exception case awaiting approval; returns its id."""
    _, refund_id = await backfilled_cancellation(rig)
    [found] = await wait_for_breaks(rig.stack, [refund_id], "awaiting_approval")
    return str(found["id"])


async def reconciliation_backfill(rig: Recording) -> str:
    """The backfill run itself: lists the provider's refunds, compares, opens the break."""
    run_id, _ = await backfilled_cancellation(rig)
    return run_id


async def break_decision(rig: Recording, decision: str) -> str:
    break_id = await canceled_refund_break(rig)
    async with rig.stack.api("carol") as api:
        (await api.post(f"/v1/reconciliation/breaks/{break_id}/approvals",
                        json={"decision": decision, "reason": "recorded scenario",
                              "reopened": 0})).raise_for_status()
    return break_workflow_id(int(break_id))


async def reconciliation_payout_break(rig: Recording) -> str:
    """A payout paid in our books that the provider shows failed: the backfill's break is
    handed to the payout's own exception case."""
    await add_payout_approvers(rig.stack)
    failed = provider_payout(40_000, 3, "failed", failure_code="account_closed")
    await seed_payouts(rig.stack, [failed], {failed["id"]: PayoutStatus.PAID})
    await backfill(rig.stack, since_days=30)
    [handed] = await wait_for_breaks(rig.stack, [failed["id"]], "handed_to_case")
    return break_workflow_id(int(handed["id"]))


async def reconciliation_unheld_refund(rig: Recording) -> str:
    """A refund one of a case's failed-looking creates made, found by a backfill while the
    case (in ops review) knows no refund: the break is handed to the case, which adopts it."""
    _, landed = await landed_unknown_to_its_case(rig.stack, 1_600)
    await backfill(rig.stack, since_days=1)
    [handed] = await wait_for_breaks(rig.stack, [landed["id"]], "handed_to_case")
    return break_workflow_id(int(handed["id"]))


async def reconciliation_run_failed(rig: Recording) -> str:
    """The provider refuses the refund listing (403) for good: the backfill run fails."""
    rig.proxy.refuse_next("GET", "/v1/refunds", 403)
    async with rig.stack.api("olga") as api:
        started = await api.post("/v1/reconciliation/runs", json={"provider": "sandbox",
                                                                  "since": ago(30).isoformat()})
    return str(started.raise_for_status().json()["run_id"])


async def reconciliation_break_approved(rig: Recording) -> str:
    """An approver approves the break: one compensating entry posts."""
    return await break_decision(rig, "approve")


async def reconciliation_break_dismissed(rig: Recording) -> str:
    """An approver denies the break: it is dismissed, nothing posts."""
    return await break_decision(rig, "deny")


async def reconciliation_break_expired(rig: Recording) -> str:
    """Nobody decides the break within the approval timeout: it expires."""
    return break_workflow_id(int(await canceled_refund_break(rig)))


SCENARIOS: dict[str, Scenario] = {
    "refund_auto_approved": Scenario(auto_approved),
    "refund_with_approval": Scenario(with_approval),
    SEALED_SCENARIO: Scenario(approval_sealed),
    "refund_verdict_resent": Scenario(verdict_resent),
    "refund_unsealed_unnamed": Scenario(approval_unsealed_unnamed, {"approval_timeout_seconds": 5}),
    "refund_denied": Scenario(denied),
    "refund_submit_case_moved_on": Scenario(moved_on_under_the_submit),
    "refund_verdicts_committed": Scenario(verdicts_committed),
    "refund_late_denial": Scenario(late_denial),
    "refund_verdict_after_deadline": Scenario(verdict_after_deadline, {"approval_timeout_seconds": 2}),
    "refund_expired": Scenario(expired, {"approval_timeout_seconds": 2}),
    "refund_expiry_under_cancel": Scenario(expiry_under_cancel, {"approval_timeout_seconds": 2}),
    "refund_rejected": Scenario(rejected),
    "refund_declined": Scenario(declined),
    "refund_failed_at_provider": Scenario(failed_at_provider),
    "refund_verify_then_found": Scenario(verify_then_found),
    "refund_verify_then_resubmit": Scenario(verify_then_resubmit),
    "refund_ledger_pending_recovered": Scenario(ledger_pending_and_recovered,
                                                {"ledger_pending_after_seconds": 1}),
    "refund_ops_review_unexpected_status": Scenario(unexpected_status, {"status_poll_interval_seconds": 0.5}),
    "refund_ops_review_refused_credentials": Scenario(refused_credentials,
                                                      {"status_poll_interval_seconds": 0.5}),
    "refund_cancel_while_validation_refused": Scenario(cancel_while_validation_refused,
                                                       {"status_poll_interval_seconds": 60}),
    "refund_ops_review_reads_exhausted": Scenario(reads_exhausted, {"provider_read_attempts": 2,
                                                                    "status_poll_interval_seconds": 0.5}),
    "refund_adyen_wait_resolved_by_ops": Scenario(adyen_wait_resolved, adyen=True),
    "refund_adyen_other_charge_ignored": Scenario(adyen_other_charge_ignored, adyen=True),
    "refund_adyen_taken_under_cancel": Scenario(adyen_taken_under_cancel, {"late_failure_window_seconds": 3},
                                                adyen=True),
    "refund_adyen_resolution_superseded": Scenario(adyen_resolution_superseded,
                                                   {"late_failure_window_seconds": 20}, adyen=True),
    "refund_adyen_other_money_than_ops_read": Scenario(adyen_other_money_than_ops_read,
                                                       {"late_failure_window_seconds": 20}, adyen=True),
    "refund_adyen_success_after_ops_not_refunded": Scenario(adyen_success_after_ops_not_refunded,
                                                            {"late_failure_window_seconds": 20}, adyen=True),
    "refund_adyen_success_after_ops_none": Scenario(adyen_success_after_ops_none,
                                                    {"late_failure_window_seconds": 20}, adyen=True),
    "refund_adyen_follow_other_refund": Scenario(adyen_follow_other_refund,
                                                 {"late_failure_window_seconds": 3}, adyen=True),
    "refund_duplicate_provider_refund": Scenario(duplicate_refund, {"late_failure_window_seconds": 6}),
    "refund_foreign_event_ignored": Scenario(foreign_event_ignored, {"late_failure_window_seconds": 6}),
    "refund_verify_finds_duplicates": Scenario(verify_finds_duplicates, {"late_failure_window_seconds": 6}),
    "refund_provider_refund_mismatch": Scenario(refund_mismatch, {"late_failure_window_seconds": 2}),
    "refund_bank_transfer_confirmed": Scenario(bank_transfer_confirmed, {"status_poll_interval_seconds": 60}),
    "refund_late_failure": Scenario(late_failure, {"late_failure_window_seconds": 60}),
    "refund_provider_contradicts": Scenario(provider_contradicts, {"late_failure_window_seconds": 4}),
    "refund_contradiction_under_cancel": Scenario(contradiction_under_cancel,
                                                  {"late_failure_window_seconds": 120}),
    "refund_news_unsealed": Scenario(news_unsealed, {"late_failure_window_seconds": 4}),
    "refund_cancel_before_submit": Scenario(cancel_before_submit),
    "refund_cancel_while_submitting": Scenario(cancel_while_submitting, {"submit_timeout_seconds": 3}),
    "refund_cancel_takes_notified": Scenario(cancel_takes_notified, {"submit_timeout_seconds": 3}),
    "refund_finish_reads_news": Scenario(finish_reads_news, {"late_failure_window_seconds": 3}),
    "refund_cancel_finish_takes_notified": Scenario(cancel_finish_takes_notified,
                                                    {"submit_timeout_seconds": 3,
                                                     "late_failure_window_seconds": 60}),
    "refund_cancel_after_success": Scenario(cancel_after_success, {"late_failure_window_seconds": 60}),
    "refund_cancel_reads_news": Scenario(cancel_reads_news, {"late_failure_window_seconds": 300}),
    "refund_continued_as_new": Scenario(continued_as_new, {"continue_as_new_after_events": 40,
                                                           "status_poll_interval_seconds": 60}),
    "refund_resubmits_exhausted": Scenario(resubmits_exhausted, {
        "max_submit_attempts": 2, "submit_timeout_seconds": 3, "resubmit_margin_seconds": 0.1,
        "status_poll_interval_seconds": 0.5}),
    "tracking_dashboard_refund": Scenario(tracked_dashboard_refund),
    "tracking_continued_as_new": Scenario(tracked_dashboard_refund, {"continue_as_new_after_events": 12}),
    "tracking_reported_otherwise": Scenario(tracked_refund_reported_otherwise,
                                            {"late_failure_window_seconds": 4}),
    "tracking_heard_at_watch_end": Scenario(tracked_refund_heard_at_watch_end,
                                            {"late_failure_window_seconds": 3}),
    "tracking_left_pending": Scenario(tracked_refund_left_pending, {"late_failure_window_seconds": 2}),
    "tracking_finish_reads_news": Scenario(tracked_failure_heard_at_finish,
                                           {"late_failure_window_seconds": 3}),
    "payout_reversed_and_reissued": Scenario(payout_reversed_and_reissued),
    "payout_reissue_key_refused": Scenario(payout_reissue_key_refused),
    "payout_reissue_denied": Scenario(payout_reissue_denied),
    "payout_reissue_verdict_for_the_reversal": Scenario(payout_reissue_verdict_for_the_reversal),
    "payout_reissue_landed_late": Scenario(payout_reissue_landed_late, {"max_submit_attempts": 1,
                                                                        "resubmit_margin_seconds": 4}),
    "payout_reissue_unsealed": Scenario(payout_reissue_unsealed),
    "payout_reissue_unsealed_unnamed": Scenario(payout_reissue_unsealed),
    "payout_reissue_canceled": Scenario(payout_reissue_canceled, {"provider_http_timeout_seconds": 3,
                                                                  "submit_timeout_seconds": 10}),
    "payout_reissue_waited_for_hold": Scenario(payout_reissue_waited_for_hold),
    "payout_continued_as_new": Scenario(payout_continued_as_new, {"continue_as_new_after_events": 20}),
    "payout_ledger_failed": Scenario(payout_ledger_failed, {"ledger_pending_after_seconds": 2}),
    "payout_reversal_landed_late": Scenario(payout_reversal_landed_late, {
        "ledger_pending_after_seconds": 2, "payout_reissue_window_seconds": 1}),
    "payout_denied": Scenario(payout_denied),
    "payout_paid_at_provider": Scenario(payout_paid_at_provider),
    "payout_events_while_approving": Scenario(payout_events_while_approving),
    "payout_events_at_bound_while_approving": Scenario(payout_events_at_bound_while_approving,
                                                       {"continue_as_new_after_events": 20}),
    "payout_denied_with_events_at_bound": Scenario(payout_denied_with_events_at_bound,
                                                   {"continue_as_new_after_events": 20}),
    "payout_advice_refreshed": Scenario(payout_advice_refreshed),
    "reconciliation_backfill": Scenario(reconciliation_backfill),
    "reconciliation_run_failed": Scenario(reconciliation_run_failed, fails=True),
    "reconciliation_break_approved": Scenario(reconciliation_break_approved),
    "reconciliation_payout_break": Scenario(reconciliation_payout_break),
    "reconciliation_unheld_refund": Scenario(reconciliation_unheld_refund, {
        "status_poll_interval_seconds": 3_600, "max_submit_attempts": 2, "reconciliation_grace_seconds": 0}),
    "reconciliation_break_acts_on_its_row": Scenario(reconciliation_unheld_refund, {
        "status_poll_interval_seconds": 3_600, "max_submit_attempts": 2, "reconciliation_grace_seconds": 0}),
    "reconciliation_break_dismissed": Scenario(reconciliation_break_dismissed),
    "reconciliation_break_expired": Scenario(reconciliation_break_expired, {"approval_timeout_seconds": 2}),
}


# -- recording ---------------------------------------------------------------------------------

@asynccontextmanager
async def recording(scenario: Scenario, store: Store, client: Client, temporal: TemporalDevServer,
                    dsn: str) -> AsyncIterator[Recording]:
    """A stack of the scenario's own, its provider's API behind a lossy proxy."""
    if scenario.adyen:
        async with adyen_rig(store, client, temporal, charges_from_fake=True, **scenario.settings) as rigged:
            yield Recording(rigged.stack, rigged.proxy, dsn, rigged.fake)
        return
    proxy = LossyProxy("")
    proxy_server = AppServer(proxy, "127.0.0.1", 0)
    await proxy_server.start()
    try:
        stack = await open_stack(store, client, temporal.address, sandbox_api_base=proxy_server.url,
                                 **scenario.settings)
        proxy.target = stack.sandbox_url
        try:
            yield Recording(stack, proxy, dsn)
        finally:
            await stack.close()
    finally:
        await proxy_server.stop()


async def closed(handle: WorkflowHandle[Any, Any], *, fails: bool) -> None:
    """Waits for the workflow's end, which is a failure exactly when the scenario says so."""
    try:
        await handle.result()
    except WorkflowFailureError:
        if not fails:
            raise
        return
    if fails:
        raise AssertionError(f"{handle.id} completed; its scenario ends failed")


async def first_run(handle: WorkflowHandle[Any, Any]) -> str:
    """The run id that started the workflow's chain of continued runs."""
    started = (await handle.fetch_history()).events[0].workflow_execution_started_event_attributes
    return started.first_execution_run_id


async def continued(handle: WorkflowHandle[Any, Any]) -> None:
    """Waits until the workflow's first run has continued as new and the next run has
    completed a workflow task: before that, an update's validator would see the new run's
    initial state, not the case it carries."""
    started = await first_run(handle)
    async with asyncio.timeout(60):
        while ((await handle.describe()).run_id == started or not any(
                e.HasField("workflow_task_completed_event_attributes")
                for e in (await handle.fetch_history()).events)):
            await asyncio.sleep(0.1)


async def runs(client: Client, workflow_id: str) -> list[WorkflowHistory]:
    """Every run's history, from the first, following continue-as-new."""
    histories: list[WorkflowHistory] = []
    run_id: str | None = await first_run(client.get_workflow_handle(workflow_id))
    while run_id is not None:
        recorded = await client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history()
        histories.append(recorded)
        last = recorded.events[-1]
        continued = last.HasField("workflow_execution_continued_as_new_event_attributes")
        run_id = last.workflow_execution_continued_as_new_event_attributes.new_execution_run_id \
            if continued else None
    return histories


def free_path(stem: str) -> Path:
    """Where a new recording goes: `<stem>.json`, or when taken the first free
    `<stem>_v<n>.json` (existing files are never rewritten, renamed or removed)."""
    path, version = HISTORIES / f"{stem}.json", 0
    while path.exists():
        version += 1
        path = HISTORIES / f"{stem}_v{version}.json"
    return path


def compact(history: WorkflowHistory) -> str:
    """The history's JSON without indentation (a quarter smaller; the payloads are the rest)."""
    return json.dumps(json.loads(history.to_json()), separators=(",", ":")) + "\n"


async def record(folder: Path, names: list[str]) -> list[Path]:
    """Plays the named scenarios (all when none) to their workflow's end and writes each
    run's history as JSON."""
    unknown = set(names) - set(SCENARIOS)
    if unknown:
        raise SystemExit(f"unknown scenarios: {sorted(unknown)}; known: {sorted(SCENARIOS)}")
    temporal = TemporalDevServer(folder / "temporal.db", port=free_port(), ui_port=None)
    pg = EmbeddedPostgres(folder / "pg", delete_on_stop=True)
    await temporal.start()
    try:
        dsn = await asyncio.to_thread(pg.start)
        store = await Store.open(dsn)
        await store.database.migrate()
        client = await Client.connect(temporal.address, data_converter=data_converter(None),
                                      interceptors=[TracingInterceptor(),
                                                    NewsSealing(ApprovalKeys([APPROVAL_KEYS]))])
        written = []
        try:
            HISTORIES.mkdir(exist_ok=True)
            for name, scenario in SCENARIOS.items():
                if names and name not in names:
                    continue
                async with recording(scenario, store, client, temporal, dsn) as rig:
                    workflow_id = await scenario.play(rig)
                    await closed(client.get_workflow_handle(workflow_id), fails=scenario.fails)
                    for number, run in enumerate(await runs(client, workflow_id), start=1):
                        path = free_path(name if number == 1 else f"{name}_run{number}")
                        path.write_text(compact(run))
                        written.append(path)
        finally:
            await store.close()
        return written
    finally:
        temporal.stop()
        pg.stop()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        for path in asyncio.run(record(Path(tmp), sys.argv[1:])):
            print(f"wrote {path}")
