"""The KL–reward Pareto front of WARP iterations (the paper's figures 1 and 4).

For each iteration i: its M RL runs, its SLERP merge, and the LITI sweep
θ(η) = (1 − η)·θ_target + η·θ_slerp_i for η in `etas` (target θ_sft by default, as in the paper's
fronts; η > 1 extrapolates). Also θ_sft, each iteration's init and the final output. Each point's
reward and KL(π‖π_sft) come from `score.Evaluator` on the held-out prompts; interpolated checkpoints
exist only in memory. The caller lists the checkpoints (`Iteration`); the pipeline builds that list
from its run folder.

Every score is also written to `scores.json`, keyed by the identities of the checkpoints it comes from
(the caller's `key_of`: the pipeline uses their recorded hashes) and by the recipe (θ_sft, prompts,
reward, settings, device). Given back as `known`, those points are not sampled again: the pipeline
evaluates each iteration as soon as it is merged, and may then delete its checkpoints.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mergekit_warp.devices import resolve_device
from mergekit_warp.errors import WarpError
from mergekit_warp.eval.score import Evaluator, Score
from mergekit_warp.eval.settings import EvalSettings
from mergekit_warp.io.atomic import claim, staged
from mergekit_warp.io.publish import check_output_path, content_fingerprint
from mergekit_warp.lm.rewards import reward_inputs
from mergekit_warp.progress import Log

SCORES = "scores.json"


@dataclass(frozen=True)
class Point:
    """One evaluated checkpoint of the front. `iteration` 0 is θ_sft."""

    iteration: int
    kind: str  # sft | init | rl | slerp | liti | final
    eta: float | None
    score: Score

    def row(self) -> dict[str, Any]:
        s = {k: v for k, v in asdict(self.score).items() if k != "eta"}  # the point's own η is the one
        return {"iteration": self.iteration, "kind": self.kind, "eta": "" if self.eta is None else self.eta, **s}


@dataclass(frozen=True)
class ParetoResult:
    points: list[Point]
    csv: Path
    png: Path
    summary: str
    headline: dict[str, Any]
    """Key figures of the summary (also in summary.json)."""


@dataclass(frozen=True)
class Iteration:
    """The checkpoints of one WARP iteration, as the caller (the pipeline) laid them out."""

    index: int
    init: Path
    """The iteration's init (θ_sft for the first)."""
    runs: list[Path]
    merged: Path
    """The SLERP of the runs (the run itself when there is one)."""
    final: Path | None = None
    """The pipeline's output, when this is the last iteration and it exists."""


def pareto(
    sft: Path,
    iterations: list[Iteration],
    prompts: Path,
    reward: str,
    settings: EvalSettings,
    out: Path,
    *,
    etas: list[float],
    target: str = "sft",
    force: bool = False,
    device: str = "cpu",
    progress: bool = True,
    title: str = "WARP Pareto front",
    on_point: Callable[[int, int], None] | None = None,
    known: dict[str, Score] | None = None,
    key_of: Callable[[Path], str] | None = None,
    gone: Callable[[Path], str | None] | None = None,
    check_only: bool = False,
) -> ParetoResult | None:
    """Score θ_sft, and per iteration its init, RL runs, merge, the LITI sweep
    (1 − η)·θ_target + η·θ_merged for each η (`target` 'sft' or 'init'), and the final output; write
    `out/` (pareto.csv, pareto.png, summary.txt, summary.json, scores.json) atomically.
    `on_point(done, total)` is called after each point (for a progress display). `known`: scores of
    earlier evaluations (`load_scores`), keyed by `key_of(checkpoint)` (default: its resolved path);
    `gone(checkpoint)`: why a checkpoint can no longer be read (None when it can), for a point that
    is not known. `check_only`: stop (returning None) once it is clear that every point can be made."""
    if not etas or any(not math.isfinite(e) or e < 0 for e in etas):
        raise WarpError(f"--etas {etas}: η values must be finite and ≥ 0")
    if not iterations:
        raise WarpError("no iteration has finished its RL runs and merge yet; nothing to evaluate")
    checkpoints = [sft, *(p for it in iterations for p in (it.init, *it.runs, it.merged, it.final) if p)]
    out = check_output_path(Path(out), [*checkpoints, prompts, *reward_inputs(reward)], force)
    resolve_device(device)
    settings = settings.resolved()
    recipe = score_recipe(prompts, reward, settings, device)
    key_of = key_of or (lambda p: str(Path(p).resolve()))
    say = Log(progress)
    every = dict(known or {})  # written back whole: a redraw with other η, device or settings loses none
    known = {k: v for k, v in every.items() if json.loads(k)[0] == recipe}

    # The points, in order: (iteration, kind, η, name, θ_target, θ_merged, interpolation η).
    plan: list[tuple[int, str, float | None, str, Path, Path, float]] = [(0, "sft", None, "sft", sft, sft, 0.0)]
    for it in iterations:
        i = it.index
        if i > 1:
            plan.append((i, "init", None, f"iter_{i}/init", it.init, it.init, 0.0))
        plan += [(i, "rl", None, f"iter_{i}/run_{m}", r, r, 1.0) for m, r in enumerate(it.runs, 1)]
        plan.append((i, "slerp", None, f"iter_{i}/slerp", it.merged, it.merged, 1.0))
        toward = sft if target == "sft" else it.init
        plan += [(i, "liti", e, f"iter_{i}/liti(eta={e:g})", toward, it.merged, e) for e in sorted(set(etas))]
        if it.final is not None:
            plan.append((i, "final", None, "final", it.final, it.final, 1.0))

    def same(a: Path, b: Path, eta: float) -> bool:  # θ(η=0) is θ_target itself
        return eta == 0 or a.resolve() == b.resolve()

    def key(a: Path, b: Path, eta: float) -> str:  # identical weights are scored once
        return json.dumps([recipe, key_of(a)] if same(a, b, eta) else [recipe, key_of(a), key_of(b), eta])

    for _, _, _, name, a, b, eta in plan:  # the checkpoints of every point to sample, before any work
        if key(a, b, eta) not in known and gone is not None:
            for p in (a,) if same(a, b, eta) else (a, b):
                if why := gone(p):
                    raise WarpError(
                        f"point {name} is not in the stored scores (kept per sampling settings, device, prompts "
                        f"and reward) and {p} {why}"
                    )
    if check_only:
        return None

    scores = dict(known)
    ev: Evaluator | None = None  # built on the first point to sample
    points: list[Point] = []
    shown = 0
    for i, kind, eta, name, a, b, e in plan:
        k, path = key(a, b, e), str(a if same(a, b, e) else b)
        if k not in scores:
            ev = ev or Evaluator(sft, prompts, reward, settings, device)
            ev.load_liti(a, b, e)
            scores[k] = s = ev.score(name, path)
            if i > shown:
                say(f"iteration {i}")
                shown = i
            say(
                f"  {name:<24} reward {s.reward:+.4f} ± {s.reward_se:.4f}   KL {s.kl:7.3f} ± {s.kl_se:.3f}   len {s.length:.1f}"
            )
        # `path`: where it is now (a stored score may come from a run folder since moved)
        points.append(Point(i, kind, eta, Score(**{**asdict(scores[k]), "name": name, "path": path})))
        if on_point is not None:
            on_point(len(points), len(plan))

    headline, summary = summarize(points, settings, reward)
    with claim(out), staged(out, replace=True) as tmp:
        stored = {k: asdict(v) for k, v in {**every, **scores}.items()}
        (tmp / SCORES).write_text(json.dumps({"format": "mergekit-warp/scores/1", "scores": stored}, indent=1) + "\n")
        with open(tmp / "pareto.csv", "w", newline="") as f:
            rows = [p.row() for p in points]
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        plot(points, tmp / "pareto.png", title=title)
        (tmp / "summary.txt").write_text(summary + "\n")
        (tmp / "summary.json").write_text(json.dumps(headline, indent=2) + "\n")
    return ParetoResult(
        points=points, csv=out / "pareto.csv", png=out / "pareto.png", summary=summary, headline=headline
    )


def score_recipe(prompts: Path, reward: str, settings: EvalSettings, device: str) -> str:
    """What a stored score depends on besides its checkpoints: the prompts' bytes, the reward (its spec
    and the content of the file or model it reads), the sampling settings and the device (CPU and GPU
    numerics differ)."""
    digest = hashlib.sha256(Path(prompts).read_bytes()).hexdigest()[:16]
    files = [content_fingerprint(p) for p in reward_inputs(reward)]
    return json.dumps([digest, reward, files, settings.record(), device], sort_keys=True)


def load_scores(files: list[Path]) -> dict[str, Score]:
    """The stored scores of earlier evaluations (`scores.json` files; missing or unreadable ones are
    skipped: their points are scored again)."""
    out: dict[str, Score] = {}
    for f in files:
        try:
            out.update({k: Score(**v) for k, v in json.loads(Path(f).read_text())["scores"].items()})
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return out


# ----------------------------------------------------------------------------------------------------
# Summary: does the run show what WARP promises?


def front(points: list[Point], iteration: int) -> tuple[np.ndarray, np.ndarray]:
    """The LITI points of one iteration, sorted by KL: (kl, reward)."""
    pts = sorted((p.score.kl, p.score.reward) for p in points if p.iteration == iteration and p.kind == "liti")
    return np.array([k for k, _ in pts]), np.array([r for _, r in pts])


def front_gap(
    a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], n: int = 21
) -> tuple[float, float, float] | None:
    """Mean of reward_b(KL) − reward_a(KL) over the KL range both fronts cover (piecewise-linear
    fronts); returns (gap, kl_lo, kl_hi) or None when the ranges do not overlap."""
    lo, hi = max(a[0].min(), b[0].min()), min(a[0].max(), b[0].max())
    if not hi > lo:
        return None
    grid = np.linspace(lo, hi, n)
    return float(np.mean(np.interp(grid, *b) - np.interp(grid, *a))), float(lo), float(hi)


def summarize(points: list[Point], settings: EvalSettings, reward: str) -> tuple[dict[str, Any], str]:
    """The figures behind WARP's two promises, each marked yes / NO / within noise (±1 s.e.)."""
    sft = next(p.score for p in points if p.kind == "sft")
    iters = sorted({p.iteration for p in points if p.iteration > 0})
    lines = [
        f"WARP Pareto summary — held-out: {sft.n} completions ({settings.samples_per_prompt} per prompt), "
        f"reward: {reward}"
        + (f" − {settings.length_penalty:g}·tokens" if settings.length_penalty else "")
        + ", KL = Σ_tokens log π/π_sft (mean ± s.e.)",
        f"  SFT (init)   reward {sft.reward:+.4f} ± {sft.reward_se:.4f}",
    ]
    head: dict[str, Any] = {"sft_reward": sft.reward, "sft_reward_se": sft.reward_se, "iterations": {}}
    for i in iters:
        rl = [p.score for p in points if p.iteration == i and p.kind == "rl"]
        sl = next(p.score for p in points if p.iteration == i and p.kind == "slerp")
        kl, rw = front(points, i)
        best = int(np.argmax(rw))
        head["iterations"][i] = {
            "rl": [{"reward": s.reward, "kl": s.kl} for s in rl],
            "slerp": {"reward": sl.reward, "reward_se": sl.reward_se, "kl": sl.kl},
            "front_best": {"reward": float(rw[best]), "kl": float(kl[best])},
        }
        lines.append(
            f"  iteration {i}: RL runs "
            + ", ".join(f"{s.reward:+.4f} @ KL {s.kl:.2f}" for s in rl)
            + f";  SLERP {sl.reward:+.4f} ± {sl.reward_se:.4f} @ KL {sl.kl:.2f}"
            + f";  best LITI point {rw[best]:+.4f} @ KL {kl[best]:.2f}"
        )

    # Promise 1: the merge reaches a higher reward than the init, and than its own RL runs at no more KL.
    for i in iters:
        rec = head["iterations"][i]
        sl, rl = rec["slerp"], rec["rl"]
        gain, se = sl["reward"] - sft.reward, (sl["reward_se"] ** 2 + sft.reward_se**2) ** 0.5
        rl_r, rl_kl = float(np.mean([r["reward"] for r in rl])), float(np.mean([r["kl"] for r in rl]))
        ok = _verdict(gain, se)
        rec["merged_above_init"] = {"verdict": ok, "gain": gain, "se": se}
        rec["merged_vs_runs"] = {"reward_gain": sl["reward"] - rl_r, "kl_change": sl["kl"] - rl_kl}
        lines.append(
            f"[{ok}] iteration {i}: SLERP merge above the init: reward {sl['reward']:+.4f} vs SFT "
            f"{sft.reward:+.4f} (Δ {gain:+.4f} ± {se:.4f}) at KL {sl['kl']:.2f}; vs its RL runs' mean "
            f"{rl_r:+.4f} @ KL {rl_kl:.2f}: Δreward {sl['reward'] - rl_r:+.4f}, ΔKL {sl['kl'] - rl_kl:+.2f}"
        )
    first = head["iterations"][iters[0]]["merged_above_init"]
    head["merged_above_init"] = {"ok": first["verdict"] == "yes", **first}

    # Promise 2: each iteration's front at or above the previous one over their common KL range.
    for a, b in itertools.pairwise(iters):
        g = front_gap(front(points, a), front(points, b))
        key = f"front_{b}_vs_{a}"
        if g is None:
            head[key] = {"ok": None}
            lines.append(f"[ ? ] iteration {b}'s front vs iteration {a}'s: their KL ranges do not overlap")
            continue
        gap, lo, hi = g
        ok = _verdict(gap, sft.reward_se)
        head[key] = {"ok": ok != "NO", "verdict": ok, "mean_gap": gap, "kl_range": [lo, hi]}  # "at or above"
        (ka, ra), (kb, rb) = front(points, a), front(points, b)
        lines.append(
            f"[{ok}] iteration {b}'s front at/above iteration {a}'s: mean reward gap {gap:+.4f} over KL "
            f"[{lo:.2f}, {hi:.2f}] (1 s.e. of a reward estimate: {sft.reward_se:.4f}); best points: "
            f"iteration {b} {rb.max():+.4f} @ KL {kb[rb.argmax()]:.2f}, iteration {a} {ra.max():+.4f} @ KL {ka[ra.argmax()]:.2f}"
        )
    # The pipeline's output: LITI of the last merge toward its iteration's init (Algorithm 1).
    fin = next((p.score for p in points if p.kind == "final"), None)
    if fin is not None:
        kl1, rw1 = front(points, iters[0])
        ahead = float(np.interp(fin.kl, kl1, rw1)) if kl1.min() <= fin.kl <= kl1.max() else None
        head["final"] = {
            "reward": fin.reward,
            "reward_se": fin.reward_se,
            "kl": fin.kl,
            "minus_front_1": None if ahead is None else fin.reward - ahead,
        }
        lines.append(
            f"  final/: reward {fin.reward:+.4f} ± {fin.reward_se:.4f} @ KL {fin.kl:.2f}"
            + (
                ""
                if ahead is None
                else f"; iteration {iters[0]}'s front at that KL: {ahead:+.4f} (Δ {fin.reward - ahead:+.4f})"
            )
        )
    return head, "\n".join(lines)


def _verdict(delta: float, se: float) -> str:
    """'yes' when delta exceeds 1 s.e., 'NO' when it is below −1 s.e., else 'at, within noise'."""
    return "yes" if delta > se else ("NO" if delta < -se else "at, within noise")


# ----------------------------------------------------------------------------------------------------
# Plot


def plot(points: list[Point], path: Path, title: str = "WARP Pareto front") -> Path:
    """KL on x, reward on y; one LITI series per iteration with its RL runs (×) and SLERP (★)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=100)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    sft = next(p.score for p in points if p.kind == "sft")
    bars = dict(elinewidth=0.8, capsize=2, alpha=0.7)  # ± 1 s.e. of the mean reward
    ax.errorbar(
        [sft.kl], [sft.reward], yerr=[sft.reward_se], fmt="o", color="black", label="SFT (init)", zorder=5, **bars
    )
    for i in sorted({p.iteration for p in points if p.iteration > 0}):
        c = colors[(i - 1) % len(colors)]
        liti = sorted(
            (p.score.kl, p.score.reward, p.score.reward_se, p.eta)
            for p in points
            if p.iteration == i and p.kind == "liti"
        )
        kl, rw, se = ([x[j] for x in liti] for j in range(3))
        ax.errorbar(kl, rw, yerr=se, fmt="-o", color=c, ms=4, label=f"iteration {i}: LITI η sweep (η labelled)", **bars)
        for k, r, _, e in liti:  # η below-right of its point, clear of the marker and its error bar
            ax.annotate(f"η={e:g}", (k, r), textcoords="offset points", xytext=(5, -9), fontsize=6, color=c)
        for p in points:
            if p.iteration != i:
                continue
            s = p.score
            if p.kind == "rl":
                ax.errorbar([s.kl], [s.reward], yerr=[s.reward_se], fmt="x", color=c, ms=8, mew=2, **bars)
            elif p.kind == "slerp":
                ax.plot([s.kl], [s.reward], "*", color=c, ms=14, mec="black")
            elif p.kind == "final":
                ax.plot([s.kl], [s.reward], "D", color=c, ms=7, mec="black", label="final/")
    ax.plot([], [], "x", color="gray", ms=8, mew=2, label="RL runs (colour of their iteration)")
    ax.plot([], [], "*", color="gray", ms=12, mec="black", label="SLERP merge (colour of its iteration)")
    ax.set_xlabel("KL(π ‖ π_sft)  [nats, summed over completion tokens]")
    ax.set_ylabel("mean reward, held-out prompts (± 1 s.e.)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
