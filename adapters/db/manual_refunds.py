"""Manual refunds: the instruction ops carry out (bank transfer, cheque) for a case whose
money cannot go back through the provider, and their confirmation."""

from adapters.db.audit import AuditLog
from adapters.db.database import Repository
from adapters.db.rows import ManualRefundRow
from domain.models import RefundRequest


class ManualRefundRepository(Repository):
    """The `manual_refunds` rows: one instruction per case."""

    async def create(self, request: RefundRequest) -> ManualRefundRow:
        """The instruction ops carry out; one per request, whatever the retries."""
        async with self._db.transaction() as conn:
            cur = await conn.execute(
                "INSERT INTO manual_refunds (id, refund_request_id, charge_id, amount, currency,"
                " method, status) VALUES (%s,%s,%s,%s,%s,%s,'pending')"
                " ON CONFLICT (refund_request_id) DO NOTHING RETURNING *",
                (f"man_{request.refund_request_id}", request.refund_request_id, request.charge_id,
                 request.amount, request.currency, request.method.value))
            row = await cur.fetchone()
            if row is not None:
                await AuditLog.append(conn, request.refund_request_id, "system", "manual_refund_instructed",
                                      {"method": request.method.value, "amount": request.amount,
                                       "currency": request.currency})
                return ManualRefundRow.from_row(row)
        found = await self.get(request.refund_request_id)
        assert found is not None
        return found

    async def get(self, case_id: str) -> ManualRefundRow | None:
        row = await self._db.fetch_one("SELECT * FROM manual_refunds WHERE refund_request_id = %s",
                                       (case_id,))
        return ManualRefundRow.from_row(row) if row else None

    async def confirm(self, case_id: str, *, succeeded: bool, by: str,
                      reason: str) -> ManualRefundRow | None:
        """Ops confirm they paid (or could not); only a pending instruction moves."""
        async with self._db.transaction() as conn:
            cur = await conn.execute(
                "UPDATE manual_refunds SET status = %s, failure_reason = %s, confirmed_by = %s,"
                " confirmed_at = now() WHERE refund_request_id = %s AND status = 'pending'"
                " RETURNING *",
                ("succeeded" if succeeded else "failed", None if succeeded else reason, by, case_id))
            row = await cur.fetchone()
            if row is not None:
                await AuditLog.append(conn, case_id, by, "manual_refund_confirmed",
                                      {"status": row["status"], "reason": reason})
            return ManualRefundRow.from_row(row) if row else None
