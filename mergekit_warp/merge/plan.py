"""Which tensors share an angle (grouping) and which λ/η each tensor gets (per-layer schedules).
Resolved here, in one place, from tensor names alone."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from mergekit_warp.errors import WarpError

GRANULARITIES = ("block", "tensor", "model")
# `model.layers.12.mlp…` (Llama, Mistral, Qwen, Gemma), `transformer.h.3.…` (GPT-2), `…blocks.4.…`,
# `encoder.layer.5.…` (BERT). The index is the transformer block.
_BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The transformer block a tensor belongs to, or None for embeddings, final norm, head…"""
    m = _BLOCK.search(name)
    return int(m.group(1)) if m else None


def group_of(name: str, granularity: str) -> str:
    """The group sharing one SLERP angle: the block's name prefix (`model.layers.3`), the tensor
    itself (non-block tensors, or granularity `tensor`), or `model`."""
    if granularity == "model":
        return "model"
    if granularity == "tensor":
        return name
    m = _BLOCK.search(name)
    return name[: m.end() - 1] if m else name


def check_granularity(granularity: str) -> str:
    if granularity not in GRANULARITIES:
        raise WarpError(f"--granularity {granularity!r}: choose one of {', '.join(GRANULARITIES)}")
    return granularity


def group_names(names: list[str], granularity: str) -> dict[str, list[str]]:
    """Group → its tensor names, groups in order of first appearance."""
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(group_of(n, granularity), []).append(n)
    return groups


@dataclass(frozen=True)
class Schedule:
    """A merge parameter per tensor: one value, or a list interpolated linearly over depth (the first
    value at block 0, the last at the deepest block, as mergekit's gradients), plus the value for the
    tensors outside blocks (default: the mean of the list)."""

    values: tuple[float, ...]
    nonblock: float

    @classmethod
    def build(
        cls,
        option: str,
        value: float | list[float],
        nonblock: float | None = None,
        low: float = 0.0,
        high: float | None = 1.0,
    ) -> Schedule:
        """Validate (finite, within [low, high]; `high=None` for no upper bound) and build."""
        values = tuple(float(v) for v in (value if isinstance(value, (list, tuple)) else [value]))
        if not values:
            raise WarpError(f"{option}: give at least one value")
        nb = sum(values) / len(values) if nonblock is None else float(nonblock)
        for v in (*values, nb):
            if not math.isfinite(v) or v < low or (high is not None and v > high):
                rng = f"in [{low:g}, {high:g}]" if high is not None else f">= {low:g}"
                raise WarpError(f"{option} {v}: must be a finite number {rng}")
        return cls(values, nb)

    def at(self, name: str, n_layers: int) -> float:
        """The value for tensor `name` in a model of `n_layers` blocks."""
        layer = layer_index(name)
        if layer is None:
            return self.nonblock
        return value_at(self.values, layer, n_layers)

    def record(self) -> float | list[float]:
        return self.values[0] if len(self.values) == 1 else list(self.values)


def value_at(schedule: tuple[float, ...] | list[float], layer: int, n_layers: int) -> float:
    """Linear interpolation of `schedule` at block `layer` of `n_layers` (0 → first value, last → last)."""
    if len(schedule) == 1 or n_layers <= 1:
        return float(schedule[0])
    pos = layer / (n_layers - 1) * (len(schedule) - 1)
    lo = min(math.floor(pos), len(schedule) - 2)
    frac = pos - lo
    return float(schedule[lo] * (1 - frac) + schedule[lo + 1] * frac)


def count_layers(names: list[str]) -> int:
    idx = [i for i in map(layer_index, names) if i is not None]
    return max(idx) + 1 if idx else 0
