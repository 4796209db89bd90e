"""LoRA adapters as task vectors, merged without dense matrices. Pure math: tensors in, tensors out.

A LoRA adapter changes a linear layer of its base by δ = s·B·A (B: out × r, A: r × in, s its scale).
Here the scale is folded into B (`Factors`), so δ = B·A, and:

- inner products need no dense matrix: ⟨B_i A_i, B_j A_j⟩ = Σ (B_iᵀ B_j) ∘ (A_i A_jᵀ), a sum over an
  r_i × r_j matrix (`dot`): SLERP's angles between adapters are exact and cheap;
- a linear combination Σ c_m δ_m is exactly the adapter B = [c_1 B_1 | … | c_M B_M], A = [A_1; …; A_M]
  of rank Σ r_m (`combine`): SLERP, LERP and LITI toward the base give adapters, exactly;
- an adapter can be cut to rank R (`truncate`): QR of B and of Aᵀ, then the SVD of the small
  (Σr) × (Σr) product of their R factors; the relative Frobenius error of the cut is returned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Factors:
    """δ = B·A of one linear layer: B (out, r) with the adapter's scale folded in, A (r, in)."""

    B: Tensor
    A: Tensor

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return self.B.shape[0], self.A.shape[1]

    def dense(self) -> Tensor:
        """B·A in fp32 (or the factors' wider dtype)."""
        return self.B.float() @ self.A.float() if self.B.dtype != torch.float64 else self.B @ self.A


def dot(x: Factors, y: Factors) -> float:
    """⟨x.B x.A, y.B y.A⟩_F = Σ (x.Bᵀ y.B) ∘ (x.A y.Aᵀ), in fp64."""
    bb = x.B.double().T @ y.B.double()
    aa = x.A.double() @ y.A.double().T
    return float((bb * aa).sum())


def combine(coeffs: list[float], parts: list[Factors]) -> Factors:
    """Σ c_m·(B_m A_m) as one adapter of rank Σ r_m: B = [c_1 B_1 | …], A = [A_1; …] (fp32)."""
    if not parts:
        raise ValueError("nothing to combine")
    B = torch.cat([float(c) * p.B.float() for c, p in zip(coeffs, parts, strict=True)], dim=1)
    A = torch.cat([p.A.float() for p in parts], dim=0)
    return Factors(B, A)


def truncate(f: Factors, rank: int) -> tuple[Factors, float]:
    """The best rank-`rank` approximation of B·A (Eckart–Young), as factors, and its relative
    Frobenius error ‖BA − B'A'‖ / ‖BA‖ (0 when nothing was cut). B = Q_b R_b and Aᵀ = Q_a R_a, so
    BA = Q_b (R_b R_aᵀ) Q_aᵀ; the SVD U S Vᵀ of the small middle gives B' = Q_b U_k S_k, A' = (Q_a V_k)ᵀ."""
    if rank < 1:
        raise ValueError("rank must be ≥ 1")
    B, A = f.B.double(), f.A.double()
    qb, rb = torch.linalg.qr(B)
    qa, ra = torch.linalg.qr(A.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    k = min(rank, s.numel())
    total = float(s.square().sum())
    err = (float(s[k:].square().sum()) / total) ** 0.5 if total > 0 else 0.0
    return Factors((qb @ u[:, :k] * s[:k]).float(), (qa @ vh[:k].T).T.contiguous().float()), err
