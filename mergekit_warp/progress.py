"""Progress on stderr, one facility for every command (stdout is kept for results):

- `Bytes`: a bar of input bytes read and tensors done (merges, the angle pass);
- `Steps`: a bar of steps with a line of statistics (RL runs);
- `Log`: timestamped lines (pipeline steps, evaluation points).

Each takes `enabled`; disabled, it prints nothing.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


def _console():
    from rich.console import Console

    return Console(stderr=True)


class Bytes:
    """A bar counting input bytes read and tensors done."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    @contextmanager
    def task(self, description: str, total_bytes: int, total_tensors: int) -> Iterator[Callable[[int, int], None]]:
        """Yield `advance(nbytes, ntensors)`."""
        if not self.enabled:
            yield lambda nbytes, ntensors: None
            return
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        bar = Progress(
            TextColumn("{task.description:<6}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TextColumn("{task.fields[tensors]} tensors"),
            TimeRemainingColumn(),
            console=_console(),
        )
        done = [0]
        with bar:
            tid = bar.add_task(description, total=total_bytes, tensors=f"0/{total_tensors}")

            def advance(nbytes: int, ntensors: int) -> None:
                done[0] += ntensors
                bar.update(tid, advance=nbytes, tensors=f"{done[0]}/{total_tensors}")

            yield advance


class Steps:
    """A bar of `total` steps (starting at `start`) with a line of statistics."""

    def __init__(self, label: str, enabled: bool, total: int, start: int = 0):
        self.bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn(label),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeRemainingColumn(),
                console=_console(),
            )
            self.task = self.bar.add_task(label, total=total, completed=start, stats="")
            self.bar.start()

    def update(self, done: int, stats: str) -> None:
        if self.bar:
            self.bar.update(self.task, completed=done, stats=stats)

    def close(self) -> None:
        if self.bar:
            self.bar.stop()


class Log:
    """`log(msg)` prints `[PREFIX  12.3s] msg` to stderr (seconds since creation), or `msg` alone
    without a prefix."""

    def __init__(self, enabled: bool, prefix: str | None = None):
        self.enabled, self.prefix, self.t0 = enabled, prefix, time.time()

    def __call__(self, msg: str) -> None:
        if self.enabled:
            head = f"[{self.prefix} {time.time() - self.t0:7.1f}s] " if self.prefix else ""
            print(head + msg, file=sys.stderr, flush=True)
