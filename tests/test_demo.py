"""The two worked examples of the refund-orchestration pattern, as `refunds demo` plays them."""

import argparse

import pytest

from starters.cli.servers import cmd_demo
from starters.dev import demo
from starters.dev.demo import DemoReport, run_demo
from tests.harness import Stack


async def test_demo_duplicate_webhook_and_timeout_then_resubmit(stack: Stack) -> None:
    fault_seconds = stack.settings.provider_http_timeout_seconds + 2
    report = await run_demo(stack.relay_url, stack.sandbox_url, stack.tokens["admin"],
                            fault_seconds=fault_seconds, timeout=60)

    # Example 1: two deliveries, two receipts, one execution.
    assert sorted(r["verdict"] for r in report.duplicate_receipts) == ["accepted", "duplicate"]
    assert report.duplicate_case["status"] == "succeeded"
    assert report.duplicate_provider_refunds == 1
    trail = [e["action"] for e in await stack.store.audit.trail(report.duplicate_case["refund_request_id"])]
    assert trail.count("trigger_received") == 1
    assert trail.count("provider_submit_started") == 1

    # Example 2: the agent's resubmit attaches to the same case; verify-state finds the refund.
    assert report.timeout_statuses == (202, 200)
    assert report.timeout_case["status"] == "succeeded"
    assert report.timeout_provider_refunds == 1
    assert "provider_outcome_unknown" in report.timeout_trail
    assert "verify_state" in report.timeout_trail
    assert report.timeout_trail.count("provider_submit_started") == 1
    assert report.timeout_trail.count("ledger_posted") == 1
    assert report.problems() == []


async def test_refunds_demo_exits_0_when_it_saw_the_pattern_and_1_when_it_did_not(
        stack: Stack, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`refunds demo` said what it saw and exited 0 whatever that was: two refunds at the
    provider for one request printed and a success to the script that ran it."""
    settings = stack.settings.model_copy(update={"relay_url": stack.relay_url,
                                                 "sandbox_api_base": stack.sandbox_url})
    args = argparse.Namespace(token=stack.tokens["admin"])
    assert await cmd_demo(args, settings) == 0
    seen_twice = DemoReport(duplicate_case={"status": "succeeded"},
                            duplicate_receipts=[{"verdict": "accepted"}, {"verdict": "duplicate"}],
                            duplicate_provider_refunds=2, timeout_case={"status": "succeeded"},
                            timeout_statuses=(202, 200), timeout_provider_refunds=1)

    async def played(*_: object, **__: object) -> DemoReport:
        return seen_twice

    monkeypatch.setattr(demo, "run_demo", played)
    assert await cmd_demo(args, settings) == 1
    assert "demo: example 1 refunds at the provider: 2, expected 1" in capsys.readouterr().err
