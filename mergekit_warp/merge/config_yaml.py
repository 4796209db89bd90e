"""mergekit's configuration format, read and written.

`read(path)` turns a mergekit YAML into the arguments of `api.merge`; what `warp` does not support is a
one-line error that says so (never silently ignored):

    merge_method: ties                 # any registered method with mergekit's name (and warp's own)
    base_model: path/or/hub-id         # the base of task-vector methods; for `slerp`, the t = 0 end
    models:
      - model: path/or/hub-id
        parameters: {weight: 1.0, density: 0.5}
    parameters: {normalize: true}      # top-level: scalars, gradients [0.2, 0.8], filters [{filter: mlp, value: 1}, {value: 0}]
    dtype: float32                     # mergekit's compute dtype: warp always computes in fp32
    out_dtype: bfloat16                # the output dtype
    tokenizer_source: base             # config and tokenizer files come from the base (warp's only choice)

`write(...)` records a merge made with `warp` in that format (`merge_config.yml` beside the output), so it
can be reproduced by mergekit or by `warp merge yaml` (bit for bit).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from mergekit_warp.errors import WarpError

FILE = "merge_config.yml"
_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}
_UNSUPPORTED = {
    "modules": "multi-module configurations are not supported; give `models` (or one full slice)",
    "tokenizer": "the `tokenizer` block is not supported; warp copies the base model's tokenizer (tokenizer_source: base)",
    "chat_template": "`chat_template` is not supported; warp copies the base model's tokenizer files as they are",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelEntry(_Strict):
    model: str
    parameters: dict[str, Any] | None = None


class SliceSource(_Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, Any] | None = None


class Slice(_Strict):
    sources: list[SliceSource]
    parameters: dict[str, Any] | None = None


class MergekitConfig(_Strict):
    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry] | None = None
    slices: list[Slice] | None = None
    parameters: dict[str, Any] | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    warp_seed: int | None = None
    """warp's seed of random drops (mergekit ignores unknown keys; warp writes it for DARE and DELLA)."""


@dataclass(frozen=True)
class Plan:
    """`api.merge` arguments read from a mergekit YAML."""

    method: str
    models: list[str]
    base: str | None
    params: dict[str, Any]
    model_params: list[dict[str, Any]]
    dtype: str | None
    seed: int


def read(path: Path) -> Plan:
    """Parse and check a mergekit YAML (paths relative to its folder)."""
    from mergekit_warp.merge.methods import REGISTRY

    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise WarpError(f"config {path}: cannot be read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise WarpError(f"config {path}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise WarpError(f"config {path}: expected a mergekit configuration (merge_method, models, …) at the top")
    for key, why in _UNSUPPORTED.items():
        if key in raw:
            raise WarpError(f"config {path}: {why}")
    try:
        cfg = MergekitConfig.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(x) for x in err["loc"])
        what = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        raise WarpError(f"config {path}: {key}: {what}") from None
    if cfg.merge_method not in REGISTRY:
        raise WarpError(
            f"config {path}: merge_method {cfg.merge_method!r} is not supported; warp has {', '.join(sorted(REGISTRY))}"
        )
    if cfg.tokenizer_source not in (None, "base"):
        raise WarpError(
            f"config {path}: tokenizer_source {cfg.tokenizer_source!r} is not supported; warp copies the "
            "base model's tokenizer (tokenizer_source: base)"
        )
    entries = _entries(cfg, path)
    base = _spec(cfg.base_model, path) if cfg.base_model else None
    models = [_spec(e.model, path) for e in entries]
    params = [dict(e.parameters or {}) for e in entries]
    m = REGISTRY[cfg.merge_method]
    if base is not None and base in models:  # mergekit lists the base among the models, or not
        i = models.index(base)
        if m.base == "none" or cfg.merge_method == "slerp":  # slerp: the base is the t = 0 end
            models.insert(0, models.pop(i))
            params.insert(0, params.pop(i))
            base = None
        else:
            del models[i], params[i]  # the base's own parameters are not used by task-vector methods
    elif base is not None and (m.base == "none" or cfg.merge_method == "slerp"):
        models.insert(0, base)
        params.insert(0, {})
        base = None
    dtype = cfg.out_dtype or cfg.dtype
    if dtype is not None and dtype not in _DTYPES:
        raise WarpError(f"config {path}: dtype {dtype!r}; choose float32, bfloat16 or float16")
    return Plan(
        cfg.merge_method,
        models,
        base,
        dict(cfg.parameters or {}),
        params if any(params) else [],
        _DTYPES.get(dtype) if dtype else None,
        cfg.warp_seed or 0,
    )


def _entries(cfg: MergekitConfig, path: Path) -> list[ModelEntry]:
    if (cfg.models is None) == (cfg.slices is None):
        raise WarpError(f"config {path}: give exactly one of `models` or `slices`")
    if cfg.models is not None:
        return cfg.models
    if len(cfg.slices) != 1 or cfg.slices[0].parameters:
        raise WarpError(
            f"config {path}: slices that are not one full slice (without slice parameters) are not "
            "supported; give `models`"
        )
    ranges = {tuple(s.layer_range) for s in cfg.slices[0].sources}
    if len(ranges) != 1 or next(iter(ranges))[0] != 0:
        raise WarpError(f"config {path}: only one full slice (every source from layer 0 to its last) is supported")
    return [ModelEntry(model=s.model, parameters=s.parameters) for s in cfg.slices[0].sources]


def _spec(model: str, path: Path) -> str:
    """A model spec: a path relative to the config's folder when it exists there, else as written;
    `BASE+ADAPTER` (a LoRA adapter applied to its base) side by side."""
    p = Path(model).expanduser()
    if not p.is_absolute() and (path.parent / p).exists():
        return str(path.parent / p)
    if "+" in model and not p.exists():
        from mergekit_warp.merge.adapters import split_spec

        for i in (j for j, c in enumerate(model) if c == "+"):  # the split whose sides exist beside the config
            pair = split_spec(f"{_spec(model[:i], path)}+{_spec(model[i + 1 :], path)}")
            if pair is not None:
                return "+".join(pair)
    return model


def write(
    folder: Path,
    method: str,
    models: list[str],
    base: str | None,
    params: dict[str, Any],
    model_params: list[dict[str, Any]],
    dtype: str | None,
    seed: int | None,
    warp_only: tuple[str, ...] = (),
) -> Path:
    """`merge_config.yml` in `folder`: the merge in mergekit's format (absolute local paths). `warp_only`:
    given parameters mergekit does not know (a comment says mergekit would ignore them)."""

    def spec(s: str) -> str:
        from mergekit_warp.merge.adapters import split_spec

        pair = split_spec(s)
        if pair is not None:
            return "+".join(spec(x) for x in pair)
        return str(Path(s).resolve()) if Path(s).exists() else s

    doc: dict[str, Any] = {"merge_method": method}
    if base is not None:
        doc["base_model"] = spec(base)
    elif method == "slerp":  # mergekit's slerp names its t = 0 end as the base model
        doc["base_model"] = spec(models[0])
    doc["models"] = [
        {"model": spec(m), **({"parameters": model_params[i]} if i < len(model_params) and model_params[i] else {})}
        for i, m in enumerate(models)
    ]
    if params:
        doc["parameters"] = params
    doc["dtype"] = "float32"  # warp computes in fp32 whatever the inputs
    if dtype is not None:
        doc["out_dtype"] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]
    if base is not None:
        doc["tokenizer_source"] = "base"
    if seed is not None:
        doc["warp_seed"] = seed
    out = Path(folder) / FILE
    head = ["# Written by mergekit-warp: `warp merge yaml " + FILE + " -o OUT` redoes this merge bit for bit"]
    if warp_only:
        head.append(f"# mergekit-yaml would ignore {', '.join(warp_only)} (warp's own) and merge differently")
    if seed is not None:
        head.append("# mergekit-yaml draws its own random drops: the same distribution, other bytes")
    out.write_text("\n".join(head) + "\n" + yaml.safe_dump(doc, sort_keys=False))
    return out
