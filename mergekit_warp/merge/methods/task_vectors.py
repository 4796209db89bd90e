"""Generalized task arithmetic: the task-vector merges on a required base that mergekit builds from one
class (task_arithmetic, ties, dare_*, breadcrumbs*, della*), here one `Family` of options each.

With δ_m = θ_m − θ_base, per element:

    θ = θ_base + λ · Σ_m c_m·w_m·s_m(δ_m) / D

- s_m: the model's drop (sparsify.py: none, TIES magnitude, DARE random, breadcrumbs band, DELLA),
  rescaled to keep ‖δ_m‖₁ of the tensor when `rescale`;
- c_m (sign consensus, TIES): 1 where sign(w_m·s_m(δ_m)) is the elected sign, else 0 (a zero never
  agrees). The elected sign is that of Σ_m w_m·s_m(δ_m) (`sum`, the paper's and mergekit's) or of
  Σ_m sign(w_m·s_m(δ_m)) (`count`), + where it is 0. Without consensus c_m = 1;
- D (with `normalize`, else 1): Σ_m c_m·w_m per element (1 where it is 0, as mergekit), or Σ_m w_m.

Parameters follow mergekit 0.1.5 (names, defaults, per model or not). Differences:
- mergekit computes in its configured dtype (often bf16); warp always computes in fp32.
- `normalize` with weights summing to 0 is an error (mergekit silently skips the division).
- `consensus_method` (sum or count) is warp's: mergekit always elects by sum and ignores the key.
- `int8_mask` is accepted for mergekit YAMLs and changes nothing (warp's masks are booleans).
- task_arithmetic takes no `density`/`rescale` (mergekit accepts and ignores them).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

from mergekit_warp.errors import WarpError
from mergekit_warp.merge.methods.base import Context, Method, Param, Settings

if TYPE_CHECKING:
    from torch import Tensor

    from mergekit_warp.io.reader import CheckpointReader
    from mergekit_warp.merge.engine import Combine, Fetch
    from mergekit_warp.merge.methods.sparsify import Drop

WEIGHT_EPS = 1e-8  # mergekit's: a weight sum below it is not divided by


@dataclass(frozen=True)
class Family:
    drop: str | None  # sparsify.py's kind: None, "magnitude", "outliers", "random" or "della"
    consensus: bool
    normalize: bool  # defaults, as mergekit registers each method
    rescale: bool = False


WEIGHT = Param("weight", per_model=True, help="Weight w_m of the model's task vector.")
DENSITY = Param(
    "density",
    1.0,
    per_model=True,
    help="Fraction of each task vector kept.",
    valid=lambda v: 0 < v <= 1,
    expect="in (0, 1] (the fraction of each task vector kept)",
)
GAMMA = Param(
    "gamma",
    0.01,
    per_model=True,
    help="Fraction of largest-magnitude outliers dropped.",
    valid=lambda v: 0 <= v <= 1,
    expect="in [0, 1] (the fraction of largest elements dropped)",
)
EPSILON = Param(
    "epsilon",
    0.15,
    per_model=True,
    help="Spread ε of the keep probabilities, density ± ε from the smallest to the largest of a row.",
    valid=lambda v: v >= 0,
    expect=">= 0 (keep probabilities run from density − ε to density + ε)",
)
LAMBDA = Param("lambda", 1.0, help="Scale λ of the merged task vector.")
CONSENSUS = Param(
    "consensus_method",
    "sum",
    kind=str,
    choices=("sum", "count"),
    help="Sign election: sign of Σ w·δ (sum) or majority of signs (count; mergekit has only sum).",
    mergekit=False,
)
INT8_MASK = Param("int8_mask", False, kind=bool, help="Accepted for mergekit YAMLs; no effect.")


def params(f: Family) -> tuple[Param, ...]:
    normalize = Param(
        "normalize",
        f.normalize,
        kind=bool,
        help="Divide by the sum of the (agreeing) weights." if f.consensus else "Divide by the sum of the weights.",
    )
    out = [WEIGHT]
    if f.drop:
        out.append(DENSITY)
    out += {"outliers": [GAMMA], "della": [EPSILON]}.get(f.drop or "", [])
    out += [normalize, LAMBDA]
    if f.drop:
        out.append(Param("rescale", f.rescale, kind=bool, help="Rescale the kept values to the task vector's L1 norm."))
    if f.consensus:
        out.append(CONSENSUS)
    return (*out, INT8_MASK)


@dataclass
class TensorPlan:
    weights: list[float]
    drops: list[Drop]
    normalize: bool
    lam: float
    vote: str | None  # "sum", "count", or None without consensus
    row: int


def plan(f: Family, by: dict[str, Param], s: Settings, name: str, shape: tuple[int, ...], n: int) -> TensorPlan:
    """Every setting of one tensor (`by`: the method's parameters by name), checked across parameters
    (what no single value shows)."""
    from mergekit_warp.merge.methods.sparsify import Drop, row_length

    w = [s.get(WEIGHT, name, m) for m in range(n)]
    normalize = s.get(by["normalize"], name)
    if normalize and abs(sum(w)) < WEIGHT_EPS:
        raise WarpError(
            f"--weight (parameter weight) {w} sums to 0 for {name}: --normalize would divide by zero; give "
            "weights with a non-zero sum, or --normalize false"
        )
    drops = []
    for m in range(n):
        d = Drop(f.drop)
        if f.drop:
            d.density, d.rescale = s.get(DENSITY, name, m), s.get(by["rescale"], name)
        if f.drop == "outliers":
            d.gamma = s.get(GAMMA, name, m)
        if f.drop == "della":
            d.epsilon = s.get(EPSILON, name, m)
            lo, hi = d.density - d.epsilon, d.density + d.epsilon
            if d.density < 1 and not (lo > 0 and hi < 1):
                raise WarpError(
                    f"--epsilon (parameter epsilon) {d.epsilon:g} of model {m + 1} with --density {d.density:g} "
                    f"gives keep probabilities [{lo:g}, {hi:g}] for {name}; density ± epsilon must lie inside (0, 1)"
                )
        drops.append(d)
    vote = s.get(CONSENSUS, name) if f.consensus else None
    return TensorPlan(w, drops, normalize, s.get(LAMBDA, name), vote, row_length(shape))


def check(f: Family, name: str, s: Settings, n_models: int, has_base: bool) -> list[str]:
    notes = []
    if f.drop and not s.given("density"):
        notes.append(f"{name}: no density given; mergekit's default 1 keeps every element of the task vectors")
    if f.consensus and s.top.get("consensus_method") == "count":
        notes.append("consensus_method count is warp's: mergekit-yaml ignores it and elects by sum")
    return notes


def build(f: Family, readers: list[CheckpointReader], s: Settings, ctx: Context) -> Combine:
    from mergekit_warp.merge.methods import sparsify

    infos, by = readers[0].infos, {p.name: p for p in params(f)}
    plans = {n: plan(f, by, s, n, infos[n].shape, len(readers) - 1) for n in readers[0].names if infos[n].is_float}
    done: set[str] = set()  # tensors whose drop statistics are known

    def run(name: str, fetch: Fetch) -> Tensor:
        if name not in done:  # before the tensor's first chunk: from memory when the engine holds it
            sparsify.statistics(readers, name, plans[name].drops, seed=ctx.seed, device=ctx.device, chunk=ctx.chunk)
            done.add(name)
        return combine(plans[name], name, fetch, ctx.seed)

    return run


def combine(p: TensorPlan, name: str, fetch: Fetch, seed: int) -> Tensor:
    """One chunk: the task vectors one model at a time into running sums (memory flat in the number of
    models): Σ w·s(δ), and with consensus its positive and negative parts, the weights of each sign, the
    sign votes. NaN/Inf in a task vector is reported even where the drop removes it."""
    import torch

    from mergekit_warp.merge.engine import check_finite
    from mergekit_warp.merge.methods.sparsify import dropped

    base = fetch(0).to(torch.float32, copy=True)
    total = torch.zeros_like(base)
    if p.vote:
        pos, neg, w_pos, w_neg = (torch.zeros_like(base) for _ in range(4))
        votes = torch.zeros_like(base) if p.vote == "count" else None
    for m, (w, drop) in enumerate(zip(p.weights, p.drops)):
        d = fetch(m + 1).to(torch.float32, copy=True).sub_(base)
        gone = dropped(drop, d, seed, name, m, fetch.start, p.row)
        if gone is not None:
            if not bool(torch.isfinite(d.sum())):  # (the output check would miss a dropped NaN)
                check_finite(d, [fetch.readers[0], fetch.readers[m + 1]], name, d.device, d.numel())
            d.masked_fill_(gone, 0.0)
        d.mul_(w * drop.scale)
        total.add_(d)
        if p.vote:
            up, down = d > 0, d < 0
            neg.add_(d.clamp(max=0))
            pos.add_(d.relu_())  # d is not needed past this point
            w_pos.add_(up, alpha=w)
            w_neg.add_(down, alpha=w)
            if votes is not None:
                votes.add_(up).sub_(down.float())
        del d, gone
    if p.vote:
        up = (total if votes is None else votes) >= 0
        mixed = torch.where(up, pos, neg)
        if p.normalize:
            div = torch.where(up, w_pos, w_neg)
            mixed.div_(div.masked_fill_(div == 0, 1.0))
    else:
        mixed = total
        if p.normalize:
            mixed.div_(sum(p.weights))
    if p.lam != 1.0:
        mixed.mul_(p.lam)
    return base.add_(mixed)


def define(name: str, summary: str, family: Family) -> Method:
    return Method(
        name=name,
        summary=summary,
        base="required",
        roles=("base", "models"),
        params=params(family),
        build=partial(build, family),
        check=partial(check, family, name),
        rows=family.drop == "della",
        mergekit=name,
        random=family.drop in ("random", "della"),
    )
