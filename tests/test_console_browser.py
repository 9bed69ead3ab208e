"""The ops console in a real browser: Debian's chromium driven by playwright-core
(tests/browser/console.spec.mjs) against a stack this test prepares. Screenshots of the
main pages land in test-artifacts/console/.

`make test` installs chromium and playwright-core when it can (tests/browser/install.sh);
where it cannot, this test skips and says why, except in CI (CI=true), where it fails."""

import asyncio
import json
import os
import shutil
import uuid
from pathlib import Path

import pytest

from tests.harness import Stack
from tests.test_reissue import failed_case

BROWSER_DIR = Path(__file__).parent / "browser"
ARTIFACTS = Path(__file__).parent.parent / "test-artifacts" / "console"
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))


def missing_prerequisite() -> str | None:
    if shutil.which("node") is None:
        return "node is not installed"
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is not installed"
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        return "playwright-core is not installed in tests/browser"
    return None


@pytest.fixture
def browser_ready() -> None:
    why = missing_prerequisite()
    if why is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"browser tests cannot run in CI: {why} (tests/browser/install.sh installs it)")
    pytest.skip(f"browser tests skipped: {why}; run `make browser-deps` as root to install it")


async def test_sign_in_refuse_the_requester_approve_and_reissue_in_a_real_browser(
        browser_ready: None, stack: Stack) -> None:
    rita = await stack.store.create_token("rita", ["requester", "approver"],
                                          token=f"t-rita-{uuid.uuid4().hex}", by="test")
    stack.tokens["rita"] = rita
    async with stack.sandbox() as sb:  # a type we have no branch for: coverage must show it
        await sb.post("/_sandbox/events", json={"type": "refund.reversed", "object": {"id": "re_x"}})
    waiting = await stack.request_refund("rita", await stack.charge(30_000), 12_000)
    failed, _ = await failed_case(stack)
    await stack.wait_for_status(waiting, "awaiting_approval")
    if ARTIFACTS.exists():
        shutil.rmtree(ARTIFACTS)
    scenario = {"tokens": {"requester": rita, "approver": stack.tokens["bob"], "ops": stack.tokens["olga"]},
                "approval_case": waiting, "failed_case": failed}
    process = await asyncio.create_subprocess_exec(
        "node", str(BROWSER_DIR / "console.spec.mjs"), stack.relay_url, str(ARTIFACTS),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "SCENARIO": json.dumps(scenario), "CHROMIUM": str(CHROMIUM)})
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout=240)
    except TimeoutError:
        process.kill()
        raise
    text = output.decode(errors="replace")
    assert process.returncode == 0, text
    assert "console browser scenario: all steps passed" in text, text
    assert text.count("ok - ") == 7 and "not ok" not in text, text

    trail = await stack.store.audit_trail(waiting)
    assert [(e["actor"], e["detail"].get("via")) for e in trail if e["action"] == "approval_refused"] == [
        ("rita", "console")]
    assert [e["actor"] for e in trail if e["action"] == "approval_granted"] == ["bob"]
    children = await stack.store.children(failed)
    assert [(c["refund_request_id"], c["method"], c["requester"]) for c in children] == [
        (f"{failed}-r1", "provider", "olga")]
    for name in ("01-sign-in", "03-case-awaiting-approval", "04-requester-refused", "08-failed-refund-banner",
                 "09-reissued", "10-coverage"):
        assert (ARTIFACTS / f"{name}.png").stat().st_size > 10_000, name
