"""Toy reward for the distributed RL tests (loaded as `--reward tests/dist_toy_reward.py:reward`).

Test hook: with WARP_TEST_KILL_RANK=R and WARP_TEST_KILL_CALL=N, the process of rank R SIGKILLs itself
on its N-th reward call (step N, between sampling and the optimiser update): a rank dying mid-step.
"""

import os
import signal

GOOD = {"good", "great", "happy", "love", "nice", "wonderful"}
_calls = 0


def reward(prompts, completions):
    global _calls
    _calls += 1
    if os.environ.get("RANK") == os.environ.get("WARP_TEST_KILL_RANK", "-") and _calls == int(
        os.environ.get("WARP_TEST_KILL_CALL", "0")
    ):
        os.kill(os.getpid(), signal.SIGKILL)
    return [sum(w in GOOD for w in c.split()) / max(1, len(c.split())) for c in completions]
