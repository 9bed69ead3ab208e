"""The load generator, run as its own process so it does not share the relay's CPU time
slice or event loop: sends signed sandbox `refund.requested` webhooks, or does the bare
signal-with-start itself, and prints one JSON line of latencies.

The webhook sender is the measuring instrument, not the system under test (a provider sends
from its own machines), yet here it takes its CPU from the same cores as the Temporal server:
it uses aiohttp, whose C parser costs about half of httpx's CPU a request, close to what the
bare client's own driver (the Temporal SDK) costs.

    python -m bench.load_client relay --url URL --secret S --events N --copies C --concurrency K [--label L]
                                      [--at-once]
    python -m bench.load_client bare --temporal ADDR --queue Q --events N --concurrency K
"""

import argparse
import asyncio
import json
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import aiohttp

from adapters import event_loop
from adapters.providers.sandbox import sign


def refund_requested(event_id: str, object_id: str) -> bytes:
    return json.dumps({
        "id": event_id, "object": "event", "type": "refund.requested", "created": int(time.time()),
        "data": {"object": {"id": object_id, "object": "refund_request", "charge": "ch_bench",
                            "amount": 1_000, "currency": "usd", "merchant_account": "acct_1",
                            "reason": "duplicate", "evidence": {"order_id": "o-1"}}}}).encode()


async def delivered(http: aiohttp.ClientSession, secret: str, body: bytes) -> dict[str, Any]:
    """The relay's answer to one signed delivery: its JSON (verdict, workflow_id) and status."""
    async with http.post("/webhooks/sandbox", data=body, headers={
            "Content-Type": "application/json",
            "Sandbox-Signature": sign(secret, body, int(time.time()))}) as response:
        answer: dict[str, Any] = await response.json()
    return {"status": response.status, **answer}


async def drive(jobs: list[Callable[[], Awaitable[None]]], concurrency: int) -> dict[str, object]:
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def one(job: Callable[[], Awaitable[None]]) -> None:
        async with gate:
            started = time.perf_counter()
            await job()
            latencies.append(time.perf_counter() - started)

    began = time.perf_counter()
    await asyncio.gather(*(one(job) for job in jobs))
    return {"seconds": time.perf_counter() - began, "latencies": latencies}


async def relay_load(args: argparse.Namespace) -> dict[str, object]:
    """Each event `copies` times, in order: first delivery, then its duplicates."""
    tag = uuid.uuid4().hex[:8]
    async with aiohttp.ClientSession(base_url=args.url, timeout=aiohttp.ClientTimeout(total=60),
                                     connector=aiohttp.TCPConnector(limit=args.concurrency)) as http:
        async def deliver(body: bytes, status: list[str]) -> None:
            answer = await delivered(http, args.secret, body)
            status.append(answer.get("verdict", str(answer["status"])))

        # Connections open before the clock starts, as the bare client's is (`connect`).
        await asyncio.gather(*(http.get("/healthz") for _ in range(args.concurrency)))
        verdicts: list[str] = []
        firsts = [refund_requested(f"evt_{tag}_{i}", f"{args.label}_{tag}_{i}") for i in range(args.events)]
        first = await drive([partial(deliver, b, verdicts) for b in firsts], args.concurrency)
        dup_verdicts: list[str] = []
        dups = await drive([partial(deliver, b, dup_verdicts)
                            for b in firsts for _ in range(args.copies - 1)], args.concurrency)
    return {"first": first, "duplicates": dups, "verdicts": sorted(set(verdicts)),
            "duplicate_verdicts": sorted(set(dup_verdicts))}


async def racing_load(args: argparse.Namespace) -> dict[str, object]:
    """Each event's `copies` deliveries sent at once, so its duplicates race its first one;
    counts the duplicates whose answer names the workflow they started or signalled (those
    reached Temporal)."""
    tag = uuid.uuid4().hex[:8]
    verdicts: list[str] = []
    routed: list[bool] = []
    async with aiohttp.ClientSession(base_url=args.url, timeout=aiohttp.ClientTimeout(total=60)) as http:
        async def deliver(body: bytes) -> None:
            answer = await delivered(http, args.secret, body)
            verdicts.append(answer.get("verdict", str(answer["status"])))
            routed.append(answer.get("verdict") == "duplicate" and answer.get("workflow_id") is not None)

        async def storm(body: bytes) -> None:
            await asyncio.gather(*(deliver(body) for _ in range(args.copies)))

        bodies = [refund_requested(f"evt_{tag}_{i}", f"{args.label}_{tag}_{i}") for i in range(args.events)]
        racing = await drive([partial(storm, b) for b in bodies], args.concurrency)
    return {"first": racing, "verdicts": sorted(set(verdicts)), "deliveries": len(verdicts),
            "duplicates_routed": sum(routed)}


async def bare_load(args: argparse.Namespace) -> dict[str, object]:
    """The same workflow starts with the same trigger signal, straight to Temporal."""
    from datetime import UTC, datetime

    from adapters.config import Settings
    from adapters.temporal_client import connect
    from domain.models import (
        EventKind,
        ProviderEvent,
        RefundReason,
        RefundRequest,
        RefundWorkflowInput,
        RequestSource,
    )
    from workflows.refund import RefundWorkflow

    client = await connect(Settings(temporal_address=args.temporal,  # seals its news, as the relay does
                                    payload_keys=os.environ["REFUNDS_PAYLOAD_KEYS"],
                                    approval_keys=os.environ["REFUNDS_APPROVAL_KEYS"]))
    tag = uuid.uuid4().hex[:8]

    def start(i: int) -> Callable[[], Awaitable[None]]:
        request = RefundRequest(refund_request_id=f"bare-{tag}-{i}", provider="sandbox",
                                charge_id="ch_bench", amount=1_000, currency="USD",
                                merchant_account="acct_1", reason=RefundReason.DUPLICATE,
                                evidence={"order_id": "o-1"}, source=RequestSource.WEBHOOK)

        trigger = ProviderEvent(
            provider="sandbox", event_id=f"evt_{tag}_{i}", event_type="refund.requested",
            kind=EventKind.REFUND_REQUESTED, body_sha256="0" * 64, occurred_at=datetime.now(UTC),
            request_object_id=f"{tag}_{i}", charge_id="ch_bench", amount=1_000, currency="USD",
            merchant_account="acct_1", reason=RefundReason.DUPLICATE, evidence={"order_id": "o-1"})

        async def go() -> None:
            await client.start_workflow(
                RefundWorkflow.run, RefundWorkflowInput(request=request, requester="bench"),
                id=request.refund_request_id, task_queue=args.queue, start_signal="provider_event",
                start_signal_args=[trigger])

        return go

    return {"first": await drive([start(i) for i in range(args.events)], args.concurrency)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["relay", "bare"])
    parser.add_argument("--url")
    parser.add_argument("--secret")
    parser.add_argument("--temporal")
    parser.add_argument("--queue")
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--copies", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--label", default="rrq", help="relay: the refund request ids' prefix")
    parser.add_argument("--at-once", action="store_true",
                        help="relay: each event's copies at once (concurrency counts events)")
    args = parser.parse_args()
    load = racing_load if args.at_once else relay_load
    result = event_loop.run(load(args) if args.mode == "relay" else bare_load(args))
    print(json.dumps(result), flush=True)
    os._exit(0)  # temporalio's runtime may crash at interpreter exit (sdk-python #300)


if __name__ == "__main__":
    main()
