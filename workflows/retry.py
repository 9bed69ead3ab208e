"""Every activity's timeouts and retry policy, in one place.

The provider submit is never retried by Temporal: an unknown outcome goes to the
verify-state step first, and only the workflow decides to submit again.
"""

from datetime import timedelta
from typing import Any

from temporalio.common import RetryPolicy

from domain import errors

_PATIENT = RetryPolicy(initial_interval=timedelta(seconds=1), backoff_coefficient=2.0,
                       maximum_interval=timedelta(minutes=1))


def provider_read(attempts: int) -> dict[str, Any]:
    """Validation's and verify-state's options: a provider read retries `attempts` times
    (RefundTimings.provider_read_attempts) and never on refused credentials; the workflow
    then sends the case to ops review (a notice and a metric) and keeps asking every
    status poll interval, so a revoked key or a long outage is seen, never silent."""
    return {"start_to_close_timeout": timedelta(seconds=30),
            "retry_policy": RetryPolicy(initial_interval=timedelta(seconds=1), backoff_coefficient=2.0,
                                        maximum_interval=timedelta(minutes=1), maximum_attempts=attempts,
                                        non_retryable_error_types=[errors.CONFIGURATION_REFUSED,
                                                                   errors.UNKNOWN_PROVIDER])}


POLICY: dict[str, Any] = {"start_to_close_timeout": timedelta(seconds=10), "retry_policy": _PATIENT}
CASE_EVENT: dict[str, Any] = {"start_to_close_timeout": timedelta(seconds=10), "retry_policy": _PATIENT}
LEDGER: dict[str, Any] = {
    "start_to_close_timeout": timedelta(seconds=30),
    "retry_policy": RetryPolicy(initial_interval=timedelta(seconds=1), backoff_coefficient=2.0,
                                maximum_interval=timedelta(minutes=5)),
}
SUBMIT_RETRY = RetryPolicy(maximum_attempts=1)


def ledger_within(deadline: timedelta) -> dict[str, Any]:
    """LEDGER for a local posting that gives up by `deadline` (then the case shows 'ledger
    pending' and posting goes on). A local activity retries in the worker, where a retry's
    backoff was seen to run past the schedule-to-close timeout (the fast tier's ledger test),
    so the attempts are bounded too: as many as LEDGER's backoffs fit in the deadline."""
    policy = LEDGER["retry_policy"]
    attempts, waited, interval = 1, timedelta(0), policy.initial_interval
    while waited + interval <= deadline:
        waited += interval
        interval = min(interval * policy.backoff_coefficient, policy.maximum_interval or interval)
        attempts += 1
    return {"schedule_to_close_timeout": deadline,
            "start_to_close_timeout": min(LEDGER["start_to_close_timeout"], deadline),
            "retry_policy": RetryPolicy(initial_interval=policy.initial_interval,
                                        backoff_coefficient=policy.backoff_coefficient,
                                        maximum_interval=policy.maximum_interval, maximum_attempts=attempts)}

# Notices and advice serve people, never the money path: bounded, and their failure is
# tolerated by the workflow. A delivery retries only channels that certainly failed.
DELIVER: dict[str, Any] = {
    "start_to_close_timeout": timedelta(seconds=60),
    "retry_policy": RetryPolicy(initial_interval=timedelta(seconds=1), backoff_coefficient=2.0,
                                maximum_interval=timedelta(minutes=2), maximum_attempts=8),
}
ADVISE_RETRY = RetryPolicy(initial_interval=timedelta(seconds=1), maximum_attempts=2)

RESUBMIT_BACKOFF_CAP = timedelta(minutes=10)

# Payout reversal: each runbook step its own policy. Hold, rollback and ticket are our own
# writes and must land; advice is optional (bounded, its failure tolerated); the
# compensating entry uses LEDGER under the case's `ledger_pending_after` deadline, after
# which the rollback branch runs. A reissue looks up before it creates, and its
# start-to-close outlasts an attempt's provider calls, and an attempt that wakes past it
# creates nothing, so attempts never overlap.
PAYOUT_ADMIT: dict[str, Any] = {"start_to_close_timeout": timedelta(seconds=30), "retry_policy": _PATIENT}
PAYOUT_TRIAGE: dict[str, Any] = {
    "start_to_close_timeout": timedelta(seconds=30),
    "retry_policy": RetryPolicy(initial_interval=timedelta(seconds=1), maximum_attempts=3),
}
PAYOUT_HOLD: dict[str, Any] = {"start_to_close_timeout": timedelta(seconds=30), "retry_policy": _PATIENT}
PAYOUT_TICKET: dict[str, Any] = {"start_to_close_timeout": timedelta(seconds=30), "retry_policy": _PATIENT}
PAYOUT_REISSUE: dict[str, Any] = {
    "start_to_close_timeout": timedelta(seconds=60),
    "retry_policy": RetryPolicy(initial_interval=timedelta(seconds=2), backoff_coefficient=2.0,
                                maximum_interval=timedelta(minutes=5)),
}
# Since the reissue horizon patch: one attempt at a time; the workflow tries again only
# past the provider horizon after an attempt with an unknown outcome (as for refunds).
PAYOUT_REISSUE_ONCE: dict[str, Any] = {"start_to_close_timeout": timedelta(seconds=60),
                                       "retry_policy": SUBMIT_RETRY}
# The lookup after the last attempt: it creates nothing, so it may be asked again, a few times.
PAYOUT_REISSUE_LOOKUP: dict[str, Any] = {
    "start_to_close_timeout": timedelta(seconds=60),
    "retry_policy": RetryPolicy(initial_interval=timedelta(seconds=2), backoff_coefficient=2.0,
                                maximum_attempts=5),
}

# Declines, unmapped statuses and run conflicts are raised non-retryable by the activities.
RECONCILE_BATCH: dict[str, Any] = {"start_to_close_timeout": timedelta(minutes=5), "retry_policy": _PATIENT}
RECONCILE_STEP: dict[str, Any] = {"start_to_close_timeout": timedelta(minutes=2), "retry_policy": _PATIENT}
