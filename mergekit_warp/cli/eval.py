"""Placeholder: filled by the eval work."""

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the top-level `warp` app."""
