"""The relay: `create_app` builds the HTTP front door (`app`), its routers one module each."""

from starters.relay.app import create_app

__all__ = ["create_app"]
