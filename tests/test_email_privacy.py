"""A customer's address is personal data: it reaches the mail it is for, and never the logs,
the outbox's error column or a workflow's failure (which carry what a delivery error says)."""

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from adapters.config import Settings
from adapters.notify.channels import email_recipient
from adapters.notify.delivery import DeliveryFailed
from adapters.notify.email import SmtpEmail
from adapters.notify.message import Message
from starters.ports import free_port

CUSTOMER = "jane.customer@example.com"


class RefuseEveryRecipient:
    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"


@pytest.fixture
def refusing_server() -> Iterator[int]:
    controller = Controller(RefuseEveryRecipient(), hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        yield int(controller.port)
    finally:
        controller.stop()


@pytest.mark.parametrize("customer", [CUSTOMER, "o'neil@example.com", '"jane customer"@example.com'])
async def test_a_refused_recipient_is_named_by_its_code_not_its_address(
        refusing_server: int, customer: str) -> None:
    """Also an address with an apostrophe or a quoted local part, which the address check
    takes: the masking kept the part before the apostrophe or the whole quoted address."""
    mail = SmtpEmail("127.0.0.1", refusing_server, "refunds@example.test", timeout=5)
    message = Message(notice_id=1, kind="refund_could_not_be_processed", audience="customer",
                      case_id="rr-1", title="Your refund could not be processed", text="x", facts=(),
                      link=None, buttons=False, ticket=None, customer=True, email_to=customer)
    with pytest.raises(DeliveryFailed) as failed:
        await mail.send(message)
    shown = str(failed.value)
    assert "550" in shown and not [part for part in ("example.com", "neil", "jane") if part in shown], shown


def test_a_customer_address_refused_for_its_form_is_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    given = f"Jane Customer <{CUSTOMER}>"
    with caplog.at_level(logging.WARNING):
        assert email_recipient(Settings(), "customer", {"customer_email": given}) is None
    assert caplog.messages and CUSTOMER not in caplog.text, caplog.text
