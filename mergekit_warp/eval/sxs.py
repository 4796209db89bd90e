"""Side-by-side (SxS) comparison, scored as the paper's Table 1.

Policies A and B answer the same prompts. A judge gives each pair a margin m (positive favours A):
- a pointwise judge (any `warp rl --reward` spec: reward model, `sentiment`, `module:function`, …)
  scores both answers and m = r(A) − r(B);
- a pairwise judge is a Python callable `f(prompts, completions_a, completions_b) -> list[float]`
  (`module:function` or `file.py:function` with three parameters) returning m directly.
The margin maps to a score: |m| ≥ t3 → ±1.5 (much better), ≥ t2 → ±1 (better), ≥ t1 → ±0.5
(slightly better), else 0 (tie). Default thresholds (0.05, 0.25, 0.5) suit rewards in [−1, 1] such as
VADER; rescale them for a reward model's logit range (`--thresholds`).

The mean score comes with a percentile bootstrap 95% interval over prompts (seeded) and the
win/tie/loss counts. A and B are sampled with different seeds, so A against itself is a real null
test: the mean is ≈ 0 and its interval contains 0.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mergekit_warp.errors import WarpError
from mergekit_warp.eval.settings import EvalSettings

DEFAULT_THRESHOLDS = (0.05, 0.25, 0.5)
PairJudge = Callable[[list[str], list[str], list[str]], list[float]]


@dataclass(frozen=True)
class SxsResult:
    mean: float
    ci_low: float
    ci_high: float
    wins: int
    ties: int
    losses: int
    n: int
    thresholds: tuple[float, float, float]
    scores: list[float]


def score_margins(margins: torch.Tensor, thresholds: tuple[float, float, float] = DEFAULT_THRESHOLDS) -> torch.Tensor:
    """(n,) margins → (n,) scores in {±1.5, ±1, ±0.5, 0}."""
    t1, t2, t3 = thresholds
    a = margins.abs()
    mag = torch.where(a >= t3, 1.5, torch.where(a >= t2, 1.0, torch.where(a >= t1, 0.5, 0.0)))
    return torch.sign(margins) * mag


def bootstrap_ci(x: torch.Tensor, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of x (n,)."""
    g = torch.Generator().manual_seed(seed)
    x = x.double()
    idx = torch.randint(len(x), (n_boot, len(x)), generator=g)  # (B, n)
    means = x[idx].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return lo.item(), hi.item()


def check_thresholds(t: tuple[float, ...]) -> tuple[float, float, float]:
    if len(t) != 3 or not (0 <= t[0] <= t[1] <= t[2]):
        raise WarpError(
            f"--thresholds {','.join(map(str, t))}: give three increasing values t1 ≤ t2 ≤ t3 ≥ 0 (slightly/better/much better)"
        )
    return (float(t[0]), float(t[1]), float(t[2]))


def summarize(margins: torch.Tensor, thresholds: tuple[float, float, float], seed: int = 0) -> SxsResult:
    s = score_margins(margins.double(), thresholds)
    lo, hi = bootstrap_ci(s, seed=seed)
    return SxsResult(
        mean=s.mean().item(),
        ci_low=lo,
        ci_high=hi,
        wins=int((s > 0).sum()),
        ties=int((s == 0).sum()),
        losses=int((s < 0).sum()),
        n=len(s),
        thresholds=thresholds,
        scores=s.tolist(),
    )


def _required_positional(fn) -> int | None:
    """How many positional arguments `fn` requires (None: not introspectable, or it takes *args)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return None
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty for p in params)


def check_margins(out: object, spec: str, n: int) -> list[float]:
    """A judge's answer as n finite floats, or a WarpError naming the judge and the first bad pair.

    A NaN margin would silently count as a tie and ±inf as a ±1.5 win; a string, a bool or a count
    other than one margin per pair are refused as well."""
    if hasattr(out, "tolist"):  # tensors and arrays
        out = out.tolist()
    if isinstance(out, (str, bytes, dict)) or not hasattr(out, "__iter__"):
        raise WarpError(
            f"judge {spec} returned {type(out).__name__}; it must return a list of floats, one margin per pair"
        )
    try:
        values = list(out)
    except Exception as e:
        raise WarpError(f"judge {spec} raised {type(e).__name__}: {e}") from None
    if len(values) != n:
        raise WarpError(
            f"judge {spec} returned {len(values)} margins for {n} pairs (first bad pair: {min(len(values), n)}); "
            "it must return one margin per pair"
        )
    margins = []
    for i, v in enumerate(values):
        try:
            if isinstance(v, (str, bytes, bool)):
                raise TypeError
            x = float(v)
        except (TypeError, ValueError):
            raise WarpError(
                f"judge {spec} returned {v!r:.40} ({type(v).__name__}) for pair {i}; "
                "margins must be numbers (positive favours A)"
            ) from None
        if not math.isfinite(x):
            raise WarpError(
                f"judge {spec} returned a non-finite margin {x} for pair {i}; margins must be finite numbers"
            )
        margins.append(x)
    return margins


def load_judge(spec: str, device: str = "cpu", tokenizer=None) -> PairJudge:
    """A pairwise judge from `spec`: a callable requiring three positional arguments is used as is;
    anything else is a pointwise reward (`warp rl --reward` spec) turned into r(A) − r(B). Either
    way every answer is checked (`check_margins`)."""
    from mergekit_warp.lm.rewards import _callable, load_reward, validated

    if ":" in spec and not Path(spec).is_dir():
        fn = _callable(spec)
        # Required positional arguments, not all parameters: f(prompts, completions, tokenizer=None) is
        # a pointwise reward, f(prompts, a, b, scale=1.0) a pairwise judge.
        if _required_positional(fn) == 3:

            def pair(prompts: list[str], a: list[str], b: list[str]) -> list[float]:
                try:
                    out = fn(prompts, a, b)
                except Exception as e:
                    raise WarpError(f"judge {spec} raised {type(e).__name__}: {e}") from None
                return check_margins(out, spec, len(a))

            return pair
        reward = validated(fn, spec, tokenizer=tokenizer)  # what load_reward does, without importing it again
    else:
        reward = load_reward(spec, device=device, tokenizer=tokenizer)

    def pointwise(prompts: list[str], a: list[str], b: list[str]) -> list[float]:
        # Each reward is finite (`validated`); the difference of two huge ones can still overflow.
        return check_margins([x - y for x, y in zip(reward(prompts, a), reward(prompts, b))], spec, len(a))

    return pointwise


def check_same_tokenizer(tok_a, tok_b, a: Path, b: Path) -> None:
    """B is sampled with A's tokenizer: refuse a B whose vocabulary or special tokens differ."""
    va, vb = tok_a.get_vocab(), tok_b.get_vocab()
    if va != vb:
        only_a, only_b = sorted(set(va) - set(vb))[:3], sorted(set(vb) - set(va))[:3]
        moved = sorted(t for t in set(va) & set(vb) if va[t] != vb[t])[:3]
        diff = "; ".join(
            x
            for x in (
                f"only in A: {only_a}" if only_a else "",
                f"only in B: {only_b}" if only_b else "",
                f"different ids: {moved}" if moved else "",
            )
            if x
        )
        raise WarpError(
            f"sxs needs A and B to share a tokenizer: {a} and {b} have different vocabularies ({diff}); "
            "compare policies fine-tuned from the same model"
        )
    sa, sb = tok_a.special_tokens_map, tok_b.special_tokens_map
    if sa != sb:
        keys = sorted(k for k in {*sa, *sb} if sa.get(k) != sb.get(k))
        diff = ", ".join(f"{k} {sa.get(k)!r} vs {sb.get(k)!r}" for k in keys[:3])
        raise WarpError(
            f"sxs needs A and B to share a tokenizer: {a} and {b} have different special tokens ({diff}); "
            "compare policies fine-tuned from the same model"
        )


def sxs(
    policy_a: Path,
    policy_b: Path,
    prompts: Path,
    judge: str,
    settings: EvalSettings | None = None,
    *,
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS,
    device: str = "cpu",
) -> SxsResult:
    """Generate with A and B on the same prompts, judge each pair, score it (see the module doc)."""
    from mergekit_warp.lm.models import load_model, load_tokenizer, model_folder
    from mergekit_warp.lm.prompts import load_prompts
    from mergekit_warp.lm.sampling import generate

    s = (settings or EvalSettings()).resolved()
    seed, batch_size = s.seed, s.batch_size
    t = check_thresholds(tuple(thresholds))
    policy_a, policy_b = model_folder(policy_a, "policy A"), model_folder(policy_b, "policy B")
    tok = load_tokenizer(policy_a)
    if Path(policy_b).resolve() != Path(policy_a).resolve():  # before any model is loaded
        check_same_tokenizer(tok, load_tokenizer(policy_b), policy_a, policy_b)
    ps = load_prompts(prompts, tok)[: s.max_prompts]
    ps = [p for p in ps for _ in range(s.samples_per_prompt)]
    judge_fn = load_judge(judge, device=device, tokenizer=tok)

    def answers(path: Path, seed: int) -> list[str]:
        model = load_model(path, device=device)
        out = []
        for c, start in enumerate(range(0, len(ps), batch_size)):
            ro = generate(
                model,
                tok,
                ps[start : start + batch_size],
                max_new_tokens=s.max_new_tokens,
                temperature=s.temperature,
                generator_seed=seed + c,
            )
            out += ro.completions
        del model
        return out

    a = answers(Path(policy_a), seed)
    b = answers(Path(policy_b), seed + 1_000_003)  # independent samples for B
    margins = torch.tensor(judge_fn(ps, a, b), dtype=torch.float64)
    return summarize(margins, t, seed=seed)
