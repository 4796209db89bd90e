"""TIES-merging (Yadav et al. 2023): trim each task vector to its top `density` fraction by magnitude
(k = max(1, ⌊density·n⌋) elements of each tensor), elect a sign per element (of Σ_m w_m·δ̂_m, or by
count of signs), and average the agreeing w_m·δ̂_m over the agreeing weights (`normalize`, default on).

As mergekit's `ties` (rescale off by default; on, the kept values are scaled to the tensor's L1 norm).
Equal magnitudes at the threshold are all kept (mergekit's sort keeps an arbitrary k of them): see
sparsify.py. Shared rules and differences: task_vectors.py.
"""

from __future__ import annotations

from mergekit_warp.merge.methods.task_vectors import Family, define

METHOD = define(
    "ties",
    "θ_base + λ·Σ_agree w_m·top_density(δ_m) ÷ Σ_agree w_m, agree: sign = elected sign of Σ w_m·top(δ_m)",
    Family(drop="magnitude", consensus=True, normalize=True),
)
