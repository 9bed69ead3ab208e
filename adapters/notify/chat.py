"""Slack (incoming webhook, Block Kit) and Microsoft Teams (incoming webhook / Workflows,
Adaptive Card). Approval notices carry Slack buttons whose clicks come back to the relay
(`POST /integrations/slack/actions`), signed by Slack. Customer notices never go to chat."""

import hashlib
import html
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from adapters.notify.delivery import DeliveryFailed, send_http
from adapters.notify.message import Message
from domain.integrations import TICKETING_AUDIENCE

APPROVE_ACTION = "refund_approve"
DENY_ACTION = "refund_deny"


def slack_escape(text: str) -> str:
    """Slack mrkdwn control characters; notice text may quote provider or ticket input."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


TEAMS_MARKDOWN = re.compile(
    r"[\\`*\[\]<>{}&~]"  # code, emphasis, links, <at> mentions, {{DATE()}} functions, entities
    r"|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])"  # emphasis (an underscore inside a word is not)
    r"|^[ \t]*(?:[-+]|\d+\.)(?=[ \t])", re.MULTILINE)  # list items
"""What Teams reads as formatting in a TextBlock or a fact (its Markdown subset)."""


def teams_escape(text: str) -> str:
    """Teams card text shown as written: notices quote requester, provider and ticket text,
    which must not turn into a link (`[pay here](https://…)`), a mention or a list. Each
    formatting character gets Markdown's backslash escape; ids like `rr-1` stay as they are."""
    return TEAMS_MARKDOWN.sub(lambda m: m.group(0)[:-1] + "\\" + m.group(0)[-1], text)


def slack_payload(message: Message) -> dict[str, Any]:
    """A Block Kit message: header, text with up to ten fact fields, and buttons."""
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": message.title[:150]}},
        {"type": "section", "text": {"type": "mrkdwn", "text": slack_escape(message.text)[:3000]},
         "fields": [{"type": "mrkdwn", "text": f"*{slack_escape(k)}*\n{slack_escape(v)}"[:2000]}
                    for k, v in message.facts[:10]]},
    ]
    buttons: list[dict[str, Any]] = []
    if message.buttons and message.case_id:
        buttons += [
            {"type": "button", "action_id": APPROVE_ACTION, "style": "primary",
             "text": {"type": "plain_text", "text": "Approve"}, "value": message.case_id},
            {"type": "button", "action_id": DENY_ACTION, "style": "danger",
             "text": {"type": "plain_text", "text": "Deny"}, "value": message.case_id},
        ]
    if message.link:
        buttons.append({"type": "button", "action_id": "refund_open", "url": message.link,
                        "text": {"type": "plain_text", "text": "Open case"}})
    if buttons:
        blocks.append({"type": "actions", "block_id": f"refund:{message.notice_id}", "elements": buttons})
    return {"text": message.title, "blocks": blocks}


SHOWN_KEYS = ("type", "action_id", "value", "url", "style", "image_url", "alt_text")
"""What a button, link, image or context element shows or does, beside its text."""


def shown_digest(blocks: Sequence[Mapping[str, Any]]) -> str:
    """A digest of what a Slack message shows its reader and what its buttons do: every
    block's kind, text and field texts, the element beside a text (`accessory`) and every
    element of an actions or context block (text, action, value, link, style, image), as
    read by `SHOWN_KEYS` (Slack's echo escapes `&<>` in plain text; keys it adds are not
    read). Kept when an approval notice is sent, so a click is taken only on the message as
    it went out: not on a copy whose red "Deny" approves. `v2`: the buttons are covered
    (a `sha256:` digest, kept before, matches no click)."""
    def text(value: object) -> object:
        inner = value.get("text") if isinstance(value, Mapping) else value
        return html.unescape(inner) if isinstance(inner, str) else None

    def element(value: object) -> object:
        if not isinstance(value, Mapping):
            return None
        return [text(value.get("text")), *(value.get(key) for key in SHOWN_KEYS)]

    shown = [[block.get("type"), text(block.get("text")),
              [text(f) for f in block.get("fields") or () if isinstance(f, Mapping)],
              element(block.get("accessory")), [element(e) for e in block.get("elements") or ()]]
             for block in blocks if isinstance(block, Mapping)]
    return "sha256v2:" + hashlib.sha256(json.dumps(shown, sort_keys=True).encode()).hexdigest()


def teams_payload(message: Message) -> dict[str, Any]:
    """An Adaptive Card in the message envelope Teams webhooks and Workflows accept."""
    card: dict[str, Any] = {
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json", "type": "AdaptiveCard",
        "version": "1.4",
        "body": [{"type": "TextBlock", "text": teams_escape(message.title), "weight": "Bolder",
                  "size": "Medium", "wrap": True},
                 {"type": "TextBlock", "text": teams_escape(message.text), "wrap": True},
                 {"type": "FactSet", "facts": [{"title": teams_escape(k), "value": teams_escape(v)}
                                               for k, v in message.facts]}],
    }
    if message.link:
        card["actions"] = [{"type": "Action.OpenUrl", "title": "Open case", "url": message.link}]
    return {"type": "message", "attachments": [
        {"contentType": "application/vnd.microsoft.card.adaptive", "contentUrl": None, "content": card}]}


LEGACY_CONNECTOR_PATH = "/IncomingWebhook/"
"""In an Office 365 connector's webhook URL. Such a connector answers 200 to a message it
dropped (throttled, too large) with the error as text, and `1` to one it posted."""


class WebhookChat:
    """A chat channel reached by POSTing JSON to a secret webhook URL."""

    def __init__(self, name: str, url: str, timeout: float) -> None:
        self.name = name
        self._url = url
        self._timeout = timeout
        self._payload = slack_payload if name == "slack" else teams_payload

    def accepts(self, message: Message) -> bool:
        return not message.customer and message.audience != TICKETING_AUDIENCE

    async def send(self, message: Message) -> str | None:
        """Slack's approval messages answer the digest of what they show (see `shown_digest`)."""
        payload = self._payload(message)
        response = await send_http("POST", self._url, timeout=self._timeout, json=payload)
        if LEGACY_CONNECTOR_PATH in self._url and response.text.strip() != "1":
            raise DeliveryFailed(f"the connector dropped it: {response.text[:300]}",
                                 status=response.status_code)
        return shown_digest(payload["blocks"]) if self.name == "slack" and message.buttons else None
