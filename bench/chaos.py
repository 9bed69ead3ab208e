# Over 400 lines: the eight scenarios share one embedded stack, the checker's calls and the
# Outcome they print, and `--scenario` names them from one table.
"""The reliability suite (`make chaos`): each scenario prints its counts; 0 violations is
the bar. After every scenario the checker (bench/checker.py) holds each request it sent to the
provider's refunds per charge. A smoke version of each runs in `make test`
(tests/test_chaos_smoke.py).

1. kill_worker: SIGKILL the worker at named points (before and after the provider acted,
   during verify, during the ledger posting), each `rounds` times, against a provider that
   ignores idempotency keys.
2. restart: restart the Temporal dev server (same SQLite file) and PostgreSQL while cases are
   in flight (counted at each restart).
3. storms: 12 identical deliveries at once, 12 spread out, 12 re-signed with fresh timestamps;
   one workflow call each (a duplicate whose answer names its workflow reached Temporal).
4. order: every permutation of a refund's event sequence ends in the provider's final state.
5. bad_input: thousands of malformed, forged, oversize and stale requests: no 5xx, no state;
   then each named bad input of issue #19 once (NAMED_BAD_INPUTS), its answer and receipt
   verdict checked;
   schema_fuzz: schemathesis against the relay's OpenAPI document as each role that can
   write, steered in part onto captured charges and real cases (bench/fuzz_hooks.py); every
   case it created accounted against the answers and the provider.
6. concurrency: more requested than captured on one charge, from the API, provider webhooks
   and ServiceNow at once; close_race: refunds that close as they settle, the provider's
   webhook landing as the closing task runs (a task run again writes nothing twice).
7. fault_schedule: the randomised fault schedule (bench/fault_schedule.py); `--seed` replays one.

    python -m bench.chaos [--scenario NAME] [--scale 1.0] [--seed N]
"""

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
from temporalio.api.enums.v1 import EventType, WorkflowTaskFailedCause
from temporalio.client import WorkflowFailureError

from adapters import signing
from adapters.providers import cashfree
from adapters.providers.sandbox import sign
from bench import fault_schedule
from bench.checker import Outcome, Sent, check
from bench.common import RESULTS, Embedded, embedded_stack, gather_limited, run
from bench.fuzz_hooks import ACTION_BODIES, CASE_PARAMETER, REQUESTS_PATH, Steering
from starters import relay
from tests.adyen_fake import refund_notification
from tests.harness import PAYLOAD_KEYS, Stack, open_stack

SERVICENOW_SECRET = "chaos-servicenow"
UNHANDLED_COMMAND = WorkflowTaskFailedCause.WORKFLOW_TASK_FAILED_CAUSE_UNHANDLED_COMMAND
CONTENDED_CAPTURE = 10_000
# The schema fuzz runs as each role that can change something.
FUZZ_USERS = ("alice", "bob", "olga")

# Bad input may not grow the relay: what its process adds after warm-up (a tenth of the
# requests) stays under this, where a leak of a kilobyte a request over 10,000 would not.
MEMORY_BOUND_KIB = 8 * 1024


async def check_requests(stack: Stack, outcome: Outcome, sent: list[Sent], since: datetime) -> None:
    """The checker with the suite's bounded wait (a minute, and two seconds a request)."""
    await check(stack, outcome, sent, since=since, timeout=60 + 2 * len(sent))


KILLED_WORKER_STICKY_SECONDS = "5"
"""The sticky timeout of a worker that is going to be killed: its cases' next workflow tasks
wait this long for it before another worker takes them (the default's 60 s is a latency
choice for busy workers; what the kills test is the money, not that wait)."""


def worker_process(stack: Stack, dsn: str, temporal: str, **settings: str) -> subprocess.Popen[bytes]:
    """The stack's worker as its own process (to be killed), configured as the stack's: its
    approval keys too, without which it refuses every approval as unsealed. `settings`:
    environment variables that differ (e.g. a provider call left hanging)."""
    secret, approval_keys = stack.settings.sandbox_webhook_secret, stack.settings.approval_keys
    assert secret is not None and approval_keys is not None
    env = {**os.environ, "REFUNDS_DATABASE_URL": dsn, "TEMPORAL_ADDRESS": temporal,
           "REFUNDS_PAYLOAD_KEYS": PAYLOAD_KEYS, "REFUNDS_WORKER_HEALTH_PORT": "0",
           "REFUNDS_TEMPORAL_METRICS_PORT": "0", "REFUNDS_TASK_QUEUE": stack.settings.task_queue,
           "REFUNDS_SANDBOX_API_BASE": stack.sandbox_url,
           "REFUNDS_SANDBOX_WEBHOOK_SECRET": secret.get_secret_value(), "REFUNDS_LOG_LEVEL": "ERROR",
           "REFUNDS_APPROVAL_KEYS": approval_keys.get_secret_value(),
           "REFUNDS_PROVIDER_HTTP_TIMEOUT_SECONDS": str(stack.settings.provider_http_timeout_seconds),
           "REFUNDS_WORKER_STICKY_QUEUE_TIMEOUT_SECONDS": KILLED_WORKER_STICKY_SECONDS, **settings}
    return subprocess.Popen([str(Path(sys.executable).parent / "refunds"), "worker"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def request_many(stack: Stack, count: int, amount: int = 1_000) -> list[Sent]:
    """`count` refund requests through the API, each on its own charge; each is expected
    to be accepted (the checker holds every answer to that)."""
    sent: list[Sent] = []
    async with stack.api("alice") as api:
        for _ in range(count):
            charge = await stack.charge(10_000)
            body = stack.refund_body(charge, amount)
            response = await api.post("/v1/refund-requests", json=body)
            sent.append(Sent(body["refund_request_id"], charge, response.status_code))
    return sent


# Where kill_worker strikes: the sandbox fault that holds the call there (the sandbox lists
# held calls at /_sandbox/stalled); the ledger point holds a lock on the ledger instead.
KILL_POINTS: dict[str, list[dict[str, Any]]] = {
    "before_provider_acted": [{"mode": "timeout_before", "seconds": 4}],
    "after_provider_acted": [{"mode": "timeout_after_success", "seconds": 4}],
    "during_verify": [{"mode": "error_after"}, {"mode": "lookup_slow", "seconds": 4}],
    "during_ledger_posting": [],
}
STALLED_AT = {"before_provider_acted": "create_before_acting", "after_provider_acted": "create_after_acting",
              "during_verify": "lookup"}


async def kill_worker(env: Embedded, rounds: int) -> Outcome:
    """SIGKILLs the worker at each named point `rounds` times (a case a kill), against a
    provider that ignores idempotency keys; each kill is counted where it struck, and the
    checker holds every case to the provider's refunds."""
    outcome = Outcome("kill_worker", cases=rounds * len(KILL_POINTS))
    stack = await open_stack(env.store, env.client, env.temporal.address, worker=False,
                             submit_timeout_seconds=3)
    since = datetime.now(UTC)
    worker = worker_process(stack, env.dsn, env.temporal.address)
    sent: list[Sent] = []
    try:
        for _ in range(rounds):
            for point, faults in KILL_POINTS.items():
                charge = await stack.charge(10_000)
                await fault_schedule.arm(stack, charge, faults)
                body = stack.refund_body(charge, 1_000)
                async with contextlib.AsyncExitStack() as held:
                    if point == "during_ledger_posting":
                        conn = await held.enter_async_context(stack.store.database.transaction())
                        await conn.execute("LOCK TABLE ledger_entries IN SHARE ROW EXCLUSIVE MODE")
                    sent.append(Sent(body["refund_request_id"], charge,
                                     await fault_schedule.post_retrying(stack, body)))
                    if not await reached(stack, point, charge, timeout=30):
                        outcome.violation(f"{body['refund_request_id']} kill point {point}", "reached",
                                          "not within 30 s")
                        continue
                    worker.send_signal(signal.SIGKILL)
                    await asyncio.to_thread(worker.wait)
                    outcome.counts[f"kills_{point}"] = outcome.counts.get(f"kills_{point}", 0) + 1
                worker = worker_process(stack, env.dsn, env.temporal.address)
        await check_requests(stack, outcome, sent, since)
    finally:
        worker.kill()
        worker.wait()
        await stack.close()
    outcome.counts["kills"] = sum(v for k, v in outcome.counts.items() if k.startswith("kills_"))
    return outcome


async def reached(stack: Stack, point: str, charge: str, timeout: float) -> bool:
    """Waits until the case's call is held at the kill point: a call the sandbox holds, or
    the ledger insert waiting on the suite's lock."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if point == "during_ledger_posting":
            async with stack.store.database.transaction() as conn:
                row = await (await conn.execute(
                    "SELECT count(*) AS n FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND query ILIKE 'INSERT INTO ledger_entries%%'")).fetchone()
            if row and row["n"]:
                return True
        else:
            async with stack.sandbox() as sb:
                if f"{STALLED_AT[point]}:{charge}" in (await sb.get("/_sandbox/stalled")).json()["stalled"]:
                    return True
        await asyncio.sleep(0.1)
    return False


async def restart_services(env: Embedded, refunds: int) -> Outcome:
    """Restarts Temporal, then PostgreSQL, while cases are in flight: half wait for an
    approver (decided only after both restarts), half meet a provider that holds its answer
    past the client's timeout and then refuses its lookups a few times. The count in flight
    at each restart (cases still moving; the parked ones do nothing a restart could break)
    is reported, and a restart that strikes nothing is a violation."""
    outcome = Outcome("restart", cases=refunds)
    stack = await open_stack(env.store, env.client, env.temporal.address)
    since = datetime.now(UTC)
    try:
        sent: list[Sent] = []
        for i in range(refunds):
            charge = await stack.charge(fault_schedule.CAPTURED)
            if i % 2:
                # the answer held past the client's timeout, then the lookups refused a few
                # times: still moving when both restarts strike
                await fault_schedule.arm(stack, charge, [
                    {"mode": "timeout_after_success", "seconds": 3},
                    {"mode": "lookup_status", "status": 503, "times": 3}])
            amount = fault_schedule.AUTO_AMOUNT if i % 2 else fault_schedule.APPROVAL_AMOUNT
            body = stack.refund_body(charge, amount)
            sent.append(Sent(body["refund_request_id"], charge,
                             await fault_schedule.post_retrying(stack, body)))
        waiting = [s.case_id for i, s in enumerate(sent) if not i % 2]
        for case_id in waiting:
            await stack.wait_for_status(case_id, "awaiting_approval", timeout=60 + refunds)
        restarts: list[tuple[str, Callable[[], Awaitable[None]]]] = [("temporal", env.restart_temporal)]
        if env.postgres is not None:
            restarts.append(("postgres", env.restart_postgres))
        for name, restart in restarts:
            in_flight = await fault_schedule.count_in_flight(stack, sent)
            outcome.counts[f"in_flight_at_{name}_restart"] = in_flight
            if in_flight == 0:
                outcome.violation(f"{name} restart", "cases in flight", 0)
            await restart()
        for case_id in waiting:
            await fault_schedule.approve_retrying(stack, case_id)
        await check_requests(stack, outcome, sent, since)
    finally:
        await stack.close()
    return outcome


async def storms(env: Embedded, copies: int = 12) -> Outcome:
    outcome = Outcome("storms", cases=3)
    stack = await open_stack(env.store, env.client, env.temporal.address)
    secret = stack.settings.sandbox_webhook_secret
    assert secret is not None
    since = datetime.now(UTC)
    sent: dict[str, Sent] = {}
    try:
        async with httpx.AsyncClient(base_url=stack.relay_url, timeout=60) as http:
            async def deliver(body: bytes) -> tuple[int, bool]:
                """The answer's status, and whether it names a workflow the delivery started
                or signalled (a duplicate that does reached Temporal)."""
                headers = {"Sandbox-Signature": sign(secret.get_secret_value(), body, int(time.time())),
                           "Content-Type": "application/json"}
                answer = await http.post("/webhooks/sandbox", content=body, headers=headers)
                ack = answer.json() if answer.status_code < 300 else {}
                redriven = ack.get("verdict") == "duplicate" and ack.get("workflow_id") is not None
                return answer.status_code, redriven

            for mode in ("at_once", "spread", "resigned"):
                charge = await stack.charge(10_000)
                object_id = f"rrq_{stack.new_id()}"
                event_id = f"evt_{stack.new_id()}"
                body = json.dumps({"id": event_id, "object": "event", "type": "refund.requested",
                                   "created": int(time.time()), "data": {"object": {
                                       "id": object_id, "object": "refund_request", "charge": charge,
                                       "amount": 1_000, "currency": "usd", "merchant_account": "acct_1",
                                       "reason": "duplicate", "evidence": {"order_id": "o"}}}}).encode()
                if mode == "at_once":
                    answers = await asyncio.gather(*(deliver(body) for _ in range(copies)))
                else:
                    answers = []
                    for _ in range(copies):
                        answers.append(await deliver(body))
                        await asyncio.sleep(0.05 if mode == "spread" else 1.05)
                codes = [code for code, _ in answers]
                if any(code >= 300 for code in codes):
                    outcome.violations.append(f"{mode}: answers {sorted(set(codes))}")
                if reached := sum(redriven for _, redriven in answers):
                    outcome.violation(f"{mode} {event_id}", "no duplicate reaching Temporal",
                                      f"{reached} duplicates started or signalled its workflow")
                receipts = await stack.store.receipts.find("sandbox", event_id)
                if len(receipts) != copies:
                    outcome.violations.append(f"{mode}: {len(receipts)} receipts for {copies} deliveries")
                sent[mode] = Sent(f"sandbox-{object_id}", charge, 202)
        await check_requests(stack, outcome, list(sent.values()), since)
        for mode, request in sent.items():
            executions = (await stack.actions(request.case_id)).count("provider_submit_started")
            if executions != 1:
                outcome.violation(f"{mode} {request.case_id}", "1 execution", executions)
    finally:
        await stack.close()
    return outcome


async def order(env: Embedded,
                sequence: tuple[str, ...] = ("pending", "requires_action", "succeeded")) -> Outcome:
    """Delivers a refund's status events in every order; the case must end where the
    provider ended (the last status of the real sequence)."""
    permutations = list(itertools.permutations(sequence))
    outcome = Outcome("order", cases=len(permutations))
    # the poll comes after the check's wait: only the webhooks can bring a case to its end
    stack = await open_stack(env.store, env.client, env.temporal.address, late_failure_window_seconds=5,
                             status_poll_interval_seconds=600)
    since = datetime.now(UTC)
    sent: list[Sent] = []
    try:
        async with stack.sandbox() as sb:
            await sb.post("/_sandbox/config", json={"refund_initial_status": "pending",
                                                    "hold_webhooks": True})
        for perm in permutations:
            charge = await stack.charge(10_000)
            case_id = await stack.request_refund("alice", charge, 1_000)
            sent.append(Sent(case_id, charge, 202))
            row = await stack.wait_for_status(case_id, "pending")
            refund_id = row["provider_refund_id"]
            for status in sequence:  # the provider really moves in order; webhooks are held
                await stack.set_provider_status(refund_id, status)
            bodies = await take_held(stack)
            for index in (sequence.index(s) for s in perm):
                if (answer := await stack_deliver(stack, bodies[index])) != 200:
                    outcome.violation(f"{'>'.join(perm)} {case_id} delivery", "HTTP 200", f"HTTP {answer}")
        await check_requests(stack, outcome, sent, since)
        for perm, request in zip(permutations, sent, strict=True):
            ended = await stack.store.cases.get(request.case_id)
            if ended is None or ended["status"] != "succeeded":
                outcome.violation(f"{'>'.join(perm)} {request.case_id}", "succeeded",
                                  ended["status"] if ended else "missing")
    finally:
        await stack.close()
    return outcome


async def take_held(stack: Stack) -> list[bytes]:
    """The status webhooks the sandbox holds, oldest first (`refund.created` left out)."""
    async with stack.sandbox() as sb:
        bodies = [b.encode() for b in (await sb.get("/_sandbox/held-webhooks")).json()["bodies"]]
        await sb.post("/_sandbox/discard-held")
    return [b for b in bodies if json.loads(b)["type"] != "refund.created"]


async def stack_deliver(stack: Stack, body: bytes) -> int:
    """Delivers a held webhook, signed now; the relay's answer."""
    secret = stack.settings.sandbox_webhook_secret
    assert secret is not None
    async with httpx.AsyncClient(base_url=stack.relay_url, timeout=30) as http:
        return (await http.post("/webhooks/sandbox", content=body, headers={
            "Content-Type": "application/json",
            "Sandbox-Signature": sign(secret.get_secret_value(), body, int(time.time()))})).status_code


BAD_INPUT_SECRETS: dict[str, Any] = {"stripe_webhook_secret": "whsec_chaos",
                     "adyen_hmac_keys": "00112233445566778899aabbccddeeff",
                     "rainforest_webhook_secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
                     "cashfree_webhook_secret": "cf-chaos", "slack_signing_secret": "s1,"}
"""Every provider's webhooks on, and a Slack secret left ending in a comma by a rotation edit."""
DEEP = b"[" * 100_000 + b"]" * 100_000


@dataclass(frozen=True)
class BadInput:
    """One named bad input and what it must get: its status and, for the deliveries the relay
    stores, the receipt's verdict (None: an API route, or refused by the HTTP parser)."""

    name: str
    path: str
    body: bytes
    headers: dict[str, str]
    status: int
    verdict: str | None = None
    wire: bool = True
    """False: sent to the relay app in process, since HTTP servers refuse it on the wire."""


def named_bad_inputs(stack: Stack, token: str) -> list[BadInput]:
    """Issue #19's bad inputs, signed now with the stack's secrets where a signature matters."""
    now, old = int(time.time()), int(time.time()) - 3600
    sandbox_secret = stack.settings.sandbox_webhook_secret
    assert sandbox_secret is not None
    sandbox_key, stripe_key = sandbox_secret.get_secret_value(), BAD_INPUT_SECRETS["stripe_webhook_secret"]
    event = json.dumps({"id": f"evt_{uuid.uuid4().hex[:12]}", "object": "event", "type": "refund.updated",
                        "created": now, "data": {"object": {"id": "re_chaos"}}}).encode()
    old_sig = sign(stripe_key, event, old).partition("v1=")[2]
    nul_id = json.dumps({"id": "evt_chaos\u0000", "object": "event", "type": "refund.requested",
                         "created": now, "data": {"object": {
                             "id": f"rrq_{uuid.uuid4().hex[:10]}", "object": "refund_request",
                             "charge": "ch_chaos", "amount": 100, "currency": "usd",
                             "merchant_account": "acct_1", "reason": "duplicate"}}}).encode()
    unknown = json.dumps({"id": f"evt_{uuid.uuid4().hex[:12]}", "object": "event", "type": "refund.mystery",
                          "created": now, "data": {"object": {"id": "x"}}}).encode()
    slack = f"payload={json.dumps({'type': 'block_actions', 'actions': []})}".encode()
    request = {"refund_request_id": stack.new_id("chaos-bad"), "provider": "sandbox", "charge_id": "ch_chaos",
               "amount": 100, "currency": "USD", "merchant_account": "acct_1",
               "reason": "requested_by_customer", "evidence": {"order_id": "o-1"}}
    api = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def asked(**change: Any) -> bytes:
        return json.dumps({**request, **change}).encode()

    def sandbox_signed(body: bytes, **extra: str) -> dict[str, str]:
        return {"Content-Type": "application/json", "Sandbox-Signature": sign(sandbox_key, body, now),
                **extra}

    return [
        BadInput("stripe_signed_old_then_new_and_old_t", "/webhooks/stripe", event,
                 {"Stripe-Signature": f"v1={old_sig}, t={now},t={old}"}, 401, "stale"),
        BadInput("stripe_t_with_a_tail", "/webhooks/stripe", event,
                 {"Stripe-Signature": f"t={old}=x,v1={old_sig}"}, 401, "stale"),
        BadInput("deep_json_sandbox", "/webhooks/sandbox", DEEP, sandbox_signed(DEEP), 400, "malformed"),
        BadInput("deep_json_stripe", "/webhooks/stripe", DEEP,
                 {"Stripe-Signature": sign(stripe_key, DEEP, now)}, 400, "malformed"),
        BadInput("deep_json_adyen", "/webhooks/adyen", DEEP, {}, 400, "malformed"),
        BadInput("adyen_additional_data_a_list", "/webhooks/adyen", refund_notification(["hmacSignature"]),
                 {}, 401, "bad_signature"),
        BadInput("svix_timestamp_year_9999", "/webhooks/rainforest", b"{}",
                 {"svix-id": "msg_chaos", "svix-timestamp": "253402300800", "svix-signature": "v1,AAAA"},
                 401, "bad_signature"),
        BadInput("cashfree_superscript_timestamp", "/webhooks/cashfree", b"{}",
                 {"x-webhook-timestamp": "\u00b2\u00b3\u00b9", "x-webhook-signature":
                  cashfree.sign(BAD_INPUT_SECRETS["cashfree_webhook_secret"], b"{}", 231)},
                 401, "bad_signature"),
        BadInput("nul_in_a_header_value", "/webhooks/sandbox", unknown,
                 sandbox_signed(unknown, **{"x-note": "a\x00b"}), 202, "unknown_type", wire=False),
        BadInput("nul_in_a_header_value_on_the_wire", "/webhooks/sandbox", unknown,
                 sandbox_signed(unknown, **{"x-note": "a\x00b"}), 400),
        BadInput("signed_event_id_with_nul", "/webhooks/sandbox", nul_id, sandbox_signed(nul_id), 400,
                 "unreadable"),
        BadInput("slack_signed_with_an_empty_key", "/integrations/slack/actions", slack,
                 {"Content-Type": "application/x-www-form-urlencoded", "x-slack-request-timestamp": str(now),
                  "x-slack-signature": signing.signature("slack", "", str(now), slack)},
                 401, "bad_signature"),
        BadInput("caller_set_trigger_identities", "/v1/refund-requests", asked(trigger_identities=["bob"]),
                 api, 422),
        BadInput("caller_set_source", "/v1/refund-requests", asked(source="webhook"), api, 422),
        BadInput("nul_in_a_reason", "/v1/refund-requests", asked(reason="requested_by_customer\u0000"),
                 api, 422),
        BadInput("amount_of_2_to_the_63", "/v1/refund-requests", asked(amount=2**63), api, 422),
        BadInput("body_over_the_limit", "/v1/refund-requests",
                 asked(evidence={"note": "x" * stack.settings.webhook_max_body_bytes}), api, 413),
    ]


async def send_raw(url: str, probe: BadInput) -> int:
    """The probe over a plain TCP connection: HTTP clients refuse to send a NUL in a header."""
    host, port = httpx.URL(url).host, httpx.URL(url).port
    reader, writer = await asyncio.open_connection(host, port)
    head = "".join(f"{k}: {v}\r\n" for k, v in probe.headers.items())
    writer.write(f"POST {probe.path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(probe.body)}\r\n"
                 f"Connection: close\r\n{head}\r\n".encode("latin-1") + probe.body)
    await writer.drain()
    status_line = await reader.readline()
    writer.close()
    return int(status_line.split()[1])


async def send_named(stack: Stack, outcome: Outcome) -> int:
    """Each named bad input once; a wrong status or verdict is a violation. Returns how many
    receipts they should have stored."""
    probes = named_bad_inputs(stack, stack.tokens["alice"])
    in_process = httpx.ASGITransport(app=relay.create_app(stack.store, stack.client, stack.providers,
                                                           stack.settings))
    async with httpx.AsyncClient(base_url=stack.relay_url, timeout=30) as wire, \
            httpx.AsyncClient(base_url="http://relay.in-process", transport=in_process, timeout=30) as local:
        for probe in probes:
            headers = {k.encode(): v.encode("latin-1") for k, v in probe.headers.items()}
            if "\x00" in "".join(probe.headers.values()) and probe.wire:
                status, verdict = await send_raw(stack.relay_url, probe), None
            else:
                response = await (wire if probe.wire else local).post(probe.path, content=probe.body,
                                                                      headers=headers)
                status, verdict = response.status_code, await stored_verdict(stack, response)
            outcome.counts[f"named_{probe.name}"] = status
            if (status, verdict) != (probe.status, probe.verdict):
                outcome.violations.append(f"{probe.name}: answered {status} ({verdict}), expected "
                                          f"{probe.status} ({probe.verdict})")
    return sum(p.verdict is not None for p in probes)


async def stored_verdict(stack: Stack, response: httpx.Response) -> str | None:
    """The verdict of the receipt an answer names, or None when it names none."""
    receipt_id = response.headers.get("x-receipt-id")
    if receipt_id is None:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            receipt_id = response.json()["receipt_id"]
    if receipt_id is None:
        return None
    stored = await stack.store.receipts.delivery(int(receipt_id))
    return stored.verdict if stored is not None else None


async def bad_input(env: Embedded, requests: int) -> Outcome:
    """Malformed, forged, oversize and stale requests, then the named ones: no 5xx, no case
    nor ledger entry, a receipt for every delivery, and (the checker) each one it accepted
    processed."""
    outcome = Outcome("bad_input", cases=requests)
    stack = await open_stack(env.store, env.client, env.temporal.address, stripe_api_key="sk_test_unused",
                             **BAD_INPUT_SECRETS)
    process = psutil.Process()  # the relay serves from this process
    rng = random.Random(11)
    secret = stack.settings.sandbox_webhook_secret
    assert secret is not None
    since = datetime.now(UTC)
    try:
        before = await counts(stack)
        async with httpx.AsyncClient(base_url=stack.relay_url, timeout=30) as http, \
                stack.api("alice") as api:
            statuses: dict[int, int] = {}
            rss_warm = webhooks = 0
            for i in range(requests):
                if i == requests // 10:  # warmed up: from here on the relay's memory must hold
                    rss_warm = process.memory_info().rss
                kind = i % 6
                body = json.dumps({"id": f"evt_bad_{i}", "type": "refund.requested", "created": 0,
                                   "data": {"object": {"amount": rng.choice([-1, 0, 1.5, "x"])}}}).encode()
                if kind == 0:  # forged
                    response = await http.post("/webhooks/sandbox", content=body,
                                               headers={"Sandbox-Signature": f"t={int(time.time())},v1=00"})
                elif kind == 1:  # stale
                    response = await http.post("/webhooks/sandbox", content=body, headers={
                        "Sandbox-Signature": sign(secret.get_secret_value(), body, int(time.time()) - 3600)})
                elif kind == 2:  # signed garbage
                    garbage = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 200)))
                    response = await http.post("/webhooks/sandbox", content=garbage, headers={
                        "Sandbox-Signature": sign(secret.get_secret_value(), garbage, int(time.time()))})
                elif kind == 3:  # oversize
                    response = await http.post("/webhooks/sandbox",
                                               content=b"x" * (stack.settings.webhook_max_body_bytes + 1))
                elif kind == 4:  # invalid refund request
                    response = await api.post("/v1/refund-requests", json={
                        "refund_request_id": f"bad-{i}", "amount": rng.choice([-5, 0, 2.5, "9", None]),
                        "currency": rng.choice(["USD", "XYZ", "", 7])})
                else:  # malformed JSON to the API
                    response = await api.post("/v1/refund-requests", content=b"{not json",
                                              headers={"Content-Type": "application/json"})
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                webhooks += response.request.url.path.startswith("/webhooks/")
        growth_kib = (process.memory_info().rss - rss_warm) // 1024
        webhooks += await send_named(stack, outcome)
        outcome.counts.update({f"http_{k}": v for k, v in sorted(statuses.items())})
        outcome.counts["rss_growth_after_warmup_kib"] = growth_kib
        if any(code >= 500 for code in statuses):
            outcome.violations.append(f"5xx answers: {statuses}")
        if growth_kib > MEMORY_BOUND_KIB:
            outcome.violations.append(f"the relay's process grew {growth_kib} KiB after warm-up")
        after = await counts(stack)
        outcome.counts["webhook_receipts"] = after["receipts"] - before["receipts"]
        if (stored := outcome.counts["webhook_receipts"]) != webhooks:  # every refusal is on record
            outcome.violations.append(f"{stored} receipts for {webhooks} deliveries")
        if money_state(after) != money_state(before):
            outcome.violations.append(f"state changed: {before} -> {after}")
        await check_requests(stack, outcome, [], since)  # no request made a case: the receipts' rule
    finally:
        await stack.close()
    return outcome


def money_state(counted: dict[str, int]) -> tuple[int, int]:
    """What bad input must never change: the cases and the ledger (receipts it may add)."""
    return counted["cases"], counted["ledger"]


async def counts(stack: Stack) -> dict[str, int]:
    async with stack.store.database.transaction() as conn:
        cases = await (await conn.execute("SELECT count(*) AS n FROM refund_cases")).fetchone()
        ledger = await (await conn.execute("SELECT count(*) AS n FROM ledger_entries")).fetchone()
        receipts = await (await conn.execute("SELECT count(*) AS n FROM webhook_receipts")).fetchone()
    return {"cases": int(cases["n"]) if cases else -1, "ledger": int(ledger["n"]) if ledger else -1,
            "receipts": int(receipts["n"]) if receipts else -1}


def failures_section(report: str) -> str:
    """schemathesis's report from its failures (each with the response that failed) to its
    warnings, which are long and the same every run; the whole report when it has no such part."""
    found = re.search(r"^=+ FAILURES =+$.*?(?=^=+ WARNINGS =+$|\Z)", report, re.MULTILINE | re.DOTALL)
    return found.group(0) if found else report


async def schema_fuzz(env: Embedded, examples: int, seed: int = 0,
                      phases: str = "examples,coverage,fuzzing,stateful") -> Outcome:
    """schemathesis against the relay's own OpenAPI document, once with each token that can
    write (requester, approver, ops), six calls in ten steered onto captured charges and real
    cases (bench/fuzz_hooks.py): no answer may be a 5xx, and every case it created is held
    to the answers and to the provider (`account_fuzz`). Each role's run is seeded (`seed`
    plus its place), its calls one at a time."""
    outcome = Outcome("schema_fuzz", cases=examples * len(FUZZ_USERS), seed=seed)
    stack = await open_stack(env.store, env.client, env.temporal.address)
    try:
        # cases waiting for an approver before the fuzz begins, for the approver's run to decide
        seeded = await request_many(stack, max(2, examples // 5), fault_schedule.APPROVAL_AMOUNT)
        for request in seeded:
            await stack.wait_for_status(request.case_id, "awaiting_approval")
        steering = Steering(
            charges=[await stack.charge(fault_schedule.CAPTURED) for _ in range(max(3, examples // 2))],
            cases=[s.case_id for s in seeded], share=0.6,
            amounts=[fault_schedule.AUTO_AMOUNT] * 2 + [fault_schedule.APPROVAL_AMOUNT,
                                                        fault_schedule.CAPTURED + 1],
            currencies=["USD", "USD", "usd", "EUR"])
        since = datetime.now(UTC)
        answers: list[dict[str, Any]] = []
        for i, user in enumerate(FUZZ_USERS):
            entries, exit_code, report = await run_schemathesis(stack, user, examples, phases,
                                                                replace(steering, seed=seed + i))
            answers += entries
            steering.cases += sorted(announced_cases(entries))  # later roles act on what it created
            outcome.counts[f"exit_code_{user}"] = exit_code
            if exit_code != 0:
                outcome.violations.append(f"schemathesis as {user} found failures:\n{report}")
        outcome.counts["requests"] = len(answers)
        for answer in answers:  # how often a steered action reached its decision on a real case
            action = answer["request"]["url"].rsplit("/", 1)[-1]
            if action in ACTION_BODIES and 200 <= answer["response"]["status"] < 300:
                outcome.counts[f"answered_2xx_{action}"] = outcome.counts.get(f"answered_2xx_{action}", 0) + 1
        await account_fuzz(stack, outcome, answers, since, seeded, timeout=60 + 2 * len(steering.cases))
    finally:
        await stack.close()
    return outcome


async def run_schemathesis(stack: Stack, user: str, examples: int, phases: str,
                           steering: Steering) -> tuple[list[dict[str, Any]], int, str]:
    """One `st run` as `user`, seeded with the steering's seed: its HAR entries (each request
    with its answer), its exit code and the failures part of its report. It runs in a folder
    of its own, removed after: schemathesis keeps a request cache (and Hypothesis an example
    database) in its working directory and replays them when it next starts, outside the HAR
    and through the steering hooks, so a case could be made that no recorded answer announced
    and a seed would no longer stand for one run."""
    with tempfile.TemporaryDirectory(prefix="refunds-fuzz-") as folder:
        har = Path(folder) / "run.har"
        done = await asyncio.to_thread(subprocess.run, [
            str(Path(sys.executable).parent / "st"), "run", f"{stack.relay_url}/openapi.json",
            "--checks", "not_a_server_error", "--max-examples", str(examples), "--seed", str(steering.seed),
            "--workers", "1",  # one call at a time: the seed stands for one sequence of calls
            # past the relay's own bound: a verdict no workflow takes is answered 202 after
            # `approval_answer_seconds` (10), schemathesis's default timeout to the second
            "--request-timeout", str(stack.settings.approval_answer_seconds + 20),
            "--header", f"Authorization: Bearer {stack.tokens[user]}", "--no-color",
            "--phases", phases, "--report", "har", "--report-har-path", str(har)],
            capture_output=True, text=True, timeout=1800, cwd=folder,
            env={**os.environ, **steering.as_env(), "SCHEMATHESIS_HOOKS": "bench.fuzz_hooks",
                 "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
        entries = list(json.loads(har.read_text())["log"]["entries"]) if har.exists() else []
    return entries, done.returncode, failures_section(done.stdout + done.stderr)


def announced_cases(answers: list[dict[str, Any]]) -> set[str]:
    """The case ids the 2xx answers name (a request's case, a reissue's child), read from
    their JSON: an id is announced only where an answer holds it whole."""
    found: set[str] = set()

    def walk(value: object) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if key == CASE_PARAMETER and isinstance(item, str):
                    found.add(item)
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    for answer in answers:
        if 200 <= answer["response"]["status"] < 300:
            with contextlib.suppress(ValueError):
                walk(json.loads(answer["response"]["content"].get("text") or "null"))
    return found


async def account_fuzz(stack: Stack, outcome: Outcome, answers: list[dict[str, Any]], since: datetime,
                       seeded: list[Sent], timeout: float) -> None:
    """Holds the fuzz to what it was answered and to the provider: every case created since
    `since` is one a 2xx answer announced, every 2xx answer to a refund request has its case,
    each created or seeded case ends as the provider says (the checker's rules), and every
    ledger entry posted since belongs to one of them (so the ledger moved only by what the
    provider refunded, which the checker holds per case). Counts how the created cases ended."""
    async with stack.store.database.transaction() as conn:
        created = {r["refund_request_id"]: r["charge_id"] for r in await (await conn.execute(
            "SELECT refund_request_id, charge_id FROM refund_cases WHERE created_at >= %s",
            (since,))).fetchall()}
    announced = announced_cases(answers)
    for case_id in sorted(created.keys() - announced):
        outcome.violation(case_id, "a case only where a 2xx answer announced it", "created unannounced")
    for answer in answers:
        request = answer["request"]
        if (request["method"] == "POST" and request["url"].endswith(REQUESTS_PATH)
                and 200 <= answer["response"]["status"] < 300):
            case_id = json.loads(request["postData"]["text"])[CASE_PARAMETER]
            if await stack.store.cases.get(case_id) is None:
                outcome.violation(case_id, "the case its 2xx answer announced", "no case")
    await check(stack, outcome, seeded + [Sent(c, charge, 202) for c, charge in created.items()],
                since=since, timeout=timeout)
    async with stack.store.database.transaction() as conn:
        posted = {r["refund_request_id"] for r in await (await conn.execute(
            "SELECT DISTINCT refund_request_id FROM ledger_entries WHERE posted_at >= %s",
            (since,))).fetchall()}
    for case_id in sorted(posted - created.keys() - {s.case_id for s in seeded}):
        outcome.violation(f"ledger of {case_id}", "entries only for the fuzz's and the seeded cases",
                          "posted for a case neither made")
    outcome.counts["cases_created"] = len(created)
    for case_id in created:
        row = await stack.store.cases.get(case_id)
        ended = f"created_ended_{row['status'] if row else 'missing'}"
        outcome.counts[ended] = outcome.counts.get(ended, 0) + 1


async def concurrency(env: Embedded, requests: int, amount: int = 1_500) -> Outcome:
    """Contention: `requests` partial refunds of `amount` on one charge of 10,000, at once
    from the API, provider webhooks and ServiceNow tickets, more than was captured. The
    sandbox is told to refund beyond the captured amount, so only our reservations keep the
    sum under it: what we record as refunded and what the provider refunded stay <= 10,000."""
    outcome = Outcome("concurrency", cases=requests)
    stack = await open_stack(env.store, env.client, env.temporal.address,
                             servicenow_inbound_secret=SERVICENOW_SECRET)
    since = datetime.now(UTC)
    sent: list[Sent] = []
    try:
        await stack.store.access.link_identity("servicenow", f"sn-{stack.settings.task_queue}",
                                               "alice")
        async with stack.sandbox() as sb:
            await sb.post("/_sandbox/config", json={"enforce_captured": False})
        charge = await stack.charge(CONTENDED_CAPTURE)

        async def by_api() -> None:
            body = stack.refund_body(charge, amount)
            async with stack.api("alice") as api:
                response = await api.post("/v1/refund-requests", json=body)
            sent.append(Sent(body["refund_request_id"], charge, response.status_code))

        async def by_webhook() -> None:
            object_id = f"rrq_{stack.new_id()}"
            async with stack.sandbox() as sb:
                response = await sb.post("/_sandbox/events", json={"type": "refund.requested", "object": {
                    "id": object_id, "object": "refund_request", "charge": charge, "amount": amount,
                    "currency": "usd", "merchant_account": "acct_1", "reason": "duplicate",
                    "evidence": {"order_id": "o"}}})
            response.raise_for_status()  # the provider sends it; the relay's answer is its own
            sent.append(Sent(f"sandbox-{object_id}", charge, 202))

        async def by_servicenow() -> None:
            sys_id = uuid.uuid4().hex
            body = json.dumps({
                "sys_id": sys_id, "number": f"RR{sys_id[:7]}", "sys_updated_on": "2026-12-01 10:00:00",
                "opened_by": {"user_name": f"sn-{stack.settings.task_queue}"},
                "sys_created_by": f"sn-{stack.settings.task_queue}", "provider": "sandbox",
                "charge_id": charge, "amount": amount, "currency": "USD", "merchant_account": "acct_1",
                "evidence": {"order_id": "o"}}).encode()
            stamp = str(int(time.time()))
            async with httpx.AsyncClient(base_url=stack.relay_url, timeout=60) as http:
                response = await http.post("/integrations/servicenow/refund-requests", content=body, headers={
                    "Content-Type": "application/json", "X-Refunds-Request-Timestamp": stamp,
                    "X-Refunds-Signature": signing.signature("servicenow", SERVICENOW_SECRET, stamp, body)})
            sent.append(Sent(f"servicenow-{sys_id}", charge, response.status_code))

        entry_points = (by_api, by_webhook, by_servicenow)
        await asyncio.gather(*(entry_points[i % 3]() for i in range(requests)))
        await approve_until_settled(stack, sent, timeout=60 + 2 * requests)
        await check_requests(stack, outcome, sent, since)
        async with stack.store.database.transaction() as conn:
            by_status = {r["status"]: r for r in await (await conn.execute(
                "SELECT status, count(*) AS n, sum(reserved_amount) AS held FROM refund_cases"
                " WHERE charge_id = %s GROUP BY status", (charge,))).fetchall()}
        refunded = sum(r["amount"] for r in await stack.provider_refunds(charge)
                       if r["status"] == "succeeded")
        outcome.counts.update({status: int(r["n"]) for status, r in by_status.items()})
        outcome.counts.update({"requested": requests * amount, "captured": CONTENDED_CAPTURE,
                               "refunded": refunded,
                               "held": sum(int(r["held"] or 0) for r in by_status.values())})
        if refunded > CONTENDED_CAPTURE or outcome.counts["held"] > CONTENDED_CAPTURE:
            outcome.violation(f"charge {charge}", f"refunded and held <= {CONTENDED_CAPTURE}",
                              f"refunded {refunded}, held {outcome.counts['held']}")
    finally:
        await stack.close()
    return outcome


async def approve_until_settled(stack: Stack, sent: list[Sent], timeout: float) -> None:
    """An approver approves each case once it waits (partial refunds after a first one need
    a person), until no case is in flight or the time is up."""
    approved: set[str] = set()
    deadline = asyncio.get_running_loop().time() + timeout
    while (await fault_schedule.count_in_flight(stack, sent, parked=True)
           and asyncio.get_running_loop().time() < deadline):
        async with stack.store.database.transaction() as conn:
            waiting = [r["refund_request_id"] for r in await (await conn.execute(
                "SELECT refund_request_id FROM refund_cases WHERE refund_request_id = ANY(%s)"
                " AND status = 'awaiting_approval'", ([s.case_id for s in sent],))).fetchall()]
        for case_id in set(waiting) - approved:
            await fault_schedule.approve_retrying(stack, case_id)
            approved.add(case_id)
        await asyncio.sleep(0.5)


async def close_race(env: Embedded, cases: int, at_once: int = 2, rounds: int = 5) -> Outcome:
    """Refunds that close as they settle (no late-failure window): the provider's own webhook
    about each lands, now and then, while the settlement's workflow task closes the workflow
    (the relay signals it: it came before the settlement was written); Temporal refuses that
    completion and the task runs again with the signal, its local activities too. The checker
    holds each case's one-time rows to once. The race is one of timing (15 to 17 refunds in
    100 in this process, 1 to 3 in 60 with the stack inside pytest), so `cases` more refunds
    are sent, up to `rounds` times, until one raced (counted from the histories); none at all
    is a violation: the scenario proved nothing."""
    outcome = Outcome("close_race")
    stack = await open_stack(env.store, env.client, env.temporal.address, late_failure_window_seconds=0)
    since = datetime.now(UTC)
    sent: list[Sent] = []
    failed, run_again, other_failures = EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED, 0, Counter[str]()
    try:
        async def request() -> None:
            charge = await stack.charge(10_000)
            body = stack.refund_body(charge, 1_000)
            async with stack.api("alice") as api:
                response = await api.post("/v1/refund-requests", json=body)
            sent.append(Sent(body["refund_request_id"], charge, response.status_code))

        for _ in range(rounds):
            batch = len(sent)
            await gather_limited([request for _ in range(cases)], at_once)
            for case in sent[batch:]:
                if case.answered == case.expected:  # its workflow ran: read its whole history
                    handle = stack.client.get_workflow_handle(case.case_id)
                    with contextlib.suppress(WorkflowFailureError):  # the checker reports the case
                        await asyncio.wait_for(handle.result(), 60)
                    causes = [e.workflow_task_failed_event_attributes.cause
                              for e in (await handle.fetch_history()).events if e.event_type == failed]
                    # the race is Temporal refusing the closing completion (a new event came);
                    # a task failing for any other cause is no race, and is told apart
                    run_again += UNHANDLED_COMMAND in causes
                    other_failures.update(WorkflowTaskFailedCause.Name(c) for c in causes
                                          if c != UNHANDLED_COMMAND)
            if run_again:
                break
        outcome.cases = len(sent)
        await check_requests(stack, outcome, sent, since)
        outcome.counts["tasks_run_again"] = run_again
        outcome.counts.update({f"other_task_failures_{cause}": n for cause, n in other_failures.items()})
        if run_again == 0:
            outcome.violation("close race", "a closing task run again (a webhook at the close)", "none")
    finally:
        await stack.close()
    return outcome


def scenarios(env: Embedded, scale: float, seed: int) -> dict[str, Callable[[], Awaitable[Outcome]]]:
    """Every scenario at `scale` (1.0 = the issue's sizes), by name."""
    return {
        "kill_worker": lambda: kill_worker(env, max(1, int(20 * scale))),
        "storms": lambda: storms(env),
        "order": lambda: order(env),
        "bad_input": lambda: bad_input(env, max(60, int(10_000 * scale))),
        "concurrency": lambda: concurrency(env, max(10, int(50 * scale))),
        "close_race": lambda: close_race(env, max(20, int(100 * scale))),
        "schema_fuzz": lambda: schema_fuzz(env, max(5, int(50 * scale)), seed),
        "restart": lambda: restart_services(env, max(4, int(50 * scale))),
        "fault_schedule": lambda: fault_schedule.run(
            env, max(50, int(500 * scale)), seed,
            worker=lambda stack: worker_process(stack, env.dsn, env.temporal.address)),
    }


SCENARIOS = ("kill_worker", "storms", "order", "bad_input", "concurrency", "close_race", "schema_fuzz",
             "restart", "fault_schedule")


def print_outcome(outcome: Outcome) -> None:
    print(f"{outcome.scenario:<14} seed {outcome.seed}  cases {outcome.cases:>6}  violations "
          f"{len(outcome.violations):>3}  {outcome.counts}", flush=True)
    for violation in outcome.violations[:50]:
        print(f"    {violation}")
    if outcome.waiting_for_person:
        print(f"    waiting for a person: {', '.join(outcome.waiting_for_person)}")


async def main(scenario: str | None, scale: float, seed: int) -> list[Outcome]:
    """Runs one scenario or all; each writes bench/results/chaos-<scenario>.json, so a single
    scenario's run leaves the others' results alone."""
    outcomes: list[Outcome] = []
    RESULTS.mkdir(exist_ok=True)
    async with embedded_stack() as env:
        runs = scenarios(env, scale, seed)
        for name in SCENARIOS:
            if scenario in (None, name):
                outcome = await runs[name]()
                outcome.seed = seed if outcome.seed is None else outcome.seed
                outcomes.append(outcome)
                print_outcome(outcome)
                (RESULTS / f"chaos-{name}.json").write_text(json.dumps(
                    {**outcome.__dict__, "scale": scale}, indent=2))
    return outcomes


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scenario", choices=SCENARIOS)
    parser.add_argument("--scale", type=float, default=1.0, help="1.0 = the issue's sizes")
    parser.add_argument("--seed", type=int, default=None,
                        help="the randomised schedule's seed (a violation prints it); random if unset")
    args = parser.parse_args()
    chosen = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    results = run(main(args.scenario, args.scale, chosen))
    sys.stdout.flush()
    os._exit(1 if any(o.violations for o in results) else 0)
