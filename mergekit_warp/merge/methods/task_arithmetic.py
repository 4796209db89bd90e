"""Task arithmetic (Ilharco et al. 2023): θ_base + λ·Σ_m w_m·δ_m, δ_m = θ_m − θ_base, divided by Σ_m w_m
with `normalize` (default off). As mergekit's `task_arithmetic`; the shared rules are in task_vectors.py.
"""

from __future__ import annotations

from mergekit_warp.merge.methods.task_vectors import Family, define

METHOD = define(
    "task_arithmetic",
    "θ_base + λ·Σ w_m·(θ_m − θ_base), ÷ Σ w_m with --normalize",
    Family(drop=None, consensus=False, normalize=False),
)
