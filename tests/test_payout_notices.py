"""Each payout notice kind has its own template (decision, amount by the currency's
exponent, next steps, a link to the payout case), seen on the wire of every channel: Slack
and Teams at their HTTP boundary, email through a real SMTP server."""

import json
import uuid
from typing import Any

from temporalio.client import Client

from adapters.db import Store
from adapters.notify.message import FALLBACK, PAYOUT_APPROVAL_TEMPLATES, TEMPLATES
from domain.models import NoticeInput
from starters.dev.stack import TemporalDevServer
from tests.fakes import connected_stack
from tests.test_payout_tickets import sweep

# kind -> (audience, detail, the amount as people read it, words that must be there)
NOTICES: dict[str, tuple[str, dict[str, Any], str, tuple[str, ...]]] = {
    "payout_exception_remediated": (
        "stakeholders",
        {"amount": 1_250_000, "currency": "KWD", "decision": "approved", "approved_by": "fiona, cora",
         "tier": "finance_and_compliance", "held_from": "paid", "beneficiary_held": True,
         "ticket_ref": "servicenow INC0001001", "next_steps": "a reissue needs its own approval"},
        "1250.000 KWD", ("Decision: approved by fiona, cora", "INC0001001",
                         "Next steps: a reissue needs its own approval")),
    "payout_ledger_failed": (
        "finance",
        {"amount": 450_000, "currency": "JPY", "approved_by": "lena", "error": "lock timeout",
         "outcome": "hold_rolled_back", "priority": "high"},
        "450000 JPY", ("approved by lena", "lock timeout", "hold_rolled_back", "Next steps:")),
    "payout_reissue_failed": (
        "payments_ops",
        {"amount": 15_000, "currency": "EUR", "approved_by": "lena", "error": "declined: account_closed"},
        "150.00 EUR", ("reissue approved by lena", "account_closed", "Next steps: verify")),
    "payout_reissued": (
        "stakeholders",
        {"amount": 7, "currency": "BHD", "approved_by": ["lena", "tess"], "reissue_id": "P-9-r1"},
        "0.007 BHD", ("reissue approved by lena, tess", "as P-9-r1", "Next steps: none")),
}


def test_every_payout_notice_kind_has_its_own_template() -> None:
    for kind in NOTICES:
        assert TEMPLATES.get(kind, FALLBACK) is not FALLBACK and TEMPLATES[kind].payout, kind


async def test_payout_notices_reach_slack_teams_and_email_with_decision_money_and_link(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    async with connected_stack(store, client, temporal_server, jira_url=None,
                               servicenow_url=None) as (stack, world):
        case_id = f"sandbox-payout-P-{uuid.uuid4().hex[:8]}"
        for kind, (audience, detail, _, _) in NOTICES.items():
            await store.outbox.queue(NoticeInput(
                refund_request_id=case_id, kind=kind, audience=audience,
                dedup_key=f"{case_id}:{kind}", detail={"payout_id": "P-9", **detail}))
        await sweep(stack, case_id)
        link = stack.settings.case_url(case_id, payout=True)
        assert link.endswith(f"/v1/payout-exceptions/{case_id}")
        slack = {m["text"]: m for m in world.slack if case_id in json.dumps(m)}
        teams = [t["attachments"][0]["content"] for t in world.teams if case_id in json.dumps(t)]
        mails = {m["Subject"]: m for m in world.mail if case_id in m.get_payload()}
        assert len(slack) == len(teams) == len(mails) == len(NOTICES)
        for kind, (_, _, money, words) in NOTICES.items():
            title = TEMPLATES[kind].title.format(payout_id="P-9", reissue_id="P-9-r1", case=case_id)
            message = slack[title]
            text = message["blocks"][1]["text"]["text"]
            assert money in text and all(w in text for w in words), (kind, text)
            fields = [f["text"] for f in message["blocks"][1]["fields"]]
            assert f"*Payout case*\n{case_id}" in fields and f"*Amount*\n{money}" in fields
            assert "*Payout*\nP-9" in fields
            assert message["blocks"][2]["elements"][-1]["url"] == link
            card = next(c for c in teams if c["body"][0]["text"] == title)
            assert {f["title"]: f["value"] for f in card["body"][2]["facts"]}["Amount"] == money
            assert card["actions"][0]["url"] == link
            body = mails[title].get_payload()
            assert mails[title]["To"] == "ops@example.test"
            assert money in body and words[0] in body and f"Case: {link}" in body


async def test_a_payout_approval_round_speaks_of_the_payout_and_offers_no_refund_buttons(
        store: Store, client: Client, temporal_server: TemporalDevServer) -> None:
    async with connected_stack(store, client, temporal_server, jira_url=None,
                               servicenow_url=None) as (stack, world):
        case_id = f"sandbox-payout-P-{uuid.uuid4().hex[:8]}"
        await store.outbox.queue(NoticeInput(
            refund_request_id=case_id, kind="approval_needed", audience="approvers",
            dedup_key=f"{case_id}:approval_needed",
            detail={"payout_id": "P-10492", "amount": 1_250_000, "currency": "EUR",
                    "missing_roles": ["finance_manager", "compliance"]}))
        await sweep(stack, case_id)
        [message] = [m for m in world.slack if case_id in json.dumps(m)]
        assert message["text"] == PAYOUT_APPROVAL_TEMPLATES["approval_needed"].title.format(case=case_id)
        assert "Refund" not in json.dumps(message)
        text = message["blocks"][1]["text"]["text"]
        assert "12500.00 EUR" in text and "finance_manager, compliance" in text
        [actions] = [b for b in message["blocks"] if b["type"] == "actions"]
        assert [e["action_id"] for e in actions["elements"]] == ["refund_open"]
        assert actions["elements"][0]["url"] == stack.settings.case_url(case_id, payout=True)
