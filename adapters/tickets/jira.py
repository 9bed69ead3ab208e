"""Jira Cloud over REST v3 (basic auth with an account email and API token).

Our correlation key is an issue label; descriptions and comments are Atlassian Document
Format. Jira's search index can lag a fresh create by a moment, so the duplicate-proof
path is the stored issue id; the label search covers a lost create response.
"""

from typing import Any

import httpx

from adapters.notify.delivery import DeliveryFailed, send_http
from adapters.notify.message import Message
from adapters.tickets.base import TicketRef


def adf(message: Message) -> dict[str, Any]:
    """Plain text lines as an Atlassian Document Format document, with a link to the case."""
    content: list[dict[str, Any]] = [
        {"type": "paragraph", "content": [{"type": "text", "text": line}]}
        for line in message.plain().splitlines() if line.strip()]
    if message.link:
        content.append({"type": "paragraph", "content": [
            {"type": "text", "text": "Open the case", "marks": [{"type": "link",
                                                                  "attrs": {"href": message.link}}]}]})
    return {"type": "doc", "version": 1, "content": content}


class Jira:
    name = "jira"

    def __init__(self, base_url: str, email: str, api_token: str, *, project: str, issue_type: str,
                 timeout: float) -> None:
        self._base = base_url.rstrip("/")
        self._auth = httpx.BasicAuth(email, api_token)
        self._project = project
        self._issue_type = issue_type
        self._timeout = timeout

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await send_http(method, f"{self._base}/rest/api/3/{path}", timeout=self._timeout,
                                    auth=self._auth, headers={"Accept": "application/json"}, **kwargs)
        try:
            return response.json()
        except ValueError as exc:  # a 2xx from Jira, or from a proxy or login page before it
            raise DeliveryFailed(f"Jira answered without JSON: {response.text[:200]}",
                                 status=response.status_code) from exc

    def _ref(self, issue: dict[str, Any]) -> TicketRef:
        return TicketRef(str(issue["id"]), issue["key"], f"{self._base}/browse/{issue['key']}")

    async def find(self, incident: bool, correlation: str) -> TicketRef | None:
        found = await self._call("GET", "search/jql", params={
            "jql": f'project = "{self._project}" AND labels = "{correlation}"', "fields": "summary,labels",
            "maxResults": "1"})
        mine = [issue for issue in found.get("issues") or ()  # only an issue carrying our key
                if correlation in ((issue.get("fields") or {}).get("labels") or ())]
        return self._ref(mine[0]) if mine else None

    async def create(self, incident: bool, correlation: str, message: Message) -> TicketRef:
        labels = ["refund-orchestrator", correlation, *(["incident"] if incident else [])]
        created = await self._call("POST", "issue", json={"fields": {
            "project": {"key": self._project}, "issuetype": {"name": self._issue_type},
            "summary": message.title[:255], "description": adf(message), "labels": labels,
            **({"priority": {"name": "High"}} if message.high_priority else {})}})
        return self._ref(created)

    async def note(self, incident: bool, ticket: TicketRef, message: Message) -> None:
        await self._call("POST", f"issue/{ticket.number or ticket.external_id}/comment",
                         json={"body": adf(message)})
