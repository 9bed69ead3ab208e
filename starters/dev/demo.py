"""`refunds demo`: the two worked examples of the refund-orchestration pattern, played
against the sandbox provider through the relay's public API.

1. The provider delivers the same refund-request webhook twice: one execution, two receipts.
2. A support agent's 30.00 partial refund times out after the provider made it; the agent
   submits again. The verify-state step finds the refund: one refund at the provider.
"""

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx

from domain.money import format_minor


@dataclass
class DemoReport:
    """What the demo saw, for printing and for tests."""

    lines: list[str] = field(default_factory=list)
    duplicate_case: dict[str, Any] = field(default_factory=dict)
    duplicate_receipts: list[dict[str, Any]] = field(default_factory=list)
    duplicate_provider_refunds: int = 0
    timeout_case: dict[str, Any] = field(default_factory=dict)
    timeout_statuses: tuple[int, int] = (0, 0)
    timeout_provider_refunds: int = 0
    timeout_trail: list[str] = field(default_factory=list)

    def say(self, line: str) -> None:
        self.lines.append(line)
        print(line, flush=True)

    def problems(self) -> list[str]:
        """What the demo saw that the pattern promises otherwise: a demo that printed "refunds
        at the provider: 2" was a success to its caller."""
        seen = {
            "example 1 receipts (accepted, duplicate)": (
                sorted(str(r.get("verdict")) for r in self.duplicate_receipts), ["accepted", "duplicate"]),
            "example 1 case status": (self.duplicate_case.get("status"), "succeeded"),
            "example 1 refunds at the provider": (self.duplicate_provider_refunds, 1),
            "example 2 answers to the two submits": (self.timeout_statuses, (202, 200)),
            "example 2 case status": (self.timeout_case.get("status"), "succeeded"),
            "example 2 refunds at the provider": (self.timeout_provider_refunds, 1),
        }
        return [f"{what}: {got!r}, expected {wanted!r}"
                for what, (got, wanted) in seen.items() if got != wanted]


async def _wait_case(api: httpx.AsyncClient, case_id: str, statuses: set[str],
                     timeout: float) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        response = await api.get(f"/v1/refund-requests/{case_id}")
        if response.status_code == 200 and response.json()["status"] in statuses:
            return dict(response.json())
        if asyncio.get_running_loop().time() > deadline:
            raise RuntimeError(f"case {case_id} did not reach {statuses}: {response.text}")
        await asyncio.sleep(0.2)


async def _charge(sandbox: httpx.AsyncClient, amount: int, currency: str) -> str:
    response = await sandbox.post("/v1/charges", json={"amount": amount, "currency": currency,
                                                       "merchant_account": "acct_demo"})
    response.raise_for_status()
    return str(response.json()["id"])


async def _refund_count(sandbox: httpx.AsyncClient, charge_id: str) -> int:
    response = await sandbox.get("/v1/refunds", params={"charge": charge_id})
    return len(response.json()["data"])


async def duplicate_webhook(api: httpx.AsyncClient, sandbox: httpx.AsyncClient,
                            report: DemoReport, timeout: float) -> None:
    report.say("Example 1: the provider delivers the same refund-request webhook twice")
    charge = await _charge(sandbox, 5_000, "USD")
    request_id = f"rrq_{uuid.uuid4().hex[:10]}"
    event_id = f"evt_{uuid.uuid4().hex[:10]}"
    obj = {"id": request_id, "object": "refund_request", "charge": charge, "amount": 2_000,
           "currency": "usd", "merchant_account": "acct_demo", "reason": "duplicate",
           "evidence": {"order_id": "order-1001"}}
    response = await sandbox.post("/_sandbox/events", json={"type": "refund.requested", "object": obj,
                                                            "copies": 2, "event_id": event_id})
    response.raise_for_status()
    case = await _wait_case(api, f"sandbox-{request_id}", {"succeeded"}, timeout)
    deadline = asyncio.get_running_loop().time() + timeout
    receipts: list[dict[str, Any]] = []
    while len(receipts) < 2 and asyncio.get_running_loop().time() < deadline:
        receipts = (await api.get("/v1/webhook-receipts",
                                  params={"provider": "sandbox", "event_id": event_id})).json()
        await asyncio.sleep(0.2)
    report.duplicate_case, report.duplicate_receipts = case, receipts
    report.duplicate_provider_refunds = await _refund_count(sandbox, charge)
    for receipt in receipts:
        note = ("duplicate delivery: stored, executed nothing" if receipt["verdict"] == "duplicate"
                else f"started workflow {receipt['workflow_id']}")
        report.say(f"  receipt {receipt['id']}: {receipt['verdict']:<9} {note}")
    report.say(f"  case {case['refund_request_id']}: {case['status']}, "
               f"{format_minor(case['amount'], case['currency'])}, provider refund "
               f"{case['provider_refund_id']}; refunds at the provider: "
               f"{report.duplicate_provider_refunds}")


async def timeout_then_resubmit(api: httpx.AsyncClient, sandbox: httpx.AsyncClient,
                                report: DemoReport, fault_seconds: float, timeout: float) -> None:
    report.say("Example 2: a 30.00 partial refund times out after the provider made it; "
               "the agent submits again")
    charge = await _charge(sandbox, 10_000, "USD")
    await sandbox.post("/_sandbox/faults", json={"mode": "timeout_after_success",
                                                 "seconds": fault_seconds})
    body: dict[str, Any] = {"refund_request_id": f"support-{uuid.uuid4().hex[:10]}", "provider": "sandbox",
            "charge_id": charge, "amount": 3_000, "currency": "USD",
            "merchant_account": "acct_demo", "reason": "item_damaged",
            "evidence": {"order_id": "order-2002", "ticket": "SUP-42"}}
    first = await api.post("/v1/refund-requests", json=body)
    report.say(f"  agent submits {body['refund_request_id']}: HTTP {first.status_code}")
    await asyncio.sleep(1.0)
    second = await api.post("/v1/refund-requests", json=body)
    report.say(f"  agent clicks submit again: HTTP {second.status_code} (same case, no new workflow)")
    report.timeout_statuses = (first.status_code, second.status_code)
    case = await _wait_case(api, body["refund_request_id"], {"succeeded"}, timeout)
    trail = (await api.get(f"/v1/refund-requests/{body['refund_request_id']}/audit")).json()
    report.timeout_case = case
    report.timeout_trail = [e["action"] for e in trail]
    report.timeout_provider_refunds = await _refund_count(sandbox, charge)
    for entry in trail:
        report.say(f"    {entry['occurred_at'][11:23]}  {entry['actor']:<18} {entry['action']}")
    report.say(f"  case {case['refund_request_id']}: {case['status']}, provider refund "
               f"{case['provider_refund_id']}; refunds at the provider: "
               f"{report.timeout_provider_refunds}")


async def run_demo(relay_url: str, sandbox_url: str, token: str, *, fault_seconds: float,
                   timeout: float = 120.0) -> DemoReport:
    """Plays both examples and returns what happened."""
    report = DemoReport()
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=relay_url, headers=headers, timeout=30) as api, \
            httpx.AsyncClient(base_url=sandbox_url, timeout=fault_seconds + 30) as sandbox:
        await duplicate_webhook(api, sandbox, report, timeout)
        await timeout_then_resubmit(api, sandbox, report, fault_seconds, timeout)
    return report
