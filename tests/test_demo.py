"""The two worked examples of the refund-orchestration pattern, as `refunds demo` plays them."""

from starters.dev.demo import run_demo
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
