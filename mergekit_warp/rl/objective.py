"""The RL objective as pure functions of tensors (fp32, no files, no models).

Shapes: b = completions in the step, laid out prompt-major: the k samples of prompt j are rows
j·k .. j·k + k − 1 (that is how the loop builds its batch).
"""

from __future__ import annotations

import torch


def shaped_reward(reward: torch.Tensor, logp: torch.Tensor, logp_anchor: torch.Tensor, beta: float) -> torch.Tensor:
    """(b,) r − β·(log π(y|x) − log π_anchor(y|x)): the single-sample KL of the whole completion."""
    return reward - beta * (logp - logp_anchor)


def baseline(values: torch.Tensor, k: int, kind: str, mean: torch.Tensor | None = None) -> torch.Tensor:
    """(b,) REINFORCE baseline of each row.

    rloo: mean of the OTHER k − 1 samples of the same prompt (unbiased: independent of the row itself).
    mean: mean over the whole batch (slightly biased: includes the row); `mean` overrides it with the
    mean of the global batch when `values` is one data-parallel rank's share. none: zero.
    """
    if kind == "none":
        return torch.zeros_like(values)
    if kind == "mean":
        return (values.mean() if mean is None else mean.to(values)).expand_as(values)
    if kind == "rloo":
        if k < 2:
            raise ValueError("rloo needs k ≥ 2 samples per prompt")
        groups = values.view(-1, k)  # (b/k, k)
        return ((groups.sum(-1, keepdim=True) - groups) / (k - 1)).reshape(-1)
    raise ValueError(f"unknown baseline {kind!r}")


def advantages(values: torch.Tensor, k: int, kind: str, mean: torch.Tensor | None = None) -> torch.Tensor:
    """(b,) shaped reward minus its baseline (`mean`: see `baseline`)."""
    return values - baseline(values, k, kind, mean)


def reinforce_loss(logp: torch.Tensor, adv: torch.Tensor, n_total: int) -> torch.Tensor:
    """Scalar −Σ A·log π(y|x) / n_total over this micro-batch; summing over micro-batches gives the
    batch mean, so gradient accumulation equals one big batch. `adv` carries no gradient."""
    return -(adv.detach() * logp).sum() / n_total


def lr_at(step: int, lr: float, warmup: int) -> float:
    """Linear warm-up from lr/warmup at step 0 to lr at step warmup − 1, then constant."""
    return lr if warmup <= 0 else lr * min(1.0, (step + 1) / warmup)


@torch.no_grad()
def ema_update(anchor: list[torch.Tensor], theta: list[torch.Tensor], mu: float) -> None:
    """In place θ_ema ← (1 − μ)·θ_ema + μ·θ (fp32 anchor; θ is cast up to it)."""
    torch._foreach_mul_(anchor, 1.0 - mu)
    torch._foreach_add_(anchor, [t.to(a.dtype) for a, t in zip(anchor, theta)], alpha=mu)
