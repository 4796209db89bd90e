"""Model Stock (mergekit's `model_stock`, Jang et al. 2024): θ_base + t·(mean_m θ_m − θ_base) for N >= 2
fine-tuned models, with t = N·cos θ / (1 + (N − 1)·cos θ) and cos θ the mean over pairs of the cosine
between task vectors δ_m = θ_m − θ_base; per tensor, or per row (`filter_wise`: each slice along the last
dimension; a 1-D tensor is one row). A zero task vector has cosine 0 with everything; where
|1 + (N − 1)·cos θ| < 1e-6 there is no finite t and the output is θ_base (t = 0), as in mergekit.

Differences from mergekit 0.1.5: mergekit divides ⟨δ_a, δ_b⟩ by max(‖δ_a‖‖δ_b‖, 1e-6), an absolute floor:
wherever the product of two task vectors' norms is below 1e-6 (small updates, rows with `filter_wise`:
an RL fine-tune's row moves by ~1e-4) its cosine is shrunk toward 0, and t with it, so the output
silently falls back toward the base. That is a bug: here the cosine is ⟨δ_a, δ_b⟩/(‖δ_a‖‖δ_b‖), 0 only
for an exactly zero task vector; where the product is >= 1e-6 the two agree. mergekit computes in the
inputs' dtype (bf16 inputs: bf16 math); here math is fp32 and the cosines come from fp64 dot products.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergekit_warp.merge.methods.base import Context, Method, Param, Settings
from mergekit_warp.merge.methods.sphere import ROW, TENSOR, gram_combine

if TYPE_CHECKING:
    from torch import Tensor

    from mergekit_warp.io.reader import CheckpointReader
    from mergekit_warp.merge.engine import Combine

SINGULAR = 1e-6  # |1 + (N − 1)·cos θ| below this: t = 0 (mergekit's)

FILTER_WISE = Param("filter_wise", False, kind=bool, help="One t per row (filter) instead of per tensor.")
PARAMS = (FILTER_WISE,)


def interpolation(g: Tensor) -> Tensor:
    """t (B,) from the Gram matrices g (B, N, N) of the N task vectors, fp64."""
    import torch

    n = g.shape[-1]
    norms = g.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()
    den = norms[:, :, None] * norms[:, None, :]
    cos = torch.where(den > 0, g / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(g)).clamp(-1, 1)
    a, b = torch.triu_indices(n, n, offset=1)
    mean_cos = cos[:, a, b].mean(dim=1)
    den_t = 1 + (n - 1) * mean_cos
    singular = den_t.abs() < SINGULAR
    return torch.where(singular, torch.zeros_like(mean_cos), n * mean_cos / torch.where(singular, 1.0, den_t))


def build(readers: list[CheckpointReader], s: Settings, ctx: Context) -> Combine:
    n = len(readers) - 1

    def coeffs(name: str, g: Tensor) -> Tensor:
        return (interpolation(g) / n)[:, None].expand(-1, n)  # θ_base + Σ (t/N)·δ_m

    return gram_combine(readers, ctx, lambda name: ROW if s.get(FILTER_WISE, name) else TENSOR, coeffs)


METHOD = Method(
    name="model_stock",
    summary="θ_base + t·(mean θ_m − θ_base), t = N·cos θ/(1 + (N−1)·cos θ), cos θ the mean pairwise task-vector cosine",
    base="required",
    roles=("base", "models"),
    params=PARAMS,
    build=build,
    min_models=2,
    rows=True,
    mergekit="model_stock",
)
