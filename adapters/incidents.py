"""Incidents a case raises about money that moved outside its own path, recorded as
reconciliation breaks (left to ops, never dispatched to an automatic fix) with their audit
rows and ops notice, in one transaction."""

from typing import Any

from adapters.reconciliation import Reconciliations
from adapters.store import Store, _json, open_incident_run
from domain.incidents import DuplicateRefundInput
from domain.models import ProviderRefundStatus
from domain.reconciliation import BreakClass, BreakState


async def open_duplicate_refund_break(store: Store, inp: DuplicateRefundInput) -> dict[str, Any] | None:
    """Records the duplicate as a `duplicate_refund` break in `ops_review` on the case's
    chain, found by an `incident` run; None when it was recorded already (a retry, or the
    same refund reported again)."""
    refund = inp.duplicate
    run_id = f"incident-{refund.provider}-{refund.refund_id}"
    evidence = {"provider": {**refund.model_dump(mode="json")},
                "case": {"id": inp.case_id, "followed_refund_id": inp.followed_refund_id},
                "source": inp.source}
    # What the ledger lacks once the duplicate settled; unknown while it is not final.
    delta = refund.amount if refund.status is ProviderRefundStatus.SUCCEEDED else None
    async with store.transaction() as conn:
        await open_incident_run(conn, run_id, refund.provider, f"workflow:{inp.case_id}")
        cur = await conn.execute(
            "INSERT INTO reconciliation_breaks (provider, object_id, break_class, refund_request_id,"
            " chain, charge_id, amount, currency, provider_status, raw_status, failure_reason,"
            " case_status, ledger_delta, object_created_at, evidence, first_run_id, state,"
            " dispatched_at)"
            " SELECT %s,%s,%s,c.refund_request_id,c.refund_request_id,%s,%s,%s,%s,%s,%s,c.status,%s,"
            " now(),%s,%s,%s, now() FROM refund_cases c WHERE c.refund_request_id = %s"
            " ON CONFLICT (provider, object_id, break_class) DO NOTHING RETURNING *",
            (refund.provider, refund.refund_id, BreakClass.DUPLICATE_REFUND.value, refund.charge_id,
             refund.amount, refund.currency, refund.status.value, refund.raw_status,
             refund.failure_reason, delta, _json(evidence), run_id, BreakState.OPS_REVIEW.value,
             inp.case_id))
        row = await cur.fetchone()
        if row is None:
            return None
        await conn.execute("INSERT INTO reconciliation_run_breaks (run_id, break_id) VALUES (%s,%s)",
                           (run_id, row["id"]))
        await Reconciliations._announce(conn, row)
        return dict(row)
