"""Weighted average (model soup) Σ w_m θ_m, or of task vectors θ_init + Σ w_m (θ_m − θ_init) with a base."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from mergekit_warp.errors import WarpError
from mergekit_warp.merge.methods.base import Context, Method, Param, Settings

if TYPE_CHECKING:
    from mergekit_warp.io.reader import CheckpointReader
    from mergekit_warp.merge.engine import Combine

PARAMS = (Param("weights", None, raw=True, help="One weight per model, comma-separated (default: uniform)."),)


def model_weights(s: Settings, n_models: int) -> list[float]:
    return check_weights(s.top.get("weights"), n_models)


def check_weights(given: list[float] | None, n_models: int) -> list[float]:
    """The weights of a soup of `n_models` (default uniform): one per model, finite, ≥ 0, not all zero."""
    w = [1.0 / n_models] * n_models if given is None else [float(x) for x in given]
    if len(w) != n_models:
        raise WarpError(f"--weights has {len(w)} values for {n_models} models; give one weight per model")
    if any(not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
        raise WarpError(f"--weights {w}: each must be a finite number >= 0, not all zero")
    return w


def check(s: Settings, n_models: int, has_base: bool) -> list[str]:
    if n_models < (1 if has_base else 2):
        raise WarpError(f"lerp needs at least two models (or one with --init), got {n_models}")
    w = model_weights(s, n_models)
    what = "the task vectors add up to" if has_base else "the result is the weights times"
    return [] if abs(sum(w) - 1) < 1e-6 else [f"weights sum to {sum(w):g}, not 1 (not normalised): {what} that sum"]


def build(readers: list[CheckpointReader], s: Settings, ctx: Context) -> Combine:
    import torch

    from mergekit_warp.merge.engine import affine_combine, linear_combine

    w = torch.tensor(model_weights(s, len(readers) - ctx.has_base), dtype=torch.float64)
    return (affine_combine if ctx.has_base else linear_combine)(lambda name, fetch: w)


METHOD = Method(
    name="lerp",
    summary="Σ w_m·θ_m (model soup), or θ_init + Σ w_m·(θ_m − θ_init) with --init",
    base="optional",
    roles=("init", "models"),
    params=PARAMS,
    build=build,
    check=check,
)
