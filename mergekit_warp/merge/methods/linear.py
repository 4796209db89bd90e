"""Linear (mergekit's `linear`, Wortsman et al. 2022 model soups): Σ w_m·θ_m / Σ w_m, or Σ w_m·θ_m
with `normalize: false`. Weights may vary by tensor (gradients, filters) and may be negative.

Differences from mergekit 0.1.5: mergekit divides by Σ w_m even when it is zero (the output is Inf/NaN);
here weights that sum to zero for a tensor, with `normalize`, are refused before any work. mergekit
counts a `base_model` as one more weighted input; this method takes no base (list it among the models).
Math in fp32, as mergekit's (fp64 inputs: mergekit keeps fp64, here fp32).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergekit_warp.merge.methods.base import Context, Method, Param, Settings
from mergekit_warp.merge.methods.sphere import check_sums, model_weights, normalised

if TYPE_CHECKING:
    from torch import Tensor

    from mergekit_warp.io.reader import CheckpointReader
    from mergekit_warp.merge.engine import Combine, Fetch

WEIGHT = Param("weight", per_model=True, help="Weight w_m of each model.")
NORMALIZE = Param("normalize", True, kind=bool, help="Divide by Σ w_m (true/false).")
PARAMS = (WEIGHT, NORMALIZE)


def weights(s: Settings, name: str, n_models: int) -> list[float]:
    """The coefficients of the models for tensor `name`: w / Σ w, or w."""
    w = model_weights(WEIGHT, s, name, n_models)
    return normalised("linear", WEIGHT, w, name) if s.get(NORMALIZE, name) else w


def build(readers: list[CheckpointReader], s: Settings, ctx: Context) -> Combine:
    import torch

    from mergekit_warp.merge.engine import linear_combine

    n = len(readers)
    check_sums("linear", WEIGHT, s, [k for k in readers[0].names if readers[0].infos[k].is_float], n, NORMALIZE)

    def coefficients(name: str, fetch: Fetch) -> Tensor:
        return torch.tensor(weights(s, name, n), dtype=torch.float64)

    return linear_combine(coefficients)


METHOD = Method(
    name="linear",
    summary="Σ w_m·θ_m / Σ w_m (normalize, the default) or Σ w_m·θ_m (mergekit's linear)",
    base="none",
    roles=("", "models"),
    params=PARAMS,
    build=build,
    mergekit="linear",
)
