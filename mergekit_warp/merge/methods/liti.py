"""LITI: (1 − η)·θ_init + η·θ_merged = θ_init + η·(θ_merged − θ_init); η > 1 extrapolates (as ExPO)."""

from __future__ import annotations

from typing import Any

import torch

from mergekit_warp.errors import WarpError
from mergekit_warp.io.reader import CheckpointReader
from mergekit_warp.merge.engine import Combine, affine_combine
from mergekit_warp.merge.methods.base import Context, Method
from mergekit_warp.merge.plan import Schedule, count_layers


def check(params: dict[str, Any], n_models: int, has_base: bool) -> tuple[dict[str, Any], list[str]]:
    if n_models != 1:
        raise WarpError(f"liti takes one merged model, got {n_models}")
    sched = Schedule.build("--eta", params.get("eta", 0.3), params.get("eta_nonblock"), low=0.0, high=None)
    notes = []
    if max(*sched.values, sched.nonblock) > 1:
        notes.append("η > 1: extrapolation beyond the merged model (as ExPO); KL to the init grows past the merge's")
    return {"eta": sched.record(), "eta_nonblock": sched.nonblock}, notes


def build(readers: list[CheckpointReader], p: dict[str, Any], ctx: Context) -> Combine:
    sched = Schedule.build("--eta", p["eta"], p["eta_nonblock"], low=0.0, high=None)
    n_layers = count_layers(readers[0].names)
    return affine_combine(lambda name, fetch: torch.tensor([sched.at(name, n_layers)], dtype=torch.float64))


METHOD = Method(
    name="liti",
    summary="(1 − η)·θ_init + η·θ_merged; η > 1 extrapolates",
    base="required",
    roles=("init", "merged"),
    check=check,
    build=build,
)
