"""Exponential moving average over an ordered checkpoint sequence: θ ← (1 − μ)·θ + μ·θ_t, from C1."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergekit_warp.merge.methods.base import Context, Method, Param, Settings

if TYPE_CHECKING:
    from torch import Tensor

    from mergekit_warp.io.reader import CheckpointReader
    from mergekit_warp.merge.engine import Combine, Fetch

PARAMS = (
    Param(
        "mu",
        0.01,
        help="EMA rate μ: θ ← (1 − μ)·θ + μ·θ_t.",
        valid=lambda v: 0 < v <= 1,
        expect="in (0, 1] (the paper uses 0.01)",
    ),
)


def build(readers: list[CheckpointReader], s: Settings, ctx: Context) -> Combine:
    import torch

    mu = s.get(PARAMS[0])

    def combine(name: str, fetch: Fetch) -> Tensor:
        acc = fetch(0).to(torch.float32, copy=True)
        for t in range(1, len(readers)):  # one checkpoint's chunk at a time: memory flat in n
            acc.mul_(1.0 - mu).add_(fetch(t), alpha=mu)  # θ ← (1 − μ)·θ + μ·θ_t, in place
        return acc

    return combine


METHOD = Method(
    name="ema",
    summary="θ ← (1 − μ)·θ + μ·θ_t over C1 … Cn, starting at C1",
    base="none",
    roles=("", "checkpoints"),
    params=PARAMS,
    build=build,
    min_models=2,
)
