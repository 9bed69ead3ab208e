"""Following a reconciliation run from the terminal: a progress bar over the run's window
(the provider lists newest first, so the cursor's creation time walks from the window's end
to its start) until the run ends, completed or failed, then its report."""

import asyncio
from datetime import datetime
from typing import Any

import httpx
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

ENDED = frozenset({"completed", "failed"})
UNAVAILABLE = frozenset({502, 503, 504})
"""A relay (or its proxy) restarting: the run goes on at the worker, so polling does too."""
UNAVAILABLE_GRACE_SECONDS = 120.0


def window_done(run: dict[str, Any]) -> float:
    """The fraction of the run's window already read (1.0 once completed)."""
    if run["state"] == "completed":
        return 1.0
    if run["cursor_created"] is None:
        return 0.0
    since, until = (datetime.fromisoformat(run["window"][k]) for k in ("since", "until"))
    reached = datetime.fromisoformat(run["cursor_created"])
    return min(max((until - reached) / (until - since), 0.0), 1.0)


async def follow_run(api: httpx.AsyncClient, run_id: str, *, show_progress: bool = True,
                     poll_seconds: float = 0.5) -> dict[str, Any]:
    """Polls the relay until the run ends (completed or failed); returns its report. A
    relay unavailable for a while (`UNAVAILABLE`, up to `UNAVAILABLE_GRACE_SECONDS` in a
    row) is polled again; any other error answer ends the command."""
    columns = (TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
               TextColumn("{task.fields[objects]} objects, {task.fields[breaks]} new breaks"),
               TimeElapsedColumn())
    with Progress(*columns, disable=not show_progress) as bar:
        task = bar.add_task(run_id, total=1.0, objects=0, breaks=0)
        unavailable_since: float | None = None
        while True:
            response = await api.get(f"/v1/reconciliation/runs/{run_id}")
            now = asyncio.get_running_loop().time()
            if response.status_code in UNAVAILABLE and (
                    unavailable_since is None or now - unavailable_since < UNAVAILABLE_GRACE_SECONDS):
                unavailable_since = unavailable_since or now
                await asyncio.sleep(poll_seconds)
                continue
            unavailable_since = None
            response.raise_for_status()
            report: dict[str, Any] = response.json()
            bar.update(task, completed=window_done(report), objects=report["objects_seen"],
                       breaks=report["new_breaks"])
            if report["state"] in ENDED:
                return report
            await asyncio.sleep(poll_seconds)
