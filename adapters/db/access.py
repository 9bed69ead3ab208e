"""Access: API tokens (stored as hashes only), console sessions made from them, and the
links from a chat or ticketing identity to one of our users."""

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from adapters.db.audit import AuditLog
from adapters.db.database import Conn, Repository
from adapters.db.rows import TokenRow
from domain.models import ROLES
from domain.permissions import user_name_refusal


class IdentityTaken(Exception):
    """An external identity is linked to someone else and was not to be moved."""


@dataclass(frozen=True)
class Principal:
    """An authenticated caller of the relay."""

    user: str
    roles: frozenset[str]


@dataclass(frozen=True)
class ConsoleSession:
    """A signed-in console user; `csrf_token` must come back in every form they post."""

    session_id: int
    principal: Principal
    csrf_token: str


def hash_token(token: str) -> str:
    """Tokens are stored only as SHA-256: a leaked table grants nothing."""
    return hashlib.sha256(token.encode()).hexdigest()


FINGERPRINT_CHARS = 12
"""A token's fingerprint: its hash's first characters, named in refusals and audit rows."""


def token_fingerprint(token: str) -> str:
    return hash_token(token)[:FINGERPRINT_CHARS]


async def _one_spelling(conn: Conn, user: str) -> None:
    """Refuses a name that is not one spelling (`user_name_refusal`), unless tokens were made
    for it as spelled before the rule (its person keeps that spelling: tokens renewed, links
    made), and a name whose person has tokens under another spelling, revoked ones included
    (cases and approvals keep the old name: the two would be two people to them)."""
    cur = await conn.execute(
        "SELECT DISTINCT user_name FROM api_tokens WHERE lower(normalize(btrim(user_name), NFKC))"
        " = lower(normalize(btrim(%s), NFKC))", (user,))
    spellings = {str(r["user_name"]) for r in await cur.fetchall()}
    if (refusal := user_name_refusal(user)) and user not in spellings:
        raise ValueError(refusal)
    if others := sorted(spellings - {user}):
        raise ValueError(f"user {others[0]!r} has tokens: {user!r} would be a second identity "
                         "of the same person")


class AccessRepository(Repository):
    """Who may call: tokens, the console sessions made from them, linked identities."""

    async def create_token(self, user: str, roles: Sequence[str], token: str | None = None, *,
                           by: str, expires_in: timedelta | None = None) -> str:
        """Makes a bearer token; only its hash is stored, the plaintext is shown once. `by`
        is whoever made it (the audit names them and the token), `expires_in` an optional
        lifetime. A given `token` made before for the same person and roles is left as it is."""
        unknown = set(roles) - ROLES
        if unknown or not roles:
            raise ValueError(f"unknown roles {sorted(unknown)}; known: {sorted(ROLES)}")
        if expires_in is not None and expires_in <= timedelta(0):
            raise ValueError("a token's lifetime must be positive")
        plaintext = token or f"rfo_{secrets.token_urlsafe(32)}"
        hashed = hash_token(plaintext)
        async with self._db.transaction() as conn:
            await _one_spelling(conn, user)
            made = await (await conn.execute(
                "INSERT INTO api_tokens (user_name, roles, token_hash, expires_at)"
                " VALUES (%s, %s, %s, now() + %s) ON CONFLICT (token_hash) DO NOTHING RETURNING id",
                (user, sorted(set(roles)), hashed, expires_in))).fetchone()
            if made is None:  # the same plaintext again (the dev stack's admin token at each start)
                held = await (await conn.execute(
                    "SELECT user_name, roles FROM api_tokens WHERE token_hash = %s", (hashed,))).fetchone()
                if held is None or (held["user_name"], sorted(held["roles"])) != (user, sorted(set(roles))):
                    raise ValueError("that token is already issued to another user or with other roles")
                return plaintext  # made before: nothing new to record
            await AuditLog.append(conn, None, by, "token_created",
                                  {"user": user, "roles": sorted(set(roles)), "token_id": made["id"],
                                   "token_fingerprint": hashed[:FINGERPRINT_CHARS],
                                   "expires_in_seconds": expires_in.total_seconds() if expires_in else None})
        return plaintext

    async def authenticate(self, token: str) -> Principal | None:
        row = await self._db.fetch_one(
            "SELECT user_name, roles FROM live_api_tokens WHERE token_hash = %s",
            (hash_token(token),))
        return Principal(row["user_name"], frozenset(row["roles"])) if row else None

    async def tokens(self) -> list[TokenRow]:
        """Every token with its owner, roles and state; a short hash prefix tells tokens
        apart (it matches `token_fingerprint` in refusals) and never the secret itself."""
        rows = await self._db.fetch_all(
            "SELECT id, user_name, roles, created_at, revoked_at, expires_at,"
            " substr(token_hash, 1, %s) AS fingerprint FROM api_tokens ORDER BY id", (FINGERPRINT_CHARS,))
        return [TokenRow.from_row(row) for row in rows]

    async def revoke_tokens(self, *, by: str, token_id: int | None = None,
                            user: str | None = None) -> list[int]:
        """Revokes one token, or every token of a user; their console sessions end in the
        same transaction, so nothing made from them works a moment later."""
        if (token_id is None) == (user is None):
            raise ValueError("revoke either one token id or one user's tokens")
        async with self._db.transaction() as conn:
            cur = await conn.execute(
                "UPDATE api_tokens SET revoked_at = now() WHERE revoked_at IS NULL"
                " AND (id = %s OR user_name = %s) RETURNING id, user_name", (token_id, user))
            revoked = list(await cur.fetchall())
            ids = [int(r["id"]) for r in revoked]
            if ids:
                await conn.execute("UPDATE console_sessions SET ended_at = now()"
                                   " WHERE token_id = ANY(%s) AND ended_at IS NULL", (ids,))
                await AuditLog.append(conn, None, by, "token_revoked",
                                      {"token_ids": ids, "users": sorted({r["user_name"] for r in revoked})})
        return ids

    @staticmethod
    async def approvals_revoked_in(conn: Conn, chain: str, opened_by: str,
                                   deciding: Sequence[tuple[str, datetime]] = ()) -> list[str]:
        """Who granted an approval on `chain` since its round opened (its latest `opened_by`
        entry), or gives the `deciding` one (approver, when sealed) not yet written, with a
        token revoked since the verdict was sealed (in the caller's transaction): a token
        live then (made before it, not expired) and revoked since, so the approval may have
        been that token's (a stolen token, a person leaving), and the round that counted it
        cannot hear of a revocation. A verdict is judged as of its seal (`sealed_at`, when
        the relay read the approver's access), not of when the workflow took it: a verdict
        sealed before the revocation and taken after it counted (reproduced). One recorded
        without it (before seals carried it) as of its record. Which token gave an approval
        is not recorded: a person who replaced their token after approving is among them
        too (ops decide). None before the round opened."""
        recorded = await (await conn.execute(
            "SELECT a.approver, coalesce((e.detail->>'sealed_at')::timestamptz, a.occurred_at) AS given"
            " FROM case_approvals a JOIN audit_events e ON e.chain = a.chain AND e.seq = a.seq"
            " WHERE a.chain = %s AND a.action = 'approval_granted' AND a.occurred_at >= ("
            "  SELECT max(occurred_at) FROM audit_events WHERE chain = %s AND action = %s)",
            (chain, chain, opened_by))).fetchall()
        return await AccessRepository.revoked_since_given(
            conn, [(str(r["approver"]), r["given"]) for r in recorded] + list(deciding))

    @staticmethod
    async def revoked_since_given(conn: Conn, verdicts: Sequence[tuple[str, datetime]]) -> list[str]:
        """Who of the (approver, given at) `verdicts` had a token live then (made before it,
        not expired) and revoked since: the approval may have been that token's, so it counts
        no more (see `approvals_revoked_in`). Sorted, each once."""
        cur = await conn.execute(
            "SELECT DISTINCT v.approver FROM unnest(%s::text[], %s::timestamptz[]) AS v(approver, given)"
            " JOIN api_tokens t ON t.user_name = v.approver"
            " WHERE t.created_at <= v.given AND (t.expires_at IS NULL OR t.expires_at > v.given)"
            " AND t.revoked_at >= v.given ORDER BY v.approver",
            ([who for who, _ in verdicts], [when for _, when in verdicts]))
        return [str(r["approver"]) for r in await cur.fetchall()]

    async def approvals_revoked(self, chain: str, opened_by: str) -> list[str]:
        """`approvals_revoked_in`, on a connection of its own."""
        async with self._db.connection() as conn:
            return await self.approvals_revoked_in(conn, chain, opened_by)

    async def open_session(self, token: str, lifetime: timedelta) -> str | None:
        """Exchanges a valid API token for a console session; returns the session id (shown
        once, to be put in a cookie; only its hash is stored), None for a bad token."""
        session_id, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        async with self._db.transaction() as conn:
            cur = await conn.execute(
                "INSERT INTO console_sessions (session_hash, token_id, csrf_token, expires_at)"
                " SELECT %s, id, %s, now() + %s FROM live_api_tokens"
                " WHERE token_hash = %s RETURNING id, token_id",
                (hash_token(session_id), csrf, lifetime, hash_token(token)))
            made = await cur.fetchone()
            if made is None:
                return None
            cur = await conn.execute("SELECT user_name, roles FROM api_tokens WHERE id = %s",
                                     (made["token_id"],))
            owner = await cur.fetchone()
            assert owner is not None
            await AuditLog.append(conn, None, owner["user_name"], "console_signed_in",
                                  {"session": int(made["id"]), "token_id": int(made["token_id"])})
        return session_id

    async def session(self, session_id: str) -> ConsoleSession | None:
        """The live session behind a cookie: not ended, not expired, its token not revoked."""
        row = await self._db.fetch_one(
            "SELECT s.id, s.csrf_token, t.user_name, t.roles FROM console_sessions s"
            " JOIN live_api_tokens t ON t.id = s.token_id"
            " WHERE s.session_hash = %s AND s.ended_at IS NULL AND s.expires_at > now()",
            (hash_token(session_id),))
        if row is None:
            return None
        return ConsoleSession(int(row["id"]), Principal(row["user_name"], frozenset(row["roles"])),
                              row["csrf_token"])

    async def end_session(self, session: ConsoleSession, action: str = "console_signed_out") -> None:
        """Ends the session, audited under its person as `action` (signed out, or replaced
        by a sign-in on the same browser)."""
        async with self._db.transaction() as conn:
            await conn.execute("UPDATE console_sessions SET ended_at = now()"
                               " WHERE id = %s AND ended_at IS NULL", (session.session_id,))
            await AuditLog.append(conn, None, session.principal.user, action,
                                  {"session": session.session_id})

    async def link_identities(self, links: Sequence[tuple[str, str]], user: str, *, by: str = "admin",
                              replace: bool = False) -> dict[tuple[str, str], str | None]:
        """Links external identities (system, id) to a user, all or none, each audited as
        `by`; returns who each was linked to before. One linked to someone else is moved
        only with `replace` (the audit row names who it was), else IdentityTaken and nothing
        is linked."""
        previous: dict[tuple[str, str], str | None] = {}
        async with self._db.transaction() as conn:
            await _one_spelling(conn, user)
            for system, external_id in links:
                # insert first: a link another admin is making at once holds its row, and this
                # one then reads it (a read first found none and overwrote it on insert)
                made = await (await conn.execute(
                    "INSERT INTO identity_links (system, external_id, user_name) VALUES (%s,%s,%s)"
                    " ON CONFLICT (system, external_id) DO NOTHING RETURNING user_name",
                    (system, external_id, user))).fetchone()
                found = None if made else await (await conn.execute(
                    "SELECT user_name FROM identity_links WHERE system = %s AND external_id = %s FOR UPDATE",
                    (system, external_id))).fetchone()
                before = str(found["user_name"]) if found else None
                moved = before not in (None, user)
                if moved and not replace:
                    raise IdentityTaken(f"{system} {external_id} is linked to {before}; it approves as "
                                        "them. To move it to another person, add --replace")
                if moved:
                    await conn.execute("UPDATE identity_links SET user_name = %s"
                                       " WHERE system = %s AND external_id = %s", (user, system, external_id))
                await AuditLog.append(conn, None, by, "identity_linked",
                                      {"system": system, "external_id": external_id, "user": user,
                                       **({"previous_user": before} if moved else {})})
                previous[(system, external_id)] = before
        return previous

    async def link_identity(self, system: str, external_id: str, user: str) -> None:
        """One identity, as an admin (tests, benchmarks); see `link_identities`."""
        await self.link_identities([(system, external_id)], user)

    async def principal_for(self, system: str, external_id: str) -> Principal | None:
        """The linked user with the roles of their live tokens (neither revoked nor expired:
        the view every token lookup reads); None if unlinked or role-less."""
        row = await self._db.fetch_one(
            "SELECT l.user_name, array_agg(DISTINCT r) AS roles FROM identity_links l"
            " JOIN live_api_tokens t ON t.user_name = l.user_name,"
            " unnest(t.roles) AS r WHERE l.system = %s AND l.external_id = %s"
            " GROUP BY l.user_name", (system, external_id))
        return Principal(row["user_name"], frozenset(row["roles"])) if row else None
