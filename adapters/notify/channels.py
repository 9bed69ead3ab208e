"""Builds the channels the environment configures; each unconfigured one is named once in
the log (at worker start), and its notices simply are not sent there."""

import logging
import re
from email.errors import HeaderParseError
from email.headerregistry import Address

from adapters.config import Settings
from adapters.db.integrations import IntegrationRepository
from adapters.notify.chat import WebhookChat
from adapters.notify.delivery import Channel
from adapters.notify.email import SmtpEmail
from adapters.tickets.base import TicketChannel
from adapters.tickets.jira import Jira
from adapters.tickets.servicenow import ServiceNow
from domain.integrations import TICKETING_AUDIENCE

log = logging.getLogger(__name__)


def build_channels(settings: Settings, store: IntegrationRepository) -> list[Channel]:
    timeout = settings.integration_http_timeout_seconds
    channels: list[Channel] = []
    skipped: list[str] = []
    for name, url, variable in (("slack", settings.slack_webhook_url, "REFUNDS_SLACK_WEBHOOK_URL"),
                                ("teams", settings.teams_webhook_url, "REFUNDS_TEAMS_WEBHOOK_URL")):
        if url is None:
            skipped.append(f"{name} ({variable} unset)")
        else:
            channels.append(WebhookChat(name, url.get_secret_value(), timeout))
    if settings.smtp_host is None:
        skipped.append("email (REFUNDS_SMTP_HOST unset)")
    else:
        channels.append(SmtpEmail(
            settings.smtp_host, settings.smtp_port, settings.smtp_from, timeout=timeout,
            starttls=settings.smtp_starttls, username=settings.smtp_username,
            password=settings.smtp_password.get_secret_value() if settings.smtp_password else None))
    if settings.servicenow_url and settings.servicenow_user and settings.servicenow_password:
        channels.append(TicketChannel(ServiceNow(
            settings.servicenow_url, settings.servicenow_user,
            settings.servicenow_password.get_secret_value(),
            request_table=settings.servicenow_request_table,
            incident_table=settings.servicenow_incident_table, timeout=timeout), store))
    else:
        skipped.append("servicenow (REFUNDS_SERVICENOW_URL/_USER/_PASSWORD unset)")
    if settings.jira_url and settings.jira_email and settings.jira_api_token and settings.jira_project:
        channels.append(TicketChannel(Jira(
            settings.jira_url, settings.jira_email, settings.jira_api_token.get_secret_value(),
            project=settings.jira_project, issue_type=settings.jira_issue_type, timeout=timeout), store))
    else:
        skipped.append("jira (REFUNDS_JIRA_URL/_EMAIL/_API_TOKEN/_PROJECT unset)")
    if skipped:
        log.warning("notice channels not configured, their notices are skipped: %s", "; ".join(skipped))
    return channels


MAIL_DOMAIN = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))+")


def customer_address(value: str) -> str | None:
    """The request's customer address if it is exactly one plain mailbox at an internet
    domain, else None. It is requester input: `a@x.com, b@y.com` would copy the customer's
    notice to someone else, a display name or a quoted local part can hide the real one,
    and `localhost` or an IP literal points the mail inwards."""
    try:
        address = Address(addr_spec=value)
    except (ValueError, IndexError, HeaderParseError):  # IndexError: the stdlib parser on ""
        return None
    if address.addr_spec != value or len(value) > 254 or not MAIL_DOMAIN.fullmatch(address.domain):
        return None
    return value


def email_recipient(settings: Settings, audience: str, evidence: dict[str, str] | None) -> str | None:
    """Customers get mail at the address their request carried (when it is a valid one);
    people here at a mailbox; a notice for the ticketing systems alone, nobody."""
    if audience == TICKETING_AUDIENCE:
        return None
    if audience == "customer":
        given = (evidence or {}).get("customer_email")
        address = customer_address(given) if given is not None else None
        if given is not None and address is None:
            log.warning("the request's customer_email is not one plain address at an internet "
                        "domain; the customer notice is not emailed")  # the value is personal data
        return address
    if audience in ("approvers", "requester"):
        return settings.approvers_email or settings.ops_email
    return settings.ops_email
