"""WARP's SLERP of task vectors δ_m = θ_m − θ_init, one angle per group (transformer block by default):
θ_init + sin((1−λ)Ω)/sin Ω·δ1 + sin(λΩ)/sin Ω·δ2; M > 2 by the paper's iterative rule (λ = 1/k)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mergekit_warp.errors import WarpError
from mergekit_warp.io.reader import CheckpointReader
from mergekit_warp.merge import math as mmath
from mergekit_warp.merge.engine import Combine, Fetch, affine_combine, gram_pass
from mergekit_warp.merge.methods.base import Context, Method
from mergekit_warp.merge.plan import Schedule, check_granularity, count_layers, group_names


def check(params: dict[str, Any], n_models: int, has_base: bool) -> tuple[dict[str, Any], list[str]]:
    if n_models < 2:
        raise WarpError(f"slerp needs at least two models, got {n_models}; pass two or more checkpoints")
    sched = Schedule.build("--lambda", params.get("lam", 0.5), params.get("lam_nonblock"))
    granularity = check_granularity(params.get("granularity", "block"))
    notes = []
    if n_models > 2:
        notes.append(
            f"{n_models} models: iterative SLERP with λ = 1/k at step k (input order matters); --lambda unused"
        )
    return {"lambda": sched.record(), "lambda_nonblock": sched.nonblock, "granularity": granularity}, notes


def build(readers: list[CheckpointReader], p: dict[str, Any], ctx: Context) -> Combine:
    sched = Schedule.build("--lambda", p["lambda"], p["lambda_nonblock"])
    names = readers[0].names
    n_layers, groups = count_layers(names), group_names(names, p["granularity"])
    owner = {n: g for g, ns in groups.items() for n in ns}
    # Groups larger than one chunk need a first pass for their angle; a single small tensor is read
    # whole in the write pass, so its angle comes from that one read.
    big = {g: ns for g, ns in groups.items() if len(ns) > 1 or readers[0].infos[ns[0]].numel > ctx.chunk}
    grams = {
        g: v["delta"]
        for g, v in gram_pass(readers, big, device=ctx.device, chunk=ctx.chunk, progress=ctx.progress).items()
    }
    two = len(readers) == 3

    def weights(name: str, fetch: Fetch) -> Tensor:
        g = grams.get(owner[name])
        if g is None:
            x = torch.stack([fetch(i).double() for i in range(len(readers))])  # (k, n), n <= chunk
            d = x[1:] - x[0]
            g = (d @ d.T).cpu()
        return mmath.slerp_weights(g, sched.at(name, n_layers) if two else None)

    return affine_combine(weights)


METHOD = Method(
    name="slerp",
    summary="θ_init + Σ c_m·δ_m, c from the angle Ω between task vectors: sin((1−λ)Ω)/sin Ω, sin(λΩ)/sin Ω",
    base="required",
    roles=("init", "models"),
    check=check,
    build=build,
)
