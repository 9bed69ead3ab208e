"""Starting the exception workflow of every break a run found and none started yet: a
reconciliation batch's (an activity) and a late provider event's (the relay) go through this
one path, by derived id, so a repeat attaches. A break whose start failed (Temporal away
between its row and its workflow) is started by the next call: a re-drive of the same
delivery, or, for late events, the provider's next reconciliation run."""

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from temporalio.client import Client
from temporalio.common import WorkflowIDConflictPolicy, WorkflowIDReusePolicy
from temporalio.exceptions import WorkflowAlreadyStartedError

from adapters.db.reconciliation import ReconciliationRepository, break_case
from domain.models import ProviderRefund, RefundTimings
from domain.payouts import ProviderPayout
from domain.reconciliation import break_workflow_id

BREAK_WORKFLOW = "ReconciliationBreakWorkflow"
ROUND = "round"
"""The memo naming the round (`reopened`) an exception workflow was started for."""


async def dispatch_breaks(client: Client, recon: ReconciliationRepository,
                          pending_of: Callable[[], Awaitable[list[dict[str, Any]]]],
                          timings: RefundTimings, task_queue: str) -> None:
    """Starts one exception workflow per undispatched break `pending_of` returns (a run's,
    or every late event's of a provider), then marks it."""
    while pending := await pending_of():
        handed_back = 0
        for row in pending:
            round_ = int(row["reopened"])
            try:
                handle = await client.start_workflow(
                    BREAK_WORKFLOW, break_case(row, timings), id=break_workflow_id(int(row["id"])),
                    task_queue=task_queue, id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
                    # a break raised again (`RAISED_AGAIN`) runs its exception case again
                    id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE if round_
                    else WorkflowIDReusePolicy.REJECT_DUPLICATE, memo={ROUND: round_})
            except WorkflowAlreadyStartedError:
                pass  # started earlier and already finished
            else:
                if round_ and await (await handle.describe()).memo_value(ROUND, None) != round_:
                    # attached to the last round's case, still ending: a later dispatch starts this one
                    handed_back += 1
                    continue
            await recon.mark_dispatched(int(row["id"]))
        if handed_back == len(pending):
            return


async def reconcile_at_once(client: Client, recon: ReconciliationRepository, timings: RefundTimings,
                            task_queue: str, event_id: str, reported: ProviderRefund | ProviderPayout,
                            at: datetime, by: str) -> None:
    """One provider report no case can take, classified now in an incident run of its own
    (`reconcile_event`), its breaks' exception workflows started: the relay's after a case
    ended, and a running case's for a word it cannot apply."""
    run_id = await recon.reconcile_event(reported.provider, event_id, reported, at, by)
    await dispatch_breaks(client, recon, lambda: recon.undispatched(run_id), timings, task_queue)
