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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from mergekit_warp.errors import WarpError

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
        raise WarpError(f"--thresholds {','.join(map(str, t))}: give three increasing values t1 ≤ t2 ≤ t3 ≥ 0 (slightly/better/much better)")
    return (float(t[0]), float(t[1]), float(t[2]))


def summarize(margins: torch.Tensor, thresholds: tuple[float, float, float], seed: int = 0) -> SxsResult:
    s = score_margins(margins.double(), thresholds)
    lo, hi = bootstrap_ci(s, seed=seed)
    return SxsResult(mean=s.mean().item(), ci_low=lo, ci_high=hi, wins=int((s > 0).sum()), ties=int((s == 0).sum()),
                     losses=int((s < 0).sum()), n=len(s), thresholds=thresholds, scores=s.tolist())


def load_judge(spec: str, device: str = "cpu", tokenizer=None) -> PairJudge:
    """A pairwise judge from `spec`: a three-argument callable is used as is; anything else is a
    pointwise reward (`warp rl --reward` spec) turned into r(A) − r(B)."""
    from mergekit_warp.rl.rewards import _callable, load_reward, validated

    if ":" in spec and not Path(spec).is_dir():
        fn = _callable(spec)
        try:
            n_params = len(inspect.signature(fn).parameters)
        except (TypeError, ValueError):
            n_params = 2
        if n_params == 3:
            def pair(prompts: list[str], a: list[str], b: list[str]) -> list[float]:
                try:
                    out = [float(v) for v in fn(prompts, a, b)]
                except Exception as e:
                    raise WarpError(f"judge {spec} raised {type(e).__name__}: {e}") from None
                if len(out) != len(a):
                    raise WarpError(f"judge {spec} returned {len(out)} margins for {len(a)} pairs")
                return out

            return pair
        reward = validated(fn, spec, tokenizer=tokenizer)  # what load_reward does, without importing it again
    else:
        reward = load_reward(spec, device=device, tokenizer=tokenizer)

    def pointwise(prompts: list[str], a: list[str], b: list[str]) -> list[float]:
        return [x - y for x, y in zip(reward(prompts, a), reward(prompts, b))]

    return pointwise


def sxs(policy_a: Path, policy_b: Path, prompts: Path, judge: str, *, thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS,
        samples_per_prompt: int = 1, max_new_tokens: int = 64, temperature: float = 0.9, seed: int = 0,
        max_prompts: int | None = None, batch_size: int = 32, device: str = "cpu") -> SxsResult:
    """Generate with A and B on the same prompts, judge each pair, score it (see the module doc)."""
    from mergekit_warp.rl.data import load_prompts
    from mergekit_warp.rl.models import load_model, load_tokenizer
    from mergekit_warp.rl.rollout import generate

    from mergekit_warp.assets import resolve_model

    t = check_thresholds(tuple(thresholds))
    policy_a, policy_b = resolve_model(policy_a), resolve_model(policy_b)
    tok = load_tokenizer(policy_a)
    ps = load_prompts(prompts, tok)[:max_prompts]
    ps = [p for p in ps for _ in range(samples_per_prompt)]
    judge_fn = load_judge(judge, device=device, tokenizer=tok)

    def answers(path: Path, seed: int) -> list[str]:
        model = load_model(path, device=device)
        out = []
        for c, start in enumerate(range(0, len(ps), batch_size)):
            ro = generate(model, tok, ps[start : start + batch_size], max_new_tokens=max_new_tokens,
                          temperature=temperature, generator_seed=seed + c)
            out += ro.completions
        del model
        return out

    a = answers(Path(policy_a), seed)
    b = answers(Path(policy_b), seed + 1_000_003)  # independent samples for B
    margins = torch.tensor(judge_fn(ps, a, b), dtype=torch.float64)
    return summarize(margins, t, seed=seed)
