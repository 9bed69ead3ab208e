"""Email over SMTP (standard library `smtplib`, run in a thread).

The Message-ID is derived from the notice, so even a receiving system sees one message
per notice. A server that answers with an error code certainly did not take the message
(retry); a connection lost mid-transaction may have delivered it (never resent).
"""

import asyncio
import re
import smtplib
import ssl
from email.message import EmailMessage
from email.utils import formatdate

from adapters.net import is_loopback
from adapters.notify.delivery import DeliveryFailed, DeliveryUncertain
from adapters.notify.message import Message

_ADDRESS = re.compile(r"[^\s<>'\"(){},;:]+@[^\s<>'\"(){},;:]+")


def _masked(text: str) -> str:
    """The text with every mail address replaced: what an SMTP error may say of a recipient."""
    return _ADDRESS.sub("<address>", text)


class SmtpEmail:
    name = "email"

    def __init__(self, host: str, port: int, sender: str, *, timeout: float, starttls: bool = False,
                 username: str | None = None, password: str | None = None) -> None:
        if not starttls and not is_loopback(host):
            raise ValueError(f"SMTP server {host} without REFUNDS_SMTP_STARTTLS=true: "
                             + ("the login and " if username else "")
                             + "customers' addresses and notices would cross the network in clear")
        self._host, self._port, self._sender = host, port, sender
        self._timeout, self._starttls = timeout, starttls
        self._login = (username, password or "") if username else None

    def accepts(self, message: Message) -> bool:
        return message.email_to is not None

    def compose(self, message: Message) -> EmailMessage:
        assert message.email_to is not None
        mail = EmailMessage()
        mail["From"] = self._sender
        mail["To"] = message.email_to
        mail["Subject"] = " ".join(message.title.split())  # a line break in a header is refused
        mail["Date"] = formatdate(localtime=False, usegmt=True)
        mail["Message-ID"] = f"<notice-{message.notice_id}@refund-orchestrator>"
        mail.set_content(message.plain())
        return mail

    def _send(self, mail: EmailMessage) -> None:
        handing_over = False
        try:
            with smtplib.SMTP(self._host, self._port, timeout=self._timeout) as smtp:
                if self._starttls:
                    smtp.starttls(context=ssl.create_default_context())
                if self._login:
                    smtp.login(*self._login)
                handing_over = True
                smtp.send_message(mail)
        # `from None`, and addresses masked: a server's answer names the recipient (a
        # customer's address), and the error reaches logs, the outbox and workflow failures
        except (smtplib.SMTPResponseException, smtplib.SMTPRecipientsRefused) as exc:
            raise DeliveryFailed(f"the SMTP server refused the message: {_masked(repr(exc))}") from None
        except (OSError, smtplib.SMTPException) as exc:
            if handing_over:
                raise DeliveryUncertain(f"the SMTP transaction broke off: {_masked(repr(exc))}") from None
            raise DeliveryFailed(f"no SMTP session with {self._host}:{self._port}: "
                                 f"{_masked(repr(exc))}") from None

    async def send(self, message: Message) -> str | None:
        mail = self.compose(message)
        await asyncio.to_thread(self._send, mail)
        return str(mail["Message-ID"])
