"""What a relay process remembers of the events it saw processed: a duplicate of one needs
neither the claim nor the first receipt's lookup (an event's claim and its processed mark are
never undone), so in a retry storm its receipt is a plain insert. Per process and bounded:
another relay process, or one restarted, finds the same through the gate.

An OrderedDict rather than a cache library: the whole policy is "drop the least recently
used past `capacity`", eight lines, and no dependency of ours has one."""

from collections import OrderedDict

CAPACITY = 10_000
"""Events remembered: a storm repeats recent events; about 2 MiB at this size."""


class ProcessedEvents:
    """Each remembered event's first receipt id, the most recently used kept."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._capacity = capacity
        self._first: OrderedDict[tuple[str, str], int] = OrderedDict()

    def first_receipt(self, provider: str, event_id: str) -> int | None:
        """The event's first receipt when this process saw it processed, else None."""
        key = (provider, event_id)
        first = self._first.get(key)
        if first is not None:
            self._first.move_to_end(key)
        return first

    def add(self, provider: str, event_id: str, first_receipt_id: int) -> None:
        """Remembers a processed event (its first receipt marked processed)."""
        key = (provider, event_id)
        self._first[key] = first_receipt_id
        self._first.move_to_end(key)
        if len(self._first) > self._capacity:
            self._first.popitem(last=False)
