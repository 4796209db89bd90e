"""Magnitude thresholds of whole task vectors, for the methods that keep the largest elements of each
(TIES, breadcrumbs): the k-th largest |θ_m − θ_base| of a tensor, found before the write pass like the
angles of SLERP, with memory bounded by a chunk.

Exact, by radix selection on the bit patterns of |δ| as float32 (for non-negative floats the pattern
orders like the value): one pass counts the top 16 bits, a second counts the low 16 bits inside the
bucket that holds the k-th largest. A tensor whose |δ| fits `budget` bytes is instead read once and
ranked in memory (`torch.kthvalue`), which gives the same value.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from mergekit_warp.merge.engine import chunks

Values = Callable[[int, int], Tensor]
"""(start, stop) → |δ| of those elements, flat float32 on the math device."""


def kth_largest(values: Values, numel: int, ks: Sequence[int], chunk: int, budget: int) -> list[float]:
    """The k-th largest (1-based) of `numel` non-negative values, for each k in `ks`; +inf for k ≤ 0 (keep
    nothing), the smallest value for k ≥ numel (keep all)."""
    want = [min(max(k, 0), numel) for k in ks]
    if numel == 0 or not any(want):
        return [float("inf")] * len(ks)
    if numel * 4 <= budget:
        x = values(0, numel)
        return [float(torch.kthvalue(x, numel - k + 1).values) if k else float("inf") for k in want]
    hi = torch.zeros(1 << 16, dtype=torch.int64)
    for start, stop in chunks(numel, chunk):
        hi += torch.bincount(_bits(values(start, stop)) >> 16, minlength=1 << 16).cpu()
    above = hi.flip(0).cumsum(0).flip(0)  # above[b] = count of values whose top bits are ≥ b
    buckets = [int((above >= k).nonzero().max()) if k else -1 for k in want]  # the bucket holding rank k
    lo = {b: torch.zeros(1 << 16, dtype=torch.int64) for b in set(buckets) if b >= 0}
    for start, stop in chunks(numel, chunk):
        bits = _bits(values(start, stop))
        for b, counts in lo.items():
            counts += torch.bincount(bits[(bits >> 16) == b] & 0xFFFF, minlength=1 << 16).cpu()
    out = []
    for k, b in zip(want, buckets):
        if b < 0:
            out.append(float("inf"))
            continue
        rank = k - (int(above[b + 1]) if b + 1 < (1 << 16) else 0)  # rank inside bucket b
        within = lo[b].flip(0).cumsum(0).flip(0)
        low = int((within >= rank).nonzero().max())
        pattern = torch.tensor([(b << 16) | low], dtype=torch.int32)
        out.append(float(pattern.view(torch.float32)))
    return out


def _bits(x: Tensor) -> Tensor:
    """int64 bit patterns of non-negative float32 values (monotonic in the value)."""
    return x.float().contiguous().view(torch.int32).to(torch.int64)
