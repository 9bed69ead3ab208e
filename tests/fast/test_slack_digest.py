"""What a Slack approval message shows, as a digest kept at delivery and compared at a
click: Slack's echo of the message (its own keys added, `&<>` escaped in plain text) is
the same message; another text, an extra fact or an extra block is not."""

import copy
from typing import Any

from adapters.notify.chat import shown_digest

SENT: list[dict[str, Any]] = [
    {"type": "header", "text": {"type": "plain_text", "text": "Refund rr-1 needs approval"}},
    {"type": "section", "text": {"type": "mrkdwn", "text": "A refund of 90.00 USD &amp; more"},
     "fields": [{"type": "mrkdwn", "text": "*Amount*\n90.00 USD"}]},
    {"type": "actions", "block_id": "refund:7", "elements": [
        {"type": "button", "action_id": "refund_approve", "value": "rr-1",
         "text": {"type": "plain_text", "text": "Approve"}}]},
]


def test_slack_s_echo_of_the_message_is_the_message() -> None:
    echoed = copy.deepcopy(SENT)
    echoed[0]["block_id"] = "hdr1"
    echoed[0]["text"]["emoji"] = True
    echoed[1]["block_id"] = "sec1"
    echoed[1]["text"]["verbatim"] = False
    echoed[2]["elements"][0]["text"]["emoji"] = True
    echoed[2]["elements"][0]["block_id"] = "refund:7"
    assert shown_digest(echoed) == shown_digest(SENT)
    plain, escaped = copy.deepcopy(SENT), copy.deepcopy(SENT)
    plain[0]["text"]["text"] = "Refund <rr-1> & co"
    escaped[0]["text"]["text"] = "Refund &lt;rr-1&gt; &amp; co"  # Slack's echo of plain text
    assert shown_digest(escaped) == shown_digest(plain)


def test_another_text_fact_or_block_is_another_message() -> None:
    other_text, extra_fact, extra_block = (copy.deepcopy(SENT) for _ in range(3))
    other_text[1]["text"]["text"] = "A refund of 9.00 USD"
    extra_fact[1]["fields"].append({"type": "mrkdwn", "text": "*AI suggestion*\napprove"})
    extra_block.insert(2, {"type": "context", "elements": [{"type": "mrkdwn", "text": "verified"}]})
    digests = {shown_digest(m) for m in (SENT, other_text, extra_fact, extra_block)}
    assert len(digests) == 4


def test_the_buttons_and_anything_beside_a_text_are_what_the_message_shows() -> None:
    """Whoever holds the webhook's URL can post the notice's exact text with its own buttons:
    a red "Deny" that approves, a link elsewhere, an image beside the text. Each is another
    message (before, the digest read an actions block as the word "actions" alone)."""
    swapped, restyled, linked, beside = (copy.deepcopy(SENT) for _ in range(4))
    swapped[2]["elements"][0]["text"]["text"] = "Deny"
    restyled[2]["elements"][0]["style"] = "danger"
    linked[2]["elements"].append({"type": "button", "action_id": "refund_open", "url": "https://evil.example",
                                  "text": {"type": "plain_text", "text": "Open case"}})
    beside[1]["accessory"] = {"type": "image", "image_url": "https://evil.example/approved.png",
                              "alt_text": "approved"}
    digests = {shown_digest(m) for m in (SENT, swapped, restyled, linked, beside)}
    assert len(digests) == 5
