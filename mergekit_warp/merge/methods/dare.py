"""DARE (Yu et al. 2023): drop each element of each task vector with probability 1 − density, rescale the
survivors, then add them (`dare_linear`) or merge them by TIES's sign election (`dare_ties`).

As mergekit's: `rescale` (default on) scales the kept values of each tensor so that their L1 norm is the
task vector's, ‖δ‖₁/‖kept δ‖₁ (≈ 1/density: the paper's 1/(1 − p) in expectation); `normalize` off by
default. The draws are `base.uniform` (seed, tensor, model index, element index), not torch.bernoulli:
the same --seed gives the same bytes for any chunk size or sharding, not mergekit's bytes. Shared rules
and differences: task_vectors.py.
"""

from __future__ import annotations

from mergekit_warp.merge.methods.task_vectors import Family, define

LINEAR = define(
    "dare_linear",
    "θ_base + λ·Σ w_m·DARE(δ_m): keep each element with probability density, L1 rescale",
    Family(drop="random", consensus=False, normalize=False, rescale=True),
)
TIES = define(
    "dare_ties",
    "θ_base + λ·Σ_agree w_m·DARE(δ_m): DARE drops, then TIES's sign election",
    Family(drop="random", consensus=True, normalize=False, rescale=True),
)
