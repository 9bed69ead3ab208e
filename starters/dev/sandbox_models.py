"""The sandbox provider's request bodies: Stripe-shaped charges, refunds and payouts, and
the `/_sandbox` controls (scripted faults, status changes, imported history)."""

from typing import Any, Literal

from pydantic import BaseModel, Field

FaultMode = Literal["timeout_after_success", "error_before", "error_after", "timeout_before",
                    "acts_after_give_up", "late_failure", "lookup_status", "lookup_slow",
                    "lookup_empty", "webhook_lost", "webhook_duplicated", "webhook_late"]
# Which call a fault is for: the create, the lookup (GET /v1/refunds), or a refund's webhooks.
# `lookup_empty`: a lookup by our reference that lists nothing although the refund exists (a
# list that lags the write).
LOOKUP_FAULTS = frozenset({"lookup_status", "lookup_slow", "lookup_empty"})
WEBHOOK_FAULTS = frozenset({"webhook_lost", "webhook_duplicated", "webhook_late"})


class ChargeIn(BaseModel):
    amount: int = Field(gt=0)
    currency: str
    merchant_account: str = "acct_default"
    capture: bool = True
    id: str | None = None
    disputes: int = Field(default=0, ge=0)


class CaptureIn(BaseModel):
    amount: int | None = Field(default=None, gt=0)


class RefundIn(BaseModel):
    charge: str
    amount: int = Field(gt=0)
    currency: str | None = None
    reason: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)


class FaultIn(BaseModel):
    """A scripted fault, taken by the next `times` calls it applies to. `seconds` is how long
    a timeout holds, how late a slow create acts, a late failure comes or a late webhook
    goes; `status` is what a refused lookup answers; `charge` scopes the fault to one charge
    (a randomised schedule runs many cases at once, each with its own faults)."""

    mode: FaultMode
    times: int = 1
    seconds: float = 30.0
    status: int = Field(default=404, ge=400, le=599)
    charge: str | None = None


class StatusIn(BaseModel):
    status: str = Field(description="any string: a status we do not know tests our loud branch")
    failure_reason: str | None = None
    send_webhook: bool = True


class EventIn(BaseModel):
    type: str
    object: dict[str, Any]
    copies: int = Field(default=1, ge=1, le=50)
    event_id: str | None = None


class PayoutIn(BaseModel):
    amount: int = Field(gt=0)
    currency: str
    destination: str = "ba_default"
    id: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)


class PayoutStatusIn(BaseModel):
    status: str = Field(description="paid, failed, settlement_failed, reversed; any other string "
                                    "tests our loud branch")
    failure_code: str | None = Field(default=None, description="e.g. insufficient_funds, account_closed, "
                                                               "bank_rejection, compliance_hold")
    failure_message: str | None = None
    copies: int = Field(default=1, ge=1, le=50, description="deliveries of the same event (a retry storm)")


class ConfigIn(BaseModel):
    dedup_idempotency_keys: bool | None = None
    refund_initial_status: Literal["pending", "succeeded"] | None = None
    webhook_url: str | None = None
    hold_webhooks: bool | None = None
    enforce_captured: bool | None = Field(
        default=None, description="false: refunds beyond the captured amount are made too, so a "
                                  "test sees an over-refund its orchestrator let through")


class ImportedRefund(BaseModel):
    """A refund with its history already made (seeding scenarios and benchmarks)."""

    id: str | None = None
    charge: str
    amount: int = Field(gt=0)
    currency: str
    status: str
    failure_reason: str | None = None
    created: int
    metadata: dict[str, str] = Field(default_factory=dict)


class ImportedPayout(BaseModel):
    """A payout with its history already made (reconciliation scenarios)."""

    id: str | None = None
    amount: int = Field(gt=0)
    currency: str
    destination: str = "ba_default"
    status: str
    failure_code: str | None = None
    failure_message: str | None = None
    created: int
    metadata: dict[str, str] = Field(default_factory=dict)


class ImportIn(BaseModel):
    charges: list[ChargeIn] = Field(default_factory=list)
    refunds: list[ImportedRefund] = Field(default_factory=list)
    payouts: list[ImportedPayout] = Field(default_factory=list)
