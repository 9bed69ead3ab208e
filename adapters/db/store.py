"""The store: the database handle and one repository per aggregate, made together once per
process, so a call site names the aggregate it works on (`store.cases.reserve(...)`)."""

from adapters.db.access import AccessRepository
from adapters.db.audit import AuditLog
from adapters.db.cases import CaseRepository
from adapters.db.database import Database
from adapters.db.integrations import IntegrationRepository
from adapters.db.ledger import LedgerRepository
from adapters.db.manual_refunds import ManualRefundRepository
from adapters.db.outbox import OutboxRepository
from adapters.db.payouts import PayoutRepository
from adapters.db.receipts import ReceiptRepository
from adapters.db.reconciliation import ReconciliationRepository
from adapters.db.steps import StepResults


class Store:
    """Every repository over one database (its pool); one instance per process."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self.audit = AuditLog(database)
        self.cases = CaseRepository(database)
        self.ledger = LedgerRepository(database)
        self.receipts = ReceiptRepository(database)
        self.access = AccessRepository(database)
        self.outbox = OutboxRepository(database)
        self.manual_refunds = ManualRefundRepository(database)
        self.payouts = PayoutRepository(database)
        self.reconciliation = ReconciliationRepository(database)
        self.integrations = IntegrationRepository(database)
        self.steps = StepResults(database)

    @classmethod
    async def open(cls, dsn: str, *, min_size: int = 1, max_size: int = 10) -> "Store":
        return cls(await Database.open(dsn, min_size=min_size, max_size=max_size))

    async def close(self) -> None:
        await self.database.close()
