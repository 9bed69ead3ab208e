"""Notices quote requester, provider and ticket text: on a Teams card it is shown as
written (no link, mention, list or emphasis it did not have), and a customer's email
address from a request is used only when it is exactly one plain mailbox."""

import pytest

from adapters.config import Settings
from adapters.notify.channels import email_recipient
from adapters.notify.chat import teams_payload
from adapters.notify.email import SmtpEmail
from adapters.notify.message import Message

HOSTILE = "[verify your refund](https://evil.example/pay) **urgent** <at>CFO</at> {{DATE(2030-01-01)}}"


def notice(text: str, *, title: str = "Refund rr-1 needs approval", email_to: str | None = None) -> Message:
    return Message(notice_id=1, kind="approval_needed", audience="approvers", case_id="rr-1", title=title,
                   text=text, facts=(("Reason", "- " + HOSTILE), ("Status", "awaiting_approval")),
                   link="https://refunds.example/v1/refund-requests/rr-1", buttons=False, ticket=None,
                   customer=False, email_to=email_to)


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
