"""SLERP: spherical interpolation between two points, along the great circle through them.

With a base (`--init`, WARP): the points are the task vectors δ_m = θ_m − θ_init, one angle per group
(a transformer block by default), θ_init + sin((1−λ)Ω)/sin Ω·δ1 + sin(λΩ)/sin Ω·δ2, and M > 2 models
by the paper's iterative rule (λ = 1/k at step k). Without a base (mergekit's `slerp`): the points are
the full weights of two models, one angle per tensor, `t` from the first (t = 0) to the second, and
LERP where |cos Ω| > 0.9995 (nearly colinear tensors), as mergekit does.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from mergekit_warp.errors import WarpError
from mergekit_warp.merge.methods.base import Context, Method, Param, Settings
from mergekit_warp.merge.plan import GRANULARITIES, Schedule, count_layers, group_names

if TYPE_CHECKING:
    from torch import Tensor

    from mergekit_warp.io.reader import CheckpointReader
    from mergekit_warp.merge.engine import Combine, Fetch

DOT_THRESHOLD = 0.9995  # mergekit's "colinear": above it, the full-weight SLERP is a LERP
NORM_EPS = 1e-8  # mergekit normalises a tensor only when its norm exceeds this

PARAMS = (
    Param(
        "lambda",
        0.5,
        raw=True,
        help="With --init (WARP): λ, or a per-layer list interpolated over the blocks (two models only).",
    ),
    Param(
        "lambda_nonblock",
        None,
        raw=True,
        help="With --init: λ for embeddings, final norm and head (default: the list's mean).",
    ),
    Param(
        "granularity",
        "block",
        kind=str,
        choices=GRANULARITIES,
        help="With --init: one angle per block, tensor or model.",
    ),
    Param(
        "t",
        0.5,
        help="Without --init: 0 gives the first model, 1 the second.",
        valid=lambda v: 0 <= v <= 1,
        expect="in [0, 1]",
    ),
)


def check(s: Settings, n_models: int, has_base: bool) -> list[str]:
    if not has_base:
        if n_models != 2:
            raise WarpError(f"slerp of full weights (no --init) takes exactly two models, got {n_models}")
        return []
    if n_models < 2:
        raise WarpError(f"slerp needs at least two models, got {n_models}; pass two or more checkpoints")
    Schedule.build("--lambda", s.top.get("lambda", 0.5), s.top.get("lambda_nonblock"))
    if n_models > 2:
        return [f"{n_models} models: iterative SLERP with λ = 1/k at step k (input order matters); --lambda unused"]
    return []


def build(readers: list[CheckpointReader], s: Settings, ctx: Context) -> Combine:
    import torch

    from mergekit_warp.merge import math as mmath
    from mergekit_warp.merge.engine import affine_combine, gram_pass, linear_combine

    names = readers[0].names
    warp = ctx.has_base
    groups = grouping(s, names, warp)
    owner = {n: g for g, ns in groups.items() for n in ns}
    grams: dict[str, Tensor] = {}  # per group, computed when its first chunk is merged

    def gram(name: str, fetch: Fetch) -> Tensor:
        g = owner[name]
        if g in grams:
            return grams[g]
        members = groups[g]
        if len(members) == 1 and (fetch.start, fetch.stop) == (0, readers[0].infos[name].numel):
            x = torch.stack([fetch(i).double() for i in range(len(readers))])  # (k, n): the tensor, in one chunk
            x = x[1:] - x[0] if warp else x
            return (x @ x.T).cpu()
        kind = "delta" if warp else "full"
        grams[g] = gram_pass(readers, {g: members}, device=ctx.device, chunk=ctx.chunk, full=not warp)[g][kind]
        return grams[g]

    if not warp:
        return linear_combine(lambda name, fetch: full_weights(gram(name, fetch), s.get(PARAMS[3], name)))
    sched = Schedule.build("--lambda", s.top.get("lambda", 0.5), s.top.get("lambda_nonblock"))
    n_layers, two = count_layers(names), len(readers) == 3
    return affine_combine(
        lambda name, fetch: mmath.slerp_weights(gram(name, fetch), sched.at(name, n_layers) if two else None)
    )


def grouping(s: Settings, names: list[str], has_base: bool) -> dict[str, list[str]]:
    """The groups sharing one angle: blocks (or --granularity) with a base, tensors without."""
    return group_names(names, s.top.get("granularity", "block") if has_base else "tensor")


def full_weights(g: Tensor, t: float) -> Tensor:
    """(w0, w1) of mergekit's two-model SLERP w0·θ0 + w1·θ1 from the Gram matrix of the two tensors."""
    import torch

    n0, n1 = (math.sqrt(max(float(g[i, i]), 0.0)) for i in (0, 1))
    dot = float(g[0, 1]) / ((n0 if n0 > NORM_EPS else 1.0) * (n1 if n1 > NORM_EPS else 1.0))
    if abs(dot) > DOT_THRESHOLD:
        return torch.tensor([1.0 - t, t], dtype=torch.float64)
    omega = math.acos(max(-1.0, min(1.0, dot)))
    return torch.tensor([math.sin((1 - t) * omega), math.sin(t * omega)], dtype=torch.float64) / math.sin(omega)


METHOD = Method(
    name="slerp",
    summary="with --init: θ_init + sin((1−λ)Ω)/sin Ω·δ1 + sin(λΩ)/sin Ω·δ2 (WARP); without: the same on full weights, t",
    base="optional",
    roles=("init", "models"),
    params=PARAMS,
    build=build,
    check=check,
    min_models=2,
    mergekit="slerp",
    groups=grouping,
)
