"""The run folder of `warp pipeline run`, spelled out in this one place:

    RUN/
      config.yaml                the config the run was started with
      run.json                   the manifest (pipeline/manifest.py)
      iter_i/run_m/              RL run m of iteration i (run_m.partial/ while it runs, run_m.log on a group)
      iter_i/slerp/              SLERP of the iteration's runs (absent when M = 1: the run is the merge)
      iter_i/liti/               LITI toward the target: the next iteration's init
      final/                     the last iteration's LITI: the pipeline's output
      eval/                      the Pareto evaluation (pareto.csv, pareto.png, summary.txt, summary.json)

Step names are these paths relative to RUN (`iter_1/run_2`, `final`, `eval`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MANIFEST = "run.json"
CONFIG = "config.yaml"
EVAL = "eval"
PARETO_FILES = ("summary.txt", "summary.json", "pareto.csv", "pareto.png")  # what the Pareto evaluation writes


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
        out = []
        for i in range(1, self.iterations + 1):
            out += [(self.name(r), "rl") for r in self.runs_of(i)]
            if self.runs > 1:
                out.append((self.name(self.merged(i)), "slerp"))
            out.append((self.name(self.liti(i)), "liti"))
        if evaluate:
            out.append((EVAL, "pareto"))
        return out
