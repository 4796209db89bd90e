"""Before any math: every input must hold the same tensor names with the same shapes (and the same
float/non-float kind). Differing float dtypes are fine — the math runs in fp32 or better — but are
reported so the user knows what was mixed."""

from __future__ import annotations

from collections import Counter

from mergekit_warp.dtypes import CODES
from mergekit_warp.errors import WarpError
from mergekit_warp.io.reader import CheckpointReader


def _listing(names: list[str], k: int = 3) -> str:
    more = f" (+{len(names) - k} more)" if len(names) > k else ""
    return ", ".join(names[:k]) + more


def preflight(readers: list[CheckpointReader], ref: int = 0) -> list[str]:
    """Compare every reader with `readers[ref]`; raise `WarpError` on differing names, shapes or
    kinds; return notes (one per input whose dtypes differ from the reference)."""
    base = readers[ref]
    notes = []
    for r in readers:
        if r is base:
            continue
        a, b = base.source.spec, r.source.spec
        missing = [n for n in base.infos if n not in r.infos]
        extra = [n for n in r.infos if n not in base.infos]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"{len(missing)} of {a}'s tensors are missing in it: {_listing(missing)}")
            if extra:
                parts.append(f"{len(extra)} of its tensors are not in {a}: {_listing(extra)}")
            raise WarpError(
                f"{b}: tensor names differ from {a} — "
                + "; ".join(parts)
                + "; merge checkpoints of the same architecture"
            )
        for name, info in base.infos.items():
            other = r.infos[name]
            if other.shape != info.shape:
                raise WarpError(
                    f"{b}: tensor {name} has shape {list(other.shape)} but {list(info.shape)} in {a}; "
                    "merge checkpoints of the same architecture and size"
                )
            if other.is_float != info.is_float:
                raise WarpError(f"{b}: tensor {name} is {other.dtype} but {info.dtype} in {a}; the inputs do not match")
        if dtype_summary(r) != dtype_summary(base):
            notes.append(f"dtypes differ: {b} has {dtype_summary(r)}, {a} has {dtype_summary(base)} (math ran in fp32)")
    return notes


def dtype_summary(reader: CheckpointReader) -> str:
    """'BF16×290, F32×1': the dtypes of a checkpoint's float tensors with counts."""
    counts = Counter(CODES[i.dtype] for i in reader.infos.values() if i.is_float)
    return ", ".join(f"{k}×{v}" for k, v in counts.most_common())
