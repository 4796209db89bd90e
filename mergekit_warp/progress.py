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


def size(nbytes: int) -> str:
    """1234567890 → '1.23 GB' (decimal units, as disk sizes are usually given)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes} B"


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
    """Progress over `total` steps (starting at `start`) with a line of statistics: a live bar on a
    terminal; a plain line now and then (the first step, every tenth of the run or minute, the last)
    when stderr is a file, so a log shows the run moving."""

    def __init__(self, label: str, enabled: bool, total: int, start: int = 0):
        self.label, self.total, self.start, self.enabled = label, total, start, enabled
        self.bar, self.t0, self.last = None, time.time(), 0.0
        if enabled and sys.stderr.isatty():
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
            return
        now = time.time()
        every = max(1, (self.total - self.start) // 10)
        if self.enabled and (
            done == self.start + 1 or done == self.total or (done - self.start) % every == 0 or now - self.last > 60
        ):
            self.last = now
            rate = (now - self.t0) / max(1, done - self.start)
            print(
                f"[{self.label}] step {done}/{self.total}  {stats}  ({duration(rate * (self.total - done))} left)",
                file=sys.stderr,
                flush=True,
            )

    def note(self, msg: str) -> None:
        """A line of text beside the progress (through the live bar's console, which keeps it intact)."""
        if self.bar:
            self.bar.console.print(msg)
        elif self.enabled:
            print(msg, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar:
            self.bar.stop()


def duration(seconds: float) -> str:
    """'2 h 05 min', '3 min 20 s', '45 s'."""
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


class Log:
    """`log(msg)` prints `[PREFIX  12.3s] msg` to stderr (seconds since creation), or `msg` alone
    without a prefix."""

    def __init__(self, enabled: bool, prefix: str | None = None):
        self.enabled, self.prefix, self.t0 = enabled, prefix, time.time()

    def __call__(self, msg: str) -> None:
        if self.enabled:
            head = f"[{self.prefix} {time.time() - self.t0:7.1f}s] " if self.prefix else ""
            print(head + msg, file=sys.stderr, flush=True)
