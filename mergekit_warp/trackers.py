"""Experiment trackers: `--report-to tensorboard|wandb|trackio|mlflow` (several allowed).

Every metric line that goes to a `metrics.jsonl` also goes to each tracker, the same names at the same
step; the run's options go as its config. Each tracker is its own library, imported only when asked
for (an optional extra: `pip install 'mergekit-warp[wandb]'`), and keeps its own defaults and
environment variables for where and how it stores runs:

- tensorboard: event files in `tensorboard/GROUP/NAME/` (under `TENSORBOARD_LOGDIR` when set);
- wandb: `WANDB_MODE=offline` keeps the run in `./wandb/` (sync it later with `wandb sync`);
- trackio: a local store (`TRACKIO_DIR`, default in the Hugging Face cache);
- mlflow: `MLFLOW_TRACKING_URI` (a tracking server, or offline `file:./mlruns` with
  `MLFLOW_ALLOW_FILE_STORE=true` on mlflow 3: mlflow-skinny has no SQL store), else mlflow's default.

A missing library is a one-line error naming the extra, before any work starts (`check`); a tracker
that cannot start its run (no login, a store it refuses) is a one-line error too (`open_run`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mergekit_warp.errors import WarpError

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio", "mlflow": "mlflow"}
"""Tracker name → the module that must import (the extra of the same name installs it)."""


def names(given: Iterable[str] | None) -> list[str]:
    """The trackers asked for: repeated options and comma lists, 'none' dropped, checked and deduplicated."""
    out: list[str] = []
    for item in given or []:
        for n in str(item).split(","):
            n = n.strip().lower()
            if n in ("", "none"):
                continue
            if n not in TRACKERS:
                raise WarpError(f"--report-to: unknown tracker {n!r}; choose among {', '.join(TRACKERS)} (or none)")
            if n not in out:
                out.append(n)
    return out


def check(given: Iterable[str] | None) -> list[str]:
    """`names`, each library importable: else a WarpError with the install command."""
    import importlib.util

    wanted = names(given)
    for n in wanted:
        if importlib.util.find_spec(TRACKERS[n]) is None:
            raise WarpError(
                f"--report-to {n}: the {TRACKERS[n]} library is not installed; "
                f"pip install 'mergekit-warp[{n}]' (or pip install {TRACKERS[n]})"
            )
    return wanted


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics line, step excluded (it is the x axis)."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as one level of `a.b` keys with scalar values (lists as their text)."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
    return out


class Run:
    """One tracker run on every tracker asked for: `log(metrics, step)`, `artifact(path)`, `close()`."""

    def __init__(self, wanted: list[str], *, name: str, group: str | None, config: dict[str, Any], project: str):
        self.backends: list = []
        for n in wanted:
            try:
                self.backends.append(_open(n, name=name, group=group, config=config, project=project))
            except Exception as e:  # no login, a refused store…: one line, and the others closed
                self.close()
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise WarpError(f"--report-to {n}: could not start the tracker run: {first}") from None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        values = scalars(metrics)
        if values:
            for b in self.backends:
                b.log(values, step)

    def artifact(self, path: Path) -> None:
        for b in self.backends:
            b.artifact(Path(path))

    def close(self) -> None:
        for b in self.backends:
            b.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_run(
    given: Iterable[str] | None, *, name: str, group: str | None = None, config: dict[str, Any] | None = None
) -> Run | None:
    """A tracker run named `name` (grouped under `group`, e.g. the pipeline) or None when none is asked for."""
    wanted = check(given)
    if not wanted:
        return None
    return Run(
        wanted, name=name, group=group, config=flat(config or {}), project=os.environ.get("WARP_PROJECT", "warp")
    )


def report(
    given: Iterable[str] | None,
    name: str,
    config: dict[str, Any],
    rows: list[dict[str, Any]],
    files: Iterable[Path] = (),
    *,
    group: str | None = None,
    first_step: int = 0,
) -> None:
    """Results in one tracker run `name`: row k of `rows` at step first_step + k, then the `files` that
    exist as artifacts (an evaluation, a pipeline's Pareto summary); nothing when no tracker is asked for."""
    run = open_run(given, name=name, group=group, config=config)
    if run is None:
        return
    with run:
        for k, row in enumerate(rows):
            run.log(row, first_step + k)
        for f in files:
            if Path(f).is_file():
                run.artifact(Path(f))


def _open(kind: str, *, name: str, group: str | None, config: dict[str, Any], project: str):
    return {"tensorboard": _TensorBoard, "wandb": _Wandb, "trackio": _Trackio, "mlflow": _MLflow}[kind](
        name, group, config, project
    )


class _TensorBoard:
    def __init__(self, name: str, group: str | None, config: dict[str, Any], project: str):
        from torch.utils.tensorboard import SummaryWriter

        root = Path(os.environ.get("TENSORBOARD_LOGDIR", "tensorboard"))  # not runs/: warp's own outputs go there
        self.writer = SummaryWriter(log_dir=str(root / group / name if group else root / name))
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()))

    def log(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def artifact(self, path: Path) -> None:
        if path.suffix == ".png":
            import matplotlib.image

            self.writer.add_image(path.stem, matplotlib.image.imread(path)[..., :3], dataformats="HWC")
        else:
            self.writer.add_text(path.name, path.read_text(errors="replace")[:100_000])

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, name: str, group: str | None, config: dict[str, Any], project: str):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=project, name=name, group=group, config=config, reinit="create_new")

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def artifact(self, path: Path) -> None:
        art = self.wandb.Artifact(f"{self.run.name}-{path.name}".replace("/", "-"), type="result")
        art.add_file(str(path))
        self.run.log_artifact(art)

    def close(self) -> None:
        self.run.finish()


class _Trackio:
    def __init__(self, name: str, group: str | None, config: dict[str, Any], project: str):
        import trackio

        self.trackio = trackio
        self.run = trackio.init(
            project=project, name=name, group=group, config=config, auto_log_gpu=False, auto_log_cpu=False
        )

    def log(self, values: dict[str, float], step: int) -> None:
        self.trackio.log(values, step=step)

    def artifact(self, path: Path) -> None:
        pass  # trackio stores metrics only

    def close(self) -> None:
        self.trackio.finish()


class _MLflow:
    def __init__(self, name: str, group: str | None, config: dict[str, Any], project: str):
        import logging

        import mlflow

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # no INFO lines on stderr
        self.mlflow = mlflow
        mlflow.set_experiment(project)
        self.run = mlflow.start_run(run_name=name, tags={"group": group} if group else None)
        mlflow.log_params({k: str(v)[:6000] for k, v in config.items()})

    def log(self, values: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics({_mlflow_key(k): v for k, v in values.items()}, step=step)

    def artifact(self, path: Path) -> None:
        self.mlflow.log_artifact(str(path))

    def close(self) -> None:
        self.mlflow.end_run()


def _mlflow_key(k: str) -> str:
    """mlflow's metric names allow letters, digits and _-. /: anything else becomes _."""
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in k)
