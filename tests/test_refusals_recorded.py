"""Every refusal of an identified caller's action is recorded under their name (the trail
says who tried what and why it was refused), the not-found and not-now ones included:
a verdict on a payout case or a break that does not exist or does not wait, a reissue of
a case that does not exist, a reopen of a break that cannot reopen, a replay or backfill
asked wrongly, a read of a payout, payout exception, run or break that does not exist."""

from typing import Any

import pytest

from tests.harness import Stack
from tests.payouts_kit import add_payout_approvers

MISSING_BREAK = 987_654_321


async def refusals_of(stack: Stack, user: str, action: str) -> list[dict[str, Any]]:
    return [e["detail"] for e in await stack.store.audit.trail("")
            if e["actor"] == user and e["action"] == "action_refused" and e["detail"].get("action") == action]


CALLS = {
    "payout_verdict": ("lena", "/v1/payout-exceptions/sandbox-payout-po_nope/approvals",
                       {"decision": "approve", "awaiting": "awaiting_approval"}, 404,
                       "approving a payout exception"),
    "payout_reissue": ("omar", "/v1/payout-exceptions/sandbox-payout-po_nope/reissue",
                       {"reason": "again"}, 404, "requesting a payout reissue"),
    "break_verdict": ("carol", f"/v1/reconciliation/breaks/{MISSING_BREAK}/approvals",
                      {"decision": "approve", "reopened": 0}, 404, "approving a reconciliation break"),
    "break_reopen": ("olga", f"/v1/reconciliation/breaks/{MISSING_BREAK}/reopen",
                     {"reason": "look again", "reopened": 0}, 404, "reopening a reconciliation break"),
    "replay": ("olga", "/v1/webhook-receipts/replay", {"receipt_id": 1, "since": "2026-01-01T00:00:00Z"},
               422, "replaying webhook receipts"),
    "backfill": ("olga", "/v1/reconciliation/runs", {"provider": "nowhere", "since": "2026-01-01T00:00:00Z",
                                                      "until": "2026-01-02T00:00:00Z"},
                 422, "starting a reconciliation"),
    # reads of nothing (a GET: no body), recorded as a read of a missing refund request is
    "payout": ("olga", "/v1/payouts/po_nope", None, 404, "reading a payout"),
    "payout_exception": ("olga", "/v1/payout-exceptions/sandbox-payout-po_nope", None, 404,
                         "reading a payout exception"),
    "reconciliation_run": ("olga", "/v1/reconciliation/runs/run-nope", None, 404,
                           "reading a reconciliation run"),
    "reconciliation_break": ("olga", f"/v1/reconciliation/breaks/{MISSING_BREAK}", None, 404,
                             "reading a reconciliation break"),
}


@pytest.mark.parametrize("call", list(CALLS))
async def test_a_refused_action_is_recorded_under_the_caller(stack: Stack, call: str) -> None:
    user, path, body, status, action = CALLS[call]
    await add_payout_approvers(stack)
    async with stack.api(user) as api:
        answer = await (api.get(path) if body is None else api.post(path, json=body))
    assert answer.status_code == status, answer.text
    refused = await refusals_of(stack, user, action)
    assert refused and refused[-1]["refusal"] == answer.json()["detail"], refused

