"""The type names of the errors that cross between activities and workflows.

An `ApplicationError`'s type is how a workflow tells a decline from an unknown outcome, so
each name is written here once: the activities raise with it and the workflows (and the
retry policies' non-retryable lists) compare with it.
"""

from typing import Final

# Provider answers (activities/refund.py, activities/payout.py, activities/reconciliation.py)
DECLINED: Final = "ProviderDeclined"
"""The provider refused the create: nothing was made, the case fails."""
OUTCOME_UNKNOWN: Final = "ProviderOutcomeUnknown"
"""No answer we can trust: verify before anything is sent again."""
UNEXPECTED_STATUS: Final = "UnexpectedProviderStatus"
"""A status outside the adapter's table: ops review, never a default."""
LOOKUP_UNSUPPORTED: Final = "ProviderLookupUnsupported"
"""The provider has no status lookup (Adyen): wait for its notification."""
CONFIGURATION_REFUSED: Final = "ProviderConfigurationRefused"
"""401/403: our credentials are refused; retrying cannot help, ops must act."""
UNKNOWN_PROVIDER: Final = "UnknownProvider"
"""A case names a provider this worker has no adapter for."""
NOT_LISTABLE: Final = "NotListable"
"""The provider cannot list its refunds, so it cannot be reconciled."""

# Our own state (activities/payout.py, activities/reconciliation.py, activities/integrations.py)
UNKNOWN_PAYOUT: Final = "UnknownPayout"
HOLD_RELEASED: Final = "HoldReleased"
APPROVAL_REVOKED: Final = "ApprovalRevoked"
"""An approval the round counted was given with a token revoked since: the step it
authorised does not run (the round cannot hear of a revocation)."""
CASE_MOVED_ON: Final = "CaseMovedOn"
"""A submit attempt that outlived its case (cancelled, denied, its hold released): the
provider is not called."""
RUN_CONFLICT: Final = "RunConflict"
RECONCILIATION_FAILED: Final = "ReconciliationFailed"
"""A reconciliation run gave up for good (stored `failed` with its reason)."""
REPORT_NOT_WRITTEN: Final = "ReportNotWritten"
"""A run's report could not be written (the folder's permissions, a full disk): the run ends
failed, naming the folder, so its schedule's next run goes ahead."""
NOTICE_DELIVERY_FAILED: Final = "NoticeDeliveryFailed"
NOTICE_CHANNEL_REFUSED: Final = "NoticeChannelRefused"
"""Every channel that failed a notice refused it in a way a retry within minutes will not
change (`DeliveryFailed.refused`): the dispatcher leaves it to the sweeper at once."""

FORGED_START: Final = "ForgedStart"
"""A workflow run that did not begin as its case's workflow begins (another id, or state
carried into a run Temporal did not continue): it fails at once, acting on nothing."""

# Refused updates of a payout case (workflows/payout.py)
REISSUE_TAKEN: Final = "ReissueTaken"
NOT_REISSUABLE: Final = "NotReissuable"
REISSUE_NOT_MADE: Final = "ReissueNotMade"
"""A lookup-only reissue found nothing at the provider: no attempt paid."""
BENEFICIARY_HELD: Final = "BeneficiaryHeld"
"""Another case holds the beneficiary's payouts: the reissue waits (its details: the
holding case ids) until that hold ends; nothing was sent."""

# The approval round's answers to a verdict it refuses (workflows/approvals.py); the
# front ends tell "too late" (409) from "not yours to give" (403) by them.
ALREADY_DECIDED: Final = "AlreadyDecided"
"""The round (or the case) is decided already."""
NOT_AWAITING_APPROVAL: Final = "NotAwaitingApproval"
"""The case is in no approval round."""
APPROVAL_REFUSED: Final = "ApprovalRefused"
"""This approver's verdict cannot count (segregation of duties, roles, tier slots)."""
ALREADY_RECEIVED: Final = "AlreadyReceived"
"""The same verdict (its `verdict_id`) arrived before: the relay's durable resend of an
update it stopped waiting for. It counted, or was refused, once."""
