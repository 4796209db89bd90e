"""LITI: (1 − η)·θ_init + η·θ_merged = θ_init + η·(θ_merged − θ_init); η > 1 extrapolates (as ExPO)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mergekit_warp.errors import WarpError
from mergekit_warp.merge.methods.base import Context, Method, Param, Settings
from mergekit_warp.merge.plan import Schedule, count_layers

if TYPE_CHECKING:
    from mergekit_warp.io.reader import CheckpointReader
    from mergekit_warp.merge.engine import Combine

PARAMS = (
    Param("eta", 0.3, raw=True, help="η, or a per-layer list (interpolated over the blocks); η > 1 extrapolates."),
    Param("eta_nonblock", None, raw=True, help="η for embeddings, final norm and head (default: the list's mean)."),
)


def _schedule(s: Settings) -> Schedule:
    return Schedule.build("--eta", s.top.get("eta", 0.3), s.top.get("eta_nonblock"), low=0.0, high=None)


def check(s: Settings, n_models: int, has_base: bool) -> list[str]:
    if n_models != 1:
        raise WarpError(f"liti takes one merged model, got {n_models}")
    sched = _schedule(s)
    if max(*sched.values, sched.nonblock) > 1:
        return ["η > 1: extrapolation beyond the merged model (as ExPO); KL to the init grows past the merge's"]
    return []


def build(readers: list[CheckpointReader], s: Settings, ctx: Context) -> Combine:
    import torch

    from mergekit_warp.merge.engine import affine_combine

    sched, n_layers = _schedule(s), count_layers(readers[0].names)
    return affine_combine(lambda name, fetch: torch.tensor([sched.at(name, n_layers)], dtype=torch.float64))


METHOD = Method(
    name="liti",
    summary="(1 − η)·θ_init + η·θ_merged; η > 1 extrapolates",
    base="required",
    roles=("init", "merged"),
    params=PARAMS,
    build=build,
    check=check,
)
