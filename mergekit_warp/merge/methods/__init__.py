"""The merge methods, by name. Each is one small module exposing `METHOD`: how to check its
parameters, which inputs it takes, and the `Combine` the one streaming loop runs (merge/engine.py).
Adding a method: one module, one entry below, one test."""

from mergekit_warp.merge.methods import ema, lerp, liti, slerp
from mergekit_warp.merge.methods.base import Context, Method

REGISTRY: dict[str, Method] = {m.name: m for m in (slerp.METHOD, lerp.METHOD, ema.METHOD, liti.METHOD)}

__all__ = ["REGISTRY", "Context", "Method"]
