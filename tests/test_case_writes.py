"""The store's folded steps (issue 21) are idempotent, as the activities they replace were:
a retried `validate_and_decide` finds its reservation and decision (one policy row), a
case step run again under its step key (a local activity's, the same in each of its runs)
answers as its first run and writes nothing, and the first submit's intent commits its
`execution_started` (and the deciding approval it carries) once; what a submit carried is
written on its own only while no submit began."""

import dataclasses
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest
from prometheus_client import REGISTRY
from temporalio.exceptions import ApplicationError
from temporalio.testing import ActivityEnvironment

from activities.refund import RefundActivities, step_key
from adapters.db import Store
from adapters.policy_file import load_policy
from adapters.providers.base import ProviderDeclined, RefundsDuplicated
from domain.models import (
    CaseEventInput,
    CaseStatus,
    CaseWrite,
    CaseWrites,
    ChargeSnapshot,
    LedgerInput,
    LedgerKind,
    NoticeInput,
    PolicyDecision,
    ProviderRefund,
    ProviderRefundStatus,
    RefundReason,
    RefundRequest,
    SubmitInput,
    ValidationResult,
)
from domain.policy import ChargePriors
from workers.retention import prune_once


async def opened(store: Store, amount: int = 1_000) -> tuple[RefundRequest, ChargeSnapshot]:
    charge_id = f"ch_{uuid.uuid4().hex[:10]}"
    request = RefundRequest(refund_request_id=f"{charge_id}-case", provider="sandbox", charge_id=charge_id,
                            amount=amount, currency="USD", merchant_account="m", reason=RefundReason.OTHER)
    await store.cases.create(request, "alice")
    return request, ChargeSnapshot(provider="sandbox", charge_id=charge_id, currency="USD",
                                   merchant_account="m", amount=5_000, amount_captured=5_000, captured=True)


def auto_approve(validation: ValidationResult, prior: ChargePriors) -> PolicyDecision:
    return PolicyDecision(auto_approve=True, rules_fired=("auto_approve",), policy_version="t")


async def held(store: Store) -> RefundRequest:
    """An opened case whose amount validation reserved: what a submit finds."""
    request, charge = await opened(store)
    assert (await store.cases.reserve_and_decide(request, charge, auto_approve)).validation.ok
    return request


async def actions(store: Store, case_id: str) -> list[str]:
    return [e["action"] for e in await store.audit.trail(case_id)]


async def test_a_retried_validation_finds_its_reservation_and_its_decision(store: Store) -> None:
    request, charge = await opened(store)
    seen: list[ChargePriors] = []

    def decide(validation: ValidationResult, prior: ChargePriors) -> PolicyDecision:
        seen.append(prior)
        return PolicyDecision(auto_approve=True, rules_fired=("auto_approve",), policy_version="t")

    first = await store.cases.reserve_and_decide(request, charge, decide)
    again = await store.cases.reserve_and_decide(request, charge, decide)
    assert first == again and first.validation.ok and first.decision is not None
    assert seen == [ChargePriors()]  # decided once; the retry read the stored decision
    assert await actions(store, request.refund_request_id) == [
        "request_received", "validation_passed", "policy_decision"]
    row = await store.cases.get(request.refund_request_id)
    assert row is not None and row["reserved_amount"] == 1_000 and row["decision"]["auto_approve"] is True


async def test_a_refused_validation_decides_nothing(store: Store) -> None:
    request, charge = await opened(store, amount=6_000)
    def never(validation: ValidationResult, prior: ChargePriors) -> PolicyDecision:
        raise AssertionError("a rejected request has no decision")

    vetted = await store.cases.reserve_and_decide(request, charge, never)
    assert not vetted.validation.ok and vetted.decision is None
    assert await actions(store, request.refund_request_id) == ["request_received", "validation_rejected"]


async def test_a_settlement_posts_queues_and_records_in_one_write_once(store: Store) -> None:
    request, charge = await opened(store)
    case_id = request.refund_request_id
    await store.cases.reserve(request, charge)
    posting = LedgerInput(refund_request_id=case_id, kind=LedgerKind.REFUND_SETTLED, amount=1_000,
                          currency="USD", provider_refund_id="re_1")
    steps = CaseWrites(refund_request_id=case_id, posting=posting, writes=(
        CaseWrite(notice=NoticeInput(refund_request_id=case_id, kind="refund_succeeded", audience="requester",
                                     dedup_key=f"{case_id}:refund_succeeded")),
        CaseWrite(event=CaseEventInput(refund_request_id=case_id, action="refund_succeeded", actor="workflow",
                                       status=CaseStatus.SUCCEEDED))))
    step_key = f"run-{uuid.uuid4().hex}/2"
    first = await store.cases.write_case_steps(steps, step_key)
    assert (await actions(store, case_id))[-3:] == ["ledger_posted", "notice_queued", "refund_succeeded"]
    again = await store.cases.write_case_steps(steps, step_key)  # the step run again (a retried task)
    assert first.posting is not None and first.posting.newly_posted and first.actions == ("refund_succeeded",)
    assert again == first  # the first run's answer, nothing written
    assert len(await store.ledger.entries(case_id)) == 2  # one entry, two lines
    assert [n["kind"] for n in await store.outbox.notices(case_id)] == ["refund_succeeded"]
    assert (await actions(store, case_id))[-4:] == [
        "validation_passed", "ledger_posted", "notice_queued", "refund_succeeded"]
    row = await store.cases.get(case_id)
    assert row is not None and row["status"] == "succeeded"
    # Another step (its own key) with the same writes: posting and notice once by their
    # keys, the event again: an event has no key of its own, its step has.
    other = await store.cases.write_case_steps(steps, f"run-{uuid.uuid4().hex}/3")
    assert other.posting is not None and not other.posting.newly_posted
    assert (await actions(store, case_id))[-2:] == ["refund_succeeded", "refund_succeeded"]


async def test_a_validation_run_again_answers_as_its_first_run(store: Store) -> None:
    """Whatever the provider says on the second run: the first run's rejection, or its
    reservation and decision, is the answer, and nothing is written again."""
    def approve(validation: ValidationResult, prior: ChargePriors) -> PolicyDecision:
        return PolicyDecision(auto_approve=True, rules_fired=("auto_approve",), policy_version="t")

    rejected, charge = await opened(store)
    step_key = f"run-{uuid.uuid4().hex}/1"
    first = await store.cases.reject(rejected.refund_request_id, "charge not found", step_key)
    assert await store.cases.reserve_and_decide(rejected, charge, approve, step_key) == first
    assert await store.cases.reject(rejected.refund_request_id, "provider down", step_key) == first
    assert not first.validation.ok and first.validation.reason == "charge not found"
    assert await actions(store, rejected.refund_request_id) == ["request_received", "validation_rejected"]
    row = await store.cases.get(rejected.refund_request_id)
    assert row is not None and row["status"] == "rejected" and row["reserved_amount"] == 0

    reserved, charge = await opened(store)
    step_key = f"run-{uuid.uuid4().hex}/1"
    first = await store.cases.reserve_and_decide(reserved, charge, approve, step_key)
    assert await store.cases.reject(reserved.refund_request_id, "charge not found", step_key) == first
    assert first.validation.ok and first.decision is not None
    assert await actions(store, reserved.refund_request_id) == [
        "request_received", "validation_passed", "policy_decision"]
    row = await store.cases.get(reserved.refund_request_id)
    assert row is not None and row["status"] == "validating" and row["reserved_amount"] == 1_000


async def test_kept_step_answers_are_pruned_after_their_retention(store: Store) -> None:
    request, _ = await opened(store)
    old_key, fresh_key = f"run-{uuid.uuid4().hex}/1", f"run-{uuid.uuid4().hex}/1"
    await store.cases.reject(request.refund_request_id, "charge not found", old_key)
    await store.cases.reject(request.refund_request_id, "charge not found", fresh_key)
    await store.database.execute("UPDATE case_step_results SET recorded_at = now() - interval '31 days'"
                                 " WHERE step_key = %s", (old_key,))
    await prune_once(store, timedelta(days=30), timedelta(days=30))
    kept = await store.database.fetch_all("SELECT step_key FROM case_step_results WHERE step_key = ANY(%s)",
                                          ([old_key, fresh_key],))
    assert [k["step_key"] for k in kept] == [fresh_key]


async def test_the_first_submit_commits_execution_started_with_its_intent_once(store: Store) -> None:
    request = await held(store)
    case_id = request.refund_request_id
    started = CaseEventInput(refund_request_id=case_id, action="execution_started", actor="workflow",
                             status=CaseStatus.EXECUTING)
    intent = (CaseWrite(event=started),)
    assert await store.cases.begin_submission(case_id, "key-1", intent) is False
    assert await store.cases.begin_submission(case_id, "key-1", intent) is True  # a later one looks first
    trail = await actions(store, case_id)
    assert trail[-3:] == ["execution_started", "provider_submit_started", "provider_submit_started"]
    assert trail.count("execution_started") == 1


def approval_writes(case_id: str) -> tuple[CaseWrite, ...]:
    """The deciding approval's row and the requester's notice, as a refund defers them."""
    granted = CaseEventInput(refund_request_id=case_id, action="approval_granted", actor="bob")
    notice = NoticeInput(refund_request_id=case_id, kind="refund_approved", audience="requester",
                         dedup_key=f"{case_id}:refund_approved:requester:awaiting_approval")
    return CaseWrite(event=granted), CaseWrite(notice=notice)


async def test_the_first_submit_commits_the_deciding_approval_before_its_intent_once(store: Store) -> None:
    request = await held(store)
    case_id = request.refund_request_id
    started = CaseEventInput(refund_request_id=case_id, action="execution_started", actor="workflow",
                             status=CaseStatus.EXECUTING)
    intent = SubmitInput(request=request, idempotency_key="key-1", started=started,
                         before=approval_writes(case_id)).intent_writes()
    assert await store.cases.begin_submission(case_id, "key-1", intent) is False
    assert await store.cases.begin_submission(case_id, "key-1", intent) is True
    assert (await actions(store, case_id))[-5:] == [
        "approval_granted", "notice_queued", "execution_started", "provider_submit_started",
        "provider_submit_started"]
    assert [n["kind"] for n in await store.outbox.notices(case_id)] == ["refund_approved"]


async def test_a_guarded_write_lands_only_while_no_submit_began(store: Store) -> None:
    """What a cancelled or failed submit carried is written on its own only if no submit began
    (one that began wrote it in its first transaction)."""
    before_any, _ = await opened(store)
    case_id = before_any.refund_request_id
    guarded = CaseWrites(refund_request_id=case_id, writes=approval_writes(case_id), unless_submitted=True)
    assert (await store.cases.write_case_steps(guarded)).actions == ("approval_granted",)
    assert (await actions(store, case_id))[-2:] == ["approval_granted", "notice_queued"]

    after_one = await held(store)
    case_id = after_one.refund_request_id
    await store.cases.begin_submission(case_id, "key-1", approval_writes(case_id))
    trail = await actions(store, case_id)
    guarded = CaseWrites(refund_request_id=case_id, writes=approval_writes(case_id), unless_submitted=True)
    assert (await store.cases.write_case_steps(guarded)).actions == ()
    assert await actions(store, case_id) == trail and trail.count("approval_granted") == 1


def event_writes(case_id: str, action: str) -> CaseWrites:
    """A step of one event row."""
    return CaseWrites(refund_request_id=case_id, writes=(CaseWrite(event=CaseEventInput(
        refund_request_id=case_id, action=action, actor="workflow")),))


def test_a_step_key_is_its_run_its_activity_id_and_its_input() -> None:
    """A workflow task tried again may hold an update or signal its failed attempt did not,
    and a handler's step can then take the activity id the failed attempt gave another
    step: the key tells them apart by their input, so neither takes the other's answer."""
    settle, deny = event_writes("rr-1", "refund_succeeded"), event_writes("rr-1", "approval_denied")
    assert step_key("run-1", "5", settle) == step_key("run-1", "5", settle.model_copy())
    assert step_key("run-1", "5", deny) != step_key("run-1", "5", settle)  # another step took the id
    assert step_key("run-1", "6", settle) != step_key("run-1", "5", settle)  # the same writes, a later step
    assert step_key("run-2", "5", settle) != step_key("run-1", "5", settle)


async def test_a_step_that_took_another_steps_activity_id_writes_its_own_rows(store: Store) -> None:
    request, _ = await opened(store)
    case_id = request.refund_request_id
    run = uuid.uuid4().hex
    recorded, denied = event_writes(case_id, "approval_recorded"), event_writes(case_id, "approval_denied")
    write = store.cases.write_case_steps
    await write(recorded, step_key(run, "5", recorded))  # the failed attempt's step 5
    assert (await write(denied, step_key(run, "5", denied))).actions == ("approval_denied",)
    # the failed attempt's step run again later in the task: written again, as before step keys
    assert (await write(recorded, step_key(run, "6", recorded))).actions == ("approval_recorded",)
    assert (await actions(store, case_id))[1:] == [
        "approval_recorded", "approval_denied", "approval_recorded"]


def activity_run(activity_id: str, run_id: str) -> ActivityEnvironment:
    """An environment running activities as a local activity of `run_id` with `activity_id`."""
    environment = ActivityEnvironment()
    environment.info = dataclasses.replace(environment.info, workflow_run_id=run_id,
                                           activity_id=activity_id, is_local=True)
    return environment


async def test_a_step_redone_after_a_cancel_finds_its_first_answer(store: Store) -> None:
    """The workflow redoes an interrupted status application, or the guarded write of what a
    submit carried, as a new local activity (another id) with the same input: those steps are
    keyed by their input and write once; any other step with the same input under another id
    is another step and writes again."""
    request, _ = await opened(store)
    case_id = request.refund_request_id
    activities = RefundActivities(store, {}, load_policy())
    run = f"run-{uuid.uuid4().hex}"
    guarded = CaseWrites(refund_request_id=case_id, writes=approval_writes(case_id), unless_submitted=True)
    plain = event_writes(case_id, "provider_answering_again")
    for activity_id in ("4", "9"):
        await activity_run(activity_id, run).run(activities.write_case_steps, guarded)
        await activity_run(activity_id, run).run(activities.write_case_steps, plain)
    trail = await actions(store, case_id)
    assert trail.count("approval_granted") == 1 and trail.count("provider_answering_again") == 2


async def test_a_duplicate_report_redone_after_a_cancel_is_written_once(store: Store) -> None:
    """A cancel that interrupts a duplicate refund's report makes it again: its break and
    notice are idempotent, and its case event (once per duplicate refund: its id in the
    detail) is keyed by its input too, so a first write that committed is not written twice."""
    request, _ = await opened(store)
    case_id = request.refund_request_id
    activities = RefundActivities(store, {}, load_policy())
    run = f"run-{uuid.uuid4().hex}"
    report = CaseWrites(refund_request_id=case_id, writes=(CaseWrite(event=CaseEventInput(
        refund_request_id=case_id, actor="workflow", action="duplicate_provider_refund",
        status=CaseStatus.OPS_REVIEW, detail={"duplicate_refund_id": "re_dup"})),))
    for activity_id in ("5", "11"):
        await activity_run(activity_id, run).run(activities.write_case_steps, report)
    assert (await actions(store, case_id)).count("duplicate_provider_refund") == 1


async def test_an_escalation_whose_step_runs_again_is_counted_once(store: Store) -> None:
    """The ops-review escalation metric counts what a step wrote: a run again of the step
    (its workflow task tried again) writes nothing and counts nothing; nor does a guarded
    write once a submit began."""
    request = await held(store)
    reason = f"test_escalation_{uuid.uuid4().hex[:8]}"
    escalate = CaseWrites(refund_request_id=request.refund_request_id, writes=(CaseWrite(event=CaseEventInput(
        refund_request_id=request.refund_request_id, actor="workflow", action=reason,
        status=CaseStatus.OPS_REVIEW)),))
    environment = activity_run("7", f"run-{uuid.uuid4().hex}")
    activities = RefundActivities(store, {}, load_policy())
    for _ in range(2):
        await environment.run(activities.write_case_steps, escalate)
    await store.cases.begin_submission(request.refund_request_id, "key-1")
    environment.info = dataclasses.replace(environment.info, activity_id="8")
    await environment.run(activities.write_case_steps, escalate.model_copy(update={"unless_submitted": True}))
    assert (await actions(store, request.refund_request_id)).count(reason) == 1
    assert REGISTRY.get_sample_value("refunds_ops_review_escalations_total", {"reason": reason}) == 1.0


def counting_provider(store: Store) -> tuple[RefundActivities, list[str]]:
    """Refund activities whose provider only counts the creates asked of it."""
    calls: list[str] = []

    class Provider:
        name = "sandbox"

        async def create_refund(self, *_: object) -> None:
            calls.append("create_refund")

    return RefundActivities(store, cast(Any, {"sandbox": Provider()}), load_policy()), calls


async def test_a_submit_attempt_past_its_timeout_calls_no_provider(store: Store) -> None:
    """An attempt that stalled (a paused VM, a long GC, a slow lookup before a resubmit) and
    wakes past its start-to-close: Temporal has given up on it, and a cancel waits exactly
    that long before it looks at the provider and releases the hold. Calling the provider
    now would make a refund after that look: it stops before the call instead."""
    request = await held(store)
    activities, calls = counting_provider(store)
    environment = ActivityEnvironment()
    environment.info = dataclasses.replace(
        environment.info, started_time=datetime.now(UTC) - timedelta(minutes=10),
        start_to_close_timeout=timedelta(seconds=5))
    with pytest.raises(ApplicationError, match="past its start-to-close") as raised:
        await environment.run(activities.submit_provider_refund,
                              SubmitInput(request=request, idempotency_key="rfo_stalled"))
    assert calls == [] and not raised.value.non_retryable


@pytest.mark.parametrize("lookup_before", ["resubmit", "decline"])
async def test_a_submit_s_lookup_finding_two_refunds_follows_the_paid_one_and_raises_the_other(
        store: Store, lookup_before: str) -> None:
    """A resubmit's lookup (or the one after its decline) finds two refunds carrying our
    reference (a provider that ignored the key, a lookup that missed the first): it followed
    the older, pending one and dropped the other, which had paid. When the followed one
    failed, the case showed no refund, its hold released, and nothing stood in a reissue's
    way (reproduced: no break). The paid one is followed; the other is a `duplicate_refund`
    break (which holds any reissue) and ops are told, as when verify-state finds two."""
    request = await held(store)
    case_id = request.refund_request_id

    def refund(status: ProviderRefundStatus) -> ProviderRefund:
        return ProviderRefund(provider="sandbox", refund_id=f"re_{uuid.uuid4().hex[:12]}",
                              charge_id=request.charge_id, amount=request.amount, currency=request.currency,
                              status=status, raw_status=status.value, reference=case_id)
    pending, paid = refund(ProviderRefundStatus.PENDING), refund(ProviderRefundStatus.SUCCEEDED)

    class Provider:
        name = "sandbox"

        async def create_refund(self, *_: object) -> ProviderRefund:
            raise ProviderDeclined("sandbox: the charge is already refunded")

        async def find_refund(self, *_: object) -> ProviderRefund:
            raise RefundsDuplicated("sandbox", case_id, [pending, paid])

    activities = RefundActivities(store, cast(Any, {"sandbox": Provider()}), load_policy())
    if lookup_before == "resubmit":
        assert not await store.cases.begin_submission(case_id, "rfo_first")
    else:  # the resubmit's first lookup found nothing; its create is declined
        class Declining(Provider):
            lookups = 0

            async def find_refund(self, *args: object) -> ProviderRefund:
                self.lookups += 1
                if self.lookups == 1:
                    return None  # type: ignore[return-value]
                return await super().find_refund(*args)
        activities = RefundActivities(store, cast(Any, {"sandbox": Declining()}), load_policy())
        assert not await store.cases.begin_submission(case_id, "rfo_first")
    environment = ActivityEnvironment()  # an attempt within its start-to-close
    environment.info = dataclasses.replace(environment.info, started_time=datetime.now(UTC),
                                           start_to_close_timeout=timedelta(minutes=5))
    followed = await environment.run(activities.submit_provider_refund,
                                     SubmitInput(request=request, idempotency_key="rfo_again"))
    assert followed.refund_id == paid.refund_id
    breaks = await store.database.fetch_all(
        "SELECT object_id, break_class, refund_request_id FROM reconciliation_breaks"
        " WHERE object_id = ANY(%s)", ([pending.refund_id, paid.refund_id],))
    assert [(b["object_id"], b["break_class"], b["refund_request_id"]) for b in breaks] == [
        (pending.refund_id, "duplicate_refund", case_id)]
    assert "duplicate_provider_refund" in [n["kind"] for n in await store.outbox.notices(case_id)]


async def test_a_submit_attempt_that_outlived_its_case_calls_no_provider(store: Store) -> None:
    """An attempt of the submit still running after its timeout (stuck on a connection or
    a lock) must not call the provider once the case has moved on: ops cancelled it (the
    workflow waited the submit's timeout, wrote `canceled_by_ops` and released the hold), or
    it was denied. Its intent write is refused under the case's lock, before any call."""
    request = await held(store)
    case_id = request.refund_request_id
    await store.cases.record_event(CaseEventInput(
        refund_request_id=case_id, actor="olga", action="canceled_by_ops", status=CaseStatus.CANCELED_BY_OPS,
        release_reservation=True))
    activities, calls = counting_provider(store)
    with pytest.raises(ApplicationError, match="canceled_by_ops"):
        await ActivityEnvironment().run(activities.submit_provider_refund,
                                        SubmitInput(request=request, idempotency_key="rfo_late"))
    assert calls == []
    row = await store.cases.get(case_id)
    assert row is not None and (row["status"], row["reserved_amount"]) == ("canceled_by_ops", 0)
    assert "provider_submit_started" not in await actions(store, case_id)


async def _left_to_the_next_pass(store: Store, request: RefundRequest, seen_updated_at: datetime) -> None:
    """The sweep, acting on the row as it read it, hands nothing over: executing, held, unswept."""
    case_id = request.refund_request_id
    assert not await store.cases.sweep_closed(case_id, workflow_status="TERMINATED", provider_holds=False,
                                              found=None, seen_updated_at=seen_updated_at)
    row = await store.cases.get(case_id)
    assert row is not None and (row["status"], row["reserved_amount"]) == ("executing", request.amount)
    assert "workflow_closed_case_swept" not in await actions(store, case_id)


async def test_the_sweep_acts_on_nothing_that_moved_after_it_looked(store: Store) -> None:
    """The sweep read the case before any submit (so the provider was not asked: it holds
    nothing); an attempt still running on a worker then began its submit. Released on that
    stale reading, the hold would be gone while the refund may land; and a case whose
    workflow a re-drive started after the sweep found none was taken over from a live run.
    A case that moved since the sweep read it is left for the next pass to read again."""
    request = await held(store)
    case_id = request.refund_request_id
    seen = await store.cases.get(case_id)
    assert seen is not None and seen["submission_started_at"] is None
    assert await store.cases.begin_submission(case_id, "rfo_stray") is False  # after the sweep's read
    await _left_to_the_next_pass(store, request, seen["updated_at"])


async def test_a_resubmit_begun_after_the_sweep_looked_keeps_the_case_from_it(store: Store) -> None:
    """A later submit attempt (its case long executing, the provider asked by the sweep and
    holding nothing yet) begins after the sweep read the case: its create may land, so the
    sweep's reading is stale, as for a first submit. Before, only the first marked the case
    moved: a case resubmitting for minutes read as idle and its hold was released."""
    request = await held(store)
    case_id = request.refund_request_id
    assert await store.cases.begin_submission(case_id, "rfo_first") is False
    seen = await store.cases.get(case_id)
    assert seen is not None and seen["submission_started_at"] is not None
    assert await store.cases.begin_submission(case_id, "rfo_first") is True  # after the sweep's read
    await _left_to_the_next_pass(store, request, seen["updated_at"])
