"""The run folder of `warp pipeline run`, spelled out in this one place:

    RUN/
      config.yaml                the config the run was started with
      run.json                   the manifest (pipeline/manifest.py)
      iter_i/run_m/              RL run m of iteration i (run_m.partial/ while it runs, run_m.log on a group)
      iter_i/slerp/              SLERP of the iteration's runs (absent when M = 1: the run is the merge)
      iter_i/liti/               LITI toward the target: the next iteration's init
      iter_i/eval/               the Pareto evaluation of iterations 1..i, made as soon as iteration i is merged
      final/                     the last iteration's LITI: the pipeline's output
      eval/                      the Pareto evaluation of every iteration (pareto.csv, pareto.png, summary.txt,
                                 summary.json, scores.json)

Step names are these paths relative to RUN (`iter_1/run_2`, `final`, `eval`). Once an iteration is
evaluated, the checkpoints no later step reads lose their weights, unless the config's `keep:` names
them (`prune` lists them): a finished run holds final/, the evaluations and the records.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MANIFEST = "run.json"
CONFIG = "config.yaml"
EVAL = "eval"
# what the Pareto evaluation writes
PARETO_FILES = ("summary.txt", "summary.json", "pareto.csv", "pareto.png", "scores.json")


@dataclass(frozen=True)
class Layout:
    root: Path
    iterations: int
    runs: int

    def run(self, i: int, m: int) -> Path:
        return self.root / f"iter_{i}" / f"run_{m}"

    def runs_of(self, i: int) -> list[Path]:
        return [self.run(i, m) for m in range(1, self.runs + 1)]

    def merged(self, i: int) -> Path:
        """The iteration's merge: its SLERP folder, or its single run."""
        return self.run(i, 1) if self.runs == 1 else self.root / f"iter_{i}" / "slerp"

    def liti(self, i: int) -> Path:
        """The iteration's LITI output: the next init, or `final/` after the last iteration."""
        return self.root / ("final" if i == self.iterations else f"iter_{i}/liti")

    def eval_of(self, i: int) -> Path:
        """The Pareto evaluation made once iteration i is merged: `eval/` after the last one."""
        return self.root / (EVAL if i == self.iterations else f"iter_{i}/{EVAL}")

    def iteration(self, i: int, evaluate: bool) -> list[tuple[str, str]]:
        """The steps of iteration i, in order: (name, kind)."""
        out = [(self.name(r), "rl") for r in self.runs_of(i)]
        if self.runs > 1:
            out.append((self.name(self.merged(i)), "slerp"))
        out.append((self.name(self.liti(i)), "liti"))
        if evaluate:
            out.append((self.name(self.eval_of(i)), "pareto"))
        return out

    def prune(self, i: int, keep: tuple[str, ...]) -> list[Path]:
        """The checkpoints no step after iteration i reads, minus what `keep` names: the iteration's
        RL policies (`policy`), its SLERP and the previous iteration's LITI (`merges`; with M = 1 the
        run is the merge)."""
        out = [] if "policy" in keep or (self.runs == 1 and "merges" in keep) else self.runs_of(i)
        if "merges" not in keep:
            out += [self.merged(i)] if self.runs > 1 else []
            out += [self.liti(i - 1)] if i > 1 else []
        return out

    @property
    def final(self) -> Path:
        return self.liti(self.iterations)

    @property
    def eval(self) -> Path:
        return self.root / EVAL

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    def name(self, path: Path) -> str:
        """A step's name: its folder relative to the run folder."""
        return Path(path).relative_to(self.root).as_posix()

    def steps(self, evaluate: bool) -> list[tuple[str, str]]:
        """Every step of a complete run, in order: (name, kind)."""
        return [step for i in range(1, self.iterations + 1) for step in self.iteration(i, evaluate)]
