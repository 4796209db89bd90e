"""Model Breadcrumbs (Davari & Belilovsky 2023): in each tensor of each task vector drop the ⌊gamma·n⌋
largest magnitudes (outliers) and the smallest, keeping ⌊density·n⌋ elements; then add (`breadcrumbs`)
or merge by TIES's sign election (`breadcrumbs_ties`). `normalize` and `rescale` off by default.

As mergekit 0.1.5's magnitude_outliers: the density wins over gamma (density·n + gamma·n > n drops fewer
outliers, so density 1 — the default — keeps everything and gamma has no effect), ⌊gamma·n⌋ = 0 (small
tensors: gamma·n < 1) drops no outlier and keeps the top ⌊density·n⌋, ⌊density·n⌋ = 0 keeps nothing.
(Earlier mergekit kept `sorted[n_bot:-n_top]`, which is empty when n_top = 0, dropping the whole task
vector of every tensor with gamma·n < 1; 0.1.5 fixed it, and warp follows the fix.) Equal magnitudes
at a threshold are dropped together at the upper one and kept together at the lower one: sparsify.py.
"""

from __future__ import annotations

from mergekit_warp.merge.methods.task_vectors import Family, define

LINEAR = define(
    "breadcrumbs",
    "θ_base + λ·Σ w_m·band(δ_m): drop the gamma largest and the smallest magnitudes, keep density",
    Family(drop="outliers", consensus=False, normalize=False),
)
TIES = define(
    "breadcrumbs_ties",
    "θ_base + λ·Σ_agree w_m·band(δ_m): breadcrumbs drops, then TIES's sign election",
    Family(drop="outliers", consensus=True, normalize=False),
)
