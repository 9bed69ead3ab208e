"""Wiring: registers workflows and activities with the data converter and sandbox."""
