"""Notices quote requester, provider and ticket text: on a Teams card it is shown as
written (no link, mention, list or emphasis it did not have), and a customer's email
address from a request is used only when it is exactly one plain mailbox."""

from datetime import UTC, datetime

import pytest

from adapters.config import Settings
from adapters.notify.channels import email_recipient
from adapters.notify.chat import teams_payload
from adapters.notify.email import SmtpEmail
from adapters.notify.message import Message, render
from adapters.tickets.servicenow import journal_text

HOSTILE = "[verify your refund](https://evil.example/pay) **urgent** <at>CFO</at> {{DATE(2030-01-01)}}"


def notice(text: str, *, title: str = "Refund rr-1 needs approval", email_to: str | None = None) -> Message:
    return Message(notice_id=1, kind="approval_needed", audience="approvers", case_id="rr-1", title=title,
                   text=text, facts=(("Reason", "- " + HOSTILE), ("Status", "awaiting_approval")),
                   link="https://refunds.example/v1/refund-requests/rr-1", buttons=False, ticket=None,
                   customer=False, email_to=email_to)


FORGED = "card_expired\n\nAmount: 0.05 USD\r\nStatus: approved by finance\u2028Case: https://evil.example/ok"


def test_quoted_text_never_makes_its_own_line_of_a_notice() -> None:
    """A provider's failure reason or a model's summary (itself read from requester text)
    went into every channel with its line breaks: in email and ticket text its lines read
    exactly like the notice's own facts (a second Amount, a Case link above the real one).
    Quoted text is one line, however it was sent."""
    case = {"refund_request_id": "rr-1", "amount": 12_345, "currency": "USD", "status": "awaiting_approval",
            "provider": "sandbox", "charge_id": "ch_1", "reason": "duplicate", "requester": "alice",
            "provider_refund_id": None, "decision": None}
    advice = {"source": "llm", "advice": {"summary": FORGED, "suggested_amount": 12_345,
                                          "anomaly_flags": ["x\nAmount: 0.01 USD"], "confidence": 0.9}}
    for kind, detail in (("refund_failed", {"failure_reason": FORGED}),
                         ("approval_needed", {"missing_roles": ["approver"]})):
        message = render({"id": 7, "kind": kind, "audience": "operator", "refund_request_id": "rr-1",
                          "detail": detail, "created_at": datetime(2026, 1, 2, tzinfo=UTC)}, case, advice,
                         case_url="https://refunds.test/rr-1", email_to=None)
        lines = message.plain().splitlines()
        assert [line for line in lines if line.startswith("Amount:")] == ["Amount: 123.45 USD"], kind
        assert [line for line in lines if line.startswith("Case:")] == ["Case: https://refunds.test/rr-1"]
        assert not [line for line in lines if line.startswith("Status: approved")], kind
        assert "card_expired Amount: 0.05 USD Status: approved by finance" in message.plain(), kind


def test_servicenow_journal_text_cannot_open_a_code_block() -> None:
    """ServiceNow renders `[code]...[/code]` in a journal field as HTML (a live link), where
    the instance allows it: quoted text never opens one."""
    text = journal_text("failed ([CODE]<a href='https://evil.example'>Approve</a>[/code])")
    assert "[code]" not in text.lower() and "[/code]" not in text.lower()
    assert "Approve" in text


def test_teams_card_text_and_facts_show_quoted_text_as_written() -> None:
    card = teams_payload(notice(f"Ticket says: {HOSTILE}\n1. pay now"))["attachments"][0]["content"]
    text = card["body"][1]["text"]
    assert "\\[verify your refund\\](https://evil.example/pay)" in text
    assert "\\*\\*urgent\\*\\*" in text and "\\<at\\>CFO\\</at\\>" in text and "\\{\\{DATE" in text
    assert "\n1\\. pay now" in text
    facts = {f["title"]: f["value"] for f in card["body"][2]["facts"]}
    assert facts["Reason"].startswith("\\- \\[verify")
    assert facts["Status"] == "awaiting_approval"  # an underscore inside a word is not emphasis
    assert card["body"][0]["text"] == "Refund rr-1 needs approval"  # ids stay readable


@pytest.mark.parametrize("given", [
    "pat@example.test, mallory@evil.example", "Pat <pat@example.test>",
    "pat@example.test\r\nBcc: m@evil.example", "pat@localhost", "pat@[10.0.0.1]", '"pat"@example.test',
    "pat@example.test\x00", "not an address", ""])
def test_a_customer_email_that_is_not_one_plain_mailbox_is_not_mailed(given: str) -> None:
    assert email_recipient(Settings(), "customer", {"customer_email": given}) is None


def test_a_valid_customer_email_is_used_and_a_broken_title_still_composes() -> None:
    valid = {"customer_email": "pat@example.test"}
    assert email_recipient(Settings(), "customer", valid) == "pat@example.test"
    assert email_recipient(Settings(), "customer", {}) is None
    mail = SmtpEmail("127.0.0.1", 25, "refunds@example.test", timeout=1).compose(
        notice("hello", title="Refund rr-1\r\nBcc: m@evil.example", email_to="pat@example.test"))
    assert mail["Subject"] == "Refund rr-1 Bcc: m@evil.example" and mail["Bcc"] is None


@pytest.mark.parametrize(("host", "starttls", "refused"), [
    ("smtp.example.test", False, True), ("smtp.example.test", True, False),
    ("127.0.0.1", False, False), ("localhost", False, False), ("::1", False, False)])
def test_an_smtp_login_never_crosses_the_network_in_clear(host: str, starttls: bool, refused: bool) -> None:
    """With credentials, a server off this machine is reached only with STARTTLS: smtplib's
    AUTH would send the password as it is otherwise. Loopback (a local relay) stays allowed."""
    def build() -> SmtpEmail:
        return SmtpEmail(host, 587, "refunds@example.test", timeout=1, starttls=starttls,
                         username="refunds", password="hunter2")
    if refused:
        with pytest.raises(ValueError, match="REFUNDS_SMTP_STARTTLS"):
            build()
    else:
        build()


@pytest.mark.parametrize(("host", "starttls", "refused"), [
    ("smtp.example.test", False, True), ("smtp.example.test", True, False), ("127.0.0.1", False, False)])
def test_no_mail_crosses_the_network_in_clear(host: str, starttls: bool, refused: bool) -> None:
    """Without credentials too: a customer's address, the amount and the case link cross to
    a server off this machine only with STARTTLS (a local relay stays allowed)."""
    if refused:
        with pytest.raises(ValueError, match="REFUNDS_SMTP_STARTTLS"):
            SmtpEmail(host, 25, "refunds@example.test", timeout=1, starttls=starttls)
    else:
        SmtpEmail(host, 25, "refunds@example.test", timeout=1, starttls=starttls)


def test_a_message_id_is_one_notice_s_not_one_database_counter_s() -> None:
    """Mail servers drop a message whose Message-ID they have seen (Gmail does, silently):
    two deployments sharing an ops mailbox, or one deployment after its database was
    rebuilt, count notice ids from 1 again. The id names the case and notice too, so only a
    resend of the same notice repeats it."""
    email = SmtpEmail("127.0.0.1", 25, "refunds@example.test", timeout=1)
    first = notice("hello", email_to="ops@example.test")
    other_case = Message(**{**vars(first), "case_id": "rr-2"})
    other_kind = Message(**{**vars(first), "kind": "refund_failed"})
    ids = [str(email.compose(m)["Message-ID"]) for m in (first, other_case, other_kind)]
    assert len(set(ids)) == 3, ids
    assert str(email.compose(first)["Message-ID"]) == ids[0]  # a resend is recognisable
    assert ids[0].startswith("<notice-1.") and ids[0].endswith("@refund-orchestrator>"), ids[0]
    other_sender = SmtpEmail("127.0.0.1", 25, "Refunds <ops@other.example>", timeout=1)
    assert str(other_sender.compose(first)["Message-ID"]) == ids[0]  # settings changed, a resend
