"""Notice delivery: every configured channel gets each notice once (Slack, Teams, real SMTP,
ServiceNow, Jira), also when activities retry; a failing channel never holds up a case."""

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from temporalio.client import Client
from temporalio.exceptions import ApplicationError

from adapters.config import Settings
from adapters.db import Store
from adapters.db.outbox import OutboxRepository, SendingElsewhere
from adapters.db.rows import DeliveryRow
from adapters.notify.channels import build_channels
from adapters.notify.delivery import DeliveryFailed
from adapters.notify.email import SmtpEmail, message_id
from adapters.notify.message import TEMPLATES, Message, render
from adapters.tickets.base import correlation_key
from domain.models import NoticeInput
from starters.dev.stack import TemporalDevServer
from starters.ports import free_port
from tests.fakes import World, connected_stack, eventually
from tests.harness import Stack


async def delivered(stack: Stack, case_id: str, kind: str) -> dict[str, DeliveryRow]:
    """The case's deliveries of one notice kind, by channel."""
    rows = await stack.store.outbox.deliveries(case_id)
    return {r.channel: r for r in rows if r.kind == kind}


def slack_titles(world: World) -> list[str]:
    return [m["text"] for m in world.slack]


async def test_each_notice_reaches_every_channel_once_and_tickets_follow_the_case(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    async with connected_stack(store, client, temporal_server) as (stack, world):
        charge = await stack.charge(20_000)
        case_id = await stack.request_refund("alice", charge, 9_000)
        await stack.wait_for_status(case_id, "awaiting_approval")

        async def needed_everywhere() -> bool:
            rows = await delivered(stack, case_id, "approval_needed")
            return {c for c, r in rows.items() if r["status"] == "delivered"} == {
                "slack", "teams", "email", "servicenow", "jira"}

        await eventually(needed_everywhere)
        [slack] = world.slack
        assert slack["text"] == f"Refund {case_id} needs approval"
        section = slack["blocks"][1]
        assert "90.00 USD" in section["text"]["text"]
        assert any("AI suggestion (advisory only)" in f["text"] for f in section["fields"])
        # the policy's own reading sits beside the model's (which reads customer-supplied text)
        row = await stack.store.cases.get(case_id)
        assert row is not None and row["decision"]["tier"]
        [policy] = [f["text"] for f in section["fields"] if f["text"].startswith("*Policy*")]
        assert row["decision"]["tier"] in policy and row["decision"]["rules_fired"][0] in policy, policy
        buttons = {e["action_id"]: e for e in slack["blocks"][2]["elements"]}
        assert buttons["refund_approve"]["value"] == case_id == buttons["refund_deny"]["value"]
        assert buttons["refund_open"]["url"] == stack.settings.case_url(case_id)
        [teams] = world.teams
        card = teams["attachments"][0]["content"]
        assert card["type"] == "AdaptiveCard"
        facts = {f["title"]: f["value"] for f in card["body"][2]["facts"]}
        assert facts["Refund request"] == case_id and facts["Amount"] == "90.00 USD"
        assert facts["Status"] == "awaiting_approval"
        assert card["actions"][0]["url"] == stack.settings.case_url(case_id)
        [mail] = world.mail
        assert mail["To"] == "approvers@example.test" and mail["X-Envelope-To"] == "approvers@example.test"
        assert mail["Subject"] == f"Refund {case_id} needs approval"
        assert mail["Message-ID"].startswith("<notice-")
        assert stack.settings.case_url(case_id) in mail.get_payload()
        [ticket] = world.servicenow["u_refund_request"]
        assert ticket["correlation_id"] == correlation_key(case_id, "request")
        assert "90.00 USD" in ticket["description"]
        assert stack.settings.case_url(case_id) in ticket["description"]
        [issue] = world.jira
        assert correlation_key(case_id, "request") in issue["fields"]["labels"]
        assert issue["fields"]["project"] == {"key": "REF"}
        assert issue["fields"]["description"]["type"] == "doc"

        async with stack.api("bob") as api:
            response = await api.post(f"/v1/refund-requests/{case_id}/approvals",
                                      json={"decision": "approve", "reason": "ok"})
        assert response.status_code == 202, response.text
        await stack.wait_for_status(case_id, "succeeded")

        async def succeeded_everywhere() -> bool:
            rows = await delivered(stack, case_id, "refund_succeeded")
            return len(rows) == 5 and all(r["status"] == "delivered" for r in rows.values())

        await eventually(succeeded_everywhere)
        assert slack_titles(world) == [f"Refund {case_id} needs approval", f"Refund {case_id} approved",
                                       f"Refund {case_id} succeeded"]
        assert len(world.teams) == 3 and len(world.mail) == 3
        [ticket] = world.servicenow["u_refund_request"]  # still one ticket: later notices are work notes
        assert [n.splitlines()[0] for n in ticket["work_notes_history"]] == [
            f"Refund {case_id} approved", f"Refund {case_id} succeeded"]
        assert len(world.jira) == 1 and len(world.jira_comments[issue["key"]]) == 2
        view_tickets = await stack.store.integrations.tickets(case_id)
        assert {(t["system"], t["number"]) for t in view_tickets} == {
            ("servicenow", ticket["number"]), ("jira", issue["key"])}


async def test_a_failing_channel_is_retried_alone_and_never_holds_up_the_case(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    async with connected_stack(store, client, temporal_server, jira_url=None,
                               servicenow_url=None) as (stack, world):
        world.slack_failures = 1
        charge = await stack.charge(10_000)
        case_id = await stack.request_refund("alice", charge, 1_500)  # auto-approved
        await stack.wait_for_status(case_id, "succeeded")

        async def slack_delivered() -> dict[str, DeliveryRow] | None:
            rows = await delivered(stack, case_id, "refund_succeeded")
            slack = rows.get("slack")
            return rows if slack is not None and slack.status == "delivered" else None

        rows = await eventually(slack_delivered)
        assert rows["slack"]["attempts"] == 2
        assert rows["teams"]["attempts"] == 1 and rows["email"]["attempts"] == 1
        assert slack_titles(world) == [f"Refund {case_id} succeeded"]
        assert len(world.teams) == 1 and len(world.mail) == 1
        failures = [e for e in await stack.store.audit.trail(case_id)
                    if e["action"] == "notice_delivery_failed"]
        assert [e["detail"]["channel"] for e in failures] == ["slack"]

        world.slack_failures = 1_000  # Slack is down for good now
        charge = await stack.charge(10_000)
        second = await stack.request_refund("alice", charge, 1_500)
        await stack.wait_for_status(second, "succeeded")
        assert [r["amount"] for r in await stack.provider_refunds(charge)] == [1_500]

        async def retried() -> bool:
            slack = (await delivered(stack, second, "refund_succeeded")).get("slack")
            return slack is not None and slack["status"] == "failed" and slack["attempts"] >= 2

        await eventually(retried)
        rows = await delivered(stack, second, "refund_succeeded")
        assert rows["teams"]["status"] == "delivered" and len(world.teams) == 2


async def test_a_channel_that_refuses_for_good_holds_up_no_later_notice_of_the_case(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    """A revoked Slack webhook answers 404 `no_service` to every post: retrying it within
    minutes changes nothing, so the dispatcher tries it once and leaves the notice to the
    sweeper's slower schedule, and the case's next notice goes out at once on every channel.
    Before, each notice was tried 8 times (about 4 minutes of backoff) while the case's
    later notices waited, on Teams and email too."""
    async with connected_stack(store, client, temporal_server, jira_url=None,
                               servicenow_url=None) as (stack, world):
        world.slack_failures, world.slack_failure = 10**9, (404, "no_service")
        charge = await stack.charge(20_000)
        case_id = await stack.request_refund("alice", charge, 9_000)
        await stack.wait_for_status(case_id, "awaiting_approval")
        async with stack.api("bob") as api:
            assert (await api.post(f"/v1/refund-requests/{case_id}/approvals",
                                   json={"decision": "approve"})).status_code == 202
        await stack.wait_for_status(case_id, "succeeded")

        async def on_teams_and_handed() -> list[dict[str, DeliveryRow]] | None:
            notices = await stack.store.outbox.notices(case_id)
            rows = [await delivered(stack, case_id, n.kind) for n in notices]
            # the dispatcher hands a notice to the sweeper just after its channels' rows are
            # written: wait for both, or the last notice is read between the two
            handed = await store.database.fetch_all(
                "SELECT dispatch_queue, dispatched_at FROM notices WHERE refund_request_id = %s",
                (case_id,))
            done = ({"approval_needed", "refund_succeeded"} <= {n.kind for n in notices}
                    and all(r.get("teams") is not None and r["teams"].status == "delivered" for r in rows)
                    and all(n["dispatch_queue"] is None and n["dispatched_at"] is not None
                            for n in handed))
            return rows if done else None

        rows = await eventually(on_teams_and_handed)
        assert all(r["slack"].status == "failed" and r["slack"]["attempts"] == 1 for r in rows), rows
        refusals = [e["detail"]["channel"] for e in await stack.store.audit.trail(case_id)
                    if e["action"] == "notice_delivery_failed"]
        assert refusals == ["slack"] * len(rows)


async def test_a_refunds_notices_go_out_through_the_workers_dispatcher_not_an_activity_of_the_case(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    """Issue 21: delivery beside the case cost each refund an activity and a workflow task.
    The case only queues (in its steps' transactions); the worker pool that runs it delivers."""
    async with connected_stack(store, client, temporal_server, jira_url=None,
                               servicenow_url=None) as (stack, world):
        charge = await stack.charge(10_000)
        case_id = await stack.request_refund("alice", charge, 1_500)  # auto-approved
        await stack.client.get_workflow_handle(case_id).result()

        async def everywhere() -> dict[str, DeliveryRow] | None:
            rows = await delivered(stack, case_id, "refund_succeeded")
            done = len(rows) == 3 and all(r.status == "delivered" for r in rows.values())
            return rows if done else None

        await eventually(everywhere)
        assert slack_titles(world).count(f"Refund {case_id} succeeded") == 1
        history = await stack.client.get_workflow_handle(case_id).fetch_history()
        scheduled = {e.activity_task_scheduled_event_attributes.activity_type.name for e in history.events
                     if e.HasField("activity_task_scheduled_event_attributes")}
        assert not scheduled & {"deliver_notice", "deliver_notices"}, scheduled
        [notice] = await stack.store.outbox.notices(case_id)
        assert notice.kind == "refund_succeeded" and notice.delivered_at is not None


async def test_the_customer_hears_the_refund_could_not_be_processed_by_email_only(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    async with connected_stack(store, client, temporal_server, jira_url=None) as (stack, world):
        async with stack.sandbox() as sb:
            await sb.post("/_sandbox/config", json={"refund_initial_status": "pending"})
        charge = await stack.charge(10_000)
        case_id = await stack.request_refund(
            "alice", charge, 2_000, evidence={"order_id": "o-9", "customer_email": "pat@example.test"})
        row = await stack.wait_for_status(case_id, "pending")
        await stack.set_provider_status(row["provider_refund_id"], "failed",
                                        failure_reason="lost_or_stolen_card")
        await stack.wait_for_status(case_id, "refund_failed")

        async def customer_mail() -> list[Any]:
            return [m for m in world.mail if m["To"] == "pat@example.test"]

        [mail] = await eventually(customer_mail)
        assert mail["Subject"] == "Your refund could not be processed"
        body = mail.get_payload()
        assert "20.00 USD" in body and case_id in body
        assert charge not in body and "http" not in body  # nothing internal goes to a customer
        await eventually(lambda: delivered(stack, case_id, "refund_failed"))

        async def operator_told() -> bool:
            return f"Refund {case_id} failed" in slack_titles(world)

        await eventually(operator_told)
        failed = next(m for m in world.slack if m["text"] == f"Refund {case_id} failed")
        assert "lost_or_stolen_card" in failed["blocks"][1]["text"]["text"]
        assert not any("could not be processed" in t for t in slack_titles(world))
        assert set(await delivered(stack, case_id, "refund_could_not_be_processed")) == {"email"}
        [ticket] = world.servicenow["u_refund_request"]
        assert ticket["short_description"] == f"Refund {case_id} failed"


async def test_a_send_that_may_have_happened_is_never_repeated(store: Store) -> None:
    case_id = f"rr-{uuid.uuid4().hex[:12]}"
    await store.outbox.queue(NoticeInput(refund_request_id=case_id, kind="refund_failed",
                                         audience="operator", dedup_key=f"{case_id}:refund_failed"))
    notice = await store.outbox.notice(f"{case_id}:refund_failed")
    assert notice is not None
    assert await store.outbox.claim_delivery(notice["id"], case_id, "slack")
    with pytest.raises(SendingElsewhere):  # within its lease the claim may still be sending
        await store.outbox.claim_delivery(notice["id"], case_id, "slack")
    await store.database.execute(  # the claim's lease ran out: that attempt died mid-send
        "UPDATE notice_deliveries SET claimed_at = now() - make_interval(secs => %s)"
        " WHERE notice_id = %s AND channel = 'slack'",
        (OutboxRepository.SENDING_LEASE_SECONDS + 1, notice["id"]))
    assert not await store.outbox.claim_delivery(notice["id"], case_id, "slack")
    assert not await store.outbox.claim_delivery(notice["id"], case_id, "slack")
    assert await store.outbox.claim_delivery(notice["id"], case_id, "teams")
    await store.outbox.finish_delivery(notice["id"], case_id, "teams", "failed", error="HTTP 500")
    assert await store.outbox.claim_delivery(notice["id"], case_id, "teams")  # certainly failed: again
    await store.outbox.finish_delivery(notice["id"], case_id, "teams", "delivered")
    assert not await store.outbox.claim_delivery(notice["id"], case_id, "teams")
    async with store.database.transaction() as conn:
        cur = await conn.execute("SELECT channel, status, attempts FROM notice_deliveries"
                                 " WHERE notice_id = %s ORDER BY channel", (notice["id"],))
        rows = [(r["channel"], r["status"], r["attempts"]) for r in await cur.fetchall()]
    assert rows == [("slack", "uncertain", 1), ("teams", "delivered", 2)]
    actions = [e["action"] for e in await store.audit.trail(case_id)]
    assert actions == ["notice_queued", "notice_delivery_uncertain", "notice_delivery_failed",
                       "notice_delivered"]


def test_every_template_renders_its_facts_and_customer_notices_stay_plain() -> None:
    case = {"refund_request_id": "rr-1", "amount": 12_345, "currency": "USD", "status": "awaiting_approval",
            "provider": "sandbox", "charge_id": "ch_1", "reason": "duplicate", "requester": "alice",
            "provider_refund_id": None, "evidence": {}}
    details: dict[str, dict[str, Any]] = {
        "payout_exception": {"payout_id": "P-10492", "payout_status": "settlement_failed"},
        "reconciliation_break": {"difference": "ledger 120.00 USD, provider 0.00 USD"},
        "approval_needed": {"missing_roles": ["approver"]}}
    for kind, template in TEMPLATES.items():
        notice = {"id": 7, "kind": kind, "audience": "operator", "refund_request_id": "rr-1",
                  "detail": details.get(kind, {}), "created_at": datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)}
        message = render(notice, case, None, case_url="https://refunds.test/rr-1", email_to="x@y.test")
        assert "{" not in message.title + message.text, kind
        if template.customer:
            assert message.link is None and dict(message.facts) == {"Refund request": "rr-1",
                                                                    "Amount": "123.45 USD"}
        else:
            facts = dict(message.facts)
            assert facts["Amount"] == "123.45 USD" and facts["At"] == "2026-01-02T03:04:05+00:00"
            assert "https://refunds.test/rr-1" in message.plain()
    payout = render({"id": 1, "kind": "payout_exception", "audience": "operator", "refund_request_id": "po-1",
                     "detail": {**details["payout_exception"], "amount": 1_250_000, "currency": "EUR"},
                     "created_at": datetime.now(UTC)}, None, None, case_url=None, email_to=None)
    assert payout.text.startswith("Payout P-10492 of 12500.00 EUR came back settlement_failed")
    assert payout.ticket == "incident"


async def test_unconfigured_channels_are_named_once_in_the_log(
        store: Store, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="adapters.notify.channels"):
        channels = build_channels(Settings(), store.integrations)
    assert channels == []
    [record] = caplog.records
    for name in ("slack", "teams", "email", "servicenow", "jira"):
        assert name in record.getMessage()


async def test_the_outbox_sweeper_delivers_notices_no_workflow_delivers_once(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    from activities.integrations import IntegrationActivities
    from workers.outbox import sweep_once

    async with connected_stack(store, client, temporal_server) as (stack, world):
        case_id = f"payout-case-{uuid.uuid4().hex[:8]}"
        await store.outbox.queue(NoticeInput(
            refund_request_id=case_id, kind="reconciliation_break", audience="ops",
            dedup_key=f"{case_id}:reconciliation_break", detail={"break_class": "ledger_missing"}))
        outbox, delivery = store.outbox, IntegrationActivities(store, stack.settings)
        assert await sweep_once(outbox, delivery, older_than_seconds=0, limit=1000) >= 1
        mine = [m for m in world.slack if case_id in json.dumps(m)]
        assert len(mine) == 1
        await sweep_once(outbox, delivery, older_than_seconds=0, limit=1000)  # swept once only
        assert len([m for m in world.slack if case_id in json.dumps(m)]) == 1
        rows = await delivered(stack, case_id, "reconciliation_break")
        assert rows["slack"]["status"] == "delivered"


async def test_a_notice_the_sweeper_could_not_deliver_is_swept_again(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    """Reconciliation breaks' and payout cases' notices reach people through the sweeper
    only: one whose channel failed (Slack answered 500 to every try) is swept again once its
    retry delay passed, never given up after a single pass. (The sweeps also take other
    tests' undelivered notices, oldest first: each loop runs until this one was taken.)"""
    from activities.integrations import IntegrationActivities
    from workers.outbox import sweep_once

    async with connected_stack(store, client, temporal_server) as (stack, world):
        case_id = f"recon-break-{uuid.uuid4().hex[:8]}"
        key = f"{case_id}:reconciliation_break"
        await store.outbox.queue(NoticeInput(refund_request_id=case_id, kind="reconciliation_break",
                                             audience="ops", dedup_key=key,
                                             detail={"break_class": "ledger_missing"}))
        outbox, delivery = store.outbox, IntegrationActivities(store, stack.settings)

        async def sweeps_until(done: Callable[[], Awaitable[bool]], retry_after: float) -> None:
            for _ in range(20):  # a bound, not a timing: each sweep takes the oldest due first
                await sweep_once(outbox, delivery, older_than_seconds=0, retry_after_seconds=retry_after,
                                 limit=1000)
                if await done():
                    return
            raise AssertionError("the notice was never swept")

        async def tried() -> bool:
            rows = await store.database.fetch_all("SELECT attempts FROM notices WHERE dedup_key = %s", (key,))
            return bool(rows[0]["attempts"])

        world.slack_failures = 10**9
        await sweeps_until(tried, retry_after=3600)  # each notice tried once at most
        assert not [m for m in world.slack if case_id in json.dumps(m)]
        world.slack_failures = 0

        async def slacked() -> bool:
            return bool([m for m in world.slack if case_id in json.dumps(m)])

        await asyncio.sleep(1.1)  # past the retry delay below
        await sweeps_until(slacked, retry_after=1)
        assert len([m for m in world.slack if case_id in json.dumps(m)]) == 1
        rows = await delivered(stack, case_id, "reconciliation_break")
        assert rows["slack"]["status"] == "delivered"


class _HeldChannel:
    """A channel whose one send waits for the test, then fails for certain (HTTP 500)."""

    name = "held-chat"

    def __init__(self) -> None:
        self.sending, self.release = asyncio.Event(), asyncio.Event()

    def accepts(self, message: Message) -> bool:
        return True

    async def send(self, message: Message) -> str | None:
        self.sending.set()
        await self.release.wait()
        raise DeliveryFailed("HTTP 500")


async def test_a_send_still_under_way_elsewhere_never_lets_the_notice_count_as_delivered(
        store: Store, stack: Stack) -> None:
    """Two deliverers of one notice (an activity's retry beside the attempt that outlived its
    timeout, or the sweeper beside a dispatcher): the second finds the first's claim still
    sending. It may not take that for a dead attempt and mark the notice delivered: the
    first's send then failed, and a notice marked delivered is never tried again nor shown
    as unsent. The second answers "being sent elsewhere" (a retryable failure); once the
    first failed for certain, the notice is still undelivered and its channel retried."""
    from activities.integrations import IntegrationActivities

    case_id = f"rr-{uuid.uuid4().hex[:12]}"
    key = f"{case_id}:refund_failed"
    await store.outbox.queue(NoticeInput(refund_request_id=case_id, kind="refund_failed",
                                         audience="operator", dedup_key=key))
    first, second = IntegrationActivities(store, stack.settings), IntegrationActivities(store, stack.settings)
    held = _HeldChannel()
    first._channels = [held]  # the test's own channel, in place of the configured ones
    second._channels = [held]
    sending = asyncio.create_task(first.deliver(key))
    await held.sending.wait()
    with pytest.raises(ApplicationError) as busy:
        await second.deliver(key)
    assert not busy.value.non_retryable and "held-chat" in str(busy.value)
    held.release.set()
    with pytest.raises(ApplicationError):
        await sending
    notice = await store.outbox.notice(key)
    assert notice is not None and notice["delivered_at"] is None
    [row] = [r for r in await store.outbox.deliveries(case_id) if r.channel == "held-chat"]
    assert row.status == "failed"
    assert await store.outbox.claim_delivery(notice["id"], case_id, "held-chat")  # retried: it failed


class _AcceptsThenQuitsBadly:
    """An SMTP server that accepts the message, then answers QUIT with 421 (shutting down)."""

    def __init__(self) -> None:
        self.received: list[bytes] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received.append(envelope.original_content)
        return "250 Message accepted for delivery"

    async def handle_QUIT(self, server: Any, session: Any, envelope: Any) -> str:
        return "421 4.3.2 Service shutting down"


async def test_a_message_the_smtp_server_accepted_is_delivered_whatever_quit_answers() -> None:
    """smtplib's `with` sends QUIT after the message and raises unless it hears 221: the
    message the server had accepted counted as failed, so every retry (dispatcher, then
    sweeper) mailed it again: a customer got the same "could not be processed" mail up to
    16 times. Once DATA is accepted the mail is delivered; QUIT's answer is only logged."""
    handler = _AcceptsThenQuitsBadly()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        mail = SmtpEmail("127.0.0.1", int(controller.port), "refunds@example.test", timeout=5)
        message = Message(notice_id=7, kind="refund_could_not_be_processed", audience="customer",
                          case_id="rr-7", title="Your refund could not be processed", text="x", facts=(),
                          link=None, buttons=False, ticket=None, customer=True,
                          email_to="jane.customer@example.com")
        sent = await mail.send(message)
        assert sent == message_id(message) and sent.startswith("<notice-7.")
    finally:
        controller.stop()
    assert len(handler.received) == 1


class _RefusesRecipients:
    """An SMTP server that answers every recipient with `answer`."""

    def __init__(self, answer: str) -> None:
        self.answer = answer

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        return self.answer


@pytest.mark.parametrize(("answer", "refused"), [("550 5.1.1 No such user", True),
                                                 ("451 4.3.0 Try again later", False)])
async def test_an_smtp_refusal_for_good_is_told_apart_from_one_for_now(answer: str, refused: bool) -> None:
    """A 5xx is the server's final word (the dispatcher leaves the notice to the sweeper at
    once); a 4xx asks to be tried again soon (the dispatcher's own backoff)."""
    controller = Controller(_RefusesRecipients(answer), hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        mail = SmtpEmail("127.0.0.1", int(controller.port), "refunds@example.test", timeout=5)
        message = Message(notice_id=8, kind="refund_failed", audience="ops", case_id="rr-8",
                          title="Refund failed", text="x", facts=(), link=None, buttons=False, ticket=None,
                          customer=False, email_to="ops@example.test")
        with pytest.raises(DeliveryFailed) as failed:
            await mail.send(message)
    finally:
        controller.stop()
    assert failed.value.refused is refused


@pytest.mark.parametrize(("late", "stays"), [("failed", "uncertain"), ("delivered", "delivered")])
async def test_a_send_that_outlived_its_lease_never_turns_an_uncertain_claim_failed(
        store: Store, late: str, stays: str) -> None:
    """A send slower than the claim's lease (a server dripping its answer) is taken over: the
    claim turns uncertain and the notice counts as delivered. Its late answer wrote its own
    outcome over it: 'failed' on a notice already delivered, so never tried again and no
    longer shown as unsent. A late failure now leaves it uncertain (shown as unsent); a late
    success may say delivered."""
    case_id = f"rr-{uuid.uuid4().hex[:12]}"
    await store.outbox.queue(NoticeInput(refund_request_id=case_id, kind="refund_failed",
                                         audience="operator", dedup_key=f"{case_id}:refund_failed"))
    notice = await store.outbox.notice(f"{case_id}:refund_failed")
    assert notice is not None
    assert await store.outbox.claim_delivery(notice["id"], case_id, "slack")  # the slow send
    await store.database.execute(
        "UPDATE notice_deliveries SET claimed_at = now() - make_interval(secs => %s)"
        " WHERE notice_id = %s AND channel = 'slack'",
        (OutboxRepository.SENDING_LEASE_SECONDS + 1, notice["id"]))
    assert not await store.outbox.claim_delivery(notice["id"], case_id, "slack")  # taken over
    await store.outbox.finish_delivery(notice["id"], case_id, "slack", late, error="HTTP 500")
    [row] = [r for r in await store.outbox.deliveries(case_id) if r.channel == "slack"]
    assert row.status == stays
    last = (await store.audit.trail(case_id))[-1]
    assert (last["action"], last["detail"]["outcome"]) == (
        "notice_delivered" if late == "delivered" else "notice_delivery_outcome_after_takeover", late)
