"""The analysis of reproduce.py: reads the scores and `warp inspect` outputs under WORK, computes each
claim's effect per repetition, and writes the document and its plots. Every number in the document
comes from WORK; the verdict rule is fixed here, before any result is read:

    An effect is measured once per repetition (a seed, or a disjoint group of runs). Its mean, standard
    error and two-sided 95% Student-t interval over repetitions are reported. "reproduced": the mean has
    the paper's sign and the interval excludes 0. "contradicted": the interval excludes 0 on the other
    side. Otherwise "not reproduced (within noise)".

Matched-KL comparisons interpolate each curve's reward linearly in its KL (points sorted by KL, θ_sft
at KL 0 first) on 20 points spanning the KL range both curves cover, and average the difference.

    python examples/reproduce/report.py WORK [--doc docs/REPRODUCTION.md]   (reproduce.py calls it)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from reproduce import ITER2, PAIRS, QUADS, SEEDS, SETTINGS, T95, TRIPLES, Work, evaluation_groups, sweep, trajectory  # noqa: E402

GRID = 20


class Scores:
    """Every `warp eval score` result under WORK/evals, by checkpoint path."""

    def __init__(self, w: Work):
        self.by_key: dict[tuple[str, float | None], dict] = {}
        self.n = 0
        for name in evaluation_groups(w):
            for s in json.loads((w.evals(name) / "scores.json").read_text())["scores"]:
                self.by_key[str(Path(s["path"]).resolve()), s.get("eta")] = s
                self.n = s["n"]

    def points(self, paths: list[Path | tuple[Path, float | None]]) -> np.ndarray:
        """(n, 3): KL, reward, length of each checkpoint (or (checkpoint, LITI η toward θ_sft))."""
        keys = [(p, None) if isinstance(p, Path) else p for p in paths]
        rows = [self.by_key[str(Path(p).resolve()), eta] for p, eta in keys]
        return np.array([[r["kl"], r["reward"], r["length"]] for r in rows])


def at(points: np.ndarray, kl: np.ndarray) -> np.ndarray:
    order = np.argsort(points[:, 0], kind="stable")
    return np.interp(kl, points[order, 0], points[order, 1])


def matched(a: np.ndarray, b: np.ndarray) -> float:
    """Mean reward of curve a minus curve b on the KL range both cover (above θ_sft's KL 0)."""
    hi = min(a[:, 0].max(), b[:, 0].max())
    if hi <= 0:
        return math.nan
    grid = np.linspace(hi / GRID, hi, GRID)
    return float(np.mean(at(a, grid) - at(b, grid)))


def interval(values: list[float]) -> dict:
    v = [x for x in values if not math.isnan(x)]
    n = len(v)
    if n == 0:
        return {"mean": math.nan, "se": math.nan, "lo": math.nan, "hi": math.nan, "n": 0, "values": v}
    mean = statistics.fmean(v)
    se = statistics.stdev(v) / math.sqrt(n) if n > 1 else math.nan
    half = T95[n - 1] * se if n > 1 else math.nan
    return {"mean": mean, "se": se, "lo": mean - half, "hi": mean + half, "n": n, "values": v}


def verdict(ci: dict, sign: int) -> str:
    if ci["n"] < 2 or math.isnan(ci["lo"]):
        return "not enough repetitions"
    if (sign > 0 and ci["lo"] > 0) or (sign < 0 and ci["hi"] < 0):
        return "**reproduced**"
    if (sign > 0 and ci["hi"] < 0) or (sign < 0 and ci["lo"] > 0):
        return "**contradicted**"
    return "not reproduced (within noise)"


def fmt(ci: dict, digits: int = 3) -> str:
    return f"{ci['mean']:+.{digits}f} ± {ci['se']:.{digits}f} [{ci['lo']:+.{digits}f}, {ci['hi']:+.{digits}f}], n={ci['n']}"


class Analysis:
    def __init__(self, w: Work):
        self.w = w
        self.s = Scores(w)
        self.sft = self.s.points([w.sft])

    def traj(self, kind: str, seed: int, steps: int) -> np.ndarray:
        return np.vstack([self.sft, self.s.points(trajectory(self.w, kind, seed, steps))])

    def front(self, merged: str) -> np.ndarray:
        return self.s.points([(p, eta) for _, p, eta in sweep(self.w, merged)])

    def point(self, path: Path) -> np.ndarray:
        return self.s.points([path])[0]

    def vocab(self) -> int:
        return json.loads((self.w.sft / "config.json").read_text())["vocab_size"]

    def merged_run(self, seed: int) -> np.ndarray:
        """The trajectory of an EMA run up to the step whose policy is merged."""
        return self.traj("ema", seed, self.w.st.steps)

    @staticmethod
    def name(group) -> str:
        return "slerp_" + "-".join(map(str, group))

    def claims(self) -> list[dict]:
        w, st, out = self.w, self.w.st, []

        def claim(key, text, paper, values, sign, unit="reward", digits=3):
            ci = interval(values)
            out.append({"key": key, "claim": text, "paper": paper, "ci": ci, "verdict": verdict(ci, sign), "unit": unit, "here": fmt(ci, digits)})  # fmt: skip

        # 1. EMA anchor against the frozen anchor, same seeds, long runs
        if st.long:
            ema = {s: self.traj("ema", s, st.long_steps) for s in st.long}
            frozen = {s: self.traj("frozen", s, st.long_steps) for s in st.long}
            claim("1a", "EMA anchor: reward at matched KL, minus the frozen anchor's", "higher (fig. 3)", [matched(ema[s], frozen[s]) for s in st.long], +1)  # fmt: skip
            claim("1b", "EMA anchor: reward over the last 3 checkpoints, minus the frozen anchor's", "higher; frozen saturates (fig. 3)", [float(ema[s][-3:, 1].mean() - frozen[s][-3:, 1].mean()) for s in st.long], +1)  # fmt: skip
            claim("1c", "EMA anchor: KL over the last 3 checkpoints, minus the frozen anchor's", "higher", [float(ema[s][-3:, 0].mean() - frozen[s][-3:, 0].mean()) for s in st.long], +1, "nats", 2)  # fmt: skip

        # 2. SLERP / LERP of two runs' policies at step T
        runs = {s: self.point(w.step("ema", s, st.steps)) for s in SEEDS}
        slerp = {p: self.point(w.merge(self.name(p))) for p in PAIRS}
        lerp = {p: self.point(w.merge(f"lerp_{p[0]}-{p[1]}")) for p in PAIRS}
        claim("2a", "SLERP: reward minus the better run's", "higher (fig. 4a)", [float(slerp[p][1] - max(runs[s][1] for s in p)) for p in PAIRS], +1)  # fmt: skip
        claim("2b", "SLERP: KL minus the runs' mean", "higher (fig. 4a)", [float(slerp[p][0] - np.mean([runs[s][0] for s in p])) for p in PAIRS], +1, "nats", 2)  # fmt: skip
        claim("2c", "LERP: reward minus the runs' mean", "lower (fig. 4a)", [float(lerp[p][1] - np.mean([runs[s][1] for s in p])) for p in PAIRS], -1)  # fmt: skip
        claim("2d", "LERP: KL minus the runs' mean", "lower (fig. 4a)", [float(lerp[p][0] - np.mean([runs[s][0] for s in p])) for p in PAIRS], -1, "nats", 2)  # fmt: skip
        lemma = self.lemmas()
        claim("2e", "Lemma 1: ‖δ_SLERP‖ / mean ‖δ_m‖ − 1, worst block per pair", "0 (equal norms)", lemma["slerp"], 0, "ratio", 5)  # fmt: skip
        claim("2f", "Lemma 2: ‖δ_LERP‖ / (l·√(1−2(1−cos Ω)/4)) − 1, worst block per pair", "0 (equal norms)", lemma["lerp"], 0, "ratio", 5)  # fmt: skip
        for c in out[-2:]:  # the lemmas: a tolerance, not a sign
            worst = max(abs(v) for v in c["ci"]["values"])
            c["verdict"] = (
                "**reproduced**" if worst < 0.05 else f"not reproduced (worst block {worst:.1%} off, tolerance 5%)"
            )

        # 3. LITI front of the SLERP against the two runs' own trajectories
        claim("3", "LITI front of SLERP(2 runs): reward at matched KL minus the runs' trajectories'", "at or above (figs. 4-5)", [float(np.mean([matched(self.front(self.name(p)), self.merged_run(s)) for s in p])) for p in PAIRS], +1)  # fmt: skip

        # 4. more runs: front of M = 3, 4 against the fronts of the pairs inside the group
        def inside(g):
            return [p for p in PAIRS if set(p) <= set(g)]

        claim("4a", "M = 3: front reward at matched KL minus M = 2's", "higher (fig. 4b)", [float(np.mean([matched(self.front(self.name(g)), self.front(self.name(p))) for p in inside(g)])) for g in TRIPLES], +1)  # fmt: skip
        claim("4b", "M = 4: front reward at matched KL minus M = 2's", "higher (fig. 4b)", [float(np.mean([matched(self.front(self.name(g)), self.front(self.name(p))) for p in inside(g)])) for g in QUADS], +1)  # fmt: skip

        # 5. iteration 2's front (toward θ_sft) against iteration 1's
        claim("5", "Iteration 2: front reward at matched KL minus iteration 1's", "higher (fig. 4c)", [matched(self.front(f"slerp2_{a}-{b}"), self.front(self.name((a, b)))) for a, b in ITER2], +1)  # fmt: skip

        # 6. geometry of two runs' task vectors
        geo = self.geometry()
        claim("6a", "Task-vector cosine of two runs, mean over transformer blocks", "≈ 0 (fig. 11)", geo["cos"], 0, "cos", 3)  # fmt: skip
        c = out[-1]
        c["verdict"] = "**reproduced**" if c["ci"]["lo"] > -0.2 and c["ci"]["hi"] < 0.2 else "not reproduced (the 95% interval leaves (−0.2, 0.2))"  # fmt: skip
        claim("6b", "Full-weight cosine of the two runs, lowest group", "0.999–1.0 (fig. 11)", geo["weight_cos"], 0, "cos", 4)  # fmt: skip
        out[-1]["verdict"] = "**reproduced**" if min(geo["weight_cos"]) >= 0.99 else "not reproduced (below 0.99)"
        claim("6c", "Task-vector norm ratio ‖δ1‖/‖δ2‖ (≥ 1), largest over blocks", "0.95–1.15 (fig. 11)", geo["norm_ratio"], 0, "ratio", 3)  # fmt: skip
        out[-1]["verdict"] = "**reproduced**" if max(geo["norm_ratio"]) <= 1.15 else "not reproduced (above 1.15)"
        return out

    def inspect(self, name: str) -> list[dict]:
        return [g for g in json.loads((self.w.root / "inspect" / f"{name}.json").read_text()) if g["layer"] is not None]

    def post_hoc(self) -> list[dict]:
        """Measurements chosen after the first run, to test the reasons given for the claims that did not
        reproduce: reported with intervals, never with a verdict."""
        st, out = self.w.st, []

        def row(text, values, digits=3):
            out.append({"quantity": text, "here": fmt(interval(values), digits), "values": values})

        if st.long:
            third = len(self.traj("frozen", st.long[0], st.long_steps)) * 2 // 3
            for kind in ("frozen", "ema"):
                trajs = [self.traj(kind, s, st.long_steps) for s in st.long]
                gains = [float(t[-1, 1] - t[third, 1]) for t in trajs]
                row(f"{kind} anchor: reward gained over the last third of the run", gains)
        cos = self.geometry()["cos"]
        row("LERP's norm shrink predicted by Lemma 2 at the measured block cosine, 1 − √(1 − (1 − cos Ω)/2) (paper, cos Ω ≈ 0: 0.293)", [1 - math.sqrt(1 - (1 - c) / 2) for c in cos])  # fmt: skip
        best = [float(self.front(f"slerp2_{a}-{b}")[:, 1].max() - self.front(self.name((a, b)))[:, 1].max()) for a, b in ITER2]  # fmt: skip
        row("Iteration 2: best reward on its front minus iteration 1's (any KL)", best)
        reach = [float(self.front(f"slerp2_{a}-{b}")[:, 0].max() - self.front(self.name((a, b)))[:, 0].max()) for a, b in ITER2]  # fmt: skip
        row("Iteration 2: largest KL on its front minus iteration 1's", reach, 2)
        return out

    def lemmas(self) -> dict[str, list[float]]:
        res: dict[str, list[float]] = {"slerp": [], "lerp": []}
        for a, b in PAIRS:
            runs, merges = self.inspect(f"runs_{a}-{b}"), self.inspect(f"merges_{a}-{b}")
            s_dev, l_dev = [], []
            for r, m in zip(runs, merges):
                l1, l2 = r["task_norms"]
                cos, mean = r["task_cos"][0][1], (l1 + l2) / 2
                s_dev.append(m["task_norms"][0] / mean - 1)
                l_dev.append(m["task_norms"][1] / (mean * math.sqrt(1 - 2 * (1 - cos) * 0.25)) - 1)
            res["slerp"].append(max(s_dev, key=abs))
            res["lerp"].append(max(l_dev, key=abs))
        return res

    def geometry(self) -> dict[str, list[float]]:
        res: dict[str, list[float]] = {"cos": [], "weight_cos": [], "norm_ratio": []}
        for a, b in PAIRS:
            blocks = self.inspect(f"runs_{a}-{b}")
            every = json.loads((self.w.root / "inspect" / f"runs_{a}-{b}.json").read_text())
            res["cos"].append(float(np.mean([g["task_cos"][0][1] for g in blocks])))
            res["weight_cos"].append(min(min(min(row) for row in g["weight_cos"]) for g in every))
            res["norm_ratio"].append(max(max(g["task_norms"]) / min(g["task_norms"]) for g in blocks))
        return res


# --- plots ---


def plots(a: Analysis, folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st, names = a.w.st, []
    folder.mkdir(parents=True, exist_ok=True)
    axes = {"xlabel": "KL(π‖π_sft), nats", "ylabel": "reward (held-out)"}

    def figure(name, title, draw):
        fig, ax = plt.subplots(figsize=(6, 4))
        draw(ax)
        ax.set(title=f"{title} [{st.name}]", **axes)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / f"{st.name}_{name}.png", dpi=80)
        plt.close(fig)
        names.append(f"{st.name}_{name}.png")

    def anchors(ax):
        for s in st.long:
            for kind, color in (("ema", "tab:blue"), ("frozen", "tab:orange")):
                p = a.traj(kind, s, st.long_steps)
                ax.plot(p[:, 0], p[:, 1], "-o", ms=2, lw=1, color=color, alpha=0.8, label=f"{kind} anchor" if s == st.long[0] else None)  # fmt: skip

    def merges(ax):
        p, q = PAIRS[0]
        for s, c in ((p, "tab:gray"), (q, "tab:brown")):
            t = a.merged_run(s)
            ax.plot(t[:, 0], t[:, 1], "-o", ms=2, lw=1, color=c, label=f"run seed {s} (trajectory)")
        f = a.front(a.name(PAIRS[0]))
        ax.plot(f[:, 0], f[:, 1], "-s", color="tab:blue", label="LITI sweep of SLERP toward θ_sft")
        sl, le = a.point(a.w.merge(a.name(PAIRS[0]))), a.point(a.w.merge(f"lerp_{p}-{q}"))
        ax.plot(*sl[:2], "*", ms=14, color="tab:blue", label="SLERP (η = 1)")
        ax.plot(*le[:2], "D", ms=8, color="tab:red", label="LERP")

    def runs(ax):
        for groups, color, label in ((PAIRS, "tab:gray", "M = 2"), (TRIPLES, "tab:green", "M = 3"), (QUADS, "tab:purple", "M = 4")):  # fmt: skip
            for i, g in enumerate(groups):
                f = a.front(a.name(g))
                ax.plot(f[:, 0], f[:, 1], "-o", ms=2, lw=1, color=color, alpha=0.7, label=label if i == 0 else None)

    def iterations(ax):
        for i, (p, q) in enumerate(ITER2):
            f1, f2 = a.front(a.name((p, q))), a.front(f"slerp2_{p}-{q}")
            ax.plot(f1[:, 0], f1[:, 1], "-o", ms=2, color="tab:gray", label="iteration 1" if i == 0 else None)
            ax.plot(f2[:, 0], f2[:, 1], "-o", ms=2, color="tab:red", label="iteration 2" if i == 0 else None)

    if st.long:
        figure("claim1_anchor", f"Claim 1: EMA vs frozen anchor, {st.long_steps} steps", anchors)
    figure("claim23_merges", f"Claims 2-3: runs {PAIRS[0][0]}, {PAIRS[0][1]} and their merges", merges)
    figure("claim4_runs", "Claim 4: LITI fronts of SLERP of M runs", runs)
    figure("claim5_iterations", "Claim 5: fronts of iterations 1 and 2", iterations)
    return names


# --- the document ---

CLAIM_TEXT = {
    "1": "EMA anchor beats the frozen SFT anchor; the frozen run saturates",
    "2": "SLERP of two runs: higher reward than either (at higher KL); LERP lower on both; Lemmas 1-2",
    "3": "LITI sweep of the SLERP lies at or above the runs' trajectories",
    "4": "More runs (M = 3, 4) move the front up",
    "5": "Iteration 2's front lies above iteration 1's",
    "6": "Task vectors of runs from one init: nearly orthogonal, similar norms; full weights cos ≈ 1",
}
RULE = """Each effect is measured once per repetition: a seed (claim 1), or a disjoint group of runs (claims 2-6).
The tables give its mean, standard error and two-sided 95% Student-t interval over the repetitions.
**Reproduced**: the mean has the paper's sign and the interval excludes 0. **Contradicted**: the interval
excludes 0 with the other sign. Otherwise **not reproduced (within noise)**. Claims without a sign use a
stated tolerance: Lemmas 1-2, every block within 5% of the lemma; geometry, the interval of the mean
per-block task-vector cosine inside (−0.2, 0.2), full-weight cosines ≥ 0.99, norm ratios ≤ 1.15 (the
paper's range). Matched-KL comparisons interpolate each curve's reward linearly in KL on 20 points over the
KL range both curves cover and average the difference, so a curve that is higher where both exist counts
as higher, whatever KL it ends at.
"""


def versions() -> dict[str, str]:
    import torch
    import transformers

    import mergekit_warp

    return {"warp": mergekit_warp.__version__, "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(), "numpy": np.__version__}  # fmt: skip


def write_report(works: dict[str, Work], doc: Path, meta: dict) -> None:
    analyses = {name: Analysis(w) for name, w in works.items()}
    claims = {name: a.claims() for name, a in analyses.items()}
    images = [n for a in analyses.values() for n in plots(a, doc.parent / "reproduction")]
    main, noisy = analyses["main"], analyses["noisy"]
    v = versions()
    sft = main.sft[0]
    L = [
        "# Does WARP work here? A small-scale reproduction\n",
        "This document is written by `python examples/reproduce/reproduce.py` from the runs it makes; every number\n"
        "below comes from them. It tests the six qualitative claims of the WARP paper (Ramé et al., 2024, arXiv\n"
        "2406.16768) with warp's public commands (`warp rl`, `warp merge slerp|lerp`, `warp liti`, `warp eval score`,\n"
        "`warp inspect`), at a scale a 2-core CPU runs in well under two hours, in two settings: `main`, and\n"
        "`noisy`, which repeats claims 2-6 with noisier RL steps (see below why).\n",
        "## Summary (setting `main`)\n",
        "| claim | quantity (effect per repetition) | paper | here: mean ± s.e. [95% CI], n | verdict |",
        "|---|---|---|---|---|",
    ]
    L += [f"| {c['key']} | {c['claim']} | {c['paper']} | {c['here']} | {c['verdict']} |" for c in claims["main"]]
    L.append("")
    L.append("Claims: " + "; ".join(f"**{k}** {t}" for k, t in CLAIM_TEXT.items()) + ".\n")
    L.append("## The same claims with noisier runs (setting `noisy`)\n")
    L.append("| claim | quantity | `main` | verdict | `noisy` | verdict |")
    L.append("|---|---|---|---|---|---|")
    by_key = {c["key"]: c for c in claims["main"]}
    for c in claims["noisy"]:
        m = by_key[c["key"]]
        L.append(f"| {c['key']} | {c['claim']} | {m['here']} | {m['verdict']} | {c['here']} | {c['verdict']} |")
    L.append("")
    L.append("## Measurements chosen after the first run (no verdict)\n")
    L.append(
        "These test the reasons given below for the claims that did not reproduce. They were chosen after a first\n"
        "run of this experiment had been read, so they carry no verdict.\n"
    )
    L.append("| quantity | `main` | `noisy` |")
    L.append("|---|---|---|")
    extra = {name: {r["quantity"]: r["here"] for r in a.post_hoc()} for name, a in analyses.items()}
    for q, here in extra["main"].items():
        L.append(f"| {q} | {here} | {extra['noisy'].get(q, '—')} |")
    L.append("")
    notes = HERE / "notes.md"
    if notes.exists():
        L.append(notes.read_text().strip() + "\n")
    L.append("## The verdict rule (fixed before the runs)\n")
    L.append(RULE)
    L.append("## The setting, and why\n")
    L.append(
        "The paper's effects appear after thousands of RL steps, when the KL to the SFT policy has grown far. On\n"
        "this 2-core CPU one RL step of the builtin SmolLM2-135M (8 prompts × 2 samples × 24 tokens) takes about 8 s,\n"
        "so the 2-hour budget holds ~900 steps of it in all: one short run per claim, no seeds. The demo's 10-step\n"
        "runs sit at a KL of ≈ 6 nats with effects at the edge of the noise. So this reproduction trades model size\n"
        "for steps: a small Llama (4 layers, width 128, 0.68M parameters, word-level vocabulary of "
        f"{main.vocab()} tokens) is\n"
        'trained from scratch by `examples/reproduce/sft.py` on synthetic reviews ("the movie was really good but\n'
        'a bit long ."), whose adjectives are a third positive, a third negative and a third neutral. That is θ_sft.\n'
        "The reward is warp's builtin `sentiment` (VADER compound in [−1, 1]) of the completion, as in the demo: a\n"
        f"real reward, bounded, which saturates near 1. θ_sft scores {sft[1]:+.3f}, with completions of {sft[2]:.1f} tokens.\n"
        "An RL step then costs 0.1-0.3 s, which affords 12 runs per setting, trajectories, and 3-6 repetitions per claim.\n"
    )
    L.append("| setting | `main` | `noisy` | paper |")
    L.append("|---|---|---|---|")
    sm, sn = main.w.st, noisy.w.st
    rows = [
        ("policy θ_sft", "Llama 4×128, 0.68M parameters, trained by sft.py (500 steps)", "same", "Gemma 7B SFT"),
        ("reward", "VADER compound sentiment of the completion, in [−1, 1]", "same", "a 7B reward model"),
        ("RL steps T", f"{sm.steps} per merged run; {sm.long_steps} for claim 1", f"{sn.steps} per merged run; claim 1 not run", "9k"),
        ("batch", f"{sm.batch} prompts × 2 samples (RLOO), ≤ 24 new tokens", f"{sn.batch} prompts × 2 samples", "128 prompts"),
        ("lr, warm-up", f"{sm.lr:g}, Adam, 10 steps", f"{sn.lr:g}", "1e-6, 100 steps"),
        ("β, μ, temperature", "0.1, 0.01, 0.9", "same", "0.1, 0.01, 0.9"),
        ("SLERP", "per transformer block, λ = 1/M (iterative for M > 2)", "same", "same"),
        ("LITI", "η ∈ {0, 0.1, 0.3, 0.5, 0.8, 1, 1.3} toward θ_sft for the fronts; η = 0.3 toward the init for iteration 2", "same", "same, up to η = 2"),
        ("evaluation", f"10 held-out prompts × 32 samples = {main.s.n} completions per checkpoint, the same samples' seeds for all", "same", "—"),
        ("seeds", f"EMA runs 1-12 (1-3 to {sm.long_steps} steps), frozen-anchor runs 1-3, iteration-2 runs 1001-1006", "EMA runs 1-12, iteration-2 runs 1001-1006", "—"),
    ]  # fmt: skip
    L += [f"| {k} | {x} | {y} | {p} |" for k, x, y, p in rows]
    L.append("")
    L.append(
        "Checkpoints are saved every T/10 steps and scored, so each run has a trajectory. SLERP and LERP use the\n"
        "runs' step-T policies: 6 disjoint pairs (seeds 1+2, 3+4, …), 4 disjoint triples and 3 disjoint quadruples.\n"
        "Iteration 2 (claim 5) runs for the first three pairs: init = LITI(θ_sft → SLERP, η = 0.3), two new runs\n"
        "from it, their SLERP, and its sweep toward θ_sft.\n"
    )
    L.append("## Figures\n")
    L += [f"![{n}](reproduction/{n})\n" for n in images]
    L.append("## Per-repetition values\n")
    for name, cs in claims.items():
        L += [f"- `{name}` {c['key']}: " + ", ".join(f"{x:+.4g}" for x in c["ci"]["values"]) for c in cs]
    L.append("")
    L.append(f"## End points of the long runs (`main`, step {sm.long_steps})\n")
    L.append("| run | reward | KL (nats) | length (tokens) |")
    L.append("|---|---|---|---|")
    for kind in ("ema", "frozen"):
        for s in sm.long:
            p = main.point(main.w.step(kind, s, sm.long_steps))
            L.append(f"| {kind} anchor, seed {s} | {p[1]:+.3f} | {p[0]:.2f} | {p[2]:.1f} |")
    L.append("")
    L.append("## How to run it\n")
    L.append(
        "```\n. scripts/venv.sh && warp_venv demo   # .venv with the CPU torch and warp (or any environment with warp installed)\npython examples/reproduce/reproduce.py runs/reproduce\n```\n"
    )
    L.append(
        f"Versions of the committed run: warp {v['warp']}, torch {v['torch']}, transformers {v['transformers']}, "
        f"numpy {v['numpy']}, Python {v['python']}, {os.cpu_count()} CPU cores."
        + (
            f" The last invocation took {meta['elapsed_s'] / 60:.0f} min (a resumed run counts only what it redid)."
            if "elapsed_s" in meta
            else ""
        )
        + "\n"
    )
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text("\n".join(L))
    for name, w in works.items():
        (w.root / "claims.json").write_text(json.dumps(claims[name], indent=1))
    print(f"wrote {doc} and {len(images)} plots", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description="Write the reproduction document from a finished WORK folder.")
    ap.add_argument("work", type=Path)
    ap.add_argument("--doc", type=Path, default=HERE.parent.parent / "docs" / "REPRODUCTION.md")
    args = ap.parse_args()
    write_report({name: Work(args.work.resolve(), st) for name, st in SETTINGS.items()}, args.doc, {})


if __name__ == "__main__":
    main()
