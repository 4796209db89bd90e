"""Toy rewards for the pipeline/eval tests (loaded by file path, as `warp rl --reward FILE.py:fn`)."""

import os
import signal
from pathlib import Path

GOOD = {"good", "great", "happy", "love", "nice", "wonderful"}


def reward(prompts, completions):
    """Fraction of positive words in the completion. Test hook: with WARP_TEST_KILL_AT=N and
    WARP_TEST_KILL_COUNTER=FILE set, the N-th call SIGKILLs the process (a kill in the middle of an
    RL step, between sampling and the optimiser update)."""
    at, counter = os.environ.get("WARP_TEST_KILL_AT"), os.environ.get("WARP_TEST_KILL_COUNTER")
    if at and counter:
        f = Path(counter)
        n = int(f.read_text()) + 1 if f.exists() else 1
        f.write_text(str(n))
        if n >= int(at):
            os.kill(os.getpid(), signal.SIGKILL)
    return [sum(w in GOOD for w in c.split()) / max(1, len(c.split())) for c in completions]


def prefers_a(prompts, a, b):
    """A pairwise judge that always prefers A by a wide margin."""
    return [10.0] * len(a)


def words(prompts, completions):
    """Number of words / 6: varies a lot between samples (a judge with real noise for SxS tests)."""
    return [len(c.split()) / 6 for c in completions]
