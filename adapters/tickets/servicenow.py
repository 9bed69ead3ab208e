"""ServiceNow over the Table API (`/api/now/table/{table}`), basic auth.

Refund-request tickets live in a configurable table (`REFUNDS_SERVICENOW_REQUEST_TABLE`,
a custom "Refund Request" table by default), incidents in `incident`. Our correlation key
goes into the task's standard `correlation_id` field; updates become work notes.
"""

import re
from typing import Any
from urllib.parse import quote

import httpx

from adapters.notify.delivery import DeliveryFailed, send_http
from adapters.notify.message import Message
from adapters.tickets.base import TicketRef

# ServiceNow derives priority from impact and urgency: 1-High impact with 2-Medium urgency
# is priority 2 - High in the default lookup rules.
HIGH_PRIORITY = {"impact": "1", "urgency": "2"}


def record_url(base_url: str, table: str, sys_id: str) -> str:
    """Where a person opens the record in the ServiceNow UI."""
    return f"{base_url.rstrip('/')}/nav_to.do?uri={quote(f'{table}.do?sys_id={sys_id}', safe='')}"


CODE_TAG = re.compile(r"\[(/?)code\]", re.IGNORECASE)


def journal_text(text: str) -> str:
    """Text for a ServiceNow description or work note: `[code]...[/code]` there is rendered
    as HTML where the instance allows it (a live link in quoted provider or model text), so
    the tag is broken up; everything else reads as written."""
    return CODE_TAG.sub(r"[\1 code]", text)


class ServiceNow:
    name = "servicenow"

    def __init__(self, base_url: str, user: str, password: str, *, request_table: str,
                 incident_table: str, timeout: float) -> None:
        self._base = base_url.rstrip("/")
        self._auth = httpx.BasicAuth(user, password)
        self._tables = {False: request_table, True: incident_table}
        self._timeout = timeout

    def _ref(self, table: str, record: dict[str, Any]) -> TicketRef:
        sys_id = str(record["sys_id"])
        return TicketRef(sys_id, record.get("number"), record_url(self._base, table, sys_id))

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await send_http(method, f"{self._base}/api/now/table/{path}", timeout=self._timeout,
                                   auth=self._auth, headers={"Accept": "application/json"}, **kwargs)
        try:
            return response.json()["result"]
        except (ValueError, KeyError) as exc:  # a 2xx from ServiceNow, or a proxy's or a hibernating
            # instance's page before it
            raise DeliveryFailed(f"ServiceNow answered without a result: {response.text[:200]}",
                                 status=response.status_code) from exc

    async def find(self, incident: bool, correlation: str) -> TicketRef | None:
        table = self._tables[incident]
        found = await self._call("GET", table, params={
            "sysparm_query": f"correlation_id={correlation}",
            "sysparm_fields": "sys_id,number,correlation_id",
            "sysparm_limit": "1"})
        # only a record carrying our key: a table without the field has the query ignored
        # (ServiceNow's default) and answers with any record, someone else's ticket
        mine = [record for record in found or () if record.get("correlation_id") == correlation]
        return self._ref(table, mine[0]) if mine else None

    async def create(self, incident: bool, correlation: str, message: Message) -> TicketRef:
        table = self._tables[incident]
        record = await self._call("POST", table, json={
            "short_description": message.title[:160], "description": journal_text(message.plain()),
            "correlation_id": correlation, "correlation_display": "Refund Orchestrator",
            **(HIGH_PRIORITY if message.high_priority else {})})
        return self._ref(table, record)

    async def note(self, incident: bool, ticket: TicketRef, message: Message) -> None:
        await self._call("PATCH", f"{self._tables[incident]}/{ticket.external_id}",
                         json={"work_notes": journal_text(f"{message.title}\n{message.plain()}")})
