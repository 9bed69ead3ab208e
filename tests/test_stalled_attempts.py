"""An activity attempt that outlives its timeout (stuck on a connection or a lock, its worker
paused) is tried again by Temporal; the retry writes, the workflow moves on and writes the
case's next status, and then the stalled attempt wakes up and commits. Its write is the step
already written: it must write nothing, neither the status it carries (the case would move
backwards: a tracked refund back to `tracking` after `succeeded`, a payout case back to
`awaiting_approval` after `denied`) nor its audit row again. Every attempt of a step shares
its key (workflow run, activity id, input); so does a retry after a commit whose answer was
lost (the worker died before it reported)."""

import dataclasses
import uuid

from temporalio.testing import ActivityEnvironment

from activities.payout import PayoutActivities
from activities.refund import RefundActivities
from adapters.db import Store
from adapters.policy_file import load_policy
from domain.models import CaseEventInput, CaseStatus, ProviderRefund, ProviderRefundStatus
from domain.payouts import HoldInput, PayoutCaseEventInput, PayoutCaseStatus, PayoutStatus, ReversalInput
from tests.test_case_writes import actions, opened


def attempt(run_id: str, activity_id: str, number: int) -> ActivityEnvironment:
    """An environment running an activity as attempt `number` of `activity_id` in `run_id`."""
    environment = ActivityEnvironment()
    environment.info = dataclasses.replace(environment.info, workflow_run_id=run_id, activity_id=activity_id,
                                           attempt=number, is_local=False)
    return environment


async def test_a_stalled_attempt_of_a_case_event_writes_nothing_after_its_retry(store: Store) -> None:
    request, _ = await opened(store)
    case_id = request.refund_request_id
    activities = RefundActivities(store, {}, load_policy())
    run = f"run-{uuid.uuid4().hex}"
    provider = "provider:sandbox"
    pending = CaseEventInput(refund_request_id=case_id, action="provider_status_pending", actor=provider,
                             status=CaseStatus.PENDING)
    succeeded = CaseEventInput(refund_request_id=case_id, action="refund_succeeded", actor=provider,
                               status=CaseStatus.SUCCEEDED)
    await attempt(run, "5", 2).run(activities.record_case_event, pending)  # the retry lands first
    await attempt(run, "6", 1).run(activities.record_case_event, succeeded)  # the workflow moved on
    await attempt(run, "5", 1).run(activities.record_case_event, pending)  # the stalled attempt wakes
    row = await store.cases.get(case_id)
    assert row is not None and row["status"] == "succeeded"
    assert (await actions(store, case_id))[1:] == ["provider_status_pending", "refund_succeeded"]
    # another step with the same event (its own activity id) is written: it is another step
    await attempt(run, "7", 1).run(activities.record_case_event, pending)
    assert (await actions(store, case_id))[1:] == ["provider_status_pending", "refund_succeeded",
                                                   "provider_status_pending"]


async def payout_case(store: Store) -> tuple[str, str]:
    """A failed payout (its own beneficiary) and its opened exception case: (case id, payout id)."""
    payout_id = f"po_{uuid.uuid4().hex[:10]}"
    case_id = f"sandbox-payout-{payout_id}"
    await store.database.execute(
        "INSERT INTO payouts (id, provider, provider_payout_id, beneficiary_id, amount, currency, status)"
        " VALUES (%s, 'sandbox', %s, %s, 5000, 'USD', 'failed')", (payout_id, payout_id, f"ben_{payout_id}"))
    await store.database.execute(
        "INSERT INTO payout_cases (case_id, payout_id, status, reported_status)"
        " VALUES (%s, %s, 'opening', 'failed')", (case_id, payout_id))
    return case_id, payout_id


async def test_a_stalled_attempt_of_a_payout_case_event_writes_nothing_after_its_retry(store: Store) -> None:
    case_id, _ = await payout_case(store)
    activities = PayoutActivities(store, {}, load_policy())
    run = f"run-{uuid.uuid4().hex}"
    requested = PayoutCaseEventInput(case_id=case_id, action="approval_requested",
                                     status=PayoutCaseStatus.AWAITING_APPROVAL)
    denied = PayoutCaseEventInput(case_id=case_id, action="approval_denied", actor="bob",
                                  status=PayoutCaseStatus.DENIED)
    await attempt(run, "3", 2).run(activities.record_payout_case_event, requested)
    await attempt(run, "4", 1).run(activities.record_payout_case_event, denied)
    await attempt(run, "3", 1).run(activities.record_payout_case_event, requested)
    row = await store.database.fetch_one("SELECT status FROM payout_cases WHERE case_id = %s", (case_id,))
    assert row is not None and row["status"] == "denied"
    assert await actions(store, case_id) == ["approval_requested", "approval_denied"]


async def test_a_stalled_hold_attempt_leaves_a_payout_rolled_back_after_its_retry(store: Store) -> None:
    """Runbook step A timed out and its retry held the payout; the compensating entry failed
    and the workflow rolled the hold back; then the first attempt of the hold commits."""
    case_id, payout_id = await payout_case(store)
    activities = PayoutActivities(store, {}, load_policy())
    run = f"run-{uuid.uuid4().hex}"
    hold = HoldInput(case_id=case_id, payout_id=payout_id, hold_beneficiary=True)
    held = await attempt(run, "6", 2).run(activities.hold_payout, hold)
    payout = await store.payouts.payout(payout_id)
    assert payout is not None and held.newly_held
    released = await attempt(run, "8", 1).run(activities.release_payout_hold,
                                              ReversalInput(case_id=case_id, payout=payout))
    assert released.rolled_back and released.restored is PayoutStatus.FAILED
    assert await attempt(run, "6", 1).run(activities.hold_payout, hold) == held  # the retry's answer
    row = await store.database.fetch_one("SELECT status, held_from_status FROM payouts WHERE id = %s",
                                         (payout_id,))
    assert row == {"status": "failed", "held_from_status": None}
    holds = await store.database.fetch_all("SELECT released_at FROM beneficiary_holds WHERE case_id = %s",
                                           (case_id,))
    assert len(holds) == 1 and holds[0]["released_at"] is not None
    assert await actions(store, case_id) == ["payout_held", "payout_hold_rolled_back"]


async def test_a_late_provider_read_never_moves_the_refund_s_status_back(store: Store) -> None:
    """A verify attempt read the refund pending and stalled (a connection, the pool); its
    retry read it failed and the case moved on. Woken, the first attempt's read is older
    than what the case holds: it is recorded in the trail as read, marked stale, and the
    case keeps the failure (before, the case read pending again without a failure reason,
    and a replayed old success webhook looked like news)."""
    request, _ = await opened(store)
    case_id = request.refund_request_id

    def read(status: ProviderRefundStatus, reason: str | None = None) -> ProviderRefund:
        return ProviderRefund(provider="sandbox", refund_id=f"re_{case_id}", charge_id=request.charge_id,
                              amount=1_000, currency="USD", status=status, raw_status=status.value,
                              failure_reason=reason, reference=case_id)

    await store.cases.record_provider_refund(case_id, read(ProviderRefundStatus.FAILED, "card closed"),
                                             "verify_state")
    await store.cases.record_provider_refund(case_id, read(ProviderRefundStatus.PENDING), "verify_state")
    row = await store.cases.get(case_id)
    assert row is not None and (row["provider_status"], row["failure_reason"]) == ("failed", "card closed")
    trail = [e for e in await store.audit.trail(case_id) if e["action"] == "verify_state"]
    assert [(e["detail"]["status"], e["detail"].get("stale")) for e in trail] == [
        ("failed", None), ("pending", True)]
    # another refund found (the case followed none that exists) is taken as reported
    other = read(ProviderRefundStatus.PENDING).model_copy(update={"refund_id": f"re2_{case_id}"})
    await store.cases.record_provider_refund(case_id, other, "verify_state")
    row = await store.cases.get(case_id)
    assert row is not None and (row["provider_refund_id"], row["provider_status"]) == (
        other.refund_id, "pending")
