"""Reproduce WARP's six qualitative claims at small scale, with seeds and error bars, using only warp's
public commands (`warp rl`, `warp merge`, `warp liti`, `warp eval score`, `warp inspect`).

    python examples/reproduce/reproduce.py [WORK] [--jobs 2] [--doc docs/REPRODUCTION.md]

WORK (default runs/reproduce) holds every run, merge and evaluation; a step whose output exists is
not redone, so an interrupted reproduction continues where it stopped. At the end the report is
written: docs/REPRODUCTION.md and its plots in docs/reproduction/. About 35 minutes on 2 idle CPU cores.

The experiment (see the document for why this setting), in two settings (`SETTINGS`: `main`, and `noisy`
with smaller batches and no claim-1 runs):
  - θ_sft: a 0.68M-parameter Llama trained by sft.py on synthetic reviews; reward: VADER sentiment.
  - 12 EMA-anchor runs of T steps (seeds 1..12; in `main` seeds 1-3 go on to 300 steps, beside 3
    frozen-anchor runs of 300 steps), checkpoints every T/10 steps: the trajectories.
  - From the step-T policies: SLERP and LERP of 6 disjoint pairs, SLERP of 4 triples and 3
    quadruples, each swept toward θ_sft with LITI (η below); iteration 2 for the first 3 pairs
    (init = LITI η = 0.3 of the pair's SLERP, 2 new runs, SLERP, the same sweep).
  - Every checkpoint scored by `warp eval score` on the held-out prompts with the same samples' seeds.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent

# --- the experiment's settings (the document explains each) ---


@dataclass(frozen=True)
class Setting:
    """What differs between the two settings run: batch, learning rate and run lengths."""

    name: str
    batch: int
    """Prompts per RL step (× 2 samples)."""
    lr: float
    steps: int
    """T of the runs that are merged."""
    long_steps: int
    """Claim 1's EMA- and frozen-anchor runs (seeds LONG); 0: claim 1 is not run."""

    @property
    def save(self) -> int:
        return self.steps // 10

    @property
    def long(self) -> tuple[int, ...]:
        return LONG if self.long_steps else ()

    def rl_args(self) -> list[str]:
        return [
            "--reward", "sentiment", "--batch-size", str(self.batch), "--samples-per-prompt", "2", "--baseline",
            "rloo", "--max-new-tokens", "24", "--lr", str(self.lr), "--warmup", "10", "--beta", "0.1", "--mu",
            "0.01", "--temperature", "0.9", "--save-every", str(self.save), "--state-every", "50",
            "--no-kl-to-init", "--no-save-anchor", "--threads", "1", "-q",
        ]  # fmt: skip


SETTINGS = {
    "main": Setting("main", batch=16, lr=2e-4, steps=100, long_steps=300),
    # more gradient noise per step: the runs' task vectors are less aligned (claims 2, 4, 6)
    "noisy": Setting("noisy", batch=2, lr=1e-4, steps=200, long_steps=0),
}
SEEDS = range(1, 13)  # EMA runs
LONG = (1, 2, 3)  # seeds whose EMA and frozen-anchor runs go on to long_steps
ETAS = (0.1, 0.3, 0.5, 0.8, 1.3)  # LITI toward θ_sft; η = 0 is θ_sft, η = 1 the merge itself
ETA_NEXT = 0.3  # LITI toward the iteration's init: iteration 2's init
EVAL = ["--reward", "sentiment", "--samples-per-prompt", "32", "--max-new-tokens", "24", "--temperature", "0.9"]
EVAL += ["--seed", "1234", "--batch-size", "64", "-q"]
PAIRS = [(2 * i + 1, 2 * i + 2) for i in range(6)]
TRIPLES = [(3 * i + 1, 3 * i + 2, 3 * i + 3) for i in range(4)]
QUADS = [(4 * i + 1, 4 * i + 2, 4 * i + 3, 4 * i + 4) for i in range(3)]
ITER2 = PAIRS[:3]
# two-sided 95% Student t quantiles by degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228, 11: 2.201}


class Work:
    """Paths of everything the experiment makes, under one folder."""

    def __init__(self, top: Path, setting: Setting):
        self.st = setting
        self.root = top / setting.name
        self.sft = top / "sft"  # θ_sft and the prompts are shared by the settings
        self.prompts = top / "prompts"

    def run(self, kind: str, seed: int) -> Path:
        return self.root / "runs" / f"{kind}_{seed}"

    def step(self, kind: str, seed: int, step: int) -> Path:
        return self.run(kind, seed) / "checkpoints" / f"step_{step}"

    def merge(self, name: str) -> Path:
        return self.root / "merges" / name

    def evals(self, name: str) -> Path:
        return self.root / "evals" / name


def run(argv: list[str], log: Path) -> None:
    """One command, its output into `log`; a failure stops the reproduction with the log's tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    with open(log, "w") as f:
        code = subprocess.call(argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if code != 0:
        tail = log.read_text()[-2000:]
        raise SystemExit(f"failed ({code}): {' '.join(map(str, argv))}\n--- {log} ---\n{tail}")


def batch(jobs: list[tuple[Path, list[str]]], workers: int, what: str) -> None:
    """Run the jobs whose output folder does not exist yet, `workers` at a time."""
    todo = [(out, argv) for out, argv in jobs if not out.exists()]
    if not todo:
        return
    t0 = time.time()
    print(f"{what}: {len(todo)} to do ({len(jobs) - len(todo)} done)", flush=True)
    logs = lambda out: out.parent / "logs" / f"{out.name}.log"  # noqa: E731
    with ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(run, [str(a) for a in argv], logs(out)) for out, argv in todo]
        try:
            for f in futures:
                f.result()
        except BaseException:  # a failure (or ^C) stops here: the queued commands are not started
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    print(f"{what}: done in {time.time() - t0:.0f} s", flush=True)


def warp(*args) -> list[str]:
    return [sys.executable, "-m", "mergekit_warp", *map(str, args)]


def rl_job(w: Work, kind: str, seed: int, steps: int, init: Path) -> tuple[Path, list[str]]:
    anchor = "ema" if kind.startswith(("ema", "it2")) else "init"
    out = w.run(kind, seed)
    argv = warp("rl", "--model", init, "--prompts", w.prompts / "train.jsonl", "-o", out, "--anchor", anchor)
    return out, argv + ["--steps", str(steps), "--seed", str(seed), "--resume", *w.st.rl_args()]


def sweep(w: Work, merged: str) -> list[tuple[float, Path, float | None]]:
    """A LITI sweep of a merge toward θ_sft: (η, checkpoint, the η to score it at), η = 0 and 1
    included; `warp eval score --etas` builds the interpolations in memory."""
    inner = [(e, w.merge(merged), e) for e in ETAS]
    return sorted([(0.0, w.sft, None), (1.0, w.merge(merged), None), *inner], key=lambda x: x[0])


def experiment(w: Work, jobs: int) -> None:
    if not (w.sft / "model.safetensors").exists():
        print("θ_sft: training the small Llama (about a minute)", flush=True)
        run([sys.executable, str(HERE / "sft.py"), str(w.sft)], w.sft.parent / "logs" / "sft.log")
    st = w.st
    step = lambda seed: w.step("ema", seed, st.steps)  # noqa: E731

    rl = [rl_job(w, "ema", s, st.long_steps if s in st.long else st.steps, w.sft) for s in SEEDS]
    rl += [rl_job(w, "frozen", s, st.long_steps, w.sft) for s in st.long]
    batch(rl, jobs, f"[{st.name}] RL runs, iteration 1")

    merges: list[tuple[Path, list[str]]] = []
    for group in PAIRS + TRIPLES + QUADS:
        name = "slerp_" + "-".join(map(str, group))
        merges.append((w.merge(name), warp("merge", "slerp", *map(step, group), "--init", w.sft, "-o", w.merge(name))))
    for a, b in PAIRS:
        name = f"lerp_{a}-{b}"
        merges.append((w.merge(name), warp("merge", "lerp", step(a), step(b), "--init", w.sft, "-o", w.merge(name))))
    batch(merges, jobs, f"[{st.name}] SLERP / LERP merges")
    litis = [
        (w.merge(f"init2_{a}-{b}"), warp("liti", w.merge(f"slerp_{a}-{b}"), "--init", w.sft, "--eta", ETA_NEXT, "-o", w.merge(f"init2_{a}-{b}")))
        for a, b in ITER2
    ]  # fmt: skip
    batch(litis, jobs, f"[{st.name}] iteration 2's inits (LITI)")

    batch([rl_job(w, f"it2_{a}-{b}", 1000 + s, st.steps, w.merge(f"init2_{a}-{b}")) for a, b in ITER2 for s in (a, b)], jobs, f"[{st.name}] RL runs, iteration 2")  # fmt: skip
    it2 = []
    for a, b in ITER2:
        runs = [w.step(f"it2_{a}-{b}", 1000 + s, st.steps) for s in (a, b)]
        out = w.merge(f"slerp2_{a}-{b}")
        it2.append((out, warp("merge", "slerp", *runs, "--init", w.merge(f"init2_{a}-{b}"), "-o", out)))
    batch(it2, jobs, f"[{st.name}] iteration 2's SLERP")

    scored = []
    for name, (ckpts, etas) in evaluation_groups(w).items():
        out = w.evals(name)
        sweep_args = ["--etas", ",".join(map(str, etas))] if etas else []
        scored.append((out, warp("eval", "score", *ckpts, "--init", w.sft, "--prompts", w.prompts / "heldout.jsonl", *EVAL, *sweep_args, "-o", out)))  # fmt: skip
    batch(scored, jobs, f"[{st.name}] evaluation (warp eval score)")

    for a, b in PAIRS:
        for name, models, init in ((f"runs_{a}-{b}", [step(a), step(b)], w.sft), (f"merges_{a}-{b}", [w.merge(f"slerp_{a}-{b}"), w.merge(f"lerp_{a}-{b}")], w.sft)):  # fmt: skip
            out = w.root / "inspect" / f"{name}.json"
            if not out.exists():
                out.parent.mkdir(parents=True, exist_ok=True)
                res = subprocess.run(warp("inspect", *models, "--init", init, "--json"), capture_output=True, text=True, cwd=ROOT)  # fmt: skip
                if res.returncode:
                    raise SystemExit(f"warp inspect failed: {res.stderr[-2000:]}")
                out.write_text(res.stdout)


def trajectory(w: Work, kind: str, seed: int, steps: int) -> list[Path]:
    return [w.step(kind, seed, t) for t in range(w.st.save, steps + 1, w.st.save)]


def evaluation_groups(w: Work) -> dict[str, tuple[list[Path], tuple[float, ...]]]:
    """What `warp eval score` scores, one call per group (each loads θ_sft once): checkpoints, and the
    LITI η toward θ_sft at which each is also scored."""
    st = w.st
    groups: dict[str, tuple[list[Path], tuple[float, ...]]] = {"sft": ([w.sft], ())}
    for s in SEEDS:
        groups[f"ema_{s}"] = (trajectory(w, "ema", s, st.long_steps if s in st.long else st.steps), ())
    for s in st.long:
        groups[f"frozen_{s}"] = (trajectory(w, "frozen", s, st.long_steps), ())
    for g in PAIRS + TRIPLES + QUADS:
        name = "slerp_" + "-".join(map(str, g))
        groups[name] = ([w.merge(name)], ETAS)
    groups["lerp"] = ([w.merge(f"lerp_{a}-{b}") for a, b in PAIRS], ())
    for a, b in ITER2:
        runs = [c for s in (a, b) for c in trajectory(w, f"it2_{a}-{b}", 1000 + s, st.steps)]
        groups[f"it2_{a}-{b}"] = (runs + [w.merge(f"init2_{a}-{b}")], ())
        groups[f"slerp2_{a}-{b}"] = ([w.merge(f"slerp2_{a}-{b}")], ETAS)
    return groups


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("work", type=Path, nargs="?", default=Path("runs/reproduce"), help="where everything is made")
    ap.add_argument("--jobs", type=int, default=2, help="commands run at once (one CPU thread each)")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "REPRODUCTION.md", help="the document to write")
    args = ap.parse_args()
    if args.jobs < 1:
        ap.error("--jobs must be at least 1")
    works = {name: Work(args.work.resolve(), st) for name, st in SETTINGS.items()}
    t0 = time.time()
    for w in works.values():
        experiment(w, args.jobs)
    print(f"experiment done in {time.time() - t0:.0f} s; writing {args.doc}", flush=True)
    from report import write_report  # the analysis, beside this file

    write_report(works, args.doc, {"elapsed_s": time.time() - t0})


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
