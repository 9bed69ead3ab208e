"""The `refunds` command line's verbs and options, each bound to the command it runs."""

import argparse
from collections.abc import Callable
from typing import Any, TypeAlias

import starters.cli.admin_commands as admin_commands
import starters.cli.api_commands as api_commands
import starters.cli.servers as servers


def _json_flag(parser: argparse.ArgumentParser) -> None:
    """Every list and show command takes --json (some print JSON anyway: then it is explicit)."""
    parser.add_argument("--json", action="store_true", help="print JSON (for scripts)")


Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def _show_command(parent: Subcommands, name: str, help: str, run: Callable[..., Any]) -> None:
    """A command that shows one case or payout: its id, and --json."""
    command = parent.add_parser(name, help=help)
    command.add_argument("id")
    _json_flag(command)
    command.set_defaults(run=run)


def _case_action(parent: Subcommands, name: str, help: str, run: Callable[..., Any],
                 choice: str, choices: list[str]) -> None:
    """A command a person takes on a case: its id, one choice (the first is the default)
    and the reason written to the audit trail."""
    command = parent.add_parser(name, help=help)
    command.add_argument("id")
    command.add_argument(choice, choices=choices, default=choices[0])
    command.add_argument("--reason", default="")
    command.set_defaults(run=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="refunds", description="Refund Orchestrator")
    parser.add_argument("--token", help="API token (default: $REFUNDS_TOKEN, then the dev admin token)")
    sub = parser.add_subparsers(dest="command", required=True)

    dev = sub.add_parser("dev", help="start the whole stack on the embedded default")
    dev.add_argument("--no-demo", action="store_true", help="do not play the demo at start")
    dev.add_argument("--expose", action="store_true",
                     help="serve on REFUNDS_BIND_HOST even when it is not this machine's loopback (the "
                          "dev stack has no auth on Temporal or the sandbox)")
    dev.set_defaults(run=servers.cmd_dev)
    sub.add_parser("demo", help="play the two worked examples against a running stack").set_defaults(
        run=servers.cmd_demo)
    sub.add_parser("worker", help="run a worker (production)").set_defaults(run=servers.cmd_worker)
    relay = sub.add_parser("relay", help="run the relay (production)")
    relay.add_argument("--forwarded-allow-ips", default=None, metavar="ADDRESSES",
                       help="proxies whose X-Forwarded-For/-Proto to trust: comma-separated addresses "
                       "or networks, or '*' (default: $FORWARDED_ALLOW_IPS, else loopback only)")
    relay.set_defaults(run=servers.cmd_relay)
    sub.add_parser("migrate", help="apply schema migrations").set_defaults(run=admin_commands.cmd_migrate)
    sub.add_parser("doctor", help="check configuration and connectivity; exit 0 when healthy").set_defaults(
        run=servers.cmd_doctor)

    token = sub.add_parser("token", help="API tokens").add_subparsers(dest="token_command", required=True)
    create = token.add_parser("create", help="create a token (printed once; stored hashed)")
    create.add_argument("--user", required=True)
    create.add_argument("--roles", required=True, help="comma-separated, e.g. requester,approver")
    create.add_argument("--expires-in", help="lifetime, e.g. 12h or 30d (default: until revoked)")
    create.set_defaults(run=admin_commands.cmd_token_create)
    listing = token.add_parser("list", help="list tokens (never their secrets)")
    listing.add_argument("--all", action="store_true", help="include revoked tokens")
    _json_flag(listing)
    listing.set_defaults(run=admin_commands.cmd_token_list)
    revoke = token.add_parser("revoke", help="revoke a token, or all of a user's; sessions end too")
    revoke.add_argument("id", nargs="?", type=int, help="token id (see token list)")
    revoke.add_argument("--user", help="revoke every token of this user")
    revoke.set_defaults(run=admin_commands.cmd_token_revoke)

    integrations = sub.add_parser("integrations", help="Slack and ServiceNow identities").add_subparsers(
        dest="integrations_command", required=True)
    link = integrations.add_parser(
        "link", help="act as USER for approvals from Slack or ServiceNow (roles come from USER's tokens)")
    link.add_argument("--user", required=True)
    link.add_argument("--slack", help="Slack user id, e.g. U0123ABC")
    link.add_argument("--servicenow", help="ServiceNow user_name")
    link.add_argument("--oidc", help="the Temporal UI's OIDC user claim (REFUNDS_OIDC_USER_CLAIM, e.g. sub)")
    link.add_argument("--replace", action="store_true",
                      help="move an identity already linked to someone else (audited with who it was)")
    link.set_defaults(run=admin_commands.cmd_integrations_link)

    request = sub.add_parser("request", help="request a refund")
    request.add_argument("--id", required=True, help="refund_request_id (your idempotency key)")
    request.add_argument("--charge", required=True)
    request.add_argument("--amount", required=True, help="major units, e.g. 30.00")
    request.add_argument("--currency", required=True)
    request.add_argument("--merchant", required=True, help="merchant account")
    request.add_argument("--reason", default="requested_by_customer")
    request.add_argument("--provider", default="sandbox")
    request.add_argument("--evidence", action="append", default=[], metavar="KEY=VALUE")
    request.set_defaults(run=api_commands.cmd_request)

    payouts = sub.add_parser("payouts", help="payouts the payments system made").add_subparsers(
        dest="payouts_command", required=True)
    register = payouts.add_parser("register", help="register a paid payout (idempotent on its id)")
    register.add_argument("--id", required=True, help="our payout id")
    register.add_argument("--provider", required=True)
    register.add_argument("--provider-payout-id", required=True, help="the provider's payout id")
    register.add_argument("--beneficiary", required=True, help="beneficiary id")
    register.add_argument("--amount", required=True, help="major units, e.g. 12500.00")
    register.add_argument("--currency", required=True)
    register.set_defaults(run=api_commands.cmd_payouts_register)
    payout_list = payouts.add_parser("list", help="the latest booked payouts")
    payout_list.add_argument("--limit", type=int, default=50)
    _json_flag(payout_list)
    payout_list.set_defaults(run=api_commands.cmd_payouts_list)
    _show_command(payouts, "show", "a payout and its exception case", api_commands.cmd_payouts_show)

    _case_action(sub, "approve", "approve or deny a refund", api_commands.cmd_approve,
                 "--decision", ["approve", "deny"])

    hooks = sub.add_parser("webhooks", help="webhook receipts: coverage, replay, re-drive").add_subparsers(
        dest="webhooks_command", required=True)
    coverage = hooks.add_parser("coverage",
                                help="event types per provider: arrived, handled, unknown, refused")
    _json_flag(coverage)
    coverage.set_defaults(run=api_commands.cmd_webhooks_coverage)
    replay = hooks.add_parser("replay", help="re-feed stored receipts through the webhook path")
    which = replay.add_mutually_exclusive_group(required=True)
    which.add_argument("--receipt", type=int, help="one receipt id")
    which.add_argument("--since", help="every delivery received since, ISO 8601 with offset")
    replay.set_defaults(run=api_commands.cmd_webhooks_replay)
    hooks.add_parser("redrive", help="re-drive accepted receipts that never reached their workflow"
                     ).set_defaults(run=api_commands.cmd_webhooks_redrive)

    _show_command(sub, "status", "show a refund case", api_commands.cmd_status)

    _case_action(sub, "reissue", "reissue a failed or canceled refund (ops)", api_commands.cmd_reissue,
                 "--method", ["provider", "bank_transfer"])

    reconcile = sub.add_parser("reconcile", help="backfill: cross-check a provider's refunds with cases "
                               "and the ledger (resumes an unfinished one)")
    reconcile.add_argument("--provider", required=True)
    reconcile.add_argument("--since", default="90d", help="refunds created this long ago or later, e.g. 90d")
    reconcile.add_argument("--until", help="window end, ISO 8601 with offset (default: now)")
    reconcile.add_argument("--no-progress", action="store_true", help="no progress bar")
    reconcile.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                           help="stop following (exit 1) when the run has not ended by then; it goes on")
    reconcile.set_defaults(run=api_commands.cmd_reconcile)

    audit = sub.add_parser("audit", help="the audit trail").add_subparsers(dest="audit_command",
                                                                          required=True)
    _show_command(audit, "show", "a case's timeline", api_commands.cmd_audit_show)
    audit.add_parser("verify", help="recompute every hash chain; exit 1 on tampering").set_defaults(
        run=admin_commands.cmd_audit_verify)

    policy = sub.add_parser("policy", help="policy files").add_subparsers(dest="policy_command",
                                                                         required=True)
    check = policy.add_parser("check", help="validate a policy file")
    check.add_argument("file")
    check.set_defaults(run=admin_commands.cmd_policy_check)
    simulate = policy.add_parser("simulate", help="re-decide past cases under a candidate policy")
    simulate.add_argument("file")
    simulate.add_argument("--since", default="90d", help="how far back, e.g. 90d, 12h")
    simulate.set_defaults(run=admin_commands.cmd_policy_simulate)
    return parser
