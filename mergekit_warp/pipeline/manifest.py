"""`run.json`: the pipeline's manifest. One record per step (RL run, SLERP, LITI, evaluation) with its
status, inputs (path + hash), output (path + hash) and key metrics. Written atomically (temp file +
`os.replace`) after every change, so a kill at any point leaves the last consistent manifest behind.

A step counts as finished only when its record says `done` AND its output still has the recorded
hash; `--resume` redoes everything else. A `pruned` step was finished, then its weights were deleted
because no later step reads them: its recorded hash stands for it as an input of later steps, so
those stay finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from mergekit_warp.errors import WarpError
from mergekit_warp.io.atomic import write_atomic
from mergekit_warp.io.publish import PROVENANCE, fingerprint
from mergekit_warp.pipeline.layout import MANIFEST

Status = Literal["pending", "running", "done", "failed", "interrupted", "pruned"]


def output_hash(path: Path) -> str:
    """Header fingerprint of a checkpoint plus the bytes of its provenance file (which carries the
    creation time and the inputs' hashes), so a re-made output never matches an old record."""
    path = Path(path)
    if not path.exists():
        return "missing"
    try:
        h = fingerprint(path)
    except WarpError:  # a damaged output: it matches no record, so its step is redone
        return "unreadable"
    prov = path / PROVENANCE
    if path.is_dir() and prov.is_file():
        h += "+prov:" + hashlib.sha256(prov.read_bytes()).hexdigest()[:16]
    return h


@dataclass
class Step:
    """One unit of work. `name` is its path relative to the run folder (`iter_1/run_2`, `final`)."""

    name: str
    kind: str  # rl | slerp | liti | pareto
    status: Status = "pending"
    inputs: dict[str, dict[str, str]] = field(default_factory=dict)
    output: str | None = None
    hash: str | None = None
    started: float | None = None
    finished: float | None = None
    pid: int | None = None
    device: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


class Manifest:
    """The run folder's `run.json`. Only the pipeline's parent process writes it (parallel RL runs
    report back to it), guarded by a lock for the thread that collects their results."""

    def __init__(self, run_dir: Path, config: dict[str, Any], config_hash: str, steps: dict[str, Step] | None = None):
        self.run_dir = Path(run_dir)
        self.config = config
        self.config_hash = config_hash
        self.steps: dict[str, Step] = steps or {}
        self.created = time.time()
        self._lock = threading.Lock()

    @property
    def path(self) -> Path:
        return self.run_dir / MANIFEST

    @classmethod
    def load(cls, run_dir: Path) -> Manifest:
        path = Path(run_dir) / MANIFEST
        try:
            raw = json.loads(path.read_text())
            m = cls(run_dir, raw["config"], raw["config_hash"], {k: Step(**v) for k, v in raw["steps"].items()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise WarpError(
                f"{path} is damaged or not a warp manifest ({type(e).__name__}); restore it, or start "
                "the pipeline again in a new -o folder"
            ) from None
        m.created = raw.get("created", m.created)
        return m

    def save(self) -> None:
        with self._lock:
            record = {
                "format": "mergekit-warp/run/1",
                "created": self.created,
                "updated": time.time(),
                "config_hash": self.config_hash,
                "config": self.config,
                "steps": {k: asdict(s) for k, s in self.steps.items()},
            }
            write_atomic(self.path, json.dumps(record, indent=2, default=str) + "\n")

    def step(self, name: str, kind: str) -> Step:
        """The record of step `name`, created pending if new."""
        if name not in self.steps:
            self.steps[name] = Step(name=name, kind=kind)
        return self.steps[name]

    # -- transitions ------------------------------------------------------------------------------

    def start(self, name: str, kind: str, inputs: dict[str, Path], device: str | None = None) -> None:
        s = self.step(name, kind)
        s.status, s.started, s.finished, s.pid, s.device, s.error = (
            "running",
            time.time(),
            None,
            os.getpid(),
            device,
            None,
        )
        s.inputs = {role: {"path": str(p), "hash": self.current_hash(p)} for role, p in inputs.items()}
        s.output, s.hash = None, None
        self.save()

    def finish(
        self,
        name: str,
        output: Path | None,
        metrics: dict[str, Any] | None = None,
        *,
        started: float | None = None,
        finished: float | None = None,
    ) -> None:
        """Mark a step done. `started`/`finished`: when the work really ran, measured by the process
        that did it (a parallel worker), instead of when this process submitted and collected it."""
        s = self.steps[name]
        s.status, s.finished = "done", finished or time.time()
        s.started = started or s.started
        if output is not None:
            s.output, s.hash = str(Path(output).relative_to(self.run_dir)), output_hash(output)
        s.metrics = metrics or {}
        self.save()

    def fail(self, name: str, error: str) -> None:
        s = self.steps[name]
        s.status, s.finished, s.error = "failed", time.time(), error
        self.save()

    def interrupt(self, name: str) -> None:
        """Ctrl-C or SIGTERM stopped the step: not a failure; `--resume` continues it."""
        s = self.steps[name]
        s.status, s.finished, s.error = "interrupted", time.time(), None
        self.save()

    def prune(self, name: str) -> None:
        """Record that the finished step's weights are being deleted (before they are)."""
        self.steps[name].status = "pruned"
        self.save()

    def pruned(self, path: Path) -> bool:
        s = self.owner(path)
        return s is not None and s.status == "pruned"

    def current_hash(self, path: Path) -> str:
        """The hash of checkpoint `path` as an input: its recorded one when its step was pruned."""
        s = self.owner(path)
        return s.hash if s is not None and s.status == "pruned" and s.hash else output_hash(path)

    def owner(self, path: Path) -> Step | None:
        """The step whose output `path` is (None for a path outside the run folder)."""
        try:
            return self.steps.get(Path(path).relative_to(self.run_dir).as_posix())
        except ValueError:
            return None

    def is_done(self, name: str, inputs: dict[str, Path], *, or_pruned: bool = False) -> bool:
        """Finished, with an output whose hash still matches and the same input hashes as recorded.
        `or_pruned`: a pruned step counts as finished if its inputs match."""
        s = self.steps.get(name)
        if s is None or s.status not in (("done", "pruned") if or_pruned else ("done",)):
            return False
        if s.status == "done" and s.output is not None and output_hash(self.run_dir / s.output) != s.hash:
            return False
        now = {role: self.current_hash(p) for role, p in inputs.items()}
        return now == {role: d["hash"] for role, d in s.inputs.items()}


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
