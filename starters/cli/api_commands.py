"""The commands that go through the relay's HTTP API: same authentication, same checks as
every other entry point (request, approve, status, reissue, audit show, webhooks, payouts,
reconcile)."""

import argparse
import asyncio
import json
import sys
from datetime import UTC, datetime
from typing import Any

import httpx

from adapters.config import Settings
from domain.money import format_minor, normalise_currency, parse_major, shown_minor
from starters.actions.approving import VERDICT_PENDING
from starters.ages import parse_age
from starters.cli.common import (
    EXIT_OK,
    EXIT_PENDING,
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    CommandFailed,
    api_token,
    print_json,
)


def api_client(args: argparse.Namespace, settings: Settings) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=settings.relay_base_url(), timeout=30,
                             headers={"Authorization": f"Bearer {api_token(args, settings)}"})


def show(response: httpx.Response) -> int:
    """The API's answer: JSON on stdout when it succeeded, on stderr when refused (exit 1)
    or when the relay failed (exit 3: send it again). A verdict the relay took but no worker
    has counted yet (`verdict_pending`: it may still be refused, e.g. past its seal's age) is
    exit 4, so a script never goes on as if it counted."""
    out = sys.stdout if response.is_success else sys.stderr
    try:
        body = response.json()
        print(json.dumps(body, indent=2), file=out)
    except ValueError:
        body = None
        print(response.text, file=out)
    if response.status_code >= 500:
        return EXIT_UNREACHABLE
    if not response.is_success:
        return EXIT_REFUSED
    pending = isinstance(body, dict) and body.get("status") == VERDICT_PENDING
    return EXIT_PENDING if pending else EXIT_OK


async def cmd_request(args: argparse.Namespace, settings: Settings) -> int:
    currency = normalise_currency(args.currency)
    evidence = dict(item.split("=", 1) for item in args.evidence)
    body = {"refund_request_id": args.id, "provider": args.provider, "charge_id": args.charge,
            "amount": parse_major(args.amount, currency), "currency": currency,
            "merchant_account": args.merchant, "reason": args.reason, "evidence": evidence}
    async with api_client(args, settings) as api:
        return show(await api.post("/v1/refund-requests", json=body,
                                    headers={"X-Refund-Channel": "cli"}))


async def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    async with api_client(args, settings) as api:
        return show(await api.get(f"/v1/refund-requests/{args.id}"))


async def cmd_approve(args: argparse.Namespace, settings: Settings) -> int:
    async with api_client(args, settings) as api:
        return show(await api.post(f"/v1/refund-requests/{args.id}/approvals",
                                    json={"decision": args.decision, "reason": args.reason}))


async def cmd_reissue(args: argparse.Namespace, settings: Settings) -> int:
    async with api_client(args, settings) as api:
        return show(await api.post(f"/v1/refund-requests/{args.id}/reissue",
                                    json={"method": args.method, "reason": args.reason}))


async def cmd_audit_show(args: argparse.Namespace, settings: Settings) -> int:
    async with api_client(args, settings) as api:
        response = await api.get(f"/v1/refund-requests/{args.id}/audit")
    if not response.is_success or args.json:
        return show(response)
    for entry in response.json():
        detail = json.dumps(entry["detail"], sort_keys=True)
        print(f"{entry['seq']:>4}  {entry['occurred_at'][:23]}  {entry['actor']:<20} "
              f"{entry['action']:<32} {detail[:120]}")
    return 0


async def cmd_webhooks_coverage(args: argparse.Namespace, settings: Settings) -> int:
    async with api_client(args, settings) as api:
        return show(await api.get("/v1/webhooks/coverage"))


async def cmd_webhooks_replay(args: argparse.Namespace, settings: Settings) -> int:
    if args.receipt is not None:
        async with api_client(args, settings) as api:
            return show(await api.post("/v1/webhook-receipts/replay", json={"receipt_id": args.receipt}))
    replayed: list[Any] = []
    async with api_client(args, settings) as api:
        while True:  # a page a call, so no request outlives its client however long the window
            response = await api.post("/v1/webhook-receipts/replay", json={
                "since": args.since, "after_receipt_id": max((r["replay_of"] for r in replayed), default=0)})
            if not response.is_success or not response.json():
                break
            replayed += response.json()
    return show(response) if not response.is_success else print_json(replayed)


async def cmd_webhooks_redrive(args: argparse.Namespace, settings: Settings) -> int:
    async with api_client(args, settings) as api:
        return show(await api.post("/v1/webhook-receipts/redrive"))


async def cmd_payouts_register(args: argparse.Namespace, settings: Settings) -> int:
    """Registers a payout the payments system made (once per id; the same again is a no-op)."""
    currency = normalise_currency(args.currency)
    body = {"id": args.id, "provider": args.provider, "provider_payout_id": args.provider_payout_id,
            "beneficiary_id": args.beneficiary, "amount": parse_major(args.amount, currency),
            "currency": currency}
    async with api_client(args, settings) as api:
        return show(await api.post("/v1/payouts", json=body))


async def cmd_payouts_list(args: argparse.Namespace, settings: Settings) -> int:
    async with api_client(args, settings) as api:
        response = await api.get("/v1/payouts", params={"limit": args.limit})
    if not response.is_success or args.json:
        return show(response)
    for payout in response.json():
        print(f"{payout['id']}  {payout['provider']} {payout['provider_payout_id']}  "
              f"{format_minor(payout['amount'], payout['currency'])}  {payout['status']}  "
              f"{payout['beneficiary_id']}")
    return 0


async def cmd_payouts_show(args: argparse.Namespace, settings: Settings) -> int:
    async with api_client(args, settings) as api:
        return show(await api.get(f"/v1/payouts/{args.id}"))


async def cmd_reconcile(args: argparse.Namespace, settings: Settings) -> int:
    """Starts (or resumes) a backfill through the relay and follows it to its report."""
    from starters.cli.progress import follow_run

    body: dict[str, Any] = {"provider": args.provider,
                            "since": (datetime.now(UTC) - parse_age(args.since)).isoformat()}
    if args.until:
        body["until"] = args.until
    async with api_client(args, settings) as api:
        started = await api.post("/v1/reconciliation/runs", json=body)
        if not started.is_success:
            return show(started)
        run = started.json()
        print(f"{'resuming' if run['resumed'] else 'started'} {run['run_id']}: {run['provider']} refunds "
              f"created {run['window']['since']} .. {run['window']['until']}", flush=True)
        try:
            async with asyncio.timeout(args.timeout):
                report = await follow_run(api, run["run_id"], show_progress=not args.no_progress)
        except TimeoutError:
            raise CommandFailed(f"run {run['run_id']} has not ended after {args.timeout:g} s; it goes on "
                                f"(GET /v1/reconciliation/runs/{run['run_id']})", EXIT_REFUSED) from None
    if report["state"] == "failed":
        raise CommandFailed(f"run {report['run_id']} failed: {report['failure']}", EXIT_REFUSED)
    print(f"{report['objects_seen']} objects, {report['new_breaks']} new breaks, "
          f"{report['known_breaks']} already known")
    for name, entry in sorted(report["classes"].items()):
        amounts = ", ".join(shown_minor(v, c) for c, v in sorted(entry["amounts"].items()))
        print(f"  {name:<36} new {entry['new']:>6}  seen {entry['seen']:>6}  {amounts}")
    unmapped = report["classes"].get("unmapped_status")
    if unmapped:
        print(f"WARNING: {unmapped['seen']} objects carry a status no adapter maps; they wait for ops "
              "(unmapped_status)")
    oldest = report["oldest_break"]
    if oldest:
        print(f"oldest break: {oldest['object_id']} ({oldest['break_class']}, created "
              f"{oldest['object_created_at']})")
    for warning in report["warnings"]:
        print(f"WARNING: {warning}")
    for path in report["report_files"]:
        print(f"report: {path}")
    return 0
