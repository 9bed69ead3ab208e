"""Email over SMTP (standard library `smtplib`, run in a thread).

The Message-ID is derived from the notice (`message_id`), so even a receiving system sees
one message per notice. A server that answers with an error code certainly did not take the message
(retry); a connection lost mid-transaction may have delivered it (never resent); a message
the server took is delivered, whatever it answers to QUIT.
"""

import asyncio
import hashlib
import logging
import re
import smtplib
import ssl
from email.message import EmailMessage
from email.utils import formatdate

from adapters.net import is_loopback
from adapters.notify.delivery import DeliveryFailed, DeliveryUncertain
from adapters.notify.message import Message

log = logging.getLogger(__name__)

_ADDRESS = re.compile(  # a quoted local part, or one with apostrophes inside it (o'neil@)
    r"(?:\"[^\"\r\n]*\"|[^\s<>'\"(){},;:@]+(?:'[^\s<>'\"(){},;:@]+)*)@[^\s<>'\"(){},;:]+")


def _masked(text: str) -> str:
    """The text with every mail address replaced: what an SMTP error may say of a recipient."""
    return _ADDRESS.sub("<address>", text)



def message_id(message: Message) -> str:
    """The notice's Message-ID: its id and a digest of its case, kind and audience. Notice
    ids alone repeat across deployments sharing a mailbox and after a database is rebuilt,
    and a mail server drops a message whose id it has seen. Nothing of the settings in it, so
    a resend after the sender was changed keeps the id."""
    named = hashlib.sha256(f"{message.case_id}\x00{message.kind}\x00{message.audience}".encode()).hexdigest()
    return f"<notice-{message.notice_id}.{named[:20]}@refund-orchestrator>"


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
        mail["Message-ID"] = message_id(message)
        mail.set_content(message.plain())
        return mail

    def _send(self, mail: EmailMessage) -> None:
        handing_over = accepted = False
        try:
            with smtplib.SMTP(self._host, self._port, timeout=self._timeout) as smtp:
                if self._starttls:
                    smtp.starttls(context=ssl.create_default_context())
                if self._login:
                    smtp.login(*self._login)
                handing_over = True
                smtp.send_message(mail)
                accepted = True
        # `from None`, and addresses masked: a server's answer names the recipient (a
        # customer's address), and the error reaches logs, the outbox and workflow failures
        except (OSError, smtplib.SMTPException) as exc:
            if not accepted:
                raise self._failure(exc, handing_over) from None
            # the server took the message; only the goodbye (QUIT, answered other than 221,
            # which smtplib's `with` raises on) went wrong: delivered, never sent again
            log.warning("SMTP server %s:%s took the message but not the QUIT: %s", self._host, self._port,
                        _masked(repr(exc)))

    def _failure(self, exc: Exception, handing_over: bool) -> DeliveryFailed | DeliveryUncertain:
        """What an SMTP error before the server took the message means for a retry: an
        answer refusing it is a failure; a break once the message was being handed over
        may have delivered it; no session at all is a failure."""
        shown = _masked(repr(exc))
        if isinstance(exc, smtplib.SMTPResponseException):  # 5xx: for good; 4xx: try again soon
            return DeliveryFailed(f"the SMTP server refused the message: {shown}",
                                  refused=exc.smtp_code >= 500)
        if isinstance(exc, smtplib.SMTPRecipientsRefused):
            codes = [code for code, _ in exc.recipients.values()]
            return DeliveryFailed(f"the SMTP server refused the message: {shown}",
                                  refused=bool(codes) and min(codes) >= 500)
        if handing_over:
            return DeliveryUncertain(f"the SMTP transaction broke off: {shown}")
        return DeliveryFailed(f"no SMTP session with {self._host}:{self._port}: {shown}")

    async def send(self, message: Message) -> str | None:
        mail = self.compose(message)
        await asyncio.to_thread(self._send, mail)
        return str(mail["Message-ID"])
