"""Magnitude thresholds of whole task vectors, for the methods that keep the largest elements of each
(TIES, breadcrumbs): the exact k-th largest |θ_m − θ_base| of a tensor, found before the tensor is
written, with memory bounded by a chunk.

By bracketing: a pass takes every s-th value (about `SAMPLE` of them); the sample's quantiles around
rank k, widened by four binomial standard deviations, give an interval [lo, hi] that holds the k-th
largest with near certainty; a second pass counts the values above hi and keeps those inside, and the
k-th largest is ranked among those few. A tensor of one chunk is read once for both. Exact whatever
the sample: when the interval misses rank k, or holds more than `budget` bytes of values (heavy ties,
e.g. many unchanged elements), radix selection on the bit patterns of |δ| as float32 takes over (for
non-negative floats the pattern orders like the value): one pass counts the top 16 bits, a second the
low 16 bits inside the bucket that holds the k-th largest.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from mergekit_warp.merge.engine import chunks

Values = Callable[[int, int], Tensor]
"""(start, stop) → |δ| of those elements, flat float32 on the math device."""

SAMPLE = 1 << 16


def kth_largest(values: Values, numel: int, ks: Sequence[int], chunk: int, budget: int) -> list[float]:
    """The k-th largest (1-based) of `numel` non-negative values, for each k in `ks`; +inf for k ≤ 0 (keep
    nothing), the smallest value for k ≥ numel (keep all)."""
    want = [min(max(k, 0), numel) for k in ks]
    if numel == 0 or not any(want):
        return [math.inf] * len(ks)
    spans = list(chunks(numel, chunk))
    whole = values(0, numel) if len(spans) == 1 else None
    get = (lambda a, b: whole) if whole is not None else values
    stride = max(1, numel // SAMPLE)
    sample = torch.cat([get(a, b)[(-a) % stride :: stride] for a, b in spans]).sort(descending=True).values
    brackets = [_bracket(sample, numel, k) if k else None for k in want]
    above, count = [0] * len(want), [0] * len(want)
    inside: list[list[Tensor] | None] = [[] for _ in want]
    for a, b in spans:
        x = get(a, b)
        for i, br in enumerate(brackets):
            if br is None:
                continue
            lo, hi = br
            above[i] += int((x > hi).sum())
            mask = (x >= lo).logical_and_(x <= hi)
            count[i] += int(mask.sum())
            held = inside[i]
            if held is not None and lo < hi:
                held.append(x[mask])
                if count[i] * 4 > budget:
                    inside[i] = None  # too many to rank in memory: radix selection
    out: list[float | None] = []
    for i, k in enumerate(want):
        br, r, held = brackets[i], k - above[i], inside[i]
        if br is None:
            out.append(math.inf)
        elif not 1 <= r <= count[i]:
            out.append(None)  # the sample misled the bracket
        elif br[0] == br[1]:
            out.append(br[0])  # all inside are equal
        elif held is None:
            out.append(None)
        else:
            mid = torch.cat(held)
            out.append(float(torch.kthvalue(mid, mid.numel() - r + 1).values))
    missed = [k for k, v in zip(want, out) if v is None]
    if missed:
        found = dict(zip(missed, _radix(values, numel, missed, chunk)))
        out = [found[k] if v is None else v for k, v in zip(want, out)]
    return out  # type: ignore[return-value]


def _bracket(sample: Tensor, numel: int, k: int) -> tuple[float, float]:
    """[lo, hi] around the k-th largest of `numel` values, from a descending `sample` of them."""
    s = sample.numel()
    q = k / numel
    pos = q * s
    margin = 4 * math.sqrt(s * q * (1 - q)) + 8
    hi_at, lo_at = math.floor(pos - margin), math.ceil(pos + margin)
    hi = math.inf if hi_at < 0 else float(sample[hi_at])
    lo = 0.0 if lo_at >= s else float(sample[lo_at])
    return lo, hi


def _radix(values: Values, numel: int, want: Sequence[int], chunk: int) -> list[float]:
    """The k-th largest for each k in `want` (1 ≤ k ≤ numel) by two counting passes over the bits."""
    hi = torch.zeros(1 << 16, dtype=torch.int64)
    for start, stop in chunks(numel, chunk):
        hi += torch.bincount(_bits(values(start, stop)) >> 16, minlength=1 << 16).cpu()
    above = hi.flip(0).cumsum(0).flip(0)  # above[b] = count of values whose top bits are ≥ b
    buckets = [int((above >= k).nonzero().max()) for k in want]  # the bucket holding rank k
    lo = {b: torch.zeros(1 << 16, dtype=torch.int64) for b in set(buckets)}
    for start, stop in chunks(numel, chunk):
        bits = _bits(values(start, stop))
        for b, counts in lo.items():
            counts += torch.bincount(bits[(bits >> 16) == b] & 0xFFFF, minlength=1 << 16).cpu()
    out = []
    for k, b in zip(want, buckets):
        rank = k - (int(above[b + 1]) if b + 1 < (1 << 16) else 0)  # rank inside bucket b
        within = lo[b].flip(0).cumsum(0).flip(0)
        low = int((within >= rank).nonzero().max())
        pattern = torch.tensor([(b << 16) | low], dtype=torch.int32)
        out.append(float(pattern.view(torch.float32)))
    return out


def _bits(x: Tensor) -> Tensor:
    """int64 bit patterns of non-negative float32 values (monotonic in the value)."""
    return x.float().contiguous().view(torch.int32).to(torch.int64)
