"""What every command shares: exit codes, the one-line failure, the API token, the
database (configured, else the dev stack's embedded PostgreSQL)."""

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from adapters.config import Settings
from adapters.net import is_loopback

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_PENDING = 0, 1, 2, 3, 4
DEV_INSTALL = "a development install (from a checkout: pip install -e '.[embedded]')"


class CommandFailed(Exception):
    """Ends a command with a one-line message on stderr and one of the exit codes above."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def api_token(args: argparse.Namespace, settings: Settings) -> str:
    """--token, else REFUNDS_TOKEN; the dev stack's admin token only when neither is given
    at all (a variable set empty is a script whose secret is missing, not a wish to act as
    admin) and the relay is this machine's (the dev stack's): never against another relay."""
    given = os.environ.get("REFUNDS_TOKEN")
    token = args.token or given
    if token:
        return str(token)
    secrets_file = Path(settings.data_dir) / "dev-secrets.json"
    dev_stack = _this_machine(settings.relay_base_url()) and secrets_file.exists()
    if args.token is None and given is None and dev_stack:
        return str(json.loads(secrets_file.read_text())["admin_token"])
    raise CommandFailed("no token: pass --token or set REFUNDS_TOKEN", EXIT_USAGE)


def _this_machine(url: str) -> bool:
    """The relay's address is this machine's: a loopback address, or an unspecified one (a
    dev stack bound to 0.0.0.0, its image's default, is reached on this machine too)."""
    host = httpx.URL(url).host
    try:
        unspecified = ipaddress.ip_address(host).is_unspecified
    except ValueError:
        unspecified = False
    return is_loopback(host) or unspecified


def print_json(value: Any) -> int:
    print(json.dumps(value, indent=2, default=str))
    return EXIT_OK


async def open_database(settings: Settings) -> tuple[str, Any]:
    """The configured DSN, or the embedded PostgreSQL in the data folder."""
    if settings.database_url is not None:
        return settings.database_url.get_secret_value(), None
    with needs_dev_install("the embedded PostgreSQL (REFUNDS_DATABASE_URL is not set)"):
        from starters.dev.stack import EmbeddedPostgres

    pg = EmbeddedPostgres(Path(settings.data_dir) / "pg")
    return await asyncio.to_thread(pg.start), pg


@contextlib.contextmanager
def needs_dev_install(what: str) -> Iterator[None]:
    """The dev stack (`starters.dev`) is left out of the production wheel: importing it there
    ends the command with one line that says so, instead of a traceback."""
    try:
        yield
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("starters.dev"):
            raise
        raise CommandFailed(f"{what} needs the dev stack, which only {DEV_INSTALL} has; a "
                            "production install runs `refunds relay` and `refunds worker`",
                            EXIT_UNREACHABLE) from None
