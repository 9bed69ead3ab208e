"""Who holds a key: the payload codec encodes for ops and admin only (auditors decode, to
read histories), token creation is audited under whoever made the token, and a token may
carry an expiry after which neither the API nor a console session accepts it."""

import asyncio
import getpass
import uuid
from datetime import timedelta

import pytest

from adapters.db.access import IdentityTaken
from tests.harness import Stack
from tests.test_cli import run
from tests.test_console import console, refusals

PAYLOADS = {"payloads": [{"metadata": {"encoding": "anNvbi9wbGFpbg=="}, "data": "e30="}]}


async def test_only_ops_and_admin_encode_auditors_still_decode(stack: Stack) -> None:
    async with stack.api("olga") as ops:
        encoded = await ops.post("/codec/encode", json=PAYLOADS)
    assert encoded.status_code == 200, encoded.text
    async with stack.api("dave") as auditor:
        refused = await auditor.post("/codec/encode", json=PAYLOADS)
        decoded = await auditor.post("/codec/decode", json=encoded.json())
    assert refused.status_code == 403
    assert decoded.status_code == 200 and decoded.json() == PAYLOADS
    assert [r["actor"] for r in await refusals(stack, "", "access_refused")
            if r["detail"].get("action") == "encoding payloads"][-1:] == ["dave"]
    browser = await console(stack, "dave")
    try:
        assert (await browser.post("/console/codec/encode", json=PAYLOADS)).status_code == 403
    finally:
        await browser.aclose()


async def test_token_creation_is_audited_under_its_real_maker(stack: Stack, postgres_dsn: str) -> None:
    user = f"newcomer-{uuid.uuid4().hex[:6]}"
    made = await run("token", "create", "--user", user, "--roles", "requester",
                     env={"REFUNDS_DATABASE_URL": postgres_dsn})
    assert made.returncode == 0, made.stderr
    [created] = [r for r in await refusals(stack, "", "token_created") if r["detail"]["user"] == user]
    assert created["actor"] == f"cli:{getpass.getuser()}"


async def test_an_expired_token_is_refused_by_the_api_and_the_console(stack: Stack) -> None:
    user = f"temp-{uuid.uuid4().hex[:6]}"
    stack.tokens[user] = await stack.store.access.create_token(user, ["auditor"], by="test",
                                                               expires_in=timedelta(hours=1))
    async with stack.api(user) as api:
        assert (await api.post("/codec/decode", json=PAYLOADS)).status_code == 200
    browser = await console(stack, user)
    try:
        assert (await browser.get("/console/cases")).status_code == 200
        async with stack.store.database.transaction() as conn:  # an hour passes
            await conn.execute("UPDATE api_tokens SET expires_at = now() - interval '1 second'"
                               " WHERE user_name = %s", (user,))
        async with stack.api(user) as api:
            assert (await api.post("/codec/decode", json=PAYLOADS)).status_code == 401
        assert (await browser.get("/console/cases")).status_code == 303  # back to sign-in
    finally:
        await browser.aclose()
    listed = await stack.store.access.tokens()
    assert [t.expires_at is not None for t in listed if t.user_name == user] == [True]


async def test_one_person_has_one_spelling_so_approvals_count_them_once(
        stack: Stack, postgres_dsn: str) -> None:
    """Approvals compare user names exactly (the requester may not approve; one person
    counts once), so a second spelling of a person is refused wherever a name is granted:
    a token for `Alice` while alice requests would let her approve her own refund, and
    `bob`/`Bob` would fill two slots of a tier."""
    person = f"alice-{uuid.uuid4().hex[:6]}"
    for spelling in (person.capitalize(), f"{person} ", f"\uff41{person[1:]}", f"servicenow:{person}",
                     "workflow", ""):
        with pytest.raises(ValueError, match="user name"):
            await stack.store.access.create_token(spelling, ["approver"], by="test")
        with pytest.raises(ValueError, match="user name"):
            await stack.store.access.link_identities([("slack", f"U{uuid.uuid4().hex[:8]}")], spelling)
        refused = await run("token", "create", "--user", spelling, "--roles", "approver",
                            env={"REFUNDS_DATABASE_URL": postgres_dsn})
        assert refused.returncode == 2 and "user name" in refused.stderr and not refused.stdout, refused
    assert await stack.store.database.fetch_all(
        "SELECT user_name FROM api_tokens WHERE lower(user_name) LIKE %s", (f"%{person[1:]}%",)) == []
    # a name granted before names had one spelling keeps it (its tokens renewed, even once
    # all are revoked) and still bars its other spellings: cases and approvals hold the old one
    legacy = f"{person.upper()} "
    await stack.store.database.execute(
        "INSERT INTO api_tokens (user_name, roles, token_hash, revoked_at) VALUES (%s, %s, %s, now())",
        (legacy, ["requester"], uuid.uuid4().hex))
    for spelling in (person, person.capitalize()):
        with pytest.raises(ValueError, match=r"second identity|user name"):
            await stack.store.access.create_token(spelling, ["approver"], by="test")
        with pytest.raises(ValueError, match=r"second identity|user name"):
            await stack.store.access.link_identities([("slack", f"U{uuid.uuid4().hex[:8]}")], spelling)
    assert await stack.store.access.create_token(legacy, ["requester"], by="test")
    await stack.store.access.link_identities([("slack", f"U{uuid.uuid4().hex[:8]}")], legacy)
    assert await stack.store.access.create_token(f"{person}.smith@corp.example", ["approver"], by="test")


async def test_two_links_of_one_new_identity_at_once_move_it_only_with_replace(stack: Stack) -> None:
    """Two admins link the same new Slack id to two people at once: the second read "not
    linked" before the first committed, then overwrote it, so the id approved as the second
    person with no `previous_user` on record. The second finds it taken."""
    slack = f"U{uuid.uuid4().hex[:8]}"
    first, second = f"ann-{uuid.uuid4().hex[:6]}", f"ben-{uuid.uuid4().hex[:6]}"
    async with stack.store.database.transaction() as conn:  # the first admin's link, not yet committed
        await conn.execute("INSERT INTO identity_links (system, external_id, user_name) VALUES (%s,%s,%s)",
                           ("slack", slack, first))
        racing = asyncio.create_task(stack.store.access.link_identities([("slack", slack)], second))
        async with asyncio.timeout(60):  # a guard against a hang: it waits on the first link's row
            while not await stack.store.database.fetch_one(
                    "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND query LIKE '%%identity_links%%' AND pid <> pg_backend_pid()"):
                await asyncio.sleep(0.02)
        assert not racing.done()
    with pytest.raises(IdentityTaken, match=first):
        await racing
    held = await stack.store.database.fetch_one(
        "SELECT user_name FROM identity_links WHERE system = 'slack' AND external_id = %s", (slack,))
    assert held is not None and held["user_name"] == first


async def test_a_token_made_again_is_recorded_once_and_never_given_to_another(stack: Stack) -> None:
    """`refunds dev` makes its admin token at every start with the same plaintext: nothing new
    was inserted and a `token_created` row was written each time, naming no token. The row
    names the token (its id and fingerprint) and is written when one is made; the same
    plaintext asked for another person or other roles is refused (it would authenticate as
    the first)."""
    plaintext, user = f"t-{uuid.uuid4().hex}", f"ida-{uuid.uuid4().hex[:6]}"
    for _ in range(2):
        made_again = await stack.store.access.create_token(user, ["auditor"], token=plaintext, by="test")
        assert made_again == plaintext
    made = [e for e in await stack.store.audit.trail("")
            if e["action"] == "token_created" and e["detail"]["user"] == user]
    [token] = [t for t in await stack.store.access.tokens() if t.user_name == user]
    assert [(e["detail"]["token_id"], e["detail"]["token_fingerprint"]) for e in made] == [
        (token.id, token.fingerprint)]
    for other_user, roles in ((f"eve-{uuid.uuid4().hex[:6]}", ["auditor"]), (user, ["admin"])):
        with pytest.raises(ValueError, match="already"):
            await stack.store.access.create_token(other_user, roles, token=plaintext, by="test")
    principal = await stack.store.access.authenticate(plaintext)
    assert principal is not None and (principal.user, principal.roles) == (user, frozenset({"auditor"}))
