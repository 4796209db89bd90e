"""The merge methods, by name. Each is one small module exposing `METHOD`: how to check its
parameters, which inputs it takes, and the `Combine` the one streaming loop runs (merge/engine.py).
Adding a method: one module, one entry below, one test."""

from mergekit_warp.merge.methods import (
    breadcrumbs,
    dare,
    della,
    ema,
    karcher,
    lerp,
    linear,
    liti,
    model_stock,
    multislerp,
    nuslerp,
    slerp,
    task_arithmetic,
    ties,
)
from mergekit_warp.merge.methods.base import Context, Method

REGISTRY: dict[str, Method] = {
    m.name: m
    for m in (
        slerp.METHOD,
        lerp.METHOD,
        ema.METHOD,
        liti.METHOD,
        task_arithmetic.METHOD,
        ties.METHOD,
        dare.LINEAR,
        dare.TIES,
        breadcrumbs.LINEAR,
        breadcrumbs.TIES,
        della.TIES,
        della.LINEAR,
        linear.METHOD,
        nuslerp.METHOD,
        multislerp.METHOD,
        karcher.METHOD,
        model_stock.METHOD,
    )
}

__all__ = ["REGISTRY", "Context", "Method"]
