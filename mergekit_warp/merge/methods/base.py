"""What a merge method is: data and small functions, not a class hierarchy.

A method declares its parameters (`Param`), optionally cross-checks them (`check`), and builds the
`Combine` that the one streaming loop runs (`build`; it imports torch and the engine itself, so that the
catalogue of methods loads without them), after any statistics pass it needs (the angles of
SLERP, the magnitude thresholds of TIES). Parameter values follow mergekit's configuration language
(`Settings`): a number (or flag), a list of numbers interpolated over depth (a "gradient"), or a list of
`{filter, value}` entries matched against tensor names; a model's own value overrides the top-level one.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mergekit_warp.errors import WarpError
from mergekit_warp.merge.plan import layer_index

if TYPE_CHECKING:  # the catalogue of methods loads without torch (the CLI lists them); `build` needs it
    import torch

    from mergekit_warp.io.reader import CheckpointReader
    from mergekit_warp.merge.engine import Combine

REQUIRED = object()


@dataclass(frozen=True)
class Param:
    """One parameter of a method, named as in mergekit's YAML."""

    name: str
    default: Any = REQUIRED
    per_model: bool = False
    """A value for each input model (mergekit's tensor parameters: weight, density, …), else one value."""
    kind: type = float
    """float, int, bool or str."""
    help: str = ""
    valid: Callable[[Any], bool] | None = None
    """Whether a (resolved) value is acceptable; `expect` says what is."""
    expect: str = ""
    choices: tuple[str, ...] = ()
    raw: bool = False
    """Taken as given (a list stays a list): for parameters with their own per-layer rules."""
    mergekit: bool = True
    """mergekit knows this parameter (False: warp's own; mergekit would ignore it)."""


@dataclass(frozen=True)
class Settings:
    """The parameter values of one merge: `top` (mergekit's top-level `parameters`) and one mapping per
    model (`models[i].parameters`, input order, the base excluded); `n_layers` for gradients."""

    top: Mapping[str, Any] = field(default_factory=dict)
    models: tuple[Mapping[str, Any], ...] = ()
    n_layers: int = 0

    def get(self, p: Param, tensor: str = "", model: int | None = None) -> Any:
        """The value of `p` for `tensor` (and `model` when per model): the model's own setting, else the
        top-level one, else the default; a gradient is interpolated at the tensor's depth."""
        for source in ([self.models[model]] if model is not None and model < len(self.models) else []) + [self.top]:
            if p.name in source:
                if p.raw:
                    return source[p.name]
                value = evaluate(source[p.name], tensor, depth(tensor, self.n_layers))
                if value is not None:
                    return _typed(p, value)
        if p.default is REQUIRED:
            who = f" of model {model + 1}" if model is not None else ""
            raise WarpError(f"parameter {p.name}{who} is required for this method; give it (--{p.name} or in the YAML)")
        return p.default

    def given(self, name: str) -> bool:
        return name in self.top or any(name in m for m in self.models)


def depth(tensor: str, n_layers: int) -> float:
    """Where a tensor sits for gradients, as mergekit 0.1.5 places it: block i of n at i/(n−1) (1 for a
    single block); tensors outside the blocks (embeddings, final norm, head) at 0."""
    i = layer_index(tensor)
    if i is None:
        return 0.0
    return i / (n_layers - 1) if n_layers > 1 else 1.0


def evaluate(setting: Any, tensor: str, t: float) -> Any:
    """A setting's value for `tensor` at depth t: scalars as is; a list of numbers interpolated at t; a
    list of other scalars indexed at t; a list of {filter, value} entries: the first whose filter is a
    substring of the tensor name (no filter, or '*', matches all); None when none matches."""
    if isinstance(setting, list):
        if setting and all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in setting):
            pos = t * (len(setting) - 1)
            i0 = int(pos)
            i1 = min(len(setting) - 1, i0 + 1)
            return (1 - (pos - i0)) * setting[i0] + (pos - i0) * setting[i1]
        if setting and all(not isinstance(e, (dict, list)) for e in setting):
            return setting[int(t * (len(setting) - 1))]
        for cond in setting:
            f = cond.get("filter") if isinstance(cond, dict) else None
            if f is None or f == "*" or (tensor and f in tensor):
                return evaluate(cond.get("value") if isinstance(cond, dict) else cond, tensor, t)
        return None
    return setting


def _typed(p: Param, value: Any) -> Any:
    try:
        if p.kind is bool:
            if isinstance(value, str):
                v = {"true": True, "false": False, "1": True, "0": False}[value.lower()]
            else:
                v = bool(value)
        elif p.kind is str:
            v = str(value)
        else:
            v = p.kind(value)
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError
    except (TypeError, ValueError, KeyError):
        what = "a finite number" if p.kind is float else p.kind.__name__
        raise WarpError(f"{_label(p)} {value!r}: not {what}") from None
    if p.choices and v not in p.choices:
        raise WarpError(f"{_label(p)} {v!r}: choose one of {', '.join(p.choices)}")
    if p.valid is not None and not p.valid(v):
        raise WarpError(f"{_label(p)} {v}: must be {p.expect}")
    return v


def _label(p: Param) -> str:
    """How errors name a parameter: its option and its YAML key."""
    return f"--{p.name.replace('_', '-')} (parameter {p.name})"


@dataclass(frozen=True)
class Context:
    """What a method's `build` may use besides the readers and settings."""

    device: torch.device
    chunk: int
    has_base: bool = False
    """Whether readers[0] is the base (the init) rather than the first model."""
    seed: int = 0
    """Seed of random methods (DARE, DELLA): with the tensor name and element offset it fixes each draw."""


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    """One line with the formula (command help, model card)."""
    base: str
    """The input given apart from the models: 'required', 'optional' or 'none'."""
    roles: tuple[str, str]
    """Provenance names of the base and of the models (e.g. ('init', 'models'))."""
    params: tuple[Param, ...]
    build: Callable[[list[CheckpointReader], Settings, Context], Combine]
    """(readers: the base first when given, then the models; settings; context) → the Combine."""
    check: Callable[[Settings, int, bool], list[str]] | None = None
    """(settings, number of models, base given?) → notes; WarpError for what no single value shows."""
    min_models: int = 1
    rows: bool = False
    """Chunks hold whole rows (the last dimension): for methods that work row by row."""
    groups: Callable[[Settings, list[str], bool], dict[str, list[str]]] | None = None
    """(settings, tensor names, base given?) → the groups of tensors that share a statistic (SLERP's
    blocks), held in memory together; default: each tensor alone."""
    mergekit: str | None = None
    """mergekit's name for the same method (a merge_config.yml is written beside the output), or None."""
    random: bool = False
    """Draws random numbers (seeded by --seed, the tensor name and the element offset)."""

    def param(self, name: str) -> Param:
        return next(p for p in self.params if p.name == name)


def validate(m: Method, s: Settings, n_models: int, has_base: bool, names: list[str]) -> list[str]:
    """Check every parameter of `m` for every tensor and model (unknown names, types, ranges, required
    values), then the method's own cross-checks; return its notes."""
    known = {p.name for p in m.params}
    for where, given in [("", s.top), *((f" of model {i + 1}", g) for i, g in enumerate(s.models))]:
        unknown = sorted(set(given) - known)
        if unknown:
            raise WarpError(
                f"{m.name}: unknown parameter {unknown[0]}{where}; it takes {', '.join(sorted(known)) or 'none'}"
            )
    if n_models < m.min_models:
        need = {1: "one model", 2: "two models"}.get(m.min_models, f"{m.min_models} models")
        raise WarpError(f"{m.name} needs at least {need}, got {n_models}; pass more checkpoints")
    if len(s.models) not in (0, n_models):
        raise WarpError(f"{m.name}: parameters for {len(s.models)} models, but {n_models} models are merged")
    for p in m.params:
        for name in names:
            for model in range(n_models) if p.per_model else [None]:
                s.get(p, name, model)
    return m.check(s, n_models, has_base) if m.check else []


def uniform(
    seed: int, tensor: str, model: int, start: int, stop: int, device: torch.device | None = None
) -> torch.Tensor:
    """(stop − start,) float32 uniforms in [0, 1) for elements [start, stop) of `tensor` and `model`:
    element i is the i-th float32 of a PCG64 stream keyed by a hash of (seed, tensor, model), reached
    by jumping ahead (PCG64.advance), so a draw does not depend on chunking or sharding. Drawn on the
    CPU (the same numbers for every device), then moved."""
    import numpy as np
    import torch

    key = int.from_bytes(hashlib.sha256(f"{seed}\0{tensor}\0{model}".encode()).digest()[:16], "little")
    bits = np.random.PCG64(key)
    bits.advance(start // 2)  # each 64-bit output gives two float32 draws
    gen = np.random.Generator(bits)
    if start % 2:
        gen.random(1, dtype=np.float32)
    return torch.from_numpy(gen.random(stop - start, dtype=np.float32)).to(device)
