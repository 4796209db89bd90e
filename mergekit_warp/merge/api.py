"""Library entry points: SLERP of task vectors, LERP (model soup), EMA, LITI and inspect.

Each validates its parameters, resolves and preflights the inputs, builds a `Combine` from the pure
math and hands it to the one streaming loop, inside `publishing` (atomic output) with provenance.
The CLI (`warp merge …`, `warp liti`, `warp inspect`) is a thin layer over these.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mergekit_warp.devices import resolve_device
from mergekit_warp.errors import WarpError
from mergekit_warp.io.preflight import preflight
from mergekit_warp.io.publish import check_output_path, publishing, write_provenance
from mergekit_warp.io.reader import CheckpointReader
from mergekit_warp.io.source import resolve_source
from mergekit_warp.io.writer import parse_size
from mergekit_warp.merge import math as mmath
from mergekit_warp.merge.engine import (CHUNK, Combine, Fetch, Progress, affine_combine, finish_folder, gram_pass,
                                        write_pass)
from mergekit_warp.merge.plan import Schedule, check_granularity, count_layers, group_names, layer_index

PathLike = str | Path
_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32}


# ---- option checks ---------------------------------------------------------------------------------

def parse_dtype(dtype: str | None) -> torch.dtype | None:
    if dtype is None:
        return None
    if dtype.lower() not in _DTYPES:
        raise WarpError(f"--dtype {dtype!r}: choose bf16, fp16 or fp32 (or leave it out to keep the init's dtype)")
    return _DTYPES[dtype.lower()]


def _open(specs: Sequence[PathLike], revision: str | None, stack: ExitStack) -> list[CheckpointReader]:
    return [stack.enter_context(CheckpointReader(resolve_source(s, revision))) for s in specs]


# ---- the shared run ----------------------------------------------------------------------------------

def _run(method: str, readers: list[CheckpointReader], combine: Combine, out: PathLike, *,
         roles: dict[str, Any], params: dict[str, Any], notes: list[str], dtype: torch.dtype | None,
         max_shard_size: int, device: torch.device, force: bool, bar: Progress, chunk: int) -> Path:
    """Write `combine` over all tensors of readers[0] (the reference: key set, non-float tensors,
    default dtype, support files) into `out`, atomically, with provenance."""
    out = Path(out)
    with publishing(out, [r.source.path for r in readers], force) as tmp:
        files = write_pass(readers, 0, tmp, combine, dtype=dtype, max_shard_size=max_shard_size,
                           device=device, chunk=chunk, progress=bar)
        finish_folder(tmp, readers[0].source.folder, dtype)
        if readers[0].source.folder is None:
            notes = [*notes, "the reference input is a bare .safetensors file: no config/tokenizer files copied"]
        write_provenance(tmp, method, {**params, "shards": len(files)}, roles, notes)
    if bar.enabled:  # dtype mixes, extrapolation…: also worth seeing now, not only in the provenance
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
    return out.absolute()


def _common(dtype: str | None, max_shard_size: str | int, device: str, revision: str | None) -> dict[str, Any]:
    return {"dtype": dtype, "max_shard_size": str(max_shard_size), "device": device, "revision": revision}


# ---- methods -------------------------------------------------------------------------------------------

def slerp(models: list[PathLike], init: PathLike, out: PathLike, *, lam: float | list[float] = 0.5,
          lam_nonblock: float | None = None, granularity: str = "block", dtype: str | None = None,
          max_shard_size: str = "5GB", device: str = "cpu", force: bool = False,
          revision: str | None = None, progress: bool = True, chunk: int = CHUNK) -> Path:
    """WARP SLERP of the task vectors of `models` relative to `init` (two models: SLERP at `lam`;
    more: the iterative rule with λ = 1/k), one angle per group (`block`, `tensor` or `model`)."""
    if len(models) < 2:
        raise WarpError(f"slerp needs at least two models, got {len(models)}; pass two or more checkpoints")
    check_granularity(granularity)
    sched = Schedule.build("--lambda", lam, lam_nonblock)
    out_dtype, dev, shard = parse_dtype(dtype), resolve_device(device), parse_size(max_shard_size)
    notes: list[str] = []
    if len(models) > 2:
        notes.append(f"{len(models)} models: iterative SLERP with λ = 1/k at step k (input order matters); "
                     "--lambda unused")
    with ExitStack() as stack:
        readers = _open([init, *models], revision, stack)
        notes += preflight(readers)
        check_output_path(Path(out), [r.source.path for r in readers], force)
        names, bar = readers[0].names, Progress(progress)
        n_layers, groups = count_layers(names), group_names(names, granularity)
        owner = {n: g for g, ns in groups.items() for n in ns}
        # Groups larger than one chunk need a first pass for their angle; a single small tensor is
        # read whole in the write pass, so its angle comes from that one read.
        big = {g: ns for g, ns in groups.items() if len(ns) > 1 or readers[0].infos[ns[0]].numel > chunk}
        grams = {g: v["delta"] for g, v in gram_pass(readers, big, device=dev, chunk=chunk, progress=bar).items()}
        two = len(models) == 2

        def weights(name: str, fetch: Fetch) -> Tensor:
            g = grams.get(owner[name])
            if g is None:
                x = torch.stack([fetch(i).double() for i in range(len(readers))])  # (k, n), n <= chunk
                d = x[1:] - x[0]
                g = (d @ d.T).cpu()
            return mmath.slerp_weights(g, sched.at(name, n_layers) if two else None)

        params = {"lambda": sched.record(), "lambda_nonblock": sched.nonblock, "granularity": granularity,
                  "models_as_given": [str(m) for m in models], "init_as_given": str(init),
                  **_common(dtype, max_shard_size, device, revision)}
        return _run("slerp", readers, affine_combine(weights), out, roles={"init": readers[0].source.path,
                    "models": [r.source.path for r in readers[1:]]}, params=params, notes=notes, dtype=out_dtype,
                    max_shard_size=shard, device=dev, force=force, bar=bar, chunk=chunk)


def lerp(models: list[PathLike], out: PathLike, *, weights: list[float] | None = None, init: PathLike | None = None,
         dtype: str | None = None, max_shard_size: str = "5GB", device: str = "cpu", force: bool = False,
         revision: str | None = None, progress: bool = True, chunk: int = CHUNK) -> Path:
    """Weighted average Σ w_m θ_m (a model soup; default uniform weights), or of task vectors,
    θ_init + Σ w_m (θ_m − θ_init), when `init` is given."""
    if len(models) < (1 if init is not None else 2):
        raise WarpError(f"lerp needs at least two models (or one with --init), got {len(models)}")
    w = [1.0 / len(models)] * len(models) if weights is None else [float(x) for x in weights]
    if len(w) != len(models):
        raise WarpError(f"--weights has {len(w)} values for {len(models)} models; give one weight per model")
    if any(not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
        raise WarpError(f"--weights {w}: each must be a finite number >= 0, not all zero")
    out_dtype, dev, shard = parse_dtype(dtype), resolve_device(device), parse_size(max_shard_size)
    notes = [] if abs(sum(w) - 1) < 1e-6 else [f"weights sum to {sum(w):g}, not 1: the result is rescaled"]
    with ExitStack() as stack:
        specs = ([init] if init is not None else []) + list(models)
        readers = _open(specs, revision, stack)
        notes += preflight(readers)
        check_output_path(Path(out), [r.source.path for r in readers], force)
        if init is not None:
            combine = affine_combine(lambda name, fetch: torch.tensor(w, dtype=torch.float64))
        else:
            def combine(name: str, fetch: Fetch) -> Tensor:
                acc = fetch(0).float().mul_(w[0])
                for m in range(1, len(w)):
                    acc.add_(fetch(m), alpha=w[m])
                return acc
        roles = {"models": [r.source.path for r in readers[len(specs) - len(models):]]}
        if init is not None:
            roles["init"] = readers[0].source.path
        params = {"weights": w, "task_vectors": init is not None, "models_as_given": [str(m) for m in models],
                  "init_as_given": None if init is None else str(init), **_common(dtype, max_shard_size, device, revision)}
        return _run("lerp", readers, combine, out, roles=roles, params=params, notes=notes, dtype=out_dtype,
                    max_shard_size=shard, device=dev, force=force, bar=Progress(progress), chunk=chunk)


def ema(checkpoints: list[PathLike], out: PathLike, *, mu: float = 0.01, dtype: str | None = None,
        max_shard_size: str = "5GB", device: str = "cpu", force: bool = False, revision: str | None = None,
        progress: bool = True, chunk: int = CHUNK) -> Path:
    """Exponential moving average over the ordered `checkpoints`: θ ← (1 − μ)·θ + μ·θ_t from C1.
    Non-float tensors, key set and default dtype come from C1."""
    if len(checkpoints) < 2:
        raise WarpError(f"ema needs at least two checkpoints in order, got {len(checkpoints)}")
    if not math.isfinite(mu) or not 0 < mu <= 1:
        raise WarpError(f"--mu {mu}: must be in (0, 1] (the paper uses 0.01)")
    out_dtype, dev, shard = parse_dtype(dtype), resolve_device(device), parse_size(max_shard_size)

    def combine(name: str, fetch: Fetch) -> Tensor:
        acc = fetch(0).float()
        for t in range(1, len(checkpoints)):  # one checkpoint's chunk at a time: memory flat in n
            acc.mul_(1.0 - mu).add_(fetch(t), alpha=mu)  # mmath.ema_step, in place
        return acc

    with ExitStack() as stack:
        readers = _open(checkpoints, revision, stack)
        notes = preflight(readers)
        check_output_path(Path(out), [r.source.path for r in readers], force)
        params = {"mu": mu, "checkpoints_as_given": [str(c) for c in checkpoints],
                  **_common(dtype, max_shard_size, device, revision)}
        return _run("ema", readers, combine, out, roles={"checkpoints": [r.source.path for r in readers]},
                    params=params, notes=notes, dtype=out_dtype, max_shard_size=shard, device=dev, force=force,
                    bar=Progress(progress), chunk=chunk)


def liti(merged: PathLike, init: PathLike, out: PathLike, *, eta: float | list[float] = 0.3,
         eta_nonblock: float | None = None, dtype: str | None = None, max_shard_size: str = "5GB",
         device: str = "cpu", force: bool = False, revision: str | None = None, progress: bool = True,
         chunk: int = CHUNK) -> Path:
    """LITI: (1 − η)·θ_init + η·θ_merged (η may be a per-layer list); η > 1 extrapolates. `init` is
    the iteration's init or θ_sft — both targets of the paper are this same call."""
    sched = Schedule.build("--eta", eta, eta_nonblock, low=0.0, high=None)
    out_dtype, dev, shard = parse_dtype(dtype), resolve_device(device), parse_size(max_shard_size)
    notes = []
    if max(*sched.values, sched.nonblock) > 1:
        notes.append("η > 1: extrapolation beyond the merged model (as ExPO); KL to the init grows past the merge's")
    with ExitStack() as stack:
        readers = _open([init, merged], revision, stack)
        notes += preflight(readers)
        check_output_path(Path(out), [r.source.path for r in readers], force)
        n_layers = count_layers(readers[0].names)

        # (1 − η)·θ_init + η·θ_merged = θ_init + η·(θ_merged − θ_init): mmath.liti, streamed
        combine = affine_combine(lambda name, fetch: torch.tensor([sched.at(name, n_layers)], dtype=torch.float64))
        params = {"eta": sched.record(), "eta_nonblock": sched.nonblock, "merged_as_given": str(merged),
                  "init_as_given": str(init), **_common(dtype, max_shard_size, device, revision)}
        return _run("liti", readers, combine, out, roles={"init": readers[0].source.path,
                    "merged": readers[1].source.path}, params=params, notes=notes, dtype=out_dtype,
                    max_shard_size=shard, device=dev, force=force, bar=Progress(progress), chunk=chunk)


def inspect(models: list[PathLike], init: PathLike, *, granularity: str = "block", revision: str | None = None,
            device: str = "cpu", progress: bool = False, chunk: int = CHUNK) -> list[dict[str, Any]]:
    """Per group (WARP fig. 11 diagnostics): task-vector norms ‖δ_m‖, pairwise task-vector cosines and
    angles Ω (degrees), and full-weight cosines over [init, models…] (index 0 is the init)."""
    if len(models) < 1:
        raise WarpError("inspect needs at least one model besides --init")
    check_granularity(granularity)
    with ExitStack() as stack:
        readers = _open([init, *models], revision, stack)
        preflight(readers)
        groups = group_names(readers[0].names, granularity)
        grams = gram_pass(readers, groups, device=resolve_device(device), chunk=chunk, progress=Progress(progress), full=True)
        rows = []
        for g, ns in groups.items():
            gd, gf = grams[g]["delta"], grams[g]["full"]
            tn, wn = gd.diag().clamp_min(0).sqrt(), gf.diag().clamp_min(0).sqrt()
            tcos = _cos(gd, tn)
            rows.append({
                "group": g, "layer": _layer(ns), "tensors": len(ns),
                "numel": sum(readers[0].infos[n].numel for n in ns),
                "task_norms": tn.tolist(), "task_cos": tcos,
                "omega_deg": [[None if c is None else math.degrees(math.acos(max(-1.0, min(1.0, c)))) for c in row]
                              for row in tcos],
                "weight_norms": wn.tolist(), "weight_cos": _cos(gf, wn),
            })
        return rows


def _cos(g: Tensor, norms: Tensor) -> list[list[float | None]]:
    """Cosines from a Gram matrix; None where a vector is zero (no angle), which keeps the JSON strict."""
    den = (norms[:, None] * norms[None, :]).tolist()
    return [[gij / d if d > 0 else None for gij, d in zip(grow, drow)] for grow, drow in zip(g.tolist(), den)]


def _layer(names: list[str]) -> int | None:
    layers = {layer_index(n) for n in names}
    return layers.pop() if len(layers) == 1 else None


METHODS: dict[str, Callable[..., Path]] = {"slerp": slerp, "lerp": lerp, "ema": ema, "liti": liti}
