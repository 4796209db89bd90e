"""Exponential moving average over an ordered checkpoint sequence: θ ← (1 − μ)·θ + μ·θ_t, from C1."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from mergekit_warp.errors import WarpError
from mergekit_warp.io.reader import CheckpointReader
from mergekit_warp.merge.engine import Combine, Fetch
from mergekit_warp.merge.methods.base import Context, Method


def check(params: dict[str, Any], n_models: int, has_base: bool) -> tuple[dict[str, Any], list[str]]:
    if n_models < 2:
        raise WarpError(f"ema needs at least two checkpoints in order, got {n_models}")
    mu = float(params.get("mu", 0.01))
    if not math.isfinite(mu) or not 0 < mu <= 1:
        raise WarpError(f"--mu {mu}: must be in (0, 1] (the paper uses 0.01)")
    return {"mu": mu}, []


def build(readers: list[CheckpointReader], p: dict[str, Any], ctx: Context) -> Combine:
    mu = p["mu"]

    def combine(name: str, fetch: Fetch) -> Tensor:
        acc = fetch(0).float()
        for t in range(1, len(readers)):  # one checkpoint's chunk at a time: memory flat in n
            acc.mul_(1.0 - mu).add_(fetch(t), alpha=mu)  # θ ← (1 − μ)·θ + μ·θ_t, in place
        return acc

    return combine


METHOD = Method(
    name="ema",
    summary="θ ← (1 − μ)·θ + μ·θ_t over C1 … Cn, starting at C1",
    base="none",
    roles=("", "checkpoints"),
    check=check,
    build=build,
)
