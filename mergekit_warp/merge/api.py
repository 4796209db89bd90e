"""Library entry points: `merge(method, …)`, the one driver every registered method runs through
(merge/methods/), the named shortcuts `slerp`, `lerp`, `ema`, `liti`, and `inspect`. The CLI
(`warp merge …`, `warp liti`, `warp inspect`) is a thin layer over these.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from torch import Tensor

from mergekit_warp.devices import resolve_device
from mergekit_warp.dtypes import parse_dtype, short_name, short_of
from mergekit_warp.errors import WarpError
from mergekit_warp.io.atomic import claim
from mergekit_warp.io.preflight import preflight
from mergekit_warp.io.publish import check_disjoint, check_output_path, publishing, write_provenance
from mergekit_warp.io.writer import parse_size
from mergekit_warp.merge import config_yaml
from mergekit_warp.merge.adapters import AdaptedReader, open_reader, reader_paths
from mergekit_warp.merge.engine import BUDGET, CHUNK, finish_folder, gram_pass, write_pass
from mergekit_warp.merge.methods import REGISTRY
from mergekit_warp.merge.methods.base import REQUIRED, Context, Settings, validate
from mergekit_warp.merge.plan import check_granularity, count_layers, group_names, layer_index
from mergekit_warp.progress import Bytes

PathLike = str | Path


def merge(
    method: str,
    models: Sequence[PathLike],
    out: PathLike,
    *,
    base: PathLike | None = None,
    params: dict[str, Any] | None = None,
    model_params: Sequence[dict[str, Any]] | None = None,
    seed: int = 0,
    dtype: str | None = None,
    max_shard_size: str | int = "5GB",
    device: str = "cpu",
    force: bool = False,
    revision: str | None = None,
    progress: bool = True,
    chunk: int = CHUNK,
    memory_budget: str | int = BUDGET,
    record: dict[str, Any] | None = None,
    read_too: Sequence[PathLike] = (),
) -> Path:
    """Merge `models` (with `base`, the init, where the method takes one) by the registered `method`
    into `out`: check the parameters (`params`: the top-level ones, `model_params`: one mapping per
    model, as in mergekit's YAML), resolve and preflight the inputs, refuse an output that overlaps
    them, then stream every tensor through the method's `Combine` into an atomically published folder
    with provenance. The reference input (key set, non-float tensors, default dtype, support files) is
    `base` when given, else the first model. `record`: extra provenance (e.g. the YAML it came from); `read_too`: other files the merge was
    read from (the YAML), protected like the inputs. `memory_budget`: bytes of inputs held in memory at
    once (see merge/engine.py)."""
    if method not in REGISTRY:
        raise WarpError(f"unknown merge method {method!r}; choose one of {', '.join(REGISTRY)}")
    m = REGISTRY[method]
    if base is None and m.base == "required":
        raise WarpError(f"{method} needs a base model (--init/--base: the model the task vectors are taken from)")
    if base is not None and m.base == "none":
        raise WarpError(f"{method} takes no base model; drop --init/--base")
    top = {k: v for k, v in (params or {}).items() if v is not None}
    per_model = tuple(dict(p) for p in (model_params or ()))
    out_dtype, dev, shard = parse_dtype(dtype) if dtype else None, resolve_device(device), parse_size(max_shard_size)
    budget = parse_size(memory_budget, "--memory-budget", zero=True)
    specs = ([base] if base is not None else []) + list(models)
    with ExitStack() as stack:
        # an adapter among the models is applied to the base on the fly (merge/adapters.py: open_reader)
        readers = [stack.enter_context(open_reader(s, revision, base)) for s in specs]
        paths = [reader_paths(r)[0] for r in readers]
        guarded = [*(p for r in readers for p in reader_paths(r)), *map(Path, read_too)]
        settings = Settings(top, per_model, count_layers(readers[0].names))
        notes = validate(m, settings, len(models), base is not None, readers[0].names)
        out = check_disjoint(Path(out), guarded)  # before the lock file is made beside it
        stack.enter_context(claim(out))
        check_output_path(out, guarded, force)
        notes += preflight(readers)
        bar = Bytes(progress)
        combine = m.build(readers, settings, Context(dev, chunk, has_base=base is not None, seed=seed))
        n_base = 1 if base is not None else 0
        roles: dict[str, Any] = {m.roles[1]: paths[n_base:]}
        if base is not None:
            roles = {m.roles[0]: paths[0], **roles}
        applied = [r for r in readers if isinstance(r, AdaptedReader)]
        if applied:  # the bases the adapters among the inputs were applied to
            roles["adapter_bases"] = [r.source.path for r in applied]
        params_record = {
            **{p.name: p.default for p in m.params if not p.per_model and p.default is not REQUIRED},
            **top,
            **({"model_parameters": [dict(p) for p in per_model]} if per_model else {}),
            **({"seed": seed} if m.random else {}),
            f"{m.roles[1]}_as_given": [str(x) for x in models],
            **({f"{m.roles[0]}_as_given": str(base)} if base is not None else {}),
            "dtype": dtype,
            "max_shard_size": str(max_shard_size),
            "device": device,
            "revision": revision,
            **(record or {}),
        }
        with publishing(out, guarded, force) as tmp:
            files = write_pass(
                readers,
                0,
                tmp,
                combine,
                dtype=out_dtype,
                max_shard_size=shard,
                device=dev,
                chunk=chunk,
                progress=bar,
                rows=m.rows,
                groups=m.groups(settings, readers[0].names, base is not None) if m.groups else None,
                budget=budget,
            )
            finish_folder(tmp, readers[0].source.folder, out_dtype)
            if readers[0].source.folder is None:
                notes = [*notes, "the reference input is a bare .safetensors file: no config/tokenizer files copied"]
            if m.mergekit and not (method == "slerp" and base is not None):  # WARP's slerp is not mergekit's
                stored = {i.dtype for i in readers[0].infos.values() if i.is_float}
                out_name = short_name(dtype) if dtype else (short_of(stored.pop()) if len(stored) == 1 else None)
                # an adapter as mergekit reads it: BASE+ADAPTER, with the base it was applied to
                given = [
                    f"{r.source.path}+{r.adapter.path}" if isinstance(r, AdaptedReader) else str(x)
                    for x, r in zip(models, readers[n_base:])
                ]
                config_yaml.write(
                    tmp,
                    m.mergekit,
                    given,
                    None if base is None else str(base),
                    top,
                    [dict(p) for p in per_model],
                    out_name,
                    seed if m.random else None,
                    tuple(p.name for p in m.params if not p.mergekit and settings.given(p.name)),
                )
                params_record["mergekit_config"] = config_yaml.FILE
            write_provenance(tmp, method, {**params_record, "shards": len(files)}, roles, notes)
    if bar.enabled:  # dtype mixes, extrapolation…: also worth seeing now, not only in the provenance
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
    return out


def merge_yaml(config: PathLike, out: PathLike, **common: Any) -> Path:
    """The merge a mergekit YAML describes (see merge/config_yaml.py), into `out`."""
    plan = config_yaml.read(Path(config))
    if "dtype" in common and common["dtype"] is None:
        common["dtype"] = plan.dtype
    return merge(
        plan.method,
        plan.models,
        out,
        base=plan.base,
        params=plan.params,
        model_params=plan.model_params,
        seed=plan.seed,
        record={"mergekit_yaml_as_given": str(config)},
        read_too=[config],
        **common,
    )


# The named entry points of the library (and of `warp merge …`): one line each over `merge`.


def _adapters(inputs: Sequence[PathLike], common: dict[str, Any]) -> bool:
    """True when the inputs are LoRA adapter folders (then merged as adapters: merge/adapters.py, whose
    options `rank` and `densify` are left in `common`); full checkpoints take neither option."""
    from mergekit_warp.io.adapter import is_adapter

    flags = [is_adapter(m) for m in inputs]
    if not all(flags):  # full checkpoints, or adapters among them: applied to --init on the fly, a full model
        if common.pop("rank", None) is not None:
            raise WarpError(
                "--rank is for merges of LoRA adapters only"
                + (f" ({inputs[flags.index(False)]} is a full checkpoint)" if any(flags) else "")
            )
        if common.pop("densify", False) and not any(flags):
            raise WarpError("--densify is for LoRA adapters (folders with adapter_config.json)")
    return all(flags) and bool(flags)


def _adapter_options(common: dict[str, Any]) -> dict[str, Any]:
    """The options an adapter merge takes (it streams nothing but the base, on the CPU)."""
    resolve_device(common.get("device", "cpu"))  # checked like any merge's, though the factors' math runs on the CPU
    keep = ("rank", "densify", "dtype", "max_shard_size", "force", "progress", "revision")
    return {k: v for k, v in common.items() if k in keep}


def slerp(
    models: list[PathLike],
    init: PathLike,
    out: PathLike,
    *,
    lam: float | list[float] = 0.5,
    lam_nonblock: float | None = None,
    granularity: str = "block",
    **common: Any,
) -> Path:
    """WARP SLERP of the task vectors of `models` relative to `init` (two models: SLERP at `lam`;
    more: the iterative rule with λ = 1/k), one angle per group (`block`, `tensor` or `model`). LoRA
    adapters trained on `init` are merged exactly as adapters (`rank`, `densify`: merge/adapters.py)."""
    if _adapters(models, common):
        from mergekit_warp.merge.adapters import merge_adapters

        return merge_adapters(
            "slerp",
            models,
            init,
            out,
            lam=lam,
            lam_nonblock=lam_nonblock,
            granularity=granularity,
            **_adapter_options(common),
        )
    return merge(
        "slerp",
        models,
        out,
        base=init,
        params={"lambda": lam, "lambda_nonblock": lam_nonblock, "granularity": granularity},
        **common,
    )


def lerp(
    models: list[PathLike],
    out: PathLike,
    *,
    weights: list[float] | None = None,
    init: PathLike | None = None,
    **common: Any,
) -> Path:
    """Weighted average Σ w_m θ_m (a model soup; default uniform weights), or of task vectors,
    θ_init + Σ w_m (θ_m − θ_init), when `init` is given (LoRA adapters trained on `init`: as adapters)."""
    if _adapters(models, common):
        from mergekit_warp.merge.adapters import merge_adapters

        if init is None:
            raise WarpError("LoRA adapters are task vectors: pass the base they were trained on as --init")
        return merge_adapters("lerp", models, init, out, weights=weights, **_adapter_options(common))
    return merge("lerp", models, out, base=init, params={"weights": weights}, **common)


def ema(checkpoints: list[PathLike], out: PathLike, *, mu: float = 0.01, **common: Any) -> Path:
    """Exponential moving average over the ordered `checkpoints`: θ ← (1 − μ)·θ + μ·θ_t from C1."""
    return merge("ema", checkpoints, out, params={"mu": mu}, **common)


def liti(
    merged: PathLike,
    init: PathLike,
    out: PathLike,
    *,
    eta: float | list[float] = 0.3,
    eta_nonblock: float | None = None,
    **common: Any,
) -> Path:
    """LITI: (1 − η)·θ_init + η·θ_merged (η may be a per-layer list); η > 1 extrapolates. `init` is
    the iteration's init or θ_sft — both targets of the paper are this same call. A LoRA adapter
    `merged` trained on `init` gives the adapter η·δ (or with `densify` the model θ_init + η·δ)."""
    if _adapters([merged], common):
        from mergekit_warp.merge.adapters import merge_adapters

        return merge_adapters(
            "liti", [merged], init, out, eta=eta, eta_nonblock=eta_nonblock, **_adapter_options(common)
        )
    return merge("liti", [merged], out, base=init, params={"eta": eta, "eta_nonblock": eta_nonblock}, **common)


def inspect(
    models: list[PathLike],
    init: PathLike,
    *,
    granularity: str = "block",
    revision: str | None = None,
    device: str = "cpu",
    progress: bool = False,
    chunk: int = CHUNK,
) -> list[dict[str, Any]]:
    """Per group (WARP fig. 11 diagnostics): task-vector norms ‖δ_m‖, pairwise task-vector cosines and
    angles Ω (degrees), and full-weight cosines over [init, models…] (index 0 is the init)."""
    if len(models) < 1:
        raise WarpError("inspect needs at least one model besides --init")
    check_granularity(granularity)
    with ExitStack() as stack:
        readers = [stack.enter_context(open_reader(s, revision, init)) for s in [init, *models]]
        preflight(readers)
        groups = group_names(readers[0].names, granularity)
        grams = gram_pass(
            readers, groups, device=resolve_device(device), chunk=chunk, progress=Bytes(progress), full=True
        )
        order = sorted(groups, key=lambda g: _position(groups[g]))  # embeddings, blocks 0, 1, 2 …, the rest
        whole = {"delta": sum(grams[g]["delta"] for g in order), "full": sum(grams[g]["full"] for g in order)}
        if len(order) > 1:  # the whole model as one more row
            groups, grams = (
                {**{g: groups[g] for g in order}, "(whole model)": readers[0].names},
                {**grams, "(whole model)": whole},
            )
        rows = []
        for g, ns in groups.items():
            gd, gf = grams[g]["delta"], grams[g]["full"]
            tn, wn = gd.diag().clamp_min(0).sqrt(), gf.diag().clamp_min(0).sqrt()
            tcos = _cos(gd, tn)
            rows.append(
                {
                    "group": g,
                    "layer": _layer(ns),
                    "tensors": len(ns),
                    "numel": sum(readers[0].infos[n].numel for n in ns),
                    "task_norms": tn.tolist(),
                    "task_cos": tcos,
                    "omega_deg": [
                        [None if c is None else math.degrees(math.acos(max(-1.0, min(1.0, c)))) for c in row]
                        for row in tcos
                    ],
                    "weight_norms": wn.tolist(),
                    "weight_cos": _cos(gf, wn),
                }
            )
        return rows


def _cos(g: Tensor, norms: Tensor) -> list[list[float | None]]:
    """Cosines from a Gram matrix; None where a vector is zero (no angle), which keeps the JSON strict."""
    den = (norms[:, None] * norms[None, :]).tolist()
    return [[gij / d if d > 0 else None for gij, d in zip(grow, drow)] for grow, drow in zip(g.tolist(), den)]


def _position(names: list[str]) -> tuple[int, int]:
    """Sort key of a group: embeddings first, then the blocks by number, then the rest (final norm, head)."""
    layer = _layer(names)
    if layer is not None:
        return 1, layer
    return (0, 0) if any(k in names[0] for k in ("embed", "wte", "wpe")) else (2, 0)


def _layer(names: list[str]) -> int | None:
    layers = {layer_index(n) for n in names}
    return layers.pop() if len(layers) == 1 else None
