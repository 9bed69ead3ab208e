"""The event loop our processes run on: uvloop.

The relay spends about a third of its CPU in the event loop itself (socket readiness,
callbacks, psycopg's waits on each pipelined command); uvloop does that work in C. On a
box the relay shares with the Temporal server, that CPU is taken from Temporal's share.
The relay answers duplicate deliveries 1.6 times as fast on it (docs/BENCHMARKS.md).
"""

from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run` on a uvloop loop: what every command and benchmark process uses."""
    return uvloop.run(main)
