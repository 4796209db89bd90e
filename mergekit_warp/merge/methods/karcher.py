"""Karcher mean (mergekit's `karcher`): the weighted Riemannian (Fréchet) mean of the models' directions
on the unit sphere, per tensor, scaled by the weighted mean of their norms.

With weights ŵ = w / Σ w, per tensor: the unit vectors u_m = θ_m/‖θ_m‖ of the models with ‖θ_m‖ > tol
and ŵ_m > 0 (only these set the direction, their weights renormalised to α); the start
μ = normalise(Σ α_m·u_m) (u of the first of them when that sum's norm is below tol); then up to
`max_iter` Riemannian gradient steps: with φ_m = ∠(μ, u_m), T = Σ_{φ_m >= tol} α_m·φ_m/sin φ_m·(u_m − cos φ_m·μ)
(the log map); stop when ‖T‖ < tol, else μ ← cos‖T‖·μ + sin‖T‖·T/‖T‖ (the exp map), renormalised.
Output (Σ_m ŵ_m‖θ_m‖)·μ; zero when no model has a norm above tol; one model: that model.

Differences from mergekit 0.1.5: mergekit's `karcher` takes no per-model `weight` (its weights are
uniform, 1/N: the default here, with the same result), and counts a `base_model` as one more input
(this method takes no base: list it among the models). mergekit keeps the unit vectors in the inputs'
dtype (bf16 inputs: bf16 iterates); here math is fp32 and every angle comes from fp64 dot products.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from mergekit_warp.merge.methods.base import Context, Method, Param, Settings
from mergekit_warp.merge.methods.sphere import TENSOR, check_sums, gram_combine, model_weights, normalised

if TYPE_CHECKING:
    from torch import Tensor

    from mergekit_warp.io.reader import CheckpointReader
    from mergekit_warp.merge.engine import Combine

WEIGHT = Param(
    "weight",
    1.0,
    per_model=True,
    help="Weight of each model (uniform by default).",
    valid=lambda v: v >= 0,
    expect=">= 0",
)
MAX_ITER = Param(
    "max_iter", 10, kind=int, help="Most Riemannian gradient steps.", valid=lambda v: v >= 0, expect=">= 0"
)
TOL = Param(
    "tol",
    1e-5,
    help="Convergence threshold on the step, the angles and the norms.",
    valid=lambda v: v > 0,
    expect="> 0",
)
PARAMS = (WEIGHT, MAX_ITER, TOL)


def coefficients(g: Tensor, w: list[float], max_iter: int, tol: float) -> Tensor:
    """c (M,) with output Σ c_m·θ_m, from the Gram matrix g (M, M) of the tensors and weights w summing
    to 1, fp64: every iterate μ is kept as its coefficients on the θ's, so ⟨μ, θ_m⟩ = (g·μ)_m."""
    import torch

    g = g.double().cpu()
    k = len(w)
    if k == 1:
        return torch.ones(1, dtype=torch.float64)
    norms = g.diagonal().clamp_min(0).sqrt().tolist()
    valid = [m for m in range(k) if norms[m] > tol and w[m] > 0]
    if not valid:
        return torch.zeros(k, dtype=torch.float64)
    total = sum(w[m] for m in valid)
    alpha = {m: w[m] / total for m in valid}

    def unit(m: int) -> Tensor:
        e = torch.zeros(k, dtype=torch.float64)
        e[m] = 1.0 / norms[m]
        return e

    def norm(c: Tensor) -> float:
        return math.sqrt(max(float(c @ g @ c), 0.0))

    mu = sum((a * unit(m) for m, a in alpha.items()), torch.zeros(k, dtype=torch.float64))
    mn = norm(mu)
    mu = unit(valid[0]) if mn < tol else mu / mn
    for _ in range(max_iter):
        gm = g @ mu
        tangent = torch.zeros(k, dtype=torch.float64)
        for m, a in alpha.items():
            cos = max(-1.0, min(1.0, float(gm[m]) / norms[m]))
            theta = math.acos(cos)
            if theta < tol:
                continue
            tangent += a * theta / math.sin(theta) * (unit(m) - cos * mu)
        tn = norm(tangent)
        if tn < tol:
            break
        mu = math.cos(tn) * mu + math.sin(tn) / tn * tangent
        un = norm(mu)
        if un > tol:
            mu = mu / un
    return sum(w[m] * norms[m] for m in range(k)) * mu


def check(s: Settings, n_models: int, has_base: bool) -> list[str]:
    if s.given(WEIGHT.name):
        return [
            "mergekit's karcher has no per-model weight (it averages uniformly): mergekit-yaml on merge_config.yml ignores it"
        ]
    return []


def build(readers: list[CheckpointReader], s: Settings, ctx: Context) -> Combine:
    n = len(readers)
    check_sums("karcher", WEIGHT, s, [k for k in readers[0].names if readers[0].infos[k].is_float], n, None)

    def coeffs(name: str, g: Tensor) -> Tensor:
        w = normalised("karcher", WEIGHT, model_weights(WEIGHT, s, name, n), name)
        return coefficients(g[0], w, s.get(MAX_ITER, name), s.get(TOL, name))[None]

    return gram_combine(readers, ctx, lambda name: TENSOR, coeffs)


METHOD = Method(
    name="karcher",
    summary="(Σ w_m‖θ_m‖)·μ, μ the weighted Riemannian (Karcher) mean of θ_m/‖θ_m‖ on the sphere",
    base="none",
    roles=("", "models"),
    params=PARAMS,
    build=build,
    check=check,
    mergekit="karcher",
)
