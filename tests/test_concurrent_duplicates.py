"""A duplicate delivery that arrives while its first delivery is still in flight (claimed, not
yet marked processed: a provider's retry after a timeout, or the same event sent twice at once)
waits for that first delivery instead of starting or signalling the workflow again: duplicates
never reach Temporal. Only a first delivery that stays unprocessed (its relay crashed or failed)
is re-driven by a later delivery, after the wait."""

import asyncio
import hashlib
import json
import logging
import uuid
from typing import Any

import pytest
from prometheus_client import REGISTRY
from temporalio import client as temporal
from temporalio.api.enums.v1 import EventType

from adapters.db import Store
from adapters.db.receipts import StoredReceipt
from starters.dev.stack import TemporalDevServer
from starters.relay.webhook_desk import IngestResult, WebhookDesk
from tests.fakes import connected_stack
from tests.harness import Stack
from tests.test_bad_input import event_body, request_object, sandbox_secret, signed
from tests.test_inbound import person, servicenow, ticket_body
from tests.test_known_duplicates import deliver, requested_event, signals_of


class CountingCalls(temporal.Interceptor):
    """Counts the starts (signal-with-start included) and signals a client sends Temporal."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def intercept_client(self, next: temporal.OutboundInterceptor) -> temporal.OutboundInterceptor:
        calls = self.calls

        class Counting(temporal.OutboundInterceptor):
            async def start_workflow(self, input: temporal.StartWorkflowInput) -> Any:
                calls.append(f"start {input.id}")
                return await super().start_workflow(input)

            async def signal_workflow(self, input: temporal.SignalWorkflowInput) -> None:
                calls.append(f"signal {input.id}")
                await super().signal_workflow(input)

        return Counting(next)


def counted_desk(stack: Stack, counter: CountingCalls) -> WebhookDesk:
    """A relay process's webhook desk whose every call to Temporal is counted."""
    config = stack.client.config()
    config["interceptors"] = [*config["interceptors"], counter]
    return WebhookDesk(stack.store, temporal.Client(**config), stack.providers, stack.settings)


async def test_duplicates_racing_their_first_delivery_never_reach_temporal(stack: Stack) -> None:
    tag, body, headers = await requested_event(stack)
    counter = CountingCalls()
    here, elsewhere = counted_desk(stack, counter), counted_desk(stack, counter)  # two relay processes
    answers: list[IngestResult] = await asyncio.gather(*(
        deliver(here if n % 2 else elsewhere, body, headers, f"delivery-{n}-{tag}") for n in range(12)))

    assert [a.status_code for a in answers] == [200] * 12
    assert sorted(a.verdict for a in answers) == ["accepted"] + ["duplicate"] * 11
    [first] = [a for a in answers if a.verdict == "accepted"]
    assert first.workflow_id == f"sandbox-rrq_{tag}"
    assert counter.calls == [f"start sandbox-rrq_{tag}"]
    assert await signals_of(stack, first.workflow_id) == 1
    stored = await stack.store.receipts.find("sandbox", f"evt_{tag}")
    assert len(stored) == 12 and all(r.processed_at is not None for r in stored)


async def crashed_first_delivery(stack: Stack, tag: str, body: bytes,
                                 headers: dict[str, str]) -> StoredReceipt:
    """What a relay that crashed between the claim and the start left behind: an accepted
    receipt, never processed."""
    return await stack.store.receipts.store(
        provider="sandbox", event_id=f"evt_{tag}", event_type="refund.requested", body=body,
        body_sha256=hashlib.sha256(body).hexdigest(), headers={k.lower(): v for k, v in headers.items()},
        verdict="accepted", error=None)


def redrives_counted() -> float:
    return REGISTRY.get_sample_value("refunds_webhook_duplicate_redrives_total", {"provider": "sandbox"}) or 0


async def test_a_duplicate_re_drives_a_first_delivery_that_stays_unprocessed(
        stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    """And says so: a first delivery that stays unprocessed is a relay that crashed or failed
    between its receipt and its workflow, which ops want to hear of."""
    tag, body, headers = await requested_event(stack)
    crashed = await crashed_first_delivery(stack, tag, body, headers)
    impatient = stack.settings.model_copy(update={"webhook_duplicate_wait_seconds": 0.2})
    counted = redrives_counted()
    with caplog.at_level(logging.WARNING):
        again = await deliver(WebhookDesk(stack.store, stack.client, stack.providers, impatient),
                              body, headers, f"again-{tag}")

    assert (again.status_code, again.verdict, again.workflow_id) == (200, "duplicate", f"sandbox-rrq_{tag}")
    assert redrives_counted() == counted + 1
    assert f"first receipt {crashed.receipt_id} of sandbox evt_{tag} still unprocessed" in caplog.text
    assert await signals_of(stack, f"sandbox-rrq_{tag}") == 1
    [first, _] = await stack.store.receipts.find("sandbox", f"evt_{tag}")
    assert first.id == crashed.receipt_id and first.processed_at is not None


async def test_a_duplicate_unlike_its_first_delivery_re_drives_the_first(stack: Stack) -> None:
    """A delivery under a claimed event id whose body differs from the first's (Adyen signs
    an item's fields, not all of them: a captured item sent again with its unsigned
    `modification.action` flipped reads as the other status) re-drove a first delivery that
    stayed unprocessed with its own content (reproduced: the case opened for the copy's
    amount). The event is what was first received: the first receipt's body is re-driven."""
    tag, body, headers = await requested_event(stack)
    await crashed_first_delivery(stack, tag, body, headers)
    charge = json.loads(body)["data"]["object"]["charge"]
    unlike = event_body("refund.requested", request_object(charge, f"rrq_{tag}", amount=9_000),
                        event_id=f"evt_{tag}")
    impatient = stack.settings.model_copy(update={"webhook_duplicate_wait_seconds": 0.2})
    again = await deliver(WebhookDesk(stack.store, stack.client, stack.providers, impatient),
                          unlike, signed(sandbox_secret(stack), unlike), f"unlike-{tag}")

    assert (again.status_code, again.verdict, again.workflow_id) == (200, "duplicate", f"sandbox-rrq_{tag}")
    case = await stack.store.cases.get(f"sandbox-rrq_{tag}")
    assert case is not None and case["amount"] == 1000, case
    assert await signals_of(stack, f"sandbox-rrq_{tag}") == 1


async def test_a_first_delivery_older_than_the_re_drive_age_is_re_driven_without_waiting(
        stack: Stack) -> None:
    """A first receipt the re-drive loop would already take for stuck is not waited for: the
    wait is for deliveries in flight, and this one's relay is gone."""
    tag, body, headers = await requested_event(stack)
    await crashed_first_delivery(stack, tag, body, headers)
    stuck_at_once = stack.settings.model_copy(update={"webhook_duplicate_wait_seconds": 3600,
                                                      "webhook_redrive_after_seconds": 0})
    desk = WebhookDesk(stack.store, stack.client, stack.providers, stuck_at_once)
    # a hang here is the failure: the duplicate waited for a delivery nobody is making
    again = await asyncio.wait_for(deliver(desk, body, headers, f"again-{tag}"), timeout=120)

    assert (again.status_code, again.verdict, again.workflow_id) == (200, "duplicate", f"sandbox-rrq_{tag}")
    assert await signals_of(stack, f"sandbox-rrq_{tag}") == 1


async def test_an_approval_delivered_many_times_at_once_is_signalled_once(
        store: Store, client: temporal.Client, temporal_server: TemporalDevServer) -> None:
    """The same holds for the integrations' calls: a ServiceNow approval sent again while the
    first is still being signalled waits for it instead of signalling the workflow again."""
    async with connected_stack(store, client, temporal_server, jira_url=None) as (stack, _):
        sn_opener, sn_manager = f"jdoe.{uuid.uuid4().hex[:6]}", f"mgr.{uuid.uuid4().hex[:6]}"
        await person(stack, ["requester"], servicenow=sn_opener)
        manager = await person(stack, ["approver"], servicenow=sn_manager)
        sys_id = uuid.uuid4().hex
        ticket = ticket_body(sys_id, sn_opener, charge_id=await stack.charge(20_000))
        created = await servicenow(stack, "refund-requests", ticket)
        assert created.status_code == 202, created.text
        case_id = created.json()["refund_request_id"]
        await stack.wait_for_status(case_id, "awaiting_approval")
        approval = {"sys_id": uuid.uuid4().hex, "document_id": sys_id, "state": "approved",
                    "approver": {"user_name": sn_manager}, "sys_updated_by": sn_manager,
                    "comments": "fine by me"}
        answers = await asyncio.gather(*(servicenow(stack, "approvals", approval) for _ in range(8)))

        assert [a.status_code for a in answers] == [200] * 8
        assert sorted(a.json().get("verdict", "signalled") for a in answers) == \
            ["duplicate"] * 7 + ["signalled"]
        trail = await stack.store.audit.trail(case_id)
        assert [e["actor"] for e in trail if e["action"] == "approval_signalled"] == [manager]
        await stack.wait_for_status(case_id, "succeeded")
        history = await stack.client.get_workflow_handle(case_id).fetch_history()
        signals = [e.workflow_execution_signaled_event_attributes.signal_name for e in history.events
                   if e.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED]
        assert signals.count("approve") == 1
