"""Settings from the environment (`REFUNDS_*`, plus Temporal's own `TEMPORAL_*`).

Only addresses, credentials and durations change between the embedded default and
production; nothing here has a secret as its default.
"""

import re
from datetime import timedelta
from pathlib import Path
from typing import Literal

import psycopg
from psycopg.conninfo import conninfo_to_dict
from pydantic import AliasChoices, Field, IPvAnyNetwork, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from domain.models import RefundTimings
from domain.reconciliation import ReconcileOptions


def connection_parts(dsn: str, setting: str) -> dict[str, object]:
    """The parts of a PostgreSQL connection string; one psycopg cannot read is refused
    without its text (psycopg quotes the token it stopped at: a password, often)."""
    try:
        return dict(conninfo_to_dict(dsn))
    except psycopg.ProgrammingError:
        raise ValueError(f"{setting} is not a connection string PostgreSQL reads (not shown: it may "
                         "hold a password; percent-encode special characters in a URL's password)") from None


def _seconds(value: float | None) -> timedelta | None:
    return None if value is None else timedelta(seconds=value)


def comma_list(value: str | None) -> list[str]:
    """A comma-separated setting's entries, stripped, empty ones dropped (unset: none)."""
    return [v.strip() for v in (value or "").split(",") if v.strip()]


def secret_list(secret: SecretStr) -> list[str]:
    """Comma-separated secrets (the new one and the old ones during a rotation), stripped,
    empty entries dropped: `s1,` is one secret, never `s1` and an empty HMAC key that
    anyone can sign with. The one parser of every secret list below."""
    values = [s.strip() for s in secret.get_secret_value().split(",") if s.strip()]
    if not values:
        raise ValueError("a secret list setting is empty (only commas or blanks)")
    return values


SECRET_LISTS = ("sandbox_webhook_secret", "stripe_webhook_secret", "rainforest_webhook_secret",
                "cashfree_webhook_secret", "adyen_hmac_keys", "slack_signing_secret",
                "servicenow_inbound_secret", "approval_keys",
                "metrics_token")
"""Settings that hold comma-separated secret lists: set to nothing usable, they refuse to start."""


class Settings(BaseSettings):
    """Every knob of the product; unset addresses mean 'start the embedded one'."""

    # An empty variable is an unset one: deploy files list every setting, and a provider
    # left empty there is off, as if absent.
    model_config = SettingsConfigDict(env_prefix="REFUNDS_", extra="ignore", env_ignore_empty=True)

    data_dir: Path = Path(".data")
    bind_host: str = "127.0.0.1"
    relay_port: int = 8000
    sandbox_port: int = 8010
    temporal_port: int = 7233
    temporal_ui_port: int = 8233

    temporal_address: str | None = Field(
        default=None, validation_alias=AliasChoices("TEMPORAL_ADDRESS", "REFUNDS_TEMPORAL_ADDRESS")
    )
    temporal_namespace: str = Field(
        default="default",
        validation_alias=AliasChoices("TEMPORAL_NAMESPACE", "REFUNDS_TEMPORAL_NAMESPACE"),
    )
    temporal_ui_url: str | None = Field(
        default=None, description="Temporal UI base the console links case histories to")
    task_queue: str = "refunds"
    database_url: SecretStr | None = None

    relay_url: str | None = None
    sandbox_api_base: str | None = None
    sandbox_webhook_secret: SecretStr | None = None
    sandbox_api_key: SecretStr | None = None

    policy_file: Path | None = None

    payload_keys: SecretStr | None = Field(
        default=None, description="'kid:base64key,…' for the payload codec; the first seals, all open")
    codec_cors_origins: list[str] = Field(
        default_factory=list, description="browser origins (the Temporal UI) allowed to call /codec")

    graceful_shutdown_seconds: float = 30
    # Worker tuning for many open cases (issue 21). A case waiting for people holds no worker
    # slot; the cache only saves the replay of its history when it moves again. Workflow-task
    # slots and the sticky timeout differ from the SDK's (100, 10 s): a Python worker runs its
    # activations one at a time, so more slots only let tasks time out inside it, and a short
    # sticky timeout sends a busy worker's waiting tasks back to it for a replay
    # (docs/ARCHITECTURE.md, "Worker tuning"; measured in docs/BENCHMARKS.md, section 4).
    worker_max_cached_workflows: int = Field(
        default=1000, ge=0, description="workflows kept in the worker's memory (sticky); the others "
                                        "are replayed from their history when they move")
    worker_max_concurrent_workflow_tasks: int = Field(
        default=10, ge=2, description="workflow tasks the worker runs at once")
    worker_max_concurrent_activities: int = Field(
        default=100, ge=1, description="activities (provider calls, deliveries) the worker runs at once")
    worker_max_concurrent_local_activities: int = Field(
        default=100, ge=1, description="local activities (the case's database writes) run at once")
    worker_sticky_queue_timeout_seconds: float = Field(
        default=60, gt=0, description="how long a workflow task waits for the worker that caches "
                                      "its workflow before any worker takes it (and replays)")
    worker_health_port: int = Field(default=8001, description="worker /healthz, /readyz, /metrics; 0: off")
    temporal_metrics_port: int = Field(default=8002, description="worker's Temporal SDK metrics; 0: off")
    log_format: Literal["json", "text"] = "json"
    log_level: str = "INFO"

    # Stripe takes Stripe's own variable names too; the secret may list several (rotation).
    stripe_api_base: str | None = Field(
        default=None, validation_alias=AliasChoices("STRIPE_API_BASE", "REFUNDS_STRIPE_API_BASE"))
    stripe_api_key: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("STRIPE_API_KEY", "REFUNDS_STRIPE_API_KEY"))
    stripe_webhook_secret: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("STRIPE_WEBHOOK_SECRET", "REFUNDS_STRIPE_WEBHOOK_SECRET"))
    stripe_merchant_account: str | None = Field(
        default=None, description="the merchant account our charges belong to; default: GET /v1/account. "
                                  "A Connect endpoint's event naming another `account` is foreign_account")
    rainforest_webhook_secret: SecretStr | None = Field(
        default=None, description="Svix-style `whsec_…` signing secret(s), comma-separated")
    cashfree_webhook_secret: SecretStr | None = Field(
        default=None, description="Cashfree client secret(s) that sign webhooks, comma-separated")
    rainforest_api_base: str | None = Field(
        default=None, description="Rainforest API base, e.g. https://api.sandbox.rainforestpay.com; "
                                  "unset: webhooks only")
    rainforest_api_key: SecretStr | None = Field(default=None, description="Rainforest API key (Bearer)")
    rainforest_merchant_ids: str | None = Field(
        default=None, description=(
            "the Rainforest merchants this deployment serves, comma-separated: a platform's webhooks "
            "and API key cover every merchant on it, and another merchant's events are stored "
            "(`foreign_account`) and act on nothing, its payins are no charge of ours and a refund "
            "on it is never sent. Unset: every merchant"))
    cashfree_api_base: str | None = Field(
        default=None, description="Cashfree PG API base, e.g. https://sandbox.cashfree.com/pg; "
                                  "unset: webhooks only")
    cashfree_client_id: str | None = Field(
        default=None, description="Cashfree x-client-id (the app id: public, unlike its secret)")
    cashfree_client_secret: SecretStr | None = Field(default=None, description="Cashfree x-client-secret")
    cashfree_merchant_account: str | None = Field(
        default=None, description="the merchant account Cashfree orders belong to; default: the client id")
    adyen_hmac_keys: SecretStr | None = Field(
        default=None, description="Adyen webhook HMAC key(s) in hex, comma-separated (rotation)")
    adyen_api_base: str | None = Field(
        default=None, description="Adyen Checkout API base, e.g. https://checkout-test.adyen.com")
    adyen_api_key: SecretStr | None = Field(default=None, description="Adyen API key (X-API-Key)")
    adyen_merchant_accounts: str | None = Field(
        default=None, description=(
            "the Adyen merchant accounts this deployment serves (payment and payout accounts), "
            "comma-separated: a company-level "
            "webhook's one HMAC key signs every account's notifications, and those of another "
            "account are stored (`foreign_account`) and act on nothing; a refund on another account "
            "is never sent. Unset: every account the HMAC key signs"))
    adyen_auto_capture: bool = Field(
        default=False, description="the merchant account captures automatically (Adyen's default, "
                                   "which sends no CAPTURE notification): a successful AUTHORISATION "
                                   "counts as captured")

    console_session_hours: float = 12
    console_secure_cookie: bool = Field(
        default=True, description="Secure flag on the console session cookie; the loopback-only "
                                  "dev stack and tests turn it off (plain http)")

    notice_dispatch_seconds: float = Field(default=1, description="how long the worker's notice "
                                           "dispatcher waits after finding nothing to deliver; 0: off "
                                           "(only when another worker of the task queue dispatches)")
    outbox_sweep_seconds: float = Field(default=30, description="how often the worker sweeps the "
                                        "notice outbox; 0: off")
    outbox_sweep_after_seconds: float = Field(default=60, description="a notice undelivered this long "
                                              "is swept")
    case_sweep_seconds: float = Field(default=60, description="how often the worker looks for open "
                                      "cases whose workflow has closed; 0: off")
    case_sweep_after_seconds: float = Field(default=300, description="a case untouched this long is "
                                            "checked by the closed-workflow sweep")

    webhook_max_body_bytes: int = 256 * 1024
    webhook_tolerance_seconds: int = 300
    webhook_allowed_sources: dict[str, list[IPvAnyNetwork]] = Field(
        default_factory=dict,
        description='optional per-provider source allowlist, JSON: {"stripe": ["3.18.12.63/32"]}')
    webhook_redrive_after_seconds: float = Field(
        default=60, description="an accepted receipt still unprocessed this long is re-driven")
    webhook_duplicate_wait_seconds: float = Field(
        default=5, ge=0, description="a duplicate delivery whose first delivery is still in flight "
                                     "(younger than the re-drive age, not yet processed) waits up to "
                                     "this long for it, then re-drives it itself")
    webhook_redrive_interval_seconds: float = Field(
        default=60, description="how often the relay re-drives unprocessed receipts; 0: only at "
                                "start and on demand")
    webhook_redrive_max_attempts: int = Field(
        default=5, ge=1, description="re-drive gives up on a receipt after this many tries (logged, "
                                     "counted, its redrive_attempts column says so)")
    webhook_refused_retention_days: float = Field(
        default=30, gt=0, description="receipts refused without proof of their sender (bad signature, "
                                      "stale, malformed, too large, unknown provider, forbidden "
                                      "source) are deleted after this many days")
    webhook_prune_interval_seconds: float = Field(
        default=3600, description="how often the worker prunes refused receipts (and case steps' "
                                  "kept answers); 0: off")
    case_step_result_retention_days: float = Field(
        default=30, gt=0, description="a case step's kept answer (what makes a local activity that runs "
                                      "again write nothing twice) is deleted after this many days; a "
                                      "workflow task retried longer would write its step again")

    approval_timeout_seconds: float = 3 * 24 * 3600
    approval_reminder_seconds: float | None = 24 * 3600
    approval_escalation_seconds: float | None = 2 * 24 * 3600
    approval_answer_seconds: float = Field(
        default=10, gt=0, description="how long an approver's call waits for the case workflow to take "
                                      "the verdict before it is answered 202 verdict_pending (audited; "
                                      "the verdict still counts when a worker takes it)")
    ledger_pending_after_seconds: float = 120
    submit_timeout_seconds: float = 30
    status_poll_interval_seconds: float = 3600
    late_failure_window_seconds: float = 10 * 24 * 3600
    provider_http_timeout_seconds: float = 10
    continue_as_new_after_events: int = Field(
        default=10_000, description="history length past which an open-ended wait continues as new")
    max_submit_attempts: int = Field(
        default=20, description="submits of one refund before the case goes to ops (reservation kept)")
    resubmit_margin_seconds: float = Field(
        default=60, ge=0, description="how long past the provider HTTP timeout a timed-out create may "
                                "still land; no second create goes out before")
    provider_read_attempts: int = Field(
        default=8, ge=1, description="attempts of a provider read (validation, verify-state) "
                                     "before the case goes to ops review; it is then asked again "
                                     "every status poll interval")
    payout_reissue_window_seconds: float = Field(
        default=30 * 24 * 3600, description="how long a remediated payout case takes a reissue request")

    # Integrations: each is optional; an unset one is skipped (and said so once in the log).
    public_url: str | None = None  # base of links to cases in notices and tickets
    slack_webhook_url: SecretStr | None = None
    slack_signing_secret: SecretStr | None = None
    slack_team_id: str | None = Field(
        default=None, description="the Slack workspace (team id, T…) whose button clicks count; unset: "
                                  "any workspace whose clicks the signing secret signs (one app "
                                  "installed in several workspaces signs them all)")
    teams_webhook_url: SecretStr | None = None
    smtp_host: str | None = None
    smtp_port: int = 25
    smtp_from: str = "refunds@localhost"
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_starttls: bool = False
    ops_email: str | None = None
    approvers_email: str | None = None
    servicenow_url: str | None = None
    servicenow_user: str | None = None
    servicenow_password: SecretStr | None = None
    servicenow_request_table: str = "u_refund_request"
    servicenow_incident_table: str = "incident"
    servicenow_inbound_secret: SecretStr | None = None
    jira_url: str | None = None
    jira_email: str | None = None
    jira_api_token: SecretStr | None = None
    jira_project: str | None = None
    jira_issue_type: str = "Task"
    integration_http_timeout_seconds: float = 10

    # The AI advisor: an OpenAI-compatible endpoint (base URL ending in /v1), else offline rules.
    llm_url: str | None = None
    llm_model: str = "gpt-4o-mini"
    llm_api_key: SecretStr | None = None
    llm_timeout_seconds: float = 20
    llm_max_tokens: int = Field(default=1500, ge=100, description=(
        "bounds each answer's length and cost; a model that reasons before it answers counts "
        "that too, so raise it for one"))
    advice_timeout_seconds: float = 30

    reconciliation_interval_seconds: float = Field(
        default=3600, description="a scheduled reconciliation per listable provider this often; 0: none")
    reconciliation_window_seconds: float = Field(
        default=14 * 24 * 3600, description="the trailing window (by refund creation) a scheduled run covers")
    reconciliation_stuck_after_seconds: float = 3 * 24 * 3600
    reconciliation_grace_seconds: float = Field(
        default=900, description="objects younger than this are left to in-flight webhooks")
    reconciliation_batch_size: int = 500
    reconciliation_batches_per_run: int = Field(
        default=200, description="a run continues as new after this many batches (history stays small)")
    reports_dir: Path | None = Field(
        default=None, description="reconciliation reports (JSON, CSV); default <data_dir>/reports")
    approval_keys: SecretStr | None = Field(
        default=None, description="relay and worker only: HMAC keys sealing approvals; the first seals, "
                                  "all verify (adapters.approval_seal)")

    @field_validator("codec_cors_origins")
    @classmethod
    def _single_origins(cls, origins: list[str]) -> list[str]:
        """Each an origin (scheme and host, an optional port): the codec answers it with
        credentials, and `*` (or a pattern) would let any page read decoded histories with a
        signed-in person's session."""
        for origin in origins:
            if not re.fullmatch(r"https?://(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::\d{1,5})?", origin):
                raise ValueError(f"REFUNDS_CODEC_CORS_ORIGINS: {origin!r} is no origin "
                                 "(scheme://host[:port], no wildcard, no path)")
        return origins

    @field_validator(*SECRET_LISTS)
    @classmethod
    def _usable_secret_list(cls, value: SecretStr | None) -> SecretStr | None:
        """A set but empty secret list is a configuration error at start, not a verifier
        that accepts nothing (or, split naively, an empty key)."""
        if value is not None:
            secret_list(value)
        return value

    def reconcile_options(self) -> ReconcileOptions:
        """A reconciliation run's knobs, handed to each run in its input."""
        return ReconcileOptions(
            batch_size=self.reconciliation_batch_size, batches_per_run=self.reconciliation_batches_per_run,
            window=timedelta(seconds=self.reconciliation_window_seconds),
            stuck_after=timedelta(seconds=self.reconciliation_stuck_after_seconds),
            grace=timedelta(seconds=self.reconciliation_grace_seconds))

    def reports_folder(self) -> Path:
        return self.reports_dir or self.data_dir / "reports"

    def timings(self) -> RefundTimings:
        """The workflow's waits, handed to each new workflow in its input."""
        return RefundTimings(
            approval_timeout=timedelta(seconds=self.approval_timeout_seconds),
            submit_timeout=timedelta(seconds=self.submit_timeout_seconds),
            status_poll_interval=timedelta(seconds=self.status_poll_interval_seconds),
            late_failure_window=timedelta(seconds=self.late_failure_window_seconds),
            approval_reminder=_seconds(self.approval_reminder_seconds),
            approval_escalation=_seconds(self.approval_escalation_seconds),
            ledger_pending_after=timedelta(seconds=self.ledger_pending_after_seconds),
            advice_timeout=timedelta(seconds=self.advice_timeout_seconds),
            continue_as_new_after_events=self.continue_as_new_after_events,
            max_submit_attempts=self.max_submit_attempts,
            provider_horizon=timedelta(
                seconds=self.provider_http_timeout_seconds + self.resubmit_margin_seconds),
            provider_read_attempts=self.provider_read_attempts,
        )

    def timeout_problem(self) -> str | None:
        """Why the timeouts would let a submit activity end, or the case sweep act, while a
        create is still in flight (the provider could then act after we decided what
        happened), or None."""
        if self.submit_timeout_seconds <= self.provider_http_timeout_seconds:
            return (f"REFUNDS_SUBMIT_TIMEOUT_SECONDS ({self.submit_timeout_seconds:g}) must exceed "
                    f"REFUNDS_PROVIDER_HTTP_TIMEOUT_SECONDS ({self.provider_http_timeout_seconds:g})")
        # a case's submit stamps it: idle for less, a create may be in flight after a terminate
        # and the sweep's one lookup would release the reservation the refund then lands on
        settled = self.timings().create_lands_within().total_seconds()
        if self.case_sweep_seconds and self.case_sweep_after_seconds <= settled:
            return (f"REFUNDS_CASE_SWEEP_AFTER_SECONDS ({self.case_sweep_after_seconds:g}) must exceed "
                    f"{settled:g}: REFUNDS_SUBMIT_TIMEOUT_SECONDS + REFUNDS_PROVIDER_HTTP_TIMEOUT_SECONDS "
                    f"+ REFUNDS_RESUBMIT_MARGIN_SECONDS (a submit attempt and the provider's horizon)")
        return None

    def relay_base_url(self) -> str:
        return self.relay_url or f"http://{self.bind_host}:{self.relay_port}"

    def case_url(self, case_id: str, *, payout: bool = False) -> str:
        """Where a person opens the case (notices and tickets link here)."""
        path = "payout-exceptions" if payout else "refund-requests"
        return f"{(self.public_url or self.relay_base_url()).rstrip('/')}/v1/{path}/{case_id}"

    def sandbox_base_url(self) -> str:
        return self.sandbox_api_base or f"http://{self.bind_host}:{self.sandbox_port}"

    def temporal_target(self) -> str:
        return self.temporal_address or f"{self.bind_host}:{self.temporal_port}"

    # Migrations run as the schema owner; relay and worker as a role that cannot alter the
    # schema or disable its append-only triggers (see deploy/README.md).
    migration_database_url: SecretStr | None = Field(
        default=None, description="DSN of the role owning the schema, for `refunds migrate`; "
                                  "default: REFUNDS_DATABASE_URL")
    runtime_role: str | None = Field(
        default=None, description="role relay and worker connect as, granted its rights by "
                                  "`refunds migrate`; default: the user of REFUNDS_DATABASE_URL "
                                  "when the migration DSN is a separate one")
    audit_checkpoint_dir: Path | None = Field(
        default=None, description="folder outside PostgreSQL (append-only) where the worker "
                                  "checkpoints audit chain heads; unset: off")
    audit_checkpoint_keys: SecretStr | None = Field(
        default=None, description="HMAC key(s) sealing the checkpoints, comma-separated; the first "
                                  "seals, all verify; never given to the database")
    audit_checkpoint_seconds: float = Field(default=300, description="how often the worker checkpoints")

    def runtime_role_name(self) -> str | None:
        """The role `refunds migrate` grants to: explicit, or the runtime DSN's user when
        migrations use their own DSN (one DSN for both: nothing to grant)."""
        if self.runtime_role or self.migration_database_url is None or self.database_url is None:
            return self.runtime_role
        user = connection_parts(self.database_url.get_secret_value(), "REFUNDS_DATABASE_URL").get("user")
        return None if user is None else str(user)

    # The Temporal UI's OIDC access token at /codec (the UI passes it with
    # TEMPORAL_CODEC_PASS_ACCESS_TOKEN; see adapters/oidc.py and deploy/README.md).
    oidc_issuer: str | None = Field(
        default=None, description="issuer (`iss`) of the Temporal UI's access tokens; unset: /codec "
                                  "takes relay API tokens only")
    oidc_audience: str | None = Field(default=None, description="audience (`aud`) the tokens must name")
    oidc_jwks_url: str | None = Field(default=None, description="the issuer's signing keys (JWKS)")
    oidc_user_claim: str = Field(
        default="sub", description="claim naming the person, linked to a product user with "
                                   "`refunds integrations link --oidc VALUE`")
    oidc_algorithms: list[str] = Field(
        default_factory=lambda: ["RS256"], description="signature algorithms accepted, e.g. "
                                                       '\'["RS256","ES256"]\'')

    @model_validator(mode="after")
    def _oidc_complete(self) -> "Settings":
        """An issuer without its audience or keys would verify nothing: refuse to start."""
        if self.oidc_issuer is not None and (self.oidc_audience is None or self.oidc_jwks_url is None):
            raise ValueError("REFUNDS_OIDC_ISSUER needs REFUNDS_OIDC_AUDIENCE and REFUNDS_OIDC_JWKS_URL")
        return self

    # /metrics (relay and worker): a bearer token in production (see adapters/metrics.py).
    metrics_token: SecretStr | None = Field(
        default=None, description="bearer token(s) Prometheus presents at /metrics, comma-separated "
                                  "(rotation); unset: /metrics answers only on a loopback bind")
