"""Helpers shared by the thin CLI commands."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import typer

from mergekit_warp.errors import WarpError


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn a `WarpError` into one line on stderr and exit status 2 (no traceback)."""
    try:
        yield
    except WarpError as e:
        msg = " ".join(str(e).split())  # one line, whatever the message held
        print(f"error: {msg}", file=sys.stderr)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        print("interrupted: nothing was published at the output path", file=sys.stderr)
        raise typer.Exit(130) from None
