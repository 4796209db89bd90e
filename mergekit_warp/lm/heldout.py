"""Held-out estimates, shared by `warp rl`'s periodic evaluation and `warp eval`: sample completions of
fixed prompts with fixed seeds (the same draws for every checkpoint scored: common random numbers),
and for each completion its reward, its KL term log π(y|x) − log π_ref(y|x) (sums over completion
tokens at the sampling temperature; their mean estimates KL(π‖π_ref), WARP §4) and its length.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from mergekit_warp.lm.sampling import generate, sequence_logprobs


@dataclass(frozen=True)
class Samples:
    """Per-completion figures, (n,) float64 each."""

    rewards: torch.Tensor
    kls: torch.Tensor
    lengths: torch.Tensor


def mean_se(xs: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std / √n; 0 for n = 1)."""
    xs = xs.double()
    n = xs.numel()
    se = xs.std(unbiased=True).item() / math.sqrt(n) if n > 1 else 0.0
    return xs.mean().item(), se


@torch.no_grad()
def sample_and_score(
    policy,
    ref,
    tokenizer,
    prompts: list[str],
    reward_fn: Callable,
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    batch_size: int,
    share_prefix: bool = True,
    all_done: Callable[[bool], bool] | None = None,
    stop: Sequence[str] = (),
) -> Samples:
    """Sample one completion per entry of `prompts` from `policy` (batch c seeded `seed + c`) and score
    it. `share_prefix`/`all_done`/`stop`: see `generate` (data-parallel callers pass their own)."""
    rewards, kls, lengths = [], [], []
    for c, start in enumerate(range(0, len(prompts), batch_size)):
        ro = generate(
            policy,
            tokenizer,
            prompts[start : start + batch_size],
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            generator_seed=seed + c,
            share_prefix=share_prefix,
            all_done=all_done,
            stop=stop,
        )
        # log π was recorded while sampling: the sum a forward of the policy computes, up to float rounding
        # (tests/test_rl_rollout.py), so only the reference needs a forward.
        lp_ref = sequence_logprobs(ref, ro.input_ids, ro.attention_mask, ro.completion_mask, temperature=temperature)
        kls.append((ro.logprobs - lp_ref.float()).double().cpu())
        rewards.append(torch.tensor(reward_fn(ro.prompts, ro.completions), dtype=torch.float64))
        lengths.append(ro.completion_mask.sum(1).double().cpu())
    return Samples(torch.cat(rewards), torch.cat(kls), torch.cat(lengths))
