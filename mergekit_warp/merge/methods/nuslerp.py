"""NuSLERP (mergekit's `nuslerp`): SLERP of two models at t = w2 / (w1 + w2) (t = 1/2 when |w1 + w2| <
1e-6), of the task vectors δ_m = θ_m − θ_base with a base (θ_base + SLERP(δ1, δ2, t)), else of the weights.

SLERP(v1, v2, t) = sin((1 − t)Ω)/sin Ω·v1 + sin(tΩ)/sin Ω·v2 with cos Ω = ⟨v1, v2⟩ / (‖v1‖‖v2‖), each norm
floored at 1e-7 (a zero vector is at Ω = 90° from everything, as in mergekit), and (1 − t)·v1 + t·v2 where
1 − cos²Ω <= 1e-16 (colinear). The vectors: each tensor flattened (`nuslerp_flatten`, the default); with
`nuslerp_flatten: false`, each row, i.e. slice along the last dimension, or with `nuslerp_row_wise: true`
each slice along dimension 0 — of a 2-D weight, its columns. That is what mergekit's code does
(row_wise=True interpolates along dim 0); mergekit's README words the two the other way round.

Differences from mergekit 0.1.5: mergekit computes in the inputs' dtype (bf16 inputs: bf16 math); here
math is fp32 and the angles come from fp64 dot products. Otherwise the same formula and thresholds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergekit_warp.errors import WarpError
from mergekit_warp.merge.methods.base import Context, Method, Param, Settings
from mergekit_warp.merge.methods.sphere import COLUMN, ROW, TENSOR, gram_combine, model_weights

if TYPE_CHECKING:
    from torch import Tensor

    from mergekit_warp.io.reader import CheckpointReader
    from mergekit_warp.merge.engine import Combine

NORM_FLOOR = 1e-7  # mergekit normalises v / max(‖v‖, 1e-7)
COLINEAR = 1e-16  # 1 − cos² at or below this (mergekit: eps² with eps = 1e-8): LERP

WEIGHT = Param("weight", per_model=True, help="Weight of each of the two models; t = w2 / (w1 + w2).")
FLATTEN = Param("nuslerp_flatten", True, kind=bool, help="One angle per tensor (false: per row or column).")
ROW_WISE = Param(
    "nuslerp_row_wise",
    False,
    kind=bool,
    help="With nuslerp_flatten false: vectors along dimension 0 (a matrix's columns) instead of rows.",
)
PARAMS = (WEIGHT, FLATTEN, ROW_WISE)


def check(s: Settings, n_models: int, has_base: bool) -> list[str]:
    if n_models != 2:
        raise WarpError(f"nuslerp takes exactly two models, got {n_models}; for more use multislerp or karcher")
    if s.given(ROW_WISE.name) and s.get(FLATTEN) is True:
        return ["nuslerp_row_wise only applies where nuslerp_flatten is false (default true: one angle per tensor)"]
    return []


def interpolation(s: Settings, name: str) -> float:
    w1, w2 = model_weights(WEIGHT, s, name, 2)
    return 0.5 if abs(w1 + w2) < 1e-6 else w2 / (w1 + w2)


def slerp_coefficients(g: Tensor, t: float) -> Tensor:
    """(B, 2) coefficients of SLERP(v1, v2, t) = c1·v1 + c2·v2 from Gram matrices g (B, 2, 2), fp64."""
    import torch

    norms = g.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt().clamp_min(NORM_FLOOR)
    cos = (g[:, 0, 1] / (norms[:, 0] * norms[:, 1])).clamp(-1, 1)
    colinear = (1 - cos * cos) <= COLINEAR
    omega = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    sin = torch.where(colinear, torch.ones_like(cos), torch.sin(omega))
    c = torch.stack([torch.sin((1 - t) * omega) / sin, torch.sin(t * omega) / sin], dim=1)
    lerp = torch.tensor([1 - t, t], dtype=c.dtype, device=c.device)
    return torch.where(colinear[:, None], lerp, c)


def build(readers: list[CheckpointReader], s: Settings, ctx: Context) -> Combine:
    def how(name: str) -> str:
        if s.get(FLATTEN, name):
            return TENSOR
        return COLUMN if s.get(ROW_WISE, name) else ROW

    return gram_combine(readers, ctx, how, lambda name, g: slerp_coefficients(g, interpolation(s, name)))


METHOD = Method(
    name="nuslerp",
    summary="SLERP of two models at t = w2/(w1+w2): θ_base + SLERP(δ1, δ2, t) with --base, else of θ1, θ2; "
    "per tensor, row or column",
    base="optional",
    roles=("base", "models"),
    params=PARAMS,
    build=build,
    check=check,
    min_models=2,
    rows=True,
    mergekit="nuslerp",
)
