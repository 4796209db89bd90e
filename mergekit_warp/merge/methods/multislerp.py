"""Multi-SLERP (mergekit's `multislerp`): barycentric interpolation of N models on the hypersphere, per
tensor, of the task vectors v_m = θ_m − θ_base with a base, else of the weights v_m = θ_m.

With weights w (divided by Σ w when `normalize_weights`, the default): the unit vectors u_m = v_m /
(‖v_m‖ + eps), their weighted mean m = Σ w_m·u_m normalised, m̂ = m/‖m‖; the tangent vectors at m̂,
T = Σ w_m·(u_m − ⟨u_m, m̂⟩·m̂); back to the sphere, r = cos‖T‖·m̂ + sin‖T‖/‖T‖·T with ‖T‖ + eps for ‖T‖;
scaled to the weighted mean norm: output = (Σ w_m‖v_m‖)·r (+ θ_base). One model: that model. When
‖m‖ < eps (antipodal inputs whose weights cancel): two models give Σ w_m·v_m, more are an error.

Note: T vanishes identically (Σ w_m·⟨u_m, m̂⟩ = ⟨m, m̂⟩ = ‖m‖, so T = m − ‖m‖·m̂ = 0): the formula is the
normalised weighted mean of the unit vectors, r = m̂ up to rounding. It is computed as defined all the same.

Differences from mergekit 0.1.5: mergekit computes in the inputs' dtype (bf16 inputs: bf16 math); here
math is fp32, norms and angles from fp64 dot products. When every vector of a tensor is zero (a tensor no
model changed, with a base) mergekit raises for three or more models; the output here is that zero
vector (θ_base): its norm, the weighted mean of zeros, is zero whatever the direction. Weights that sum to
zero with `normalize_weights` (mergekit: NaN) are refused before any work.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from mergekit_warp.errors import WarpError
from mergekit_warp.merge.methods.base import Context, Method, Param, Settings
from mergekit_warp.merge.methods.sphere import TENSOR, check_sums, gram_combine, model_weights, normalised

if TYPE_CHECKING:
    from torch import Tensor

    from mergekit_warp.io.reader import CheckpointReader
    from mergekit_warp.merge.engine import Combine

WEIGHT = Param("weight", per_model=True, help="Weight w_m of each model.")
NORMALIZE = Param("normalize_weights", True, kind=bool, help="Divide the weights by their sum (true/false).")
EPS = Param(
    "eps", 1e-8, help="Added to the norms it divides by.", valid=lambda v: v > 0, expect="a small positive number"
)
PARAMS = (WEIGHT, NORMALIZE, EPS)


def coefficients(g: Tensor, w: list[float], eps: float, name: str = "") -> Tensor:
    """c (M,) with output Σ c_m·v_m, from the Gram matrix g (M, M) of the vectors, fp64."""
    import torch

    g = g.double().cpu()
    wt = torch.tensor(w, dtype=torch.float64)
    if len(w) == 1:
        return torch.ones(1, dtype=torch.float64)
    norms = g.diagonal().clamp_min(0).sqrt()
    a = 1.0 / (norms + eps)  # u_m = a_m·v_m
    mu = wt * a  # the weighted mean of the unit vectors, Σ μ_m·v_m

    def norm(c: Tensor) -> float:
        return math.sqrt(max(float(c @ g @ c), 0.0))

    mean_norm = norm(mu)
    if mean_norm < eps:
        if not bool(((norms > 0) & (wt != 0)).any()):
            return torch.zeros_like(wt)  # every weighted vector is zero: so is the output
        if len(w) == 2:
            return wt  # mergekit's fallback: the weighted sum
        raise WarpError(
            f"multislerp: for tensor {name} the weighted mean of the unit vectors is zero (antipodal inputs whose "
            "weights cancel); change the weights"
        )
    mean = mu / mean_norm
    dots = a * (g @ mean)  # ⟨u_m, m̂⟩
    tangent = mu - float(wt @ dots) * mean  # Σ w_m·(u_m − ⟨u_m, m̂⟩·m̂)
    tn = norm(tangent) + eps
    r = math.cos(tn) * mean + (math.sin(tn) / tn) * tangent
    return float(wt @ norms) * r


def build(readers: list[CheckpointReader], s: Settings, ctx: Context) -> Combine:
    n = len(readers) - ctx.has_base
    floats = [k for k in readers[0].names if readers[0].infos[k].is_float]
    check_sums("multislerp", WEIGHT, s, floats, n, NORMALIZE)

    def coeffs(name: str, g: Tensor) -> Tensor:
        w = model_weights(WEIGHT, s, name, n)
        if s.get(NORMALIZE, name):
            w = normalised("multislerp", WEIGHT, w, name)
        return coefficients(g[0], w, s.get(EPS, name), name)[None]

    return gram_combine(readers, ctx, lambda name: TENSOR, coeffs)


METHOD = Method(
    name="multislerp",
    summary="(Σ w_m‖v_m‖)·normalize(Σ w_m·v_m/‖v_m‖) on the sphere, v_m = θ_m − θ_base with --base, else θ_m",
    base="optional",
    roles=("base", "models"),
    params=PARAMS,
    build=build,
    mergekit="multislerp",
)
