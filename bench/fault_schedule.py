"""The randomised fault schedule: one seed draws, for every case, the provider faults it
meets (timeouts and 5xx before and after acting, a refused lookup, a first create that acts
after the client gave up, lost, duplicated and late webhooks, a late failure after success)
and whether two approvers race on it; and, for the run, when the worker is killed and when
Temporal and PostgreSQL restart. The same seed draws the same schedule, so a violation's
seed replays it: `make chaos SEED=<seed>` (or `python -m bench.chaos --scenario
fault_schedule --seed <seed>`).

The sandbox provider ignores idempotency keys, so every second refund it makes is one the
orchestrator sent; each case has its own charge, so the checker's per-charge view is the case's.
"""

import asyncio
import contextlib
import random
import signal
import subprocess
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import psycopg

from bench.checker import FINAL, WAITS_FOR_PERSON, Outcome, Sent, check
from bench.common import Embedded
from starters.actions.approving import VERDICT_PENDING
from tests.harness import Stack, open_stack

# How long the worker's provider client waits for an answer, and the submit activity's
# start-to-close: the faults are sized around them. A slow create lands within SUBMIT_TIMEOUT
# of reaching the provider, and the stack tells the orchestrator so: its resubmit margin (how
# long past the HTTP timeout a timed-out create may still land; a setting since issue #18,
# ignored by the code before it) is SUBMIT_TIMEOUT.
HTTP_TIMEOUT = 1.0
SUBMIT_TIMEOUT = 8.0
# How long a succeeded case watches for a late failure: well past the latest one the schedule
# draws (1.5 s) and its webhook's delivery on a loaded machine, which a 3 s watch missed.
LATE_FAILURE_WINDOW = 10
# Amounts: at or below the policy's auto-approval (50.00) runs straight through; above it an
# approver must decide, which is where two approvers race.
AUTO_AMOUNT, APPROVAL_AMOUNT, CAPTURED = 1_000, 6_000, 10_000

CREATE_FAULTS = ("timeout_before", "timeout_after_success", "error_before", "error_after",
                 "acts_after_give_up", "late_failure")
LOOKUP_FAULTS = ("lookup_401", "lookup_404")
WEBHOOK_FAULTS = ("webhook_lost", "webhook_duplicated", "webhook_late")

Worker = Callable[[Stack], subprocess.Popen[bytes]]
"""Starts a worker process for the stack (bench.chaos.worker_process)."""


@dataclass
class CasePlan:
    """What one case meets: at most one fault of each kind, and maybe an approval race."""

    faults: list[dict[str, Any]] = field(default_factory=list)
    approval_race: bool = False

    @property
    def names(self) -> list[str]:
        kind = {"lookup_status": lambda f: f"lookup_{f['status']}"}
        return [kind.get(f["mode"], lambda f: str(f["mode"]))(f) for f in self.faults] + (
            ["approval_race"] if self.approval_race else [])


@dataclass
class Schedule:
    """The whole run, drawn from one seed: each case's plan and the run's disruptions, as
    fractions of the requests sent when they strike."""

    seed: int
    cases: list[CasePlan]
    worker_kills: list[float]
    temporal_restarts: list[float]
    postgres_restarts: list[float]


def draw(seed: int, cases: int, *, restarts: bool = True, postgres: bool = True) -> Schedule:
    """The schedule a seed stands for (pure: same arguments, same schedule)."""
    rng = random.Random(seed)
    plans: list[CasePlan] = []
    for _ in range(cases):
        plan = CasePlan(approval_race=rng.random() < 0.15)
        if rng.random() < 0.6:
            mode = rng.choice(CREATE_FAULTS)
            seconds = {"acts_after_give_up": rng.uniform(SUBMIT_TIMEOUT / 2, SUBMIT_TIMEOUT),
                       "late_failure": rng.uniform(0.2, 1.5)}.get(mode, HTTP_TIMEOUT + 1.0)
            plan.faults.append({"mode": mode, "seconds": round(seconds, 2)})
        if rng.random() < 0.25:
            plan.faults.append({"mode": "lookup_status", "status": int(rng.choice(LOOKUP_FAULTS)[-3:]),
                                "times": rng.randint(1, 3)})
        webhook = {"mode": rng.choice(WEBHOOK_FAULTS), "times": rng.randint(1, 2),
                   "seconds": round(rng.uniform(0.5, 3.0), 2)} if rng.random() < 0.35 else None
        # A late failure is told by its webhook alone (the watch after success does not poll):
        # hiding or delaying that webhook past the watch leaves it to reconciliation, by design.
        if webhook is not None and not any(f["mode"] == "late_failure" for f in plan.faults):
            plan.faults.append(webhook)
        plans.append(plan)
    kills = sorted(rng.uniform(0.1, 1.0) for _ in range(max(1, cases // 40)))
    temporal = [rng.uniform(0.3, 0.9)] if restarts else []
    pg = [rng.uniform(0.3, 0.9)] if restarts and postgres else []
    return Schedule(seed, plans, kills, temporal, pg)


async def run(env: Embedded, cases: int, seed: int, *, concurrency: int = 10,
              worker: Worker,
              restarts: bool = True) -> Outcome:
    """Sends the schedule's requests (`concurrency` at a time) to a stack whose worker runs as
    its own process, strikes the disruptions as the requests go out, and runs the checker."""
    schedule = draw(seed, cases, restarts=restarts, postgres=env.postgres is not None)
    cases = len(schedule.cases)
    outcome = Outcome("fault_schedule", cases=cases, seed=seed)
    outcome.counts.update(Counter(name for plan in schedule.cases for name in plan.names))
    stack = await open_stack(env.store, env.client, env.temporal.address, worker=False,
                             provider_http_timeout_seconds=HTTP_TIMEOUT,
                             submit_timeout_seconds=SUBMIT_TIMEOUT,
                             resubmit_margin_seconds=SUBMIT_TIMEOUT,
                             status_poll_interval_seconds=1,
                             late_failure_window_seconds=LATE_FAILURE_WINDOW)
    since = datetime.now(UTC)
    process = worker(stack)
    sent: list[Sent] = []
    races: list[asyncio.Task[None]] = []
    raced: list[str] = []
    counted: dict[str, str] = {}
    disruptions = sorted([(at, "worker_kill") for at in schedule.worker_kills]
                         + [(at, "temporal_restart") for at in schedule.temporal_restarts]
                         + [(at, "postgres_restart") for at in schedule.postgres_restarts])
    in_flight: list[int] = []
    try:
        charges = [await stack.charge(CAPTURED) for _ in schedule.cases]
        gate = asyncio.Semaphore(concurrency)

        async def one(index: int, plan: CasePlan) -> None:
            async with gate:
                charge = charges[index]
                await arm(stack, charge, plan.faults)
                body = stack.refund_body(charge, APPROVAL_AMOUNT if plan.approval_race else AUTO_AMOUNT)
                answered = await post_retrying(stack, body)
                sent.append(Sent(body["refund_request_id"], charge, answered))
                if plan.approval_race and answered == 202:
                    raced.append(body["refund_request_id"])
                    races.append(asyncio.create_task(race_approvals(
                        stack, outcome, body["refund_request_id"], timeout=60 + cases, counted=counted)))

        tasks = [asyncio.create_task(one(i, plan)) for i, plan in enumerate(schedule.cases)]
        for at, what in disruptions:
            while len(sent) < at * cases:
                await asyncio.sleep(0.05)
            in_flight.append(await count_in_flight(stack, sent))
            outcome.counts[f"in_flight_at_{what}_{len(in_flight)}"] = in_flight[-1]
            if what == "worker_kill":
                process.send_signal(signal.SIGKILL)
                await asyncio.to_thread(process.wait)
                process = worker(stack)
            elif what == "temporal_restart":
                await env.restart_temporal()
            else:
                await env.restart_postgres()
            outcome.counts[what + "s"] = outcome.counts.get(what + "s", 0) + 1
        await asyncio.gather(*tasks)
        await asyncio.gather(*races)
        await check(stack, outcome, sent, since=since, timeout=60 + cases)
        for case_id in raced:  # one of the two racing approvers decides: none waits for a third
            row = await stack.store.cases.get(case_id)
            if row is not None and row["status"] == "awaiting_approval":
                outcome.violation(f"{case_id} approval race", "decided by one of its approvers",
                                  "still awaiting_approval")
            elif row is not None and case_id in counted and (row["status"] == "denied") != (
                    counted[case_id] == "deny"):
                outcome.violation(f"{case_id} approval race", f"the end its counted verdict "
                                  f"({counted[case_id]}) decides", row["status"])
        outcome.counts["succeeded"] = await count_status(stack, sent, "succeeded")
        async with stack.sandbox() as sb:  # what struck, beside what was drawn (a lookup fault
            fired = (await sb.get("/_sandbox/faults/fired")).json()  # strikes only a verify)
        outcome.counts.update({f"fired_{kind}": int(n) for kind, n in fired.items()})
    finally:
        process.kill()
        process.wait()
        await stack.close()
    outcome.counts["in_flight_at_disruptions_min"] = min(in_flight, default=0)
    if disruptions and min(in_flight) == 0:
        outcome.violation("disruptions", "cases in flight at each", in_flight)
    return outcome


async def arm(stack: Stack, charge: str, faults: list[dict[str, Any]]) -> None:
    """Queues the faults at the sandbox, each for this charge's calls only."""
    async with stack.sandbox() as sb:
        for fault in faults:
            (await sb.post("/_sandbox/faults", json={**fault, "charge": charge})).raise_for_status()


async def post_retrying(stack: Stack, body: dict[str, Any]) -> int:
    """Posts the request, repeating it (same body, as a client would) while the relay cannot
    answer because Temporal or PostgreSQL is restarting; returns the last HTTP status (0: the
    relay never answered). A repeat answered 200 (the identical request is already there)
    after an attempt that failed says that attempt was accepted, its answer lost: 202, so the
    checker holds its case like any other."""
    status, failed = 0, False
    for _ in range(60):
        with contextlib.suppress(httpx.TransportError):
            async with stack.api("alice") as api:
                status = (await api.post("/v1/refund-requests", json=body)).status_code
            if 0 < status < 500:
                return 202 if failed and status == 200 else status
        failed = True
        await asyncio.sleep(1)
    return status


async def approve_retrying(stack: Stack, case_id: str) -> None:
    """Approves the case as bob, repeating while the relay cannot answer (a restart)."""
    for _ in range(60):
        try:
            async with stack.api("bob") as api:
                response = await api.post(f"/v1/refund-requests/{case_id}/approvals",
                                          json={"decision": "approve", "reason": "chaos approver"})
            if response.status_code < 500:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(1)


async def reaches(stack: Stack, case_id: str, status: str, timeout: float) -> bool:
    """Whether the case reaches `status` in time; reads that fail while PostgreSQL restarts
    are tried again."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        with contextlib.suppress(psycopg.Error):
            row = await stack.store.cases.get(case_id)
            if row is not None and row["status"] == status:
                return True
        await asyncio.sleep(0.3)
    return False


async def race_approvals(stack: Stack, outcome: Outcome, case_id: str, timeout: float,
                         counted: dict[str, str]) -> None:
    """Once the case waits for approval, two approvers decide at once, opposite ways: one
    wins, the other is refused; neither call may hang. The verdict answered as counted goes
    into `counted` (case id: approve or deny), for the case's end to be held to it; two
    answered as counted is a violation."""
    if not await reaches(stack, case_id, "awaiting_approval", timeout=timeout):
        outcome.violation(case_id, f"awaiting_approval within {timeout} s", "never")
        return

    async def decide(user: str, decision: str) -> tuple[int, str] | str:
        async with stack.api(user) as api:
            try:
                response = await asyncio.wait_for(api.post(
                    f"/v1/refund-requests/{case_id}/approvals",
                    json={"decision": decision, "reason": "chaos race"}), timeout=30)
            except TimeoutError:
                return "no answer in 30 s"
            return response.status_code, str(response.json().get("status", "")) if response.is_success else ""

    answers = await asyncio.gather(decide("bob", "approve"), decide("carol", "deny"))
    for answer in answers:
        if not isinstance(answer, tuple) or answer[0] >= 500:
            outcome.violation(f"{case_id} approval race", "an answer (2xx, 403 or 409)", answers)
            return
    won = [decision for decision, answer in zip(("approve", "deny"), answers, strict=True)
           if isinstance(answer, tuple) and answer[0] < 300 and answer[1] != VERDICT_PENDING]
    if len(won) > 1:
        outcome.violation(f"{case_id} approval race", "one verdict answered as counted", answers)
    elif won:
        counted[case_id] = won[0]


async def count_in_flight(stack: Stack, sent: list[Sent], *, parked: bool = False) -> int:
    """Accepted cases still moving: not final and, unless `parked`, not waiting for a person
    (a parked workflow does nothing until that person acts: it is not what a disruption
    strikes, though it is what an approver still has to settle)."""
    ids = [s.case_id for s in sent if s.answered == 202]
    async with stack.store.database.transaction() as conn:
        row = await (await conn.execute(
            "SELECT count(*) AS n FROM refund_cases WHERE refund_request_id = ANY(%s)"
            " AND status <> ALL(%s)", (ids, sorted(FINAL if parked else FINAL | WAITS_FOR_PERSON)))
        ).fetchone()
    return int(row["n"]) if row else 0


async def count_status(stack: Stack, sent: list[Sent], status: str) -> int:
    async with stack.store.database.transaction() as conn:
        row = await (await conn.execute(
            "SELECT count(*) AS n FROM refund_cases WHERE refund_request_id = ANY(%s) AND status = %s",
            ([s.case_id for s in sent], status))).fetchone()
    return int(row["n"]) if row else 0

