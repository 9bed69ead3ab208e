"""Every recorded history under tests/histories replays on today's workflow code, with the
worker's sandbox, converter and interceptors; a change that would break running workflows
fails here. Re-record with `python -m tests.record_histories` (see that module)."""

from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import pytest
from temporalio import workflow
from temporalio.client import WorkflowHistory
from temporalio.common import RawValue
from temporalio.contrib.opentelemetry import TracingInterceptor
from temporalio.worker import Replayer

from adapters.approval_seal import ApprovalKeys, ApprovalSealCheck
from adapters.codec import EncryptionCodec, data_converter, parse_keys
from tests.harness import APPROVAL_KEYS, PAYLOAD_KEYS
from workers.main import WORKFLOWS, workflow_runner

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))


def _history(path: Path) -> WorkflowHistory:
    return WorkflowHistory.from_json(path.stem, path.read_text())


def _replayer(workflows: list[type]) -> Replayer:
    return Replayer(workflows=workflows, workflow_runner=workflow_runner(),
                    data_converter=data_converter(EncryptionCodec(parse_keys(PAYLOAD_KEYS))),
                    interceptors=[TracingInterceptor(), ApprovalSealCheck(ApprovalKeys([APPROVAL_KEYS]))])


def test_histories_are_recorded() -> None:
    assert {p.stem for p in HISTORIES} >= {"refund_auto_approved", "refund_with_approval",
                                           "refund-approval-sealed", "payout_reversed_and_reissued",
                                           "payout_reversed_and_reissued_v1"}


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
