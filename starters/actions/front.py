"""What the relay's routes and the console's pages work with, built once by the app factory
(`starters.relay.app.create_app`) and kept on the application's state: routers are declared
at module level and reach it through a FastAPI dependency, not through a closure."""

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from temporalio.client import Client

from adapters.config import Settings
from adapters.db import Store
from adapters.providers.base import ProviderAdapter
from adapters.refusals import SampledRefusalLog
from starters.actions.cases import CaseActions


@dataclass(frozen=True)
class FrontDoor:
    """The case rules (with the store, the approval-sealing client and the settings), the
    configured providers, and one sampled log per front end for refusals nobody signed."""

    actions: CaseActions
    providers: Mapping[str, ProviderAdapter]
    api_refusals: SampledRefusalLog = field(default_factory=SampledRefusalLog)
    console_refusals: SampledRefusalLog = field(default_factory=SampledRefusalLog)

    @property
    def store(self) -> Store:
        return self.actions.store

    @property
    def client(self) -> Client:
        return self.actions.client

    @property
    def settings(self) -> Settings:
        return self.actions.settings


def front_door(request: Request) -> FrontDoor:
    """The application's `FrontDoor` (a dependency: no parameter of the OpenAPI document)."""
    door: FrontDoor = request.app.state.front_door
    return door


async def awaited_front_door(request: Request) -> FrontDoor:
    """`front_door` as the routes' dependency: async, so FastAPI calls it on the event loop
    (a sync dependency goes to a worker thread and back on every request)."""
    return front_door(request)


Door = Annotated[FrontDoor, Depends(awaited_front_door)]
