"""Connecting to Temporal with the product's data converter.

`TEMPORAL_ADDRESS` / `TEMPORAL_NAMESPACE` (via Settings) point at a real cluster; unset,
the embedded dev server started by `refunds dev` is used.
"""

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

from adapters.config import Settings


async def connect(settings: Settings) -> Client:
    """A client whose payloads are pydantic models (typed on both sides)."""
    return await Client.connect(settings.temporal_target(), namespace=settings.temporal_namespace,
                                data_converter=pydantic_data_converter)
