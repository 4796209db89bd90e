"""The drops of the task-vector methods (task_vectors.py), element by element on a chunk of
δ = θ_m − θ_base, and the statistics of whole tensors they need before the write pass.

- magnitude (TIES): keep the k = max(1, ⌊density·n⌋) largest |δ| of the tensor;
- outliers (breadcrumbs): drop the ⌊gamma·n⌋ largest |δ| (fewer when density·n + gamma·n > n: the
  density wins), keep the next ⌊density·n⌋, drop the rest;
- random (DARE): keep each element with probability density;
- della (DELLA): keep with probability p_i = density − ε + 2ε·r_i/(n_row − 1), r_i the 0-based rank of
  |δ_i| within its row (the last dimension; a 1-D tensor is one row);
- rescale: multiply the kept values by ‖δ‖₁ / ‖kept δ‖₁ over the whole tensor (mergekit's L1 rescale;
  none when either norm is below 1e-7).

The magnitude thresholds are the exact k-th largest |δ| (merge/select.py); an element is kept when
|δ| ≥ the threshold (and, for outliers, < the upper one). Where several elements share the threshold's
magnitude (possible with bf16 inputs, never with continuous data) all of them are kept (at the lower
threshold) or dropped (at the upper one), where mergekit's sort would pick some arbitrarily. Random
draws are `base.uniform` (seed, tensor name, model index among the models, element index): the same
seed gives the same bytes for any chunk size or sharding. Everything is computed in fp32, and the L1
norms in fp64.

Imported by `build` only: it loads torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from mergekit_warp.io.reader import CheckpointReader
from mergekit_warp.merge.engine import chunks, fetch_raw
from mergekit_warp.merge.methods.base import uniform
from mergekit_warp.merge.select import kth_largest

BUDGET = 256 << 20  # bytes of |δ| near a threshold ranked in memory; beyond, streamed radix selection
RESCALE_EPS = 1e-7  # mergekit's: no rescale when either L1 norm is below it
MAGNITUDE = ("magnitude", "outliers")


@dataclass
class Drop:
    """How one model's task vector of one tensor is sparsified; `low`, `high` and `scale` are filled in
    by `statistics`."""

    kind: str | None  # None, "magnitude", "outliers", "random" or "della"
    density: float = 1.0
    gamma: float = 0.0
    epsilon: float = 0.0
    rescale: bool = False
    low: float = 0.0  # keep |δ| ≥ low …
    high: float = math.inf  # … and |δ| < high
    scale: float = 1.0

    @property
    def active(self) -> bool:
        return self.kind is not None and self.density < 1


def ranks(numel: int, d: Drop) -> list[int]:
    """The ranks (1-based, largest first) of the thresholds [high, low] of a magnitude drop of `numel`
    elements; rank ≤ 0 means +inf (nothing above it)."""
    if d.kind == "magnitude":
        return [0, max(1, int(d.density * numel))]
    target, top = int(d.density * numel), int(d.gamma * numel)
    bottom = max(0, numel - target - top)  # mergekit's: the outliers give way to the target density
    top = numel - bottom - target
    return [top, top + target]


def dropped(d: Drop, delta: Tensor, seed: int, name: str, model: int, start: int, row: int) -> Tensor | None:
    """Which elements of `delta` (elements [start, start + len) of tensor `name`, model `model`) are
    dropped; None when none is. `row`: the row length (della; chunks hold whole rows)."""
    if not d.active:
        return None
    if d.kind in MAGNITUDE:
        a = delta.abs()
        out = a < d.low
        return out if d.high == math.inf else out.logical_or_(a >= d.high)
    u = uniform(seed, name, model, start, start + delta.numel(), device=delta.device)
    if d.kind == "random":
        return u >= d.density
    return u >= della_probs(delta.abs(), row, d.density, d.epsilon)


def della_probs(a: Tensor, row: int, density: float, epsilon: float) -> Tensor:
    """Keep probabilities from density − ε (smallest |δ| of a row) to density + ε (largest), linear in
    the rank; a row of one element gets `density` (mergekit divides 0 by 0 there and fails)."""
    if row == 1:
        return torch.full_like(a, density)
    x = a.view(-1, row)
    order = x.argsort(dim=1, stable=True)  # ties ranked by position: the same on every device
    r = torch.empty_like(order).scatter_(1, order, torch.arange(row, device=a.device).expand_as(order))
    return r.view(-1).float().mul_(2 * epsilon / (row - 1)).add_(density - epsilon)


def row_length(shape: tuple[int, ...]) -> int:
    """The row of `shape` as the engine keeps it whole (rows=True): the last dimension, a 1-D tensor whole."""
    return shape[-1] if len(shape) > 1 else max(1, math.prod(shape))


def delta(readers: list[CheckpointReader], m: int, name: str, start: int, stop: int, device: torch.device) -> Tensor:
    """θ_m − θ_base of elements [start, stop), fp32 (readers[0] is the base; m counts from 1)."""
    return (
        fetch_raw(readers[m], name, start, stop, device)
        .to(torch.float32, copy=True)
        .sub_(fetch_raw(readers[0], name, start, stop, device))
    )


def statistics(
    readers: list[CheckpointReader], name: str, drops: list[Drop], *, seed: int, device: torch.device, chunk: int
) -> None:
    """Fill in the thresholds and rescale factors of the active drops of tensor `name` (one per model),
    one model at a time: memory is a chunk, or the few values near a threshold (merge/select.py)."""
    numel = readers[0].infos[name].numel
    for m, d in enumerate(drops, start=1):
        if not d.active:
            continue

        def values(start: int, stop: int, m: int = m) -> Tensor:
            if stop - start <= chunk:
                return delta(readers, m, name, start, stop, device).abs_()
            out = torch.empty(stop - start, device=device)  # assembled chunk by chunk: peak = |δ| + a chunk
            for a, b in chunks(stop - start, chunk):
                out[a:b] = delta(readers, m, name, start + a, start + b, device).abs_()
            return out

        if d.kind in MAGNITUDE:
            d.high, d.low = kth_largest(values, numel, ranks(numel, d), chunk, BUDGET)
        if d.rescale:
            d.scale = _l1_scale(values, d, seed, name, m - 1, numel, chunk, readers, device)


def _l1_scale(
    values: Callable[[int, int], Tensor],
    d: Drop,
    seed: int,
    name: str,
    model: int,
    numel: int,
    chunk: int,
    readers: list[CheckpointReader],
    device: torch.device,
) -> float:
    """‖δ‖₁ / ‖kept δ‖₁ of the whole tensor (1 when either is below `RESCALE_EPS`), in whole rows."""
    row = row_length(readers[0].infos[name].shape)
    before = after = 0.0
    for start, stop in chunks(numel, max(1, chunk // row) * row):
        a = values(start, stop)  # |δ|: the drops see only magnitudes and positions
        drop = dropped(d, a, seed, name, model, start, row)
        assert drop is not None  # only active drops are rescaled
        before += float(a.sum(dtype=torch.float64))
        after += float(a.masked_fill_(drop, 0).sum(dtype=torch.float64))
    return before / after if before >= RESCALE_EPS and after >= RESCALE_EPS else 1.0
