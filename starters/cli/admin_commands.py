"""The commands that talk to PostgreSQL directly: migrations, API tokens, linked identities,
the audit chain's verification and policy files. Only `refunds migrate` (and `refunds dev`)
apply migrations."""

import argparse
import contextlib
import dataclasses
import getpass
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from adapters.config import Settings
from domain.permissions import ROLES, unknown_roles
from starters.ages import parse_age
from starters.cli.common import (
    EXIT_USAGE,
    CommandFailed,
    open_database,
    print_json,
)

if TYPE_CHECKING:
    from adapters.db import Store


async def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    """Migrates as the schema owner (REFUNDS_MIGRATION_DATABASE_URL, else the one DSN) and
    grants the runtime role what relay and worker need."""
    from adapters.db import Store

    if settings.migration_database_url is not None:
        dsn, pg = settings.migration_database_url.get_secret_value(), None
    else:
        dsn, pg = await open_database(settings)
    runtime_role = settings.runtime_role_name()
    try:
        store = await Store.open(dsn)
        try:
            applied = await store.database.migrate(runtime_role)
        except ValueError as refused:
            print(f"refused: {refused}", file=sys.stderr)
            return 1
        finally:
            await store.close()
        print("applied: " + (", ".join(applied) if applied else "nothing (up to date)"))
        if runtime_role is not None:
            print(f"runtime role {runtime_role}: granted")
    finally:
        if pg is not None:
            pg.stop()
    return 0


@contextlib.asynccontextmanager
async def opened_store(settings: Settings) -> AsyncIterator["Store"]:
    """The store on the configured or embedded PostgreSQL (stopped afterwards). Every command
    but `migrate` refuses a database that lacks migrations instead of changing its schema:
    which database a shell points at is easy to get wrong."""
    from adapters.db import Store
    from adapters.health import require_migrated

    dsn, pg = await open_database(settings)
    try:
        store = await Store.open(dsn)
        try:
            await require_migrated(store)
            yield store
        finally:
            await store.close()
    finally:
        if pg is not None:
            pg.stop()


async def cmd_token_create(args: argparse.Namespace, settings: Settings) -> int:
    """The audit names who made the token: this machine's user, as `token revoke` does. Roles
    the permission table does not name are a usage error, before any database is opened."""
    roles = [r.strip() for r in args.roles.split(",") if r.strip()]
    if unknown := unknown_roles(roles):
        raise CommandFailed(f"unknown roles {unknown}; known: {sorted(ROLES)}", EXIT_USAGE)
    async with opened_store(settings) as store:
        try:
            token = await store.access.create_token(
                args.user, roles, by=f"cli:{getpass.getuser()}",
                expires_in=parse_age(args.expires_in) if args.expires_in else None)
        except ValueError as refused:
            raise CommandFailed(str(refused), EXIT_USAGE) from None
    print(token)
    return 0


async def cmd_token_list(args: argparse.Namespace, settings: Settings) -> int:
    async with opened_store(settings) as store:
        tokens = [t for t in await store.access.tokens() if args.all or t.revoked_at is None]
    if args.json:
        return print_json([dataclasses.asdict(t) for t in tokens])
    print(f"{'id':>5}  {'user':<20} {'roles':<36} {'fingerprint':<12}  {'created':<16}  "
          f"{'revoked':<16}  expires")
    for t in tokens:
        revoked, expires = (f"{at:%Y-%m-%d %H:%M}" if at else "-" for at in (t.revoked_at, t.expires_at))
        print(f"{t.id:>5}  {t.user_name:<20} {','.join(t.roles):<36} {t.fingerprint:<12}  "
              f"{t.created_at:%Y-%m-%d %H:%M}  {revoked:<16}  {expires}")
    return 0


async def cmd_token_revoke(args: argparse.Namespace, settings: Settings) -> int:
    """Revoked at once: the relay and console look every token up on every request."""
    if (args.id is None) == (args.user is None):
        raise CommandFailed("give a token id or --user, not both", EXIT_USAGE)
    async with opened_store(settings) as store:
        ids = await store.access.revoke_tokens(by=f"cli:{getpass.getuser()}", token_id=args.id,
                                               user=args.user)
    if not ids:
        print("no active token matched", file=sys.stderr)
        return 1
    print(f"revoked token{'s' if len(ids) > 1 else ''} {', '.join(map(str, ids))}")
    return 0


async def cmd_integrations_link(args: argparse.Namespace, settings: Settings) -> int:

    links = [(system, external) for system, external in (("slack", args.slack),
                                                         ("servicenow", args.servicenow),
                                                         ("oidc", args.oidc)) if external]
    if not links:
        raise CommandFailed("name at least one identity: --slack USER_ID, --servicenow USER_NAME or "
                            "--oidc VALUE", EXIT_USAGE)
    from adapters.db.access import IdentityTaken

    async with opened_store(settings) as store:
        try:
            previous = await store.access.link_identities(links, args.user, replace=args.replace,
                                                          by=f"cli:{getpass.getuser()}")
        except (IdentityTaken, ValueError) as taken:
            raise CommandFailed(str(taken), EXIT_USAGE) from None
    for (system, external), before in previous.items():
        print(f"{system} {external} -> {args.user}" + (f" (was {before})" if before not in (None, args.user)
                                                       else ""))
    return 0


LAPSES_SHOWN = 20
"""Chains named one by one when the checkpointer lapsed (every chain written since is one)."""


async def cmd_audit_verify(args: argparse.Namespace, settings: Settings) -> int:
    from adapters.audit_checkpoints import checkpoint_book

    try:
        book = checkpoint_book(settings.audit_checkpoint_dir, settings.audit_checkpoint_keys)
    except ValueError as missing:
        raise CommandFailed(str(missing), EXIT_USAGE) from None
    if book is not None and not book.folder.is_dir():  # a wrong path must not pass as "no checkpoints"
        raise CommandFailed(f"audit checkpoint folder {book.folder} does not exist", EXIT_USAGE)
    points, problems = book.read() if book is not None else ({}, [])
    # three rounds of the checkpointer (the workers' REFUNDS_AUDIT_CHECKPOINT_SECONDS), and a
    # fourth for a round's own length and the hosts' clocks: a row older than that is in a
    # checkpoint, or the checkpointer has stopped and a cut of it could not be told
    written_before = datetime.now(UTC) - timedelta(seconds=4 * settings.audit_checkpoint_seconds)
    async with opened_store(settings) as store:
        checked, chain_problems = await store.audit.verify(points)
        lapsed = await store.audit.uncheckpointed(points, written_before) if book is not None else []
    problems += chain_problems
    for problem in problems:
        print(f"TAMPERED: {problem}")
    for chain, seq, at in lapsed[:LAPSES_SHOWN]:
        print(f"NOT CHECKPOINTED: chain {chain or '(global)'} up to seq {seq} (written {at:%Y-%m-%d %H:%M:%S}"
              " UTC): in no checkpoint, so a cut of it cannot be told")
    if len(lapsed) > LAPSES_SHOWN:
        print(f"NOT CHECKPOINTED: {len(lapsed) - LAPSES_SHOWN} more chains")
    if book is None:
        print("no audit checkpoints (REFUNDS_AUDIT_CHECKPOINT_DIR unset): a cut tail with a rewound "
              "head cannot be detected", file=sys.stderr)
    else:
        print(f"checked against {book.count()} checkpoints in {book.folder}")
        if lapsed:
            print(f"{len(lapsed)} chains have rows older than {written_before:%Y-%m-%d %H:%M:%S} UTC in no "
                  "checkpoint: is the worker's checkpointer running, and can it write the folder?",
                  file=sys.stderr)
    print(f"{checked} audit rows checked, {len(problems)} problems, {len(lapsed)} chains not checkpointed")
    return 1 if problems or lapsed else 0



async def cmd_policy_check(args: argparse.Namespace, settings: Settings) -> int:
    from adapters.policy_file import load_policy

    policy = load_policy(Path(args.file))
    print(f"{args.file}: valid, version {policy.version}, hash {policy.fingerprint()}")
    for tier in policy.refunds.tiers:
        needs = ", ".join(f"{r.count}x {r.role}" for r in tier.approvals)
        print(f"  refund tier {tier.name}: up to {tier.max_amount or 'any amount'}: {needs}")
    return 0


async def cmd_policy_simulate(args: argparse.Namespace, settings: Settings) -> int:
    from adapters.db import request_from_row
    from adapters.policy_file import load_policy
    from domain.models import PolicyDecision
    from domain.policy import decide

    candidate = load_policy(Path(args.file))
    since = datetime.now(UTC) - parse_age(args.since)
    async with opened_store(settings) as store:
        rows = await store.cases.decisions_since(since)
    changed = 0
    for row in rows:
        before = PolicyDecision.model_validate(row["decision"])
        after = decide(candidate, request_from_row(row), before.context)
        if (before.auto_approve, before.tier) != (after.auto_approve, after.tier):
            changed += 1
            print(f"{row['refund_request_id']}: {before.tier or 'auto'} -> {after.tier or 'auto'}"
                  f"  ({', '.join(after.rules_fired)})")
    print(f"{len(rows)} decisions since {since:%Y-%m-%d %H:%M}, {changed} would change "
          f"under version {candidate.version}")
    return 0
