"""Signature headers and secret lists, read the one way the signer means them: a header
is parsed once (Stripe's way for Stripe's scheme) and the signature and the window use
the same timestamp; a secret list never holds an empty key. Pure checks, no stack."""

import hashlib
import hmac
import time

import pytest
import stripe
from pydantic import SecretStr, ValidationError

from adapters import signing
from adapters.config import Settings, secret_list
from adapters.providers.base import WebhookRejected
from adapters.providers.cashfree import CashfreeVerifier
from adapters.providers.rainforest import SvixVerifier
from adapters.providers.signing import StripeSchemeVerifier

SECRET = "whsec_test"
BODY = b'{"id": "evt_1", "type": "refund.updated"}'
ARABIC_DIGITS = "\u0661\u0667" + "\u0660" * 8
"""1700000000 in Arabic-Indic digits: `int()` reads it, a signer never writes it."""


def v1(body: bytes, at: int, secret: str = SECRET) -> str:
    return hmac.new(secret.encode(), f"{at}.".encode() + body, hashlib.sha256).hexdigest()


def verdict(verifier: StripeSchemeVerifier, header: str, now: float) -> str:
    try:
        verifier.verify({"stripe-signature": header}, BODY, now)
    except WebhookRejected as exc:
        return exc.verdict
    return "accepted"


def test_a_stripe_header_with_two_timestamps_is_checked_against_the_one_it_was_signed_with() -> None:
    """Stripe's parser takes the first item named exactly `t`; a signature made long ago
    must not pass the window with a fresh `t` put in front of it."""
    now = int(time.time())
    old = now - 3600
    verifier = StripeSchemeVerifier([SECRET])
    smuggled = f"v1={v1(BODY, old)}, t={now},t={old}"
    stripe.WebhookSignature.verify_header(BODY, smuggled, SECRET)  # Stripe reads t=<old>: valid
    assert verdict(verifier, smuggled, now) == "stale"
    assert verdict(verifier, f"t={old},v1={v1(BODY, old)},t={now}", now) == "stale"
    assert verdict(verifier, f"t={now},v1={v1(BODY, now)}", now) == "accepted"


@pytest.mark.parametrize(("header", "expected"), [
    ("t={at}=x,v1={sig}", "accepted"),  # Stripe reads t={at}: the signed time, in the window
    ("t={ancient}=x,v1={old_sig}", "stale"),  # today int("<ancient>=x") was a 500
    ("t=,v1={sig}", "bad_signature"), ("t={at},v1=\u00e9{sig}", "bad_signature"),
    ("v1={sig}", "bad_signature"), ("t=\uff11\uff12,v1={sig}", "bad_signature"),
    (",,,=", "bad_signature")])
def test_a_stripe_header_is_read_as_stripe_reads_it_and_never_crashes(header: str, expected: str) -> None:
    now = int(time.time())
    at, ancient = now - 10, now - 3600
    value = header.format(at=at, ancient=ancient, sig=v1(BODY, at), old_sig=v1(BODY, ancient))
    assert verdict(StripeSchemeVerifier([SECRET]), value, now) == expected


def test_a_stripe_header_whose_signed_time_is_far_away_is_stale_either_way() -> None:
    now = int(time.time())
    for at in (now - 301, now + 301, 253402300800):
        assert verdict(StripeSchemeVerifier([SECRET]), f"t={at},v1={v1(BODY, at)}", now) == "stale"


@pytest.mark.parametrize("stamp", ["253402300800", "99999999999999999999", "-1", ARABIC_DIGITS,
                                   "1_700_000_000", " 1700000000"])
def test_a_svix_timestamp_out_of_range_or_not_ascii_digits_is_refused(stamp: str) -> None:
    verifier = SvixVerifier(["whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"])
    headers = {"svix-id": "msg_1", "svix-timestamp": stamp, "svix-signature": "v1,AAAA"}
    with pytest.raises(WebhookRejected) as refused:
        verifier.verify(headers, BODY, time.time())
    assert refused.value.verdict == "bad_signature"


@pytest.mark.parametrize("stamp", ["\u00b2", ARABIC_DIGITS + "000",
                                   "\U0001d7cf\U0001d7d5\U0001d7ce\U0001d7ce"])
def test_a_cashfree_timestamp_of_unicode_digits_is_refused(stamp: str) -> None:
    headers = {"x-webhook-signature": "c2ln", "x-webhook-timestamp": stamp}
    with pytest.raises(WebhookRejected) as refused:
        CashfreeVerifier(["cf-secret"]).verify(headers, BODY, time.time())
    assert refused.value.verdict == "bad_signature"


@pytest.mark.parametrize("stamp", [ARABIC_DIGITS, "1_700_000_000", "99999999999999999999999"])
def test_an_integration_timestamp_that_is_not_plain_unix_seconds_is_refused(stamp: str) -> None:
    with pytest.raises(WebhookRejected) as refused:
        signing.verify("slack", signature_header=signing.signature("slack", "s1", stamp, BODY),
                       timestamp_header=stamp, body=BODY, secrets=["s1"], now=time.time(),
                       tolerance_seconds=300)
    assert refused.value.verdict in {"bad_signature", "stale"}


# -- secret lists --------------------------------------------------------------------------

SECRET_SETTINGS = ("slack_signing_secret", "servicenow_inbound_secret", "sandbox_webhook_secret",
                   "stripe_webhook_secret", "rainforest_webhook_secret", "cashfree_webhook_secret",
                   "adyen_hmac_keys")


@pytest.mark.parametrize("value", ["s1,", ",s1", " s1 , ,", "s1,,"])
def test_a_secret_list_drops_empty_entries(value: str) -> None:
    assert secret_list(SecretStr(value)) == ["s1"]
    assert secret_list(SecretStr("s1, s2")) == ["s1", "s2"]


@pytest.mark.parametrize("name", SECRET_SETTINGS)
@pytest.mark.parametrize("value", ["", ",", " , ", "\t,\n"])
def test_an_all_empty_secret_list_refuses_to_start(name: str, value: str) -> None:
    with pytest.raises(ValidationError, match="empty"):
        Settings.model_validate({name: value})


def test_a_slack_secret_with_a_trailing_comma_does_not_accept_a_signature_made_without_a_key() -> None:
    """`s1,` once meant the secrets `s1` and ``: anyone could sign with the empty key."""
    settings = Settings(slack_signing_secret="s1,")
    assert settings.slack_signing_secret is not None
    stamp = str(int(time.time()))
    forged = signing.signature("slack", "", stamp, BODY)
    with pytest.raises(WebhookRejected) as refused:
        signing.verify("slack", signature_header=forged, timestamp_header=stamp, body=BODY,
                       secrets=secret_list(settings.slack_signing_secret), now=time.time(),
                       tolerance_seconds=300)
    assert refused.value.verdict == "bad_signature"
