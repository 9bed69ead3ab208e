"""The rule a case's workflow applies to how its run began (`workflows.history.forged_start`),
over every shape of `workflow.info()` a start straight in Temporal can produce: the stack
tests cover the id and the continued-run checks end to end; a retried or scheduled run
cannot be produced there without stopping the worker between attempts."""

from types import SimpleNamespace

import pytest
from temporalio import workflow

from workflows import history

CASE = "rr-forged"


@pytest.mark.parametrize(("info", "carried", "refused"), [
    ({"workflow_id": CASE}, None, False),  # a case's first run
    ({"workflow_id": "other"}, None, True),  # a second workflow of the case
    ({"workflow_id": CASE}, "state", True),  # carried state, not continued
    ({"workflow_id": CASE, "continued_run_id": "r1"}, "state", False),  # continued as new
    ({"workflow_id": CASE, "continued_run_id": "r1", "attempt": 2}, "state", True),  # a retry's attempt
    ({"workflow_id": CASE, "continued_run_id": "r1", "cron_schedule": "* * * * *"}, "state", True),
])
def test_only_a_continued_run_of_the_case_s_own_workflow_carries_state(
        monkeypatch: pytest.MonkeyPatch, info: dict[str, object], carried: object, refused: bool) -> None:
    shape = SimpleNamespace(**{"continued_run_id": None, "cron_schedule": "", "attempt": 1, **info})
    monkeypatch.setattr(workflow, "info", lambda: shape)
    assert (history.forged_start(CASE, carried) is not None) is refused
