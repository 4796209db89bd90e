"""DELLA (Deep et al. 2024, MagPrune): drop elements at random with keep probabilities ranked by
magnitude within each row, from density − ε (smallest) to density + ε (largest), linear in the rank
(mean: density); rescale; then merge by TIES's sign election (`della`, normalize on) or add
(`della_linear`, normalize off). λ scales the merged task vector.

As mergekit 0.1.5, with these differences:
- rescale (default on) is mergekit's: the kept values of a tensor are scaled to its L1 norm, not the
  paper's per-element 1/p_i;
- rows are the last dimension (mergekit ranks along dimension 1: the same for 1-D and 2-D tensors);
- a row of one element gets probability density (mergekit computes 0/0 there and fails);
- density 1 keeps everything and is not checked against ε (as mergekit); below 1, density ± ε must lie
  inside (0, 1) (as mergekit), checked for every tensor and model before any tensor is read;
- the draws are `base.uniform` (seed, tensor, model index, element index), reproducible bytes for any
  chunking, not mergekit's torch.bernoulli stream. Ties in magnitude are ranked by position.
Shared rules and differences: task_vectors.py.
"""

from __future__ import annotations

from mergekit_warp.merge.methods.task_vectors import Family, define

TIES = define(
    "della",
    "θ_base + λ·Σ_agree w_m·MagPrune(δ_m) ÷ Σ_agree w_m: keep p = density ± ε by rank in the row, sign election",
    Family(drop="della", consensus=True, normalize=True, rescale=True),
)
LINEAR = define(
    "della_linear",
    "θ_base + λ·Σ w_m·MagPrune(δ_m): keep p = density ± ε by magnitude rank in the row, L1 rescale",
    Family(drop="della", consensus=False, normalize=False, rescale=True),
)
