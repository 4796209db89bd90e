"""WARP's merges of LoRA adapters (peft folders), exact and without dense task vectors.

An adapter trained on a base is the task vector δ = s·B·A on each targeted layer (zero elsewhere), so:
SLERP takes one angle per block from the factors' inner products and gives the adapter Σ c_m δ_m of
rank Σ r_m (merge/lora.py); LERP likewise with fixed weights; LITI toward the base scales it by η. The
output is a peft adapter of the same base (scale 1, `rank_pattern` where ranks differ), or with
`densify` the full model θ_base + δ; `rank` cuts each layer's adapter to that rank by SVD and reports
the relative error it introduced.
"""

from __future__ import annotations

import json
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from mergekit_warp.dtypes import parse_dtype
from mergekit_warp.errors import WarpError
from mergekit_warp.io.adapter import Adapter, is_adapter, read_adapter, write_adapter
from mergekit_warp.io.atomic import claim
from mergekit_warp.io.builtin import BUILTIN
from mergekit_warp.io.publish import PROVENANCE, check_disjoint, check_output_path, publishing, write_provenance
from mergekit_warp.io.reader import CheckpointReader
from mergekit_warp.io.source import HUB_ID, Source, resolve_source
from mergekit_warp.io.writer import parse_size
from mergekit_warp.merge import lora
from mergekit_warp.merge import math as mmath
from mergekit_warp.merge.methods.lerp import check_weights
from mergekit_warp.merge.plan import Schedule, check_granularity, count_layers, group_names

METHODS = ("slerp", "lerp", "liti")


def merge_adapters(
    method: str,
    adapters: list[str | Path],
    base: str | Path,
    out: str | Path,
    *,
    lam: float | list[float] = 0.5,
    lam_nonblock: float | None = None,
    granularity: str = "block",
    weights: list[float] | None = None,
    eta: float | list[float] = 0.3,
    eta_nonblock: float | None = None,
    rank: int | None = None,
    densify: bool = False,
    dtype: str | None = None,
    max_shard_size: str | int = "5GB",
    force: bool = False,
    progress: bool = True,
    revision: str | None = None,
) -> Path:
    """`method` (slerp, lerp or liti) of the LoRA adapters in `adapters`, all trained on `base`, into
    `out`: an adapter of `base`, or with `densify` a full model."""
    if method not in METHODS:
        raise WarpError(f"{method} does not take LoRA adapters; use slerp, lerp or liti (or merge full models)")
    if rank is not None and rank < 1:
        raise WarpError(f"--rank {rank}: must be ≥ 1")
    check_granularity(granularity)
    out_dtype = parse_dtype(dtype) if dtype else None
    with ExitStack() as stack:
        reader = stack.enter_context(CheckpointReader(resolve_source(base, revision)))
        ads = [read_adapter(p) for p in adapters]
        for ad in ads:
            check_base(ad, reader)
        guarded = [reader.source.path, *(a.path for a in ads)]
        out = check_disjoint(Path(out), guarded)
        stack.enter_context(claim(out))
        check_output_path(out, guarded, force)
        coeffs = _coefficients(method, ads, reader.names, lam, lam_nonblock, granularity, weights, eta, eta_nonblock)
        merged = {
            n: lora.combine(
                [c[n] for c, a in zip(coeffs, ads) if n in a.modules], [a.modules[n] for a in ads if n in a.modules]
            )
            for n in reader.names
            if any(n in a.modules for a in ads)
        }
        notes = []
        if rank is not None:
            merged, err = _truncate(merged, rank)
            notes.append(f"cut to rank ≤ {rank} by SVD: relative Frobenius error of the task vector {err:.3g}")
        params: dict[str, Any] = {
            "adapters_as_given": [str(a) for a in adapters],
            "base_as_given": str(base),
            "revision": revision,
            "base_sample": base_sample(reader, sorted(merged)),
        }
        params.update(
            {
                "slerp": {"lambda": lam, "lambda_nonblock": lam_nonblock, "granularity": granularity},
                "lerp": {"weights": weights},
                "liti": {"eta": eta, "eta_nonblock": eta_nonblock},
            }[method]
        )
        params.update(
            {"rank": rank, "densify": densify, "dtype": dtype, "ranks_out": sorted({f.rank for f in merged.values()})}
        )
        with publishing(out, guarded, force) as tmp:
            if densify:
                _write_dense(reader, merged, tmp, out_dtype, parse_size(max_shard_size), progress)
            else:
                # the base as a hub id stays one (others load it from the hub), a local one as its path
                name = str(Path(reader.source.path).absolute()) if Path(base).exists() else str(base)
                write_adapter(tmp, merged, name, out_dtype or torch.float32, ads[0].config.get("task_type"))
            write_provenance(
                tmp, f"{method}-lora", params, {"base": reader.source.path, "adapters": [a.path for a in ads]}, notes
            )
    if progress:
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
    return out


def check_base(ad: Adapter, reader: CheckpointReader) -> None:
    """Refuse an adapter that does not fit `reader`'s model: a layer it lacks or of another shape, or a
    base it names (recorded by warp, or a local folder in its adapter_config.json) whose weights are
    not the given base's (first values of a few of the adapted layers; other shards or dtype pass)."""
    for name, f in ad.modules.items():
        info = reader.infos.get(name)
        if info is None or tuple(info.shape) != f.shape:
            got = "absent" if info is None else f"shape {tuple(info.shape)}"
            raise WarpError(
                f"adapter {ad.path}: layer {name} ({f.shape[0]}×{f.shape[1]}) is {got} in base "
                f"{reader.source.path}; the adapter was trained on another base: pass that one as --init"
            )
    recorded, where = recorded_base(ad)
    if recorded is None:
        return
    here = base_sample(reader, list(recorded))
    for name, values in recorded.items():
        got = torch.tensor(here.get(name, []), dtype=torch.float64)
        want = torch.tensor(values, dtype=torch.float64)
        if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-2, atol=1e-6):
            raise WarpError(
                f"adapter {ad.path} was made on another base than {reader.source.path} ({where} has other "
                f"weights in {name}); pass the base it was trained on as --init"
            )


SAMPLE = 16  # first values of each of up to 4 layers: enough to tell two checkpoints apart


def base_sample(reader: CheckpointReader, names: list[str]) -> dict[str, list[float]]:
    """The first values of up to 4 of the tensors `names` (those the base has) of `reader`'s model."""
    picks = [n for n in names if n in reader.infos][:4]
    return {n: reader.read(n, 0, min(SAMPLE, reader.infos[n].numel)).float().tolist() for n in picks}


def sample_of(spec: str | Path, names: list[str]) -> dict[str, list[float]]:
    """`base_sample` of the checkpoint `spec` (what a warp-made adapter records of its base)."""
    with CheckpointReader(resolve_source(spec)) as reader:
        return base_sample(reader, names)


def recorded_base(ad: Adapter) -> tuple[dict[str, list[float]] | None, str]:
    """A sample of the base an adapter belongs to (`base_sample`) and where it comes from: what a
    warp-made adapter records, else the local folder (an absolute path) its adapter_config.json names;
    None when there is neither (a hub id, a relative path, a folder since moved or unreadable)."""
    try:
        prov = json.loads((ad.path / PROVENANCE).read_text())
        return dict(prov["params"]["base_sample"]), f"its {PROVENANCE} records a base that"
    except (OSError, ValueError, KeyError, TypeError):
        pass
    named = ad.base
    if not named or not Path(named).is_absolute() or not Path(named).is_dir():
        return None, ""
    try:
        with CheckpointReader(resolve_source(named)) as other:
            return base_sample(other, sorted(ad.modules)), f"its adapter_config.json names {named}, which"
    except WarpError:
        return None, ""


def _coefficients(
    method: str,
    ads: list[Adapter],
    names: list[str],
    lam: float | list[float],
    lam_nonblock: float | None,
    granularity: str,
    weights: list[float] | None,
    eta: float | list[float],
    eta_nonblock: float | None,
) -> list[dict[str, float]]:
    """c_m per adapter and layer: Σ_m c_m δ_m is the merge."""
    M = len(ads)
    n_layers = count_layers(names)
    if method == "liti":
        if M != 1:
            raise WarpError(f"liti takes one adapter, got {M}")
        sched = Schedule.build("--eta", eta, eta_nonblock, low=0.0, high=None)
        return [{n: sched.at(n, n_layers) for n in names}]
    if method == "lerp":
        return [dict.fromkeys(names, x) for x in check_weights(weights, M)]  # as for full checkpoints
    if M < 2:
        raise WarpError(f"slerp needs at least two adapters, got {M}")
    sched = Schedule.build("--lambda", lam, lam_nonblock)
    out: list[dict[str, float]] = [{} for _ in ads]
    for members in group_names(names, granularity).values():
        g = torch.zeros(M, M, dtype=torch.float64)
        for n in members:
            for i in range(M):
                for j in range(i, M):
                    if n in ads[i].modules and n in ads[j].modules:
                        g[i, j] += lora.dot(ads[i].modules[n], ads[j].modules[n])
        g = torch.triu(g) + torch.triu(g, 1).T
        for n in members:  # one angle per group, λ per tensor (as the full-model SLERP)
            c = mmath.slerp_weights(g, sched.at(n, n_layers) if M == 2 else None).tolist()
            for m in range(M):
                out[m][n] = c[m]
    return out


def _truncate(merged: dict[str, lora.Factors], rank: int) -> tuple[dict[str, lora.Factors], float]:
    """Each layer's adapter cut to `rank`; the relative error of the whole task vector."""
    cut, lost, total = {}, 0.0, 0.0
    for n, f in merged.items():
        cut[n], err = lora.truncate(f, rank)
        norm2 = lora.dot(f, f)
        lost, total = lost + err**2 * norm2, total + norm2
    return cut, (lost / total) ** 0.5 if total > 0 else 0.0


def _write_dense(
    reader: CheckpointReader,
    merged: dict[str, lora.Factors],
    folder: Path,
    dtype: torch.dtype | None,
    max_shard_size: int,
    progress: bool,
) -> None:
    """θ_base + B·A on every adapted layer, streamed through the merge engine's loop."""
    from mergekit_warp.merge.engine import finish_folder, write_pass
    from mergekit_warp.progress import Bytes

    dense: dict[str, torch.Tensor] = {}  # the current layer's δ, flat

    def combine(name, fetch):
        out = fetch(0).to(torch.float32, copy=True)
        if name in merged:
            if name not in dense:
                dense.clear()
                dense[name] = merged[name].dense().reshape(-1)
            out += dense[name][fetch.start : fetch.stop].to(out.device)
        return out

    write_pass(
        [reader],
        0,
        folder,
        combine,
        dtype=dtype,
        max_shard_size=max_shard_size,
        device=torch.device("cpu"),
        progress=Bytes(progress),
    )
    finish_folder(folder, reader.source.folder, dtype)


# ---------------------------------------------------------------------------------------------------
# Adapters as full checkpoints: BASE+ADAPTER, and adapters among full checkpoints


class AdaptedReader(CheckpointReader):
    """A base checkpoint with a LoRA adapter added: reads of the adapted tensors give θ_base + B·A
    (summed in fp32, returned in the base's stored dtype: what merging the adapter into the base and
    saving it would hold), every other tensor the base's. Rows of B·A are formed per read, so nothing
    dense is kept."""

    def __init__(self, source: Source, adapter: Adapter):
        super().__init__(source)
        self.adapter = adapter

    def _read_raw(self, name: str, start: int, stop: int, into: memoryview | None) -> torch.Tensor:
        t = super()._read_raw(name, start, stop, into)
        f = self.adapter.modules.get(name)
        if f is None:
            return t
        cols = f.A.shape[1]
        r0, r1 = start // cols, -(-stop // cols)
        rows = (f.B[r0:r1].float() @ f.A.float()).reshape(-1)[start - r0 * cols : stop - r0 * cols]
        t.copy_((t.float() + rows).to(t.dtype))
        return t

    @property
    def paths(self) -> list[Path]:
        return [self.adapter.path, self.source.path]


def split_spec(spec: str | Path) -> tuple[str, str] | None:
    """(BASE, ADAPTER) of mergekit's `BASE+ADAPTER` syntax, else None: the first '+' with a peft folder
    after it and an existing path (or a name that is not a path: a hub id, a builtin model) before it,
    so paths that hold '+' themselves still split where they should."""
    text = str(spec)
    if "+" not in text or Path(text).exists():
        return None
    for i in (j for j, c in enumerate(text) if c == "+"):
        base, adapter = text[:i], text[i + 1 :]
        if base and is_adapter(adapter) and (Path(base).exists() or base in BUILTIN or HUB_ID.match(base)):
            return base, adapter
    return None


def open_reader(spec: str | Path, revision: str | None = None, base: str | Path | None = None) -> CheckpointReader:
    """A reader of the checkpoint `spec`: a full checkpoint; `BASE+ADAPTER` (the adapter applied to that
    base); or an adapter folder, applied to `base` (the merge's --init) or else to the base it records
    (a local folder or hub id in its adapter_config.json)."""
    adapted = as_adapter(spec, revision, base)
    if adapted is not None:
        return AdaptedReader(*adapted)
    if "+" in str(spec) and not Path(spec).exists():
        raise WarpError(
            f"{spec}: no such checkpoint, and not BASE+ADAPTER (no peft adapter folder, with adapter_config.json, "
            "after a '+'); check the paths"
        )
    return CheckpointReader(resolve_source(spec, revision))


def as_adapter(
    spec: str | Path, revision: str | None = None, base: str | Path | None = None
) -> tuple[Source, Adapter] | None:
    """(the base's Source, the Adapter) when `spec` is `BASE+ADAPTER` or an adapter folder (applied to
    `base`, else to the base it records), checked to fit that base; None for any other checkpoint."""
    pair = split_spec(spec)
    if pair is None and not is_adapter(spec):
        return None
    base_spec, adapter = pair if pair is not None else (base, spec)
    ad = read_adapter(adapter)
    if base_spec is None:
        base_spec = ad.base
        if not base_spec:
            raise WarpError(f"adapter {adapter} names no base model; give it as BASE+{adapter}")
    try:
        source = resolve_source(base_spec, revision if pair is not None or base is not None else None)
    except WarpError as e:
        raise WarpError(
            f"adapter {adapter}: its base {base_spec} cannot be read ({e}); give it as BASE+{adapter}"
        ) from None
    with CheckpointReader(source) as plain:
        try:
            check_base(ad, plain)
        except WarpError as e:
            if pair is None:
                raise
            raise WarpError(
                f"{spec}: {str(e).split('; pass ')[0]}; give the base it was trained on before the +"
            ) from None
    return source, ad


@torch.no_grad()
def apply(model: torch.nn.Module, ad: Adapter) -> None:
    """Add the adapter's B·A to the loaded model's weights in place (fp32 sum, the weights' dtype)."""
    for name, f in ad.modules.items():
        p = model.get_parameter(name)
        p.copy_((p.float() + f.dense().to(p.device)).to(p.dtype))


def reader_paths(reader: CheckpointReader) -> list[Path]:
    """What a reader reads from: the checkpoint, or an adapter and its base."""
    return reader.paths if isinstance(reader, AdaptedReader) else [reader.source.path]
