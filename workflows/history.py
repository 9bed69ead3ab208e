"""A run's history: when it is long enough to continue as new (the one test every bounded
wait, the refund's, the tracking watch's, the payout case's, applies), and whether the run
began as its case's workflow can begin."""

from temporalio import workflow


def at_bound(continue_as_new_after_events: int) -> bool:
    """Past the configured event count, or Temporal suggests continuing as new (its own
    size and count limits); both are read from the history, so replay sees the same."""
    info = workflow.info()
    return (info.get_current_history_length() >= continue_as_new_after_events
            or info.is_continue_as_new_suggested())


def forged_start(case_id: str, carried: object | None) -> str | None:
    """Why this run may not act, None when it may. A case's workflow id is its case id, so a
    run under another id (started straight in Temporal) would be a second workflow of the
    case; and only a run Temporal continued as new carries its predecessor's state (a start
    carrying it would skip validation, policy and approvals; not a retry's or a cron run's,
    which have a continued_run_id too: no case workflow is started with either). Reads only
    `workflow.info()`: the same on replay, and no command, so a legitimate run's history is
    unchanged."""
    info = workflow.info()
    if info.workflow_id != case_id:
        return f"workflow id {info.workflow_id!r} is not its case's id {case_id!r}"
    if carried is not None and (info.continued_run_id is None or info.cron_schedule or info.attempt > 1):
        return "a carried state is taken only from the run it continues"
    return None
