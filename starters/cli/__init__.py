"""`refunds`: the command line. Request, approve and status go through the relay's
HTTP API (same auth, same checks as every other entry point; `api_commands`); dev, worker
and relay start servers (`servers`); migrate and token talk to PostgreSQL directly
(`admin_commands`); doctor checks the configuration and every dependency. The verbs and
their options are in `parser`; this module runs one and turns its failure into a line.

Exit codes: 0 ok, 1 refused by the API (or a check found a problem), 2 usage (bad
arguments or input), 3 the stack cannot be reached or started (relay, PostgreSQL, Temporal,
a port in use, the embedded extra missing, a database without migrations). Results go to
stdout (`--json` on list and show commands for scripts); errors and refusals go to stderr.
Only `refunds migrate` (and `refunds dev`) apply migrations.

Every command ends with os._exit after flushing, because temporalio's native runtime can
crash at interpreter exit in short-lived processes (sdk-python #300).
"""

import contextlib
import os
import sys
import traceback
from collections.abc import Sequence

import httpx
import psycopg
from psycopg_pool import PoolTimeout
from pydantic import ValidationError

from adapters import event_loop
from adapters.config import Settings
from adapters.health import DatabaseNotReady
from starters.cli.common import EXIT_OK, EXIT_REFUSED, EXIT_UNREACHABLE, EXIT_USAGE, CommandFailed
from starters.cli.parser import build_parser
from starters.ports import StackUnavailable


def failure(exc: BaseException, settings: Settings | None) -> tuple[str, int]:
    """The one line and exit code for an exception that ends a command."""
    if isinstance(exc, CommandFailed):
        return str(exc), exc.code
    if isinstance(exc, StackUnavailable | DatabaseNotReady):
        return str(exc), EXIT_UNREACHABLE
    if isinstance(exc, httpx.HTTPStatusError):
        status = exc.response.status_code
        return (f"the relay answered {status} to {exc.request.method} {exc.request.url.path}: "
                f"{exc.response.text[:300]}", EXIT_UNREACHABLE if status >= 500 else EXIT_REFUSED)
    if isinstance(exc, httpx.TransportError):
        relay = settings.relay_base_url() if settings else "the relay"
        return f"cannot reach the relay at {relay} ({exc or type(exc).__name__}): is it running? " \
               "REFUNDS_RELAY_URL points elsewhere", EXIT_UNREACHABLE
    if isinstance(exc, psycopg.OperationalError | PoolTimeout):
        return f"cannot reach PostgreSQL ({exc}): check REFUNDS_DATABASE_URL", EXIT_UNREACHABLE
    if isinstance(exc, RuntimeError) and str(exc).startswith("Failed client connect"):  # temporalio's words
        return f"cannot reach Temporal ({exc}): check TEMPORAL_ADDRESS", EXIT_UNREACHABLE
    if isinstance(exc, SystemExit) and exc.code in (None, 0):
        return "", EXIT_OK
    if isinstance(exc, ValidationError):  # its own text quotes what it was given: secrets too
        errors = exc.errors(include_url=False, include_input=False, include_context=False)
        return "settings refused: " + "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'settings'}: {error['msg']}"
            for error in errors), EXIT_USAGE
    if isinstance(exc, RuntimeError | psycopg.Error):  # a defect, not the user's input: the trace helps
        with contextlib.suppress(OSError):
            traceback.print_exception(exc)
        return str(exc), EXIT_REFUSED
    return str(exc), EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    code = 1
    settings: Settings | None = None
    try:
        settings = Settings()
        code = event_loop.run(args.run(args, settings))
    except KeyboardInterrupt:
        code = 130
    except (CommandFailed, RuntimeError, httpx.HTTPError, psycopg.Error, PoolTimeout,
            ValueError, OSError, SystemExit) as exc:
        message, code = failure(exc, settings)
        if message:
            _tell(f"error: {message}")
    except Exception as exc:  # a defect: its trace, and still the clean exit below (sdk-python #300)
        with contextlib.suppress(OSError):
            traceback.print_exception(exc)
        _tell(f"error: {type(exc).__name__}: {exc}")
        code = EXIT_REFUSED
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError):
                stream.flush()
    os._exit(code)


def _tell(line: str) -> None:
    """A line on stderr, if it can still be written: a closed terminal (SIGHUP) or a reader
    gone (a broken pipe) must not skip the clean exit after it."""
    with contextlib.suppress(OSError):
        print(line, file=sys.stderr)
