"""Every recorded history under tests/histories replays on today's workflow code, with the
worker's sandbox, converter and interceptors; a change that would break running workflows
fails here. Each history also holds the branch it is named for (its activities, case
actions, patch markers, signals, cancel or continue-as-new), so a file recorded on the
wrong branch cannot pass. Record with `python -m tests.record_histories` (see that module).
"""

import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio import workflow
from temporalio.client import WorkflowHistory
from temporalio.common import RawValue
from temporalio.contrib.opentelemetry import TracingInterceptor
from temporalio.worker import Replayer

from adapters.approval_seal import ApprovalKeys, ApprovalSealCheck
from adapters.codec import EncryptionCodec, data_converter, parse_keys
from domain.reconciliation import break_workflow_id
from tests.harness import APPROVAL_KEYS, PAYLOAD_KEYS
from tests.record_histories import SCENARIOS, SEALED_SCENARIO
from workers.main import WORKFLOWS, workflow_runner
from workflows import approvals, news, payout_case, reconciliation, refund_case, tracking
from workflows.approvals import (
    LATE_DENIALS_PATCH,
    SEALED_APPROVALS_PATCH,
    UNSEALED_UNNAMED_PATCH,
    VERDICT_ROUND_PATCH,
    VERDICT_TAKING_PATCH,
)
from workflows.news import NEWS_SEALED_PATCH
from workflows.payout_case import (
    ADVICE_REFRESH_PATCH,
    DENIED_ROUND_EVENTS_PATCH,
    EVENTS_WHILE_APPROVING_PATCH,
    GIVE_UP_PATCH,
    HELD_REISSUE_PATCH,
    LATE_REISSUE_PATCH,
    PAID_AT_PROVIDER_PATCH,
    REISSUE_CANCEL_PATCH,
    REISSUE_HORIZON_PATCH,
    SEALED_REISSUE_PATCH,
    UNSEALED_REISSUE_UNNAMED_PATCH,
)
from workflows.payout_case import BOUNDED_PATCH as PAYOUT_BOUNDED_PATCH
from workflows.reconciliation import (
    APPROVAL_ROUND_PATCH,
    PAYOUT_BREAK_PATCH,
    STORED_CASE_PATCH,
    UNHELD_REFUND_PATCH,
)
from workflows.refund_case import (
    ADYEN_WAIT_PATCH,
    BOUNDED_PATCH,
    CANCEL_NEWS_PATCH,
    CANCEL_NOTIFIED_PATCH,
    CANCEL_PATCH,
    CANCEL_VALIDATION_PATCH,
    CASE_MOVED_ON_PATCH,
    CHARGE_SCOPED_WAIT_PATCH,
    CONTRADICTION_PATCH,
    DUPLICATE_PATCH,
    EXECUTOR_EVENTS_PATCH,
    FINISH_NEWS_PATCH,
    FINISH_NOTIFIED_PATCH,
    FOLLOW_SCOPE_PATCH,
    FOLLOWED_WAIT_PATCH,
    HELD_MONEY_PATCH,
    HORIZON_PATCH,
    INTERRUPTED_STEP_PATCH,
    MISMATCH_PATCH,
    OPS_NONE_CONTRADICTED_PATCH,
    OPS_READ_CONTRADICTED_PATCH,
    PROVIDER_SCOPED_WAIT_PATCH,
    SUPERSEDED_RESOLUTION,
    SUPERSEDED_RESOLUTION_PATCH,
    TAKEN_NOTIFICATION_PATCH,
    VERDICTS_COMMITTED_PATCH,
    VERIFY_DUPLICATES_PATCH,
)
from workflows.tracking import BOUNDED_PATCH as TRACKING_BOUNDED_PATCH
from workflows.tracking import FINISH_NEWS_PATCH as TRACKING_FINISH_NEWS_PATCH
from workflows.tracking import NEWS_PATCH as TRACKING_NEWS_PATCH
from workflows.tracking import PENDING_END_PATCH as TRACKING_PENDING_END_PATCH
from workflows.tracking import WATCH_END_PATCH as TRACKING_WATCH_END_PATCH

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))
CASE_EVENT_ACTIVITIES = {"record_case_event", "record_payout_case_event"}
LOCAL_ACTIVITY_MARKER = "core_local_activity"
CASE_WRITES = "write_case_steps"
VALIDATION = {"validate_refund", "validate_and_decide"}
"""Validation in any shape (alone; with the policy's decision since fewer-round-trips-1, local
since validation-local-1) is also the fact `validation`: a branch asks how often it ran."""
"""A local activity has no scheduled event: its marker names it, and its result says what it
wrote (the case actions, the ledger template posted)."""


@dataclass(frozen=True)
class Branch:
    """What a history of a branch must hold (`has`) and must not (`lacks`); facts as
    `_facts` names them."""

    has: frozenset[str]
    lacks: frozenset[str] = frozenset()


def branch(*has: str, lacks: Sequence[str] = ()) -> Branch:
    return Branch(frozenset(has), frozenset(lacks))


SUBMIT, VERIFY = "activity:submit_provider_refund", "activity:verify_provider_refund"

# Keyed by the scenario's name; its older versions (`_v<n>`) are held to the same facts.
BRANCHES: dict[str, Branch] = {
    "refund_auto_approved": branch(SUBMIT, "action:refund_succeeded", "ledger:refund_settled",
                                   lacks=[VERIFY, "update:submit_approval"]),
    "refund_with_approval": branch("update:submit_approval", "action:approval_granted", SUBMIT,
                                   "action:refund_succeeded"),
    SEALED_SCENARIO: branch(f"patch:{SEALED_APPROVALS_PATCH}", "signal:approve", "action:approval_refused",
                            "update:submit_approval", "action:approval_granted", SUBMIT),
    "refund_unsealed_unnamed": branch(f"patch:{UNSEALED_UNNAMED_PATCH}", "signal:approve",
                                      "action:approval_refused", "action:approval_expired",
                                      lacks=["action:approval_granted", SUBMIT]),
    "refund_verdict_resent": branch("update:submit_approval", "signal:approve", "action:approval_granted",
                                    SUBMIT, "action:refund_succeeded",
                                    lacks=["action:approval_refused", "action:approval_granted#2"]),
    "refund_denied": branch("update:submit_approval", "action:approval_denied",
                            f"patch:{PROVIDER_SCOPED_WAIT_PATCH}", lacks=[SUBMIT]),
    "refund_submit_case_moved_on": branch(
        "update:submit_approval", SUBMIT, f"patch:{CASE_MOVED_ON_PATCH}", "action:approval_granted",
        "action:submit_refused_case_moved_on", lacks=[VERIFY, f"{SUBMIT}#2", "action:refund_succeeded"]),
    "refund_verdicts_committed": branch(
        "signal:approve", "update:submit_approval", f"patch:{VERDICTS_COMMITTED_PATCH}",
        "action:approval_refused", "action:approval_denied", lacks=[SUBMIT, "action:approval_granted"]),
    "refund_late_denial": branch(f"patch:{LATE_DENIALS_PATCH}", "signal:approve", "action:approval_denied",
                                 lacks=[SUBMIT, "action:approval_refused", "update:submit_approval"]),
    "refund_verdict_after_deadline": branch(
        f"patch:{VERDICT_TAKING_PATCH}", "update:submit_approval#2", "action:approval_granted",
        "action:approval_expired", "action:approval_refused", lacks=[SUBMIT, "action:approval_granted#2"]),
    "refund_expired": branch("action:approval_expired", lacks=[SUBMIT, "update:submit_approval"]),
    "refund_rejected": branch("activity:validate_refund", lacks=["activity:decide_policy", SUBMIT]),
    "refund_declined": branch(SUBMIT, "action:refund_declined",
                              lacks=[VERIFY, f"{SUBMIT}#2", "activity:post_ledger"]),
    "refund_failed_at_provider": branch(SUBMIT, "signal:provider_event", "action:refund_failed",
                                        lacks=["activity:post_ledger", "action:refund_succeeded"]),
    "refund_verify_then_found": branch(SUBMIT, VERIFY, "action:refund_succeeded",
                                       lacks=[f"{SUBMIT}#2"]),
    "refund_verify_then_resubmit": branch(VERIFY, f"{SUBMIT}#2", f"patch:{HORIZON_PATCH}",
                                          "action:refund_succeeded"),
    "refund_ledger_pending_recovered": branch("action:ledger_pending", "action:ledger_recovered",
                                              "activity:post_ledger#2", lacks=[f"{SUBMIT}#2"]),
    "refund_ops_review_unexpected_status": branch("action:unexpected_provider_status", VERIFY,
                                                  "action:refund_succeeded"),
    "refund_ops_review_refused_credentials": branch(
        "action:provider_configuration_refused#2", "action:provider_answering_again#2",
        "validation#2", f"{SUBMIT}#2", "action:refund_succeeded"),
    "refund_ops_review_reads_exhausted": branch(
        "action:validate_retries_exhausted", "action:verify_retries_exhausted",
        "action:provider_answering_again#2", "action:refund_succeeded", lacks=[f"{SUBMIT}#2"]),
    "refund_adyen_wait_resolved_by_ops": branch(
        VERIFY, "action:awaiting_provider_notification", "action:no_status_lookup_escalated",
        f"patch:{ADYEN_WAIT_PATCH}", "signal:provider_event", "action:provider_notification_received",
        "action:refund_failed", lacks=[f"{SUBMIT}#2"]),
    "refund_adyen_other_charge_ignored": branch(
        "action:awaiting_provider_notification", f"patch:{CHARGE_SCOPED_WAIT_PATCH}",
        "signal:provider_event#2", "action:provider_notification_received",
        lacks=[f"{SUBMIT}#2", "action:refund_succeeded"]),
    "refund_expiry_under_cancel": branch(
        "cancel_requested", f"patch:{INTERRUPTED_STEP_PATCH}", "action:approval_expired",
        lacks=[SUBMIT, "action:canceled_by_ops"]),
    "refund_contradiction_under_cancel": branch(
        "cancel_requested", f"patch:{INTERRUPTED_STEP_PATCH}", f"patch:{CONTRADICTION_PATCH}",
        "action:provider_status_contradicted", "action:cancel_after_provider_refund", lacks=[f"{SUBMIT}#2"]),
    "refund_adyen_taken_under_cancel": branch(
        "cancel_requested", f"patch:{TAKEN_NOTIFICATION_PATCH}", "action:awaiting_provider_notification#2",
        "action:cancel_after_provider_refund", "action:refund_succeeded", "ledger:refund_settled",
        lacks=[f"{SUBMIT}#2", "action:canceled_by_ops"]),
    "refund_adyen_success_after_ops_not_refunded": branch(
        "action:provider_notification_received", "action:refund_failed",
        f"patch:{OPS_READ_CONTRADICTED_PATCH}", "signal:provider_event#2", "activity:reconcile_provider_word",
        lacks=["ledger:refund_settled", "action:refund_succeeded"]),
    "refund_adyen_success_after_ops_none": branch(
        "action:provider_notification_received", "action:refund_failed",
        f"patch:{OPS_NONE_CONTRADICTED_PATCH}", "activity:reconcile_provider_word",
        lacks=["ledger:refund_settled", "action:refund_succeeded", "action:duplicate_provider_refund",
               f"patch:{OPS_READ_CONTRADICTED_PATCH}"]),
    "refund_adyen_other_money_than_ops_read": branch(
        "action:provider_notification_received", "action:refund_succeeded", f"patch:{HELD_MONEY_PATCH}",
        "signal:provider_event#2", "action:provider_refund_mismatch", lacks=["ledger:refund_reversed"]),
    "refund_adyen_resolution_superseded": branch(
        "action:provider_notification_received", "action:refund_succeeded", "ledger:refund_settled",
        f"patch:{SUPERSEDED_RESOLUTION_PATCH}", "signal:provider_event#2", f"action:{SUPERSEDED_RESOLUTION}",
        lacks=["action:refund_failed_after_success", "action:duplicate_provider_refund",
               "ledger:refund_reversed"]),
    "refund_adyen_follow_other_refund": branch(
        "action:provider_status_changed", "action:awaiting_provider_notification",
        f"patch:{FOLLOWED_WAIT_PATCH}", "action:duplicate_provider_refund", "action:refund_succeeded",
        "ledger:refund_settled",
        lacks=[f"{SUBMIT}#2", "action:refund_failed", "action:provider_notification_received#2"]),
    "refund_late_failure": branch("action:refund_succeeded", "action:refund_failed_after_success",
                                  "activity:post_ledger#2", "signal:provider_event#2"),
    "refund_provider_contradicts": branch(
        "action:refund_succeeded", "signal:provider_event#2", f"patch:{CONTRADICTION_PATCH}",
        "action:provider_status_contradicted",
        lacks=["action:refund_canceled", "action:refund_failed_after_success"]),
    "refund_news_unsealed": branch(
        "action:refund_succeeded", "signal:provider_event#2", f"patch:{NEWS_SEALED_PATCH}/1",
        "action:provider_event_refused",
        lacks=["action:refund_failed_after_success", "activity:post_ledger#2",
               "action:provider_event_refused#2"]),
    "refund_cancel_while_validation_refused": branch(
        "action:provider_configuration_refused", "cancel_requested", f"patch:{CANCEL_VALIDATION_PATCH}",
        "action:canceled_by_ops", lacks=[SUBMIT, "action:provider_answering_again"]),
    "refund_cancel_before_submit": branch("cancel_requested", f"patch:{CANCEL_PATCH}",
                                          "action:canceled_by_ops", lacks=[SUBMIT]),
    # Not the cancel patch: an execution of the newest shape holds it without its marker.
    "refund_cancel_while_submitting": branch("cancel_requested", SUBMIT, VERIFY,
                                             "action:cancel_after_provider_refund",
                                             "action:refund_succeeded", lacks=[f"{SUBMIT}#2"]),
    "refund_cancel_after_success": branch("cancel_requested", f"patch:{CANCEL_PATCH}",
                                          "action:refund_succeeded", "action:cancel_after_provider_refund",
                                          lacks=[VERIFY]),
    "refund_cancel_takes_notified": branch("cancel_requested", f"patch:{CANCEL_NOTIFIED_PATCH}",
                                           "action:provider_notification_received",
                                           "action:cancel_after_provider_refund",
                                           "action:refund_succeeded", "ledger:refund_settled"),
    "refund_finish_reads_news": branch("action:refund_succeeded", "action:provider_event_refused",
                                       f"patch:{FINISH_NEWS_PATCH}", "action:refund_failed_after_success",
                                       "ledger:refund_reversed"),
    "refund_cancel_finish_takes_notified": branch(
        "cancel_requested", "action:canceled_by_ops", "action:provider_event_refused",
        f"patch:{FINISH_NOTIFIED_PATCH}", "action:provider_notification_received",
        "action:refund_succeeded", "ledger:refund_settled"),
    "refund_cancel_reads_news": branch("cancel_requested", f"patch:{CANCEL_NEWS_PATCH}",
                                       "action:cancel_after_provider_refund",
                                       "action:duplicate_provider_refund",
                                       "activity:open_duplicate_refund_break"),
    "refund_continued_as_new": branch(SUBMIT, f"patch:{BOUNDED_PATCH}", "continued_as_new"),
    "refund_continued_as_new_run2": branch("carried:follow", "action:refund_succeeded",
                                           "activity:post_ledger", lacks=[SUBMIT, "continued_as_new"]),
    "refund_resubmits_exhausted": branch(f"{SUBMIT}#2", f"patch:{BOUNDED_PATCH}",
                                         "action:resubmits_exhausted", "cancel_requested",
                                         "action:canceled_by_ops", lacks=[f"{SUBMIT}#3"]),
    "refund_duplicate_provider_refund": branch(
        "action:duplicate_provider_refund", "activity:open_duplicate_refund_break",
        f"patch:{DUPLICATE_PATCH}", "signal:provider_event#2", lacks=[f"{SUBMIT}#2"]),
    "refund_foreign_event_ignored": branch(
        "action:refund_succeeded", f"patch:{FOLLOW_SCOPE_PATCH}", "signal:provider_event#2",
        lacks=["action:duplicate_provider_refund", "activity:open_duplicate_refund_break"]),
    "refund_bank_transfer_confirmed": branch(
        "update:submit_approval", f"patch:{EXECUTOR_EVENTS_PATCH}", "signal:provider_event",
        "action:refund_succeeded", "ledger:refund_settled", lacks=[VERIFY, f"patch:{FOLLOW_SCOPE_PATCH}"]),
    "refund_verify_finds_duplicates": branch(
        SUBMIT, VERIFY, f"patch:{VERIFY_DUPLICATES_PATCH}", "activity:open_duplicate_refund_break",
        "action:duplicate_provider_refund", "action:refund_succeeded", "activity:post_ledger",
        lacks=[f"{SUBMIT}#2", "signal:provider_event"]),
    "refund_provider_refund_mismatch": branch(
        SUBMIT, VERIFY, f"patch:{MISMATCH_PATCH}", "action:provider_refund_mismatch",
        "action:refund_succeeded", "ledger:refund_settled", lacks=[f"{SUBMIT}#2"]),
    "tracking_dashboard_refund": branch("signal:provider_event#2", "action:refund_succeeded",
                                        "activity:post_ledger", lacks=["continued_as_new", SUBMIT]),
    "tracking_continued_as_new": branch("continued_as_new", f"patch:{TRACKING_BOUNDED_PATCH}"),
    "tracking_continued_as_new_run2": branch("carried:watch", "action:refund_succeeded",
                                             lacks=["continued_as_new"]),
    "tracking_reported_otherwise": branch(
        "action:refund_succeeded", f"patch:{TRACKING_NEWS_PATCH}", "action:provider_refund_changed",
        "activity:queue_notice#2", "action:refund_failed_after_success", "activity:post_ledger#2"),
    "tracking_heard_at_watch_end": branch(
        "action:tracking_ended_without_final_status", f"patch:{TRACKING_WATCH_END_PATCH}",
        "action:refund_succeeded", "activity:post_ledger"),
    "tracking_left_pending": branch(f"patch:{TRACKING_PENDING_END_PATCH}", "activity:queue_notice",
                                    "action:tracking_ended_without_final_status",
                                    lacks=["activity:post_ledger"]),
    "tracking_finish_reads_news": branch("action:refund_succeeded", "action:provider_event_refused",
                                         f"patch:{TRACKING_FINISH_NEWS_PATCH}",
                                         "action:refund_failed_after_success", "activity:post_ledger#2"),
    "payout_reversed_and_reissued": branch("signal:payout_event", "update:request_reissue",
                                           "activity:post_payout_reversal", "activity:reissue_payout",
                                           "action:reissue_completed"),
    "payout_reissue_key_refused": branch("action:reissue_configuration_refused",
                                         f"patch:{REISSUE_HORIZON_PATCH}", "activity:reissue_payout",
                                         "action:reissue_completed"),
    "payout_reissue_denied": branch("update:request_reissue", "action:approval_denied",
                                    "activity:post_payout_reversal", lacks=["activity:reissue_payout"]),
    "payout_reissue_verdict_for_the_reversal": branch(
        "update:request_reissue", "signal:approve", f"patch:{VERDICT_ROUND_PATCH}", "action:approval_refused",
        "activity:reissue_payout", "action:reissue_completed"),
    "payout_reissue_landed_late": branch(
        f"patch:{LATE_REISSUE_PATCH}", "activity:reissue_payout#2", "action:reissue_completed",
        lacks=["action:reissue_attempts_exhausted", "activity:reissue_payout#3"]),
    "payout_reissue_canceled": branch(
        f"patch:{REISSUE_CANCEL_PATCH}", "action:reissue_cancel_taken", "activity:reissue_payout#2",
        "action:reissue_canceled", lacks=["action:reissue_completed", "activity:reissue_payout#3"]),
    "payout_reissue_waited_for_hold": branch(
        f"patch:{HELD_REISSUE_PATCH}", "action:reissue_waiting_for_beneficiary_hold",
        "activity:reissue_payout#2", "action:reissue_completed", lacks=["action:reissue_failed"]),
    "payout_reissue_unsealed_unnamed": branch(
        f"patch:{UNSEALED_REISSUE_UNNAMED_PATCH}", "update:request_reissue#2",
        "action:reissue_request_refused", "action:reissue_requested", "action:approval_denied",
        lacks=["activity:reissue_payout"]),
    "payout_reissue_unsealed": branch(
        f"patch:{SEALED_REISSUE_PATCH}", "update:request_reissue#2", "action:reissue_request_refused",
        "action:reissue_requested", "action:approval_denied", lacks=["activity:reissue_payout"]),
    "payout_continued_as_new": branch("activity:post_payout_reversal", "signal:payout_event#2",
                                      f"patch:{PAYOUT_BOUNDED_PATCH}", "continued_as_new",
                                      lacks=["update:request_reissue", "activity:reissue_payout"]),
    "payout_continued_as_new_run2": branch("carried:reissue_window", "activity:admit_payout_event",
                                           "update:request_reissue", "activity:reissue_payout",
                                           "action:reissue_completed",
                                           lacks=["activity:post_payout_reversal", "continued_as_new"]),
    "payout_ledger_failed": branch("action:ledger_failed", "activity:release_payout_hold",
                                   lacks=["action:runbook_completed", "activity:reissue_payout"]),
    "payout_reversal_landed_late": branch(f"patch:{GIVE_UP_PATCH}", "activity:give_up_payout_reversal",
                                          "action:runbook_completed", lacks=["action:ledger_failed"]),
    "payout_events_while_approving": branch(
        f"patch:{EVENTS_WHILE_APPROVING_PATCH}", "signal:payout_event#4", "activity:admit_payout_event#4",
        "update:submit_approval#2", "update:request_reissue", "action:approval_denied",
        lacks=["activity:reissue_payout"]),
    "payout_events_at_bound_while_approving": branch(
        f"patch:{EVENTS_WHILE_APPROVING_PATCH}", "signal:payout_event#3", "activity:admit_payout_event#3",
        "update:submit_approval#2", "update:request_reissue", "action:approval_denied",
        lacks=["activity:reissue_payout", "continued_as_new"]),
    "payout_denied_with_events_at_bound": branch(
        f"patch:{DENIED_ROUND_EVENTS_PATCH}", "signal:payout_event#3", "action:approval_denied",
        "continued_as_new", lacks=["activity:admit_payout_event#2", "activity:hold_payout"]),
    "payout_denied_with_events_at_bound_run2": branch(
        "carried:closing", "activity:admit_payout_event#2",
        lacks=["continued_as_new", "activity:hold_payout"]),
    "payout_advice_refreshed": branch(
        f"patch:{ADVICE_REFRESH_PATCH}", "activity:triage_payout_exception#3", "update:request_reissue",
        "action:approval_denied", lacks=["activity:triage_payout_exception#4", "activity:reissue_payout"]),
    "payout_denied": branch("signal:payout_event", "update:submit_approval", "action:approval_denied",
                            lacks=["activity:hold_payout", "activity:reissue_payout"]),
    "payout_paid_at_provider": branch(
        f"patch:{PAID_AT_PROVIDER_PATCH}", "update:submit_approval", "activity:read_payout_at_provider",
        "action:payout_not_failed_at_provider",
        lacks=["activity:hold_payout", "activity:post_payout_reversal"]),
    "reconciliation_backfill": branch("activity:open_reconciliation_run", "activity:reconcile_batch",
                                      "activity:finish_reconciliation_run"),
    "reconciliation_run_failed": branch("activity:reconcile_batch", "failed",
                                        lacks=["activity:finish_reconciliation_run"]),
    "reconciliation_break_approved": branch("update:submit_approval", "activity:settle_break"),
    "reconciliation_payout_break": branch(f"patch:{PAYOUT_BREAK_PATCH}", "activity:hand_break_to_payout_case",
                                          lacks=["activity:open_break_exception"]),
    "reconciliation_unheld_refund": branch(f"patch:{UNHELD_REFUND_PATCH}", "activity:settle_break",
                                           lacks=["activity:open_break_exception", "update:submit_approval"]),
    "reconciliation_break_acts_on_its_row": branch(f"patch:{STORED_CASE_PATCH}", "activity:load_break_case",
                                                   f"patch:{UNHELD_REFUND_PATCH}", "activity:settle_break",
                                                   lacks=["activity:open_break_exception"]),
    "reconciliation_break_dismissed": branch(f"patch:{APPROVAL_ROUND_PATCH}", "update:submit_approval",
                                             "activity:settle_break",
                                             "action:reconciliation_approval_denied"),
    "reconciliation_break_expired": branch(f"patch:{APPROVAL_ROUND_PATCH}", "activity:settle_break",
                                           "action:reconciliation_approval_expired",
                                           lacks=["update:submit_approval"]),
}
"""The patch-marker facts name the patch each branch reaches first (e.g. the resubmit's
horizon); markers the whole workflow records (integrations, late verdicts) need no mention."""


def _history(path: Path) -> WorkflowHistory:
    """The recorded history under its workflow's id: a refund's is its request id, a payout
    or tracking case's its case id (in the start input), which the relay's seals and the
    runs' own start check (`history.forged_start`) bind, a break's `recon-break-<id>` (its own
    start check); other workflows' the file's name."""
    history = WorkflowHistory.from_json(path.stem, path.read_text())
    started = _payload(history.events[0].workflow_execution_started_event_attributes.input)
    case_id = None
    if isinstance(started, dict):
        case_id = started.get("request", {}).get("refund_request_id") or (
            started.get("case_id") if "payout_id" in started or "refund_id" in started else None) or (
            break_workflow_id(int(started["break_id"])) if "break_class" in started else None)
    return WorkflowHistory(case_id, history.events) if case_id else history


def _scenario(stem: str) -> str:
    """A file's scenario: its name without an older version's `_v<n>`."""
    return re.sub(r"_v\d+$", "", stem)


def _payload(payloads: Any) -> Any:
    """The first payload's JSON (the recordings hold plaintext: the codec was dropped)."""
    return json.loads(payloads.payloads[0].data) if payloads.payloads else None


def _facts(history: WorkflowHistory) -> set[str]:
    """What a history shows: `activity:<type>` (local ones too), `action:<case action>`,
    `ledger:<template>` (posted by `post_ledger` or inside a case write), `signal:<name>`,
    `update:<name>`, `validation` (any shape), each also as `<fact>#<k>` for its k-th time; `patch:<id>`,
    `cancel_requested`, `continued_as_new`, `failed` and, for a continued run, `carried:<phase>` (the
    wait it resumes)."""
    seen: Counter[str] = Counter()

    def count(fact: str) -> None:
        seen[fact] += 1
        seen[f"{fact}#{seen[fact]}"] += 1

    for event in history.events:
        if event.HasField("workflow_execution_started_event_attributes"):
            started = _payload(event.workflow_execution_started_event_attributes.input)
            if isinstance(started, dict) and started.get("carried"):
                count(f"carried:{started['carried'].get('phase', 'watch')}")  # tracking: one wait
        elif event.HasField("activity_task_scheduled_event_attributes"):
            scheduled = event.activity_task_scheduled_event_attributes
            count(f"activity:{scheduled.activity_type.name}")
            if scheduled.activity_type.name in VALIDATION:
                count("validation")
            given = _payload(scheduled.input)
            if scheduled.activity_type.name in CASE_EVENT_ACTIVITIES:
                count(f"action:{given['action']}")
            elif scheduled.activity_type.name == CASE_WRITES:  # a verdict's step (verdict-steps-committed-1)
                for write in given["writes"]:
                    if write.get("event"):
                        count(f"action:{write['event']['action']}")
            elif scheduled.activity_type.name == "post_ledger":
                count(f"ledger:{given['kind']}")
            elif isinstance(given, dict):  # the submit's own writes: the approval's, its event
                for write in given.get("before") or ():
                    if write.get("event"):
                        count(f"action:{write['event']['action']}")
                if given.get("started"):
                    count(f"action:{given['started']['action']}")
        elif event.HasField("marker_recorded_event_attributes"):
            marker = event.marker_recorded_event_attributes
            if "patch-data" in marker.details:
                count(f"patch:{_payload(marker.details['patch-data'])['id']}")
            elif marker.marker_name == LOCAL_ACTIVITY_MARKER:
                kind = _payload(marker.details["data"])["activity_type"]
                count(f"activity:{kind}")
                if kind in VALIDATION:
                    count("validation")
                written = _payload(marker.details["result"]) if "result" in marker.details else None
                if kind == CASE_WRITES and written:
                    for action in written["actions"]:
                        count(f"action:{action}")
                    if written.get("posted"):
                        count(f"ledger:{written['posted']}")
        elif event.HasField("workflow_execution_signaled_event_attributes"):
            count(f"signal:{event.workflow_execution_signaled_event_attributes.signal_name}")
        elif event.HasField("workflow_execution_update_accepted_event_attributes"):
            accepted = event.workflow_execution_update_accepted_event_attributes
            count(f"update:{accepted.accepted_request.input.name}")
        elif event.HasField("workflow_execution_cancel_requested_event_attributes"):
            count("cancel_requested")
        elif event.HasField("workflow_execution_continued_as_new_event_attributes"):
            count("continued_as_new")
        elif event.HasField("workflow_execution_failed_event_attributes"):
            count("failed")
    return set(seen)


def _off_branch(facts: set[str], expected: Branch) -> tuple[set[str], set[str]]:
    """The facts a branch needs that are missing, and those it must not have but has."""
    return set(expected.has - facts), set(expected.lacks & facts)


def _replayer(workflows: list[type]) -> Replayer:
    return Replayer(workflows=workflows, workflow_runner=workflow_runner(),
                    data_converter=data_converter(EncryptionCodec(parse_keys(PAYLOAD_KEYS))),
                    interceptors=[TracingInterceptor(), ApprovalSealCheck(ApprovalKeys([APPROVAL_KEYS]))])


def test_every_scenario_is_recorded_and_every_file_has_its_branch() -> None:
    stems = {p.stem for p in HISTORIES}
    assert set(SCENARIOS) <= stems
    assert {_scenario(stem) for stem in stems} == set(BRANCHES)  # no file unchecked, no stale branch
    assert {"refund_auto_approved_v1", "payout_reversed_and_reissued_v1"} <= stems  # old code's


@pytest.mark.parametrize("path", HISTORIES, ids=lambda p: p.stem)
def test_recorded_history_holds_its_branch(path: Path) -> None:
    missing, unwanted = _off_branch(_facts(_history(path)), BRANCHES[_scenario(path.stem)])
    assert (missing, unwanted) == (set(), set())


def test_every_patch_in_force_is_reached_by_a_recording() -> None:
    """A new `workflow.patched` branch needs a history that takes it."""
    in_force = {value for module in (approvals, news, payout_case, reconciliation, refund_case, tracking)
                for name, value in vars(module).items() if name.endswith("_PATCH")}
    reached = {fact.removeprefix("patch:").split("/")[0] for path in HISTORIES  # news-sealed-1/<k>
               for fact in _facts(_history(path)) if fact.startswith("patch:") and "#" not in fact}
    assert len(in_force) >= 13 and in_force <= reached, in_force - reached


@pytest.mark.parametrize("name", sorted(set(BRANCHES) - {"refund_auto_approved"}))
def test_the_plain_refund_holds_no_other_branch(name: str) -> None:
    """The branch check can fail: the happy path's history is off every other branch."""
    happy = _facts(_history(Path(__file__).parent / "histories" / "refund_auto_approved.json"))
    assert _off_branch(happy, BRANCHES[name]) != (set(), set())


@pytest.mark.parametrize("path", HISTORIES, ids=lambda p: p.stem)
async def test_recorded_history_replays_on_current_code(path: Path) -> None:
    result = await _replayer(list(WORKFLOWS)).replay_workflow(_history(path))
    assert result.replay_failure is None


@workflow.defn(dynamic=True, sandboxed=False)
class TimerFirstWorkflow:
    """A deliberately non-deterministic 'new version' of every workflow (dynamic, so it
    takes any recorded type): it waits before its first activity. Unsandboxed because the
    sandbox would re-import this test module and pytest with it."""

    @workflow.run
    async def run(self, args: Sequence[RawValue]) -> None:
        await workflow.sleep(timedelta(seconds=1))


@pytest.mark.parametrize("path", HISTORIES, ids=lambda p: p.stem)
async def test_a_non_deterministic_change_fails_replay(path: Path) -> None:
    with pytest.raises(workflow.NondeterminismError):
        await _replayer([TimerFirstWorkflow]).replay_workflow(_history(path))
