"""One ticket per case and purpose, whatever the retries.

The ticket's id is stored with the case (`case_tickets`). Before creating, the system is
searched for our correlation key, so an attempt whose create succeeded but whose answer
was lost is found by the retry instead of creating a second ticket.
"""

import asyncio
import hashlib
from dataclasses import dataclass
from typing import Protocol

from adapters.db.integrations import IntegrationRepository
from adapters.notify.delivery import DeliveryFailed, DeliveryUncertain
from adapters.notify.message import Message
from domain.integrations import ticket_purpose

LOST_CREATE_RECHECK_SECONDS = 10.0
"""How long after a create whose answer was lost the channel searches again: longer than a
ticket system's search takes to see a new ticket (Jira's index lags its creates)."""


@dataclass(frozen=True)
class TicketRef:
    external_id: str
    number: str | None
    url: str | None


def refused_outright(status: int | None) -> bool:
    """Whether a create's failure says nothing was made: no connection (no status), a redirect
    or a 4xx. A 5xx may follow a backend that made it, and a 2xx without the record may be
    the record's answer garbled: both are looked for again."""
    return status is None or 300 <= status < 500


class TicketSystem(Protocol):
    name: str

    async def find(self, incident: bool, correlation: str) -> TicketRef | None:
        """The ticket carrying our correlation key, if one exists."""

    async def create(self, incident: bool, correlation: str, message: Message) -> TicketRef:
        """A new ticket (refund request, or incident) from the message."""

    async def note(self, incident: bool, ticket: TicketRef, message: Message) -> None:
        """Adds the message to the ticket's history."""


def correlation_key(case_id: str, purpose: str) -> str:
    """Stable, short and free of characters ticket queries would need to escape."""
    return "rfo-" + hashlib.sha256(f"{case_id}\n{purpose}".encode()).hexdigest()[:32]


class TicketChannel:
    """Creates the case's ticket on its first notice and adds later notices to it."""

    def __init__(self, system: TicketSystem, store: IntegrationRepository) -> None:
        self.name = system.name
        self._system = system
        self._store = store

    def accepts(self, message: Message) -> bool:
        return message.ticket is not None and message.case_id is not None

    async def send(self, message: Message) -> str | None:
        assert message.case_id is not None and message.ticket is not None
        incident = message.ticket == "incident"
        purpose = ticket_purpose(message.ticket, message.kind)
        correlation = correlation_key(message.case_id, purpose)

        created = False  # by this notice's create: the ticket carries its text

        async def find_or_create() -> tuple[str, str | None, str | None]:
            nonlocal created
            try:
                made = await self._system.find(incident, correlation)
                if made is None:
                    created = True  # also when the create's lost answer is found below
                    try:
                        made = await self._system.create(incident, correlation, message)
                    except (DeliveryUncertain, DeliveryFailed) as exc:
                        if isinstance(exc, DeliveryFailed) and refused_outright(exc.status):
                            raise  # refused: nothing was made
                        # the create may have landed (answer lost, a gateway's 5xx after the
                        # backend made it, a 2xx without the record), and a search lags it
                        # (Jira's index): look again past the lag, or the retry's search
                        # misses it and makes another
                        await asyncio.sleep(LOST_CREATE_RECHECK_SECONDS)
                        made = await self._system.find(incident, correlation)
                        if made is None:
                            raise
            except DeliveryUncertain as exc:  # the search before the next create makes a retry safe
                raise DeliveryFailed(str(exc)) from exc
            return made.external_id, made.number, made.url

        stored = await self._store.ticket(message.case_id, self.name, purpose)
        if stored is None:  # one deliverer at a time finds or creates it (another may have meanwhile)
            stored, made = await self._store.ticket_or_made(message.case_id, self.name, purpose,
                                                            find_or_create)
            if made and created:
                return stored.number or stored.external_id
            # found: another notice's create made it (its answer lost), so this one's text
            # goes on it as a note, or it was marked delivered and never shown
        ticket = TicketRef(stored.external_id, stored.number, stored.url)
        await self._system.note(incident, ticket, message)
        return ticket.number or ticket.external_id
