"""Side-by-side (SxS) comparison, scored as the paper's Table 1.

Policies A and B answer the same prompts. A judge gives each pair a margin m (positive favours A):
- a pointwise judge (any `warp rl --reward` spec: reward model, `sentiment`, `module:function`, …)
  scores both answers and m = r(A) − r(B);
- a pairwise judge is a Python callable `f(prompts, completions_a, completions_b) -> list[float]`
  (`module:function` or `file.py:function` with three parameters) returning m directly.
The margin maps to a score: |m| ≥ t3 → ±1.5 (much better), ≥ t2 → ±1 (better), ≥ t1 → ±0.5
(slightly better), else 0 (tie).

Thresholds. A margin smaller than the judge's own spread between two answers of one policy to one
prompt says nothing about A against B, so by default (`auto`) t1, t2, t3 = 1, 2, 3 × σ, where σ is
that spread: the pooled standard deviation of a pointwise judge's scores among the samples of one
policy for one prompt (with one sample per prompt: among all of one policy's answers), or for a
pairwise judge the standard deviation of its margins / √2. σ is reported either way, so fixed
thresholds can be chosen from it (and kept fixed across comparisons).

Common random numbers. When A and B share a tokenizer (same vocabulary, special tokens and chat
template), B's sample for a prompt is drawn with the same seed as A's: identical policies give
identical answers (A against itself: exactly 0, all ties) and the comparison's noise is only what
differs between the policies. Otherwise each policy samples with its own tokenizer and independent
seeds, and the result says so. The judge sees the prompts as formatted for A.

The mean score comes with a percentile bootstrap 95% interval over pairs (seeded) and the
win/tie/loss counts. With an output folder: sxs.json (result, thresholds, σ, settings, inputs with
hashes) and pairs.jsonl (per pair: prompt, both answers, judge scores, margin, score, verdict).
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from mergekit_warp.errors import WarpError
from mergekit_warp.eval.settings import EvalSettings

SPREADS = (1.0, 2.0, 3.0)
"""`auto` thresholds, in units of the judge's spread σ."""
PairJudge = Callable[[list[str], list[str], list[str]], list[float]]
VERDICTS = {1.5: "A much better", 1.0: "A better", 0.5: "A slightly better", 0.0: "tie"}


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
    spread: float | None = None
    """σ: the judge's spread between answers of one policy to one prompt (see the module doc)."""
    auto: bool = False
    """Thresholds derived from σ (`auto`) rather than given."""
    crn: bool = False
    """A and B sampled with common random numbers."""
    crn_note: str = ""
    pairs: list[dict[str, Any]] = field(default_factory=list)
    out: Path | None = None


def verdict(score: float) -> str:
    """'A better', 'tie', 'B slightly better', … for a score in {±1.5, ±1, ±0.5, 0}."""
    if score >= 0:
        return VERDICTS[abs(score)]
    return VERDICTS[abs(score)].replace("A ", "B ")


def score_margins(margins: torch.Tensor, thresholds: tuple[float, float, float]) -> torch.Tensor:
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


@dataclass(frozen=True)
class Judge:
    """`margins(prompts, a, b)`: one finite margin per pair (positive favours A). `scores(prompts,
    texts)`: a pointwise judge's score of each answer (None for a pairwise judge)."""

    spec: str
    margins: PairJudge
    scores: Callable[[list[str], list[str]], list[float]] | None = None

    def __call__(self, prompts: list[str], a: list[str], b: list[str]) -> list[float]:
        return self.margins(prompts, a, b)


def load_judge(spec: str, device: str = "cpu", tokenizer=None) -> Judge:
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

            return Judge(spec, pair)
        reward = validated(fn, spec, tokenizer=tokenizer)  # what load_reward does, without importing it again
    else:
        reward = load_reward(spec, device=device, tokenizer=tokenizer)

    def pointwise(prompts: list[str], a: list[str], b: list[str]) -> list[float]:
        # Each reward is finite (`validated`); the difference of two huge ones can still overflow.
        return check_margins([x - y for x, y in zip(reward(prompts, a), reward(prompts, b))], spec, len(a))

    return Judge(spec, pointwise, reward)


def judge_spread(scores_a: list[float] | None, scores_b: list[float] | None, margins: list[float], k: int) -> float:
    """σ of the module doc. Scores and margins are in prompt-major order, `k` samples per prompt."""
    if scores_a is None or scores_b is None:
        m = torch.tensor(margins, dtype=torch.float64)
        return (m.std().item() / math.sqrt(2)) if len(m) > 1 else 0.0
    groups = []
    for s in (scores_a, scores_b):
        x = torch.tensor(s, dtype=torch.float64)
        groups += list(x.view(-1, k)) if k > 1 else [x]  # one policy's answers to one prompt (or all of them)
    dof = sum(len(g) - 1 for g in groups)
    if dof <= 0:
        return 0.0
    return math.sqrt(sum(((g - g.mean()) ** 2).sum().item() for g in groups) / dof)


def tokenizer_difference(tok_a, tok_b) -> str | None:
    """What differs between two tokenizers (vocabulary, special tokens, chat template), or None."""
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
        return f"different vocabularies ({diff})"
    sa, sb = tok_a.special_tokens_map, tok_b.special_tokens_map
    if sa != sb:
        keys = sorted(k for k in {*sa, *sb} if sa.get(k) != sb.get(k))
        return "different special tokens (" + ", ".join(f"{k} {sa.get(k)!r} vs {sb.get(k)!r}" for k in keys[:3]) + ")"
    if getattr(tok_a, "chat_template", None) != getattr(tok_b, "chat_template", None):
        return "different chat templates"
    return None


def sxs(
    policy_a: Path,
    policy_b: Path,
    prompts: Path,
    judge: str,
    settings: EvalSettings | None = None,
    *,
    thresholds: tuple[float, ...] | None = None,
    device: str = "cpu",
    out: Path | None = None,
    force: bool = False,
    progress: bool = False,
) -> SxsResult:
    """Generate with A and B on the same prompts, judge each pair, score it (see the module doc).
    `thresholds` None: `auto`. With `out`, publish OUT/sxs.json and OUT/pairs.jsonl."""
    from mergekit_warp.eval.score import compute_and_publish
    from mergekit_warp.lm.rewards import reward_inputs

    t = None if thresholds is None else check_thresholds(tuple(thresholds))
    s = (settings or EvalSettings()).resolved()
    inputs = [policy_a, policy_b, prompts, *reward_inputs(judge)]
    result, out = compute_and_publish(
        out,
        inputs,
        force,
        lambda: _compare(Path(policy_a), Path(policy_b), Path(prompts), judge, s, t, device, progress),
        lambda r, folder: _write(r, folder, policy_a, policy_b, prompts, judge, s, device),
    )
    return replace(result, out=out)


def _compare(
    policy_a: Path,
    policy_b: Path,
    prompts: Path,
    judge: str,
    s: EvalSettings,
    t: tuple[float, float, float] | None,
    device: str,
    progress: bool,
) -> SxsResult:
    from mergekit_warp.lm.models import load_model, load_tokenizer, model_folder
    from mergekit_warp.lm.prompts import load_prompts
    from mergekit_warp.lm.sampling import generate
    from mergekit_warp.progress import Steps

    policy_a, policy_b = model_folder(policy_a, "policy A"), model_folder(policy_b, "policy B")
    tok_a = load_tokenizer(policy_a)
    diff = None if policy_b.resolve() == policy_a.resolve() else tokenizer_difference(tok_a, load_tokenizer(policy_b))
    crn = diff is None
    tok_b = tok_a if crn else load_tokenizer(policy_b)
    k = s.samples_per_prompt

    def repeat(texts: list[str]) -> list[str]:
        return [p for p in texts[: s.max_prompts] for _ in range(k)]

    ps_a = repeat(load_prompts(prompts, tok_a))
    ps_b = ps_a if crn else repeat(load_prompts(prompts, tok_b))
    judge_fn = load_judge(judge, device=device, tokenizer=tok_a)
    batches = math.ceil(len(ps_a) / s.batch_size)
    steps = Steps("warp eval sxs", progress, 2 * batches)

    def answers(path: Path, tok, ps: list[str], seed: int, done: int) -> list[str]:
        model = load_model(path, device=device)
        out = []
        for c, start in enumerate(range(0, len(ps), s.batch_size)):
            ro = generate(
                model,
                tok,
                ps[start : start + s.batch_size],
                max_new_tokens=s.max_new_tokens,
                temperature=s.temperature,
                generator_seed=seed + c,
            )
            out += ro.completions
            steps.update(done + c + 1, f"{path.name}: batch {c + 1}/{batches}")
        del model
        return out

    try:
        a = answers(policy_a, tok_a, ps_a, s.seed, 0)
        # Common random numbers: B's row i is drawn from the same uniforms as A's row i.
        b = answers(policy_b, tok_b, ps_b, s.seed if crn else s.seed + 1_000_003, batches)
    finally:
        steps.close()
    if judge_fn.scores is not None:
        ra, rb = judge_fn.scores(ps_a, a), judge_fn.scores(ps_a, b)
        margins = check_margins([x - y for x, y in zip(ra, rb)], judge, len(a))
    else:
        ra = rb = None
        margins = judge_fn.margins(ps_a, a, b)
    sigma = judge_spread(ra, rb, margins, k)
    auto = t is None
    if auto:
        t = (SPREADS[0] * sigma, SPREADS[1] * sigma, SPREADS[2] * sigma)
    r = summarize(torch.tensor(margins, dtype=torch.float64), t, seed=s.seed)
    pairs = [
        {
            "prompt_index": i // k,
            "sample": i % k,
            "prompt": ps_a[i],
            "a": a[i],
            "b": b[i],
            **({"score_a": ra[i], "score_b": rb[i]} if ra is not None else {}),
            "margin": margins[i],
            "score": r.scores[i] + 0.0,  # no −0.0
            "verdict": verdict(r.scores[i]),
        }
        for i in range(len(a))
    ]
    note = "same tokenizer: B sampled with A's seeds" if crn else f"not possible, {diff}: independent samples"
    return SxsResult(**{**asdict(r), "spread": sigma, "auto": auto, "crn": crn, "crn_note": note, "pairs": pairs})


def _write(
    r: SxsResult, folder: Path, a: Path, b: Path, prompts: Path, judge: str, s: EvalSettings, device: str
) -> None:
    from mergekit_warp.eval.score import provenance
    from mergekit_warp.lm.rewards import reward_inputs

    roles: dict[str, Any] = {"a": a, "b": b, "prompts": prompts}
    if reward_inputs(judge):
        roles["judge"] = reward_inputs(judge)[0]
    record = {
        **provenance(roles),
        "settings": {"a": str(a), "b": str(b), "prompts": str(prompts), "judge": judge, **s.record(), "device": device},
        "mean": r.mean,
        "ci95": [r.ci_low, r.ci_high],
        "wins": r.wins,
        "ties": r.ties,
        "losses": r.losses,
        "n": r.n,
        "thresholds": list(r.thresholds),
        "thresholds_from": f"auto: {'/'.join(f'{x:g}' for x in SPREADS)} × judge spread" if r.auto else "given",
        "judge_spread": r.spread,
        "common_random_numbers": r.crn,
        "common_random_numbers_note": r.crn_note,
    }
    (folder / "sxs.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    with open(folder / "pairs.jsonl", "w") as f:
        for row in r.pairs:
            f.write(json.dumps(row) + "\n")
