"""Re-records tests/histories/*.json, the RefundWorkflow histories the replay test replays.

    .venv/bin/python -m tests.record_histories [scenario ...]

Run it after a deliberate, versioned change to a workflow (and keep the old files too when
running workflows may still be on the old code: every file is replayed). It starts its own
Temporal dev server and PostgreSQL in a temporary folder and plays each scenario through
the relay. Histories are recorded with the product's converter minus the codec, so the
committed files hold no key material and need none: the worker's codec passes plaintext
payloads through on replay.
"""

import asyncio
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

from temporalio.client import Client
from temporalio.contrib.opentelemetry import TracingInterceptor

from adapters.codec import data_converter
from adapters.store import Store
from domain.models import ApprovalSignal, Decision
from domain.payouts import payout_case_id
from domain.reconciliation import break_workflow_id
from starters.stack import EmbeddedPostgres, TemporalDevServer, free_port
from tests.harness import Stack, open_stack
from tests.payouts_kit import (
    add_payout_approvers,
    ask_reissue,
    decide,
    move_payout,
    paid_payout,
    wait_for_case,
)
from tests.reconciliation_kit import (
    backfill,
    history,
    move_at_provider,
    seed_case,
    seed_provider,
    wait_for_breaks,
)
from workflows.refund import RefundWorkflow

HISTORIES = Path(__file__).parent / "histories"
SEALED_SCENARIO = "refund-approval-sealed"


async def auto_approved(stack: Stack) -> str:
    """A small, evidenced first refund: validate, policy auto-approves, submit, ledger, watch."""
    body = stack.refund_body(await stack.charge(10_000), 3_000)
    async with stack.api("alice") as api:
        (await api.post("/v1/refund-requests", json=body)).raise_for_status()
    return str(body["refund_request_id"])


async def with_approval(stack: Stack) -> str:
    """Above the threshold: waits for an approver's signal, then executes."""
    body = stack.refund_body(await stack.charge(20_000), 9_000)
    case_id = str(body["refund_request_id"])
    async with stack.api("alice") as api:
        (await api.post("/v1/refund-requests", json=body)).raise_for_status()
    await stack.wait_for_status(case_id, "awaiting_approval")
    async with stack.api("bob") as api:
        (await api.post(f"/v1/refund-requests/{case_id}/approvals",
                        json={"decision": "approve", "reason": "recorded scenario"})).raise_for_status()
    return case_id


async def approval_sealed(stack: Stack) -> str:
    """An approval sent straight to Temporal (no relay seal) is refused and audited; the
    relay's sealed approval then counts (`approval-relay-seal-1`). The case id is the
    scenario's name: a seal binds the workflow id, and the replay test names each history's
    workflow after its file."""
    body = stack.refund_body(await stack.charge(20_000), 9_000, refund_request_id=SEALED_SCENARIO)
    case_id = str(body["refund_request_id"])
    async with stack.api("alice") as api:
        (await api.post("/v1/refund-requests", json=body)).raise_for_status()
    await stack.wait_for_status(case_id, "awaiting_approval")
    await stack.client.get_workflow_handle(case_id).signal(RefundWorkflow.approve, ApprovalSignal(
        approver="mallory", roles=("admin", "approver"), decision=Decision.APPROVE))
    await stack.wait_for_audit(case_id, "approval_refused")
    async with stack.api("bob") as api:
        (await api.post(f"/v1/refund-requests/{case_id}/approvals",
                        json={"decision": "approve", "reason": "recorded scenario"})).raise_for_status()
    return case_id


async def payout_reversed_and_reissued(stack: Stack) -> str:
    """A paid payout fails at the provider: the case opens, is approved, held, reversed,
    ticketed and announced; then a reissue request is approved and paid once."""
    await add_payout_approvers(stack)
    payout = await paid_payout(stack, 150_000)
    await move_payout(stack, payout.provider_payout_id, "failed", failure_code="insufficient_funds")
    case_id = payout_case_id("sandbox", payout.provider_payout_id)
    await wait_for_case(stack, case_id, "awaiting_approval")
    (await decide(stack, "lena", case_id)).raise_for_status()
    await wait_for_case(stack, case_id, "remediated")
    (await ask_reissue(stack, "omar", case_id)).raise_for_status()
    (await decide(stack, "lena", case_id)).raise_for_status()
    return case_id


async def reconciliation_break_approved(stack: Stack) -> str:
    """A refund shown refunded that the provider canceled, its case long closed: the
    backfill opens an exception case, an approver approves, one compensating entry posts."""
    refund = history(f"ch_{stack.new_id('hist')}", 1_000, days_ago=2)
    await seed_provider(stack, [refund])
    await seed_case(stack, refund)
    await move_at_provider(stack, refund["id"], "canceled")
    await backfill(stack, since_days=30)
    [found] = await wait_for_breaks(stack, [refund["id"]], "awaiting_approval")
    async with stack.api("carol") as api:
        (await api.post(f"/v1/reconciliation/breaks/{found['id']}/approvals",
                        json={"decision": "approve", "reason": "recorded scenario"})).raise_for_status()
    return break_workflow_id(int(found["id"]))


SCENARIOS: dict[str, Callable[[Stack], Awaitable[str]]] = {
    "refund_auto_approved": auto_approved,
    "refund_with_approval": with_approval,
    SEALED_SCENARIO: approval_sealed,
    "payout_reversed_and_reissued": payout_reversed_and_reissued,
    "reconciliation_break_approved": reconciliation_break_approved,
}


async def record(folder: Path, names: list[str]) -> list[Path]:
    """Plays the named scenarios (all when none) to their workflow's end and writes each
    history as JSON."""
    temporal = TemporalDevServer(folder / "temporal.db", port=free_port(), ui_port=None)
    pg = EmbeddedPostgres(folder / "pg", delete_on_stop=True)
    await temporal.start()
    try:
        store = await Store.open(await asyncio.to_thread(pg.start))
        await store.migrate()
        client = await Client.connect(temporal.address, data_converter=data_converter(None),
                                      interceptors=[TracingInterceptor()])
        stack = await open_stack(store, client, temporal.address)
        written = []
        try:
            HISTORIES.mkdir(exist_ok=True)
            for name, play in SCENARIOS.items():
                if names and name not in names:
                    continue
                handle = client.get_workflow_handle(await play(stack))
                await handle.result()
                path = HISTORIES / f"{name}.json"
                path.write_text((await handle.fetch_history()).to_json() + "\n")
                written.append(path)
        finally:
            await stack.close()
            await store.close()
        return written
    finally:
        temporal.stop()
        pg.stop()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        for path in asyncio.run(record(Path(tmp), sys.argv[1:])):
            print(f"wrote {path}")
