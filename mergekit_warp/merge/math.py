"""Pure merge math. Functions take tensors and numbers and return tensors; no files, no configs.
Everything is computed in fp32 or better: callers pass fp32 (or fp64) tensors and cast once at the end.

Notation (WARP, Ramé et al. 2024): θ_init the shared init, θ_m the fine-tuned weights, δ_m = θ_m − θ_init
the task vectors, Ω the angle between two task vectors.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Below this |sin Ω| the two task vectors are (anti)colinear and SLERP's weights blow up: use LERP.
SIN_EPS = 1e-6
# A task vector whose norm is below this (relative to the larger one) counts as zero: use LERP.
ZERO_EPS = 1e-12


def lerp(a: Tensor, b: Tensor, lam: float) -> Tensor:
    """(1 − λ)·a + λ·b."""
    return (1.0 - lam) * a.float() + lam * b.float()


def slerp_coeffs(dot: float, norm1: float, norm2: float, lam: float) -> tuple[float, float]:
    """The weights (w1, w2) of δ1 and δ2 in SLERP(δ1, δ2, λ) = w1·δ1 + w2·δ2.

    cos Ω = ⟨δ1, δ2⟩ / (‖δ1‖‖δ2‖); w1 = sin((1−λ)Ω)/sin Ω, w2 = sin(λΩ)/sin Ω. Falls back to LERP's
    (1 − λ, λ) when a task vector is zero or sin Ω ≈ 0 (colinear vectors, where the ratio is 0/0).
    """
    if min(norm1, norm2) <= ZERO_EPS * max(norm1, norm2, 1e-300):
        return 1.0 - lam, lam
    cos = max(-1.0, min(1.0, dot / (norm1 * norm2)))
    omega = math.acos(cos)
    sin = math.sin(omega)
    if sin < SIN_EPS:
        return 1.0 - lam, lam
    return math.sin((1.0 - lam) * omega) / sin, math.sin(lam * omega) / sin


def slerp_weights(gram: Tensor, lam: float | None = None) -> Tensor:
    """Weights c (M,) such that Σ c_m δ_m is the WARP SLERP of M task vectors whose Gram matrix
    G[i, j] = ⟨δ_i, δ_j⟩ is `gram` (M, M).

    M = 2: SLERP(δ1, δ2, λ) (λ defaults to 1/2). M > 2: the paper's iterative rule
    s_2 = SLERP(δ1, δ2, 1/2), s_k = SLERP(s_{k−1}, δ_k, 1/k); since each s_k is a linear combination of
    the δ's, its dot products and norm follow from G without touching the tensors again.
    """
    g = gram.double()
    m = g.shape[0]
    if m < 2:
        raise ValueError("SLERP needs at least two task vectors")
    c = torch.zeros(m, dtype=torch.float64)
    c[0] = 1.0
    for k in range(1, m):
        step_lam = lam if (m == 2 and lam is not None) else 1.0 / (k + 1)
        dot = float(c @ g[:, k])
        norm_s = math.sqrt(max(float(c @ g @ c), 0.0))
        norm_k = math.sqrt(max(float(g[k, k]), 0.0))
        w_s, w_k = slerp_coeffs(dot, norm_s, norm_k, step_lam)
        c = w_s * c
        c[k] = w_k
    return c


def liti(theta_init: Tensor, theta_merged: Tensor, eta: float) -> Tensor:
    """LITI: (1 − η)·θ_init + η·θ_merged; η > 1 extrapolates past the merge (as ExPO)."""
    return lerp(theta_init, theta_merged, eta)


GRAM_BLOCK = 4096


def gram(x: Tensor) -> Tensor:
    """X Xᵀ, shape (k, k) fp64, for rows X (k, n): the dot products of k flattened tensors.

    fp32 rows: products summed in fp32 within blocks of `GRAM_BLOCK` elements (one batched sgemm), the
    blocks accumulated in fp64. Relative error ≈ 1e-6 of a full fp64 computation (measured) at fp32
    speed; a plain fp32 sum over millions of elements drifts to ≈ 1e-4. fp64 rows: exact fp64.
    """
    if x.dtype == torch.float64:
        return x @ x.T
    x = x.float()
    k, n = x.shape
    m = n - n % GRAM_BLOCK
    g = torch.zeros(k, k, dtype=torch.float64, device=x.device)
    if m:
        xb = x[:, :m].view(k, m // GRAM_BLOCK, GRAM_BLOCK).transpose(0, 1)  # (blocks, k, GRAM_BLOCK)
        g += torch.bmm(xb, xb.transpose(1, 2)).sum(0, dtype=torch.float64)
    if m < n:
        tail = x[:, m:].double()
        g += tail @ tail.T
    return g
