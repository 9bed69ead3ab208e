"""PostgreSQL: the database handle, the audit log and one repository per aggregate."""

from adapters.db.access import ConsoleSession, Principal, hash_token, token_fingerprint
from adapters.db.cases import CaseCreation, request_from_row
from adapters.db.database import Conn, Database
from adapters.db.receipts import StoredReceipt
from adapters.db.store import Store

__all__ = ["CaseCreation", "Conn", "ConsoleSession", "Database", "Principal", "Store", "StoredReceipt",
           "hash_token", "request_from_row", "token_fingerprint"]
