"""Weighted average (model soup) Σ w_m θ_m, or of task vectors θ_init + Σ w_m (θ_m − θ_init) with a base."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from mergekit_warp.errors import WarpError
from mergekit_warp.io.reader import CheckpointReader
from mergekit_warp.merge.engine import Combine, Fetch, affine_combine
from mergekit_warp.merge.methods.base import Context, Method


def check(params: dict[str, Any], n_models: int, has_base: bool) -> tuple[dict[str, Any], list[str]]:
    if n_models < (1 if has_base else 2):
        raise WarpError(f"lerp needs at least two models (or one with --init), got {n_models}")
    weights = params.get("weights")
    w = [1.0 / n_models] * n_models if weights is None else [float(x) for x in weights]
    if len(w) != n_models:
        raise WarpError(f"--weights has {len(w)} values for {n_models} models; give one weight per model")
    if any(not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
        raise WarpError(f"--weights {w}: each must be a finite number >= 0, not all zero")
    notes = [] if abs(sum(w) - 1) < 1e-6 else [f"weights sum to {sum(w):g}, not 1: the result is rescaled"]
    return {"weights": w, "task_vectors": has_base}, notes


def build(readers: list[CheckpointReader], p: dict[str, Any], ctx: Context) -> Combine:
    w = p["weights"]
    if p["task_vectors"]:
        return affine_combine(lambda name, fetch: torch.tensor(w, dtype=torch.float64))

    def combine(name: str, fetch: Fetch) -> Tensor:
        acc = fetch(0).float().mul_(w[0])
        for m in range(1, len(w)):
            acc.add_(fetch(m), alpha=w[m])
        return acc

    return combine


METHOD = Method(
    name="lerp",
    summary="Σ w_m·θ_m (model soup), or θ_init + Σ w_m·(θ_m − θ_init) with --init",
    base="optional",
    roles=("init", "models"),
    check=check,
    build=build,
)
