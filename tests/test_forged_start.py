"""A refund workflow moves money only for a request the relay recorded: someone with write
access to Temporal (its UI, its CLI) who starts one directly, with a request no case holds
or with other terms than the case of that id holds, gets a rejected run and no refund."""

from typing import Any

import pytest

from domain.models import RefundRequest, RefundWorkflowInput
from tests.harness import Stack
from workflows.refund import RefundWorkflow


async def _started_directly(stack: Stack, request: RefundRequest) -> Any:
    handle = await stack.client.start_workflow(
        RefundWorkflow.run, RefundWorkflowInput(request=request, requester="mallory",
                                                timings=stack.settings.timings()),
        id=request.refund_request_id, task_queue=stack.settings.task_queue)
    return await handle.result()


@pytest.mark.parametrize("recorded", [False, True])
async def test_a_refund_started_straight_in_temporal_moves_no_money(stack: Stack, recorded: bool) -> None:
    charge = await stack.charge(10_000)
    body = stack.refund_body(charge, 1_000)
    request = RefundRequest.model_validate({**body, "source": "api"})
    if recorded:  # the case of that id was requested for 10.00; the forged start asks 99.00
        await stack.store.cases.create(request, "alice")
        request = request.model_copy(update={"amount": 9_900})
    outcome = await _started_directly(stack, request)
    assert outcome.state.status == "rejected"
    assert await stack.provider_refunds(charge) == []
    row = await stack.store.cases.get(request.refund_request_id)
    if recorded:  # the recorded case is left as it was: its own start is still to come
        assert row is not None
        assert (row["status"], row["amount"], row["reserved_amount"]) == ("requested", 1_000, 0)
    else:
        assert row is None
    assert "start_refused" in [e["action"] for e in await stack.store.audit.trail(request.refund_request_id)]
