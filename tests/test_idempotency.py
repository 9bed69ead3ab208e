"""A refund_request_id is bound to its parameters, and survives a worker killed mid-call."""

import asyncio
import signal

from temporalio.client import Client

from adapters.db import Store
from bench.chaos import worker_process
from starters.dev.stack import TemporalDevServer
from tests.harness import Stack, open_stack, stack_with


async def test_same_id_with_other_parameters_is_409_and_changes_nothing(stack: Stack) -> None:
    charge = await stack.charge(10_000)
    body = stack.refund_body(charge, 2_000)
    async with stack.api("alice") as api:
        assert (await api.post("/v1/refund-requests", json=body)).status_code == 202
        conflict = await api.post("/v1/refund-requests", json={**body, "amount": 2_500})
        assert conflict.status_code == 409
        assert "different parameters" in conflict.json()["detail"]
        repeat = await api.post("/v1/refund-requests", json=body)
        assert repeat.status_code == 200
        assert repeat.json()["amount"] == 2_000
    await stack.wait_for_status(body["refund_request_id"], "succeeded")
    assert [r["amount"] for r in await stack.provider_refunds(charge)] == [2_000]
    trail = [e["action"] for e in await stack.store.audit.trail(body["refund_request_id"])]
    assert trail.count("request_conflict") == 1 and trail.count("request_repeated") == 1
    assert trail.count("action_refused") == 1  # the conflict's refusal, recorded


async def test_someone_else_repeating_a_request_is_refused_and_recorded_as_theirs(stack: Stack) -> None:
    """Another requester sending the same id learns nothing of the case (not even whether
    their terms match it), and the trail says that they were refused, not only that the
    request came again."""
    stack.tokens["ravi"] = await stack.store.access.create_token("ravi", ["requester"], by="test")
    charge = await stack.charge(10_000)
    body = stack.refund_body(charge, 2_000)
    async with stack.api("alice") as api:
        assert (await api.post("/v1/refund-requests", json=body)).status_code == 202
    async with stack.api("ravi") as api:
        foreign = await api.post("/v1/refund-requests", json=body)
        # nor whether a guess of its terms was right: the answer is the same either way
        guessed = await api.post("/v1/refund-requests", json={**body, "amount": 2_500})
    assert foreign.status_code == 409 and "another requester" in foreign.json()["detail"]
    assert (guessed.status_code, guessed.json()["detail"]) == (409, foreign.json()["detail"])
    trail = await stack.store.audit.trail(body["refund_request_id"])
    assert [(e["actor"], e["detail"]["refusal"]) for e in trail if e["action"] == "action_refused"] == [
        ("ravi", foreign.json()["detail"])] * 2


async def test_worker_killed_after_provider_accepted_still_one_refund(
        store: Store, client: Client, temporal_server: TemporalDevServer, postgres_dsn: str) -> None:
    stack = await open_stack(store, client, temporal_server.address, worker=False)
    worker = None
    try:
        worker = worker_process(stack, postgres_dsn, temporal_server.address,  # its call left hanging
                                REFUNDS_PROVIDER_HTTP_TIMEOUT_SECONDS="120",
                                REFUNDS_SUBMIT_TIMEOUT_SECONDS="130",
                                REFUNDS_CASE_SWEEP_AFTER_SECONDS="400")  # past submit and horizon
        charge = await stack.charge(10_000)
        async with stack.sandbox() as sb:  # the provider makes the refund, then never answers
            await sb.post("/_sandbox/faults", json={"mode": "timeout_after_success", "seconds": 120})
        body = stack.refund_body(charge, 4_000)
        async with stack.api("alice") as api:
            assert (await api.post("/v1/refund-requests", json=body)).status_code == 202
        for _ in range(600):
            if await stack.provider_refunds(charge):
                break
            await asyncio.sleep(0.1)
        assert len(await stack.provider_refunds(charge)) == 1
        worker.send_signal(signal.SIGKILL)
        worker.wait()

        await stack.start_worker()  # a fresh worker picks the case up after the activity timeout
        row = await stack.wait_for_status(body["refund_request_id"], "succeeded", timeout=90)
        refunds = await stack.provider_refunds(charge)
        assert [r["id"] for r in refunds] == [row["provider_refund_id"]]
        lines = await store.ledger.entries(body["refund_request_id"])
        assert len({line["posting_key"] for line in lines}) == 1
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
        await stack.close()


async def test_a_resubmit_declined_because_the_first_create_landed_follows_that_refund(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    """The first create lands but its answer is lost, and the lookups miss it (a list that
    lags the write). The resubmit (this provider ignores the key, as Stripe does a day on)
    is declined: the charge is refunded already, by that first create. Taken as final, the
    case was `refund_failed` with its hold released and nothing booked while the provider
    held the refund (and a reissue could pay again). A decline after an earlier attempt
    proves nothing about that attempt: looked up again, the refund is followed."""
    async with stack_with(store, client, temporal_server.address, provider_http_timeout_seconds=1,
                          submit_timeout_seconds=3, resubmit_margin_seconds=0.5) as quick:
        charge = await quick.charge(1_000)
        async with quick.sandbox() as sb:
            await sb.post("/_sandbox/faults", json={"mode": "timeout_after_success", "seconds": 5})
            await sb.post("/_sandbox/faults", json={"mode": "lookup_empty", "times": 2, "charge": charge})
        case_id = await quick.request_refund("alice", charge, 1_000)
        row = await quick.wait_for_status(case_id, "succeeded", "refund_failed", timeout=60)
        refunds = await quick.provider_refunds(charge)
        assert len(refunds) == 1 and (row["status"], row["provider_refund_id"]) == (
            "succeeded", refunds[0]["id"]), (row, refunds)
        actions = await quick.actions(case_id)
        assert "provider_refund_declined" in actions and "refund_failed" not in actions, actions
        assert {e["template"] for e in await quick.store.ledger.entries(case_id)} == {"refund_settled"}
