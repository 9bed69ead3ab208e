"""When a run's history is long enough to continue as new: the one test every bounded wait
(the refund's, the tracking watch's, the payout case's) applies."""

from temporalio import workflow


def at_bound(continue_as_new_after_events: int) -> bool:
    """Past the configured event count, or Temporal suggests continuing as new (its own
    size and count limits); both are read from the history, so replay sees the same."""
    info = workflow.info()
    return (info.get_current_history_length() >= continue_as_new_after_events
            or info.is_continue_as_new_suggested())
