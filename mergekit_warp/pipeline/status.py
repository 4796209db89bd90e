"""`warp pipeline status RUN_DIR`: what is done, running, interrupted or failed, with key metrics."""

from __future__ import annotations

import json
import time
from pathlib import Path

from mergekit_warp.errors import WarpError
from mergekit_warp.pipeline.layout import MANIFEST, Layout
from mergekit_warp.pipeline.manifest import Manifest, Step, pid_alive

# Metrics shown for RL runs: (label, name in metrics.jsonl).
_RL_KEYS = (("step", "step"), ("r", "reward"), ("KL_init", "kl_init"), ("KL_anchor", "kl_anchor"))


def planned_steps(config: dict) -> list[tuple[str, str]]:
    """Every step a complete run of `config` (the manifest's) has, in order: (name, kind)."""
    lay = Layout(Path("."), config["iterations"], config["runs"])
    return lay.steps(evaluate=config.get("eval", {}).get("enabled", True))


def effective_status(step: Step | None, run_dir: Path) -> str:
    """The manifest's status, with `running` shown as `interrupted` when its process is gone."""
    if step is None:
        return "pending"
    if step.status == "running" and not pid_alive(step.pid):
        return "interrupted"
    if step.status == "running" and step.kind == "rl":
        return f"running (step {live_metrics(run_dir / step.name).get('step', 0)})"
    return step.status


def live_metrics(out: Path) -> dict:
    """The last step logged by an RL run in progress (its state lives in OUT.partial/)."""
    for f in (out.with_name(out.name + ".partial") / "metrics.jsonl", out / "metrics.jsonl"):
        if f.is_file():
            lines = [ln for ln in f.read_text().splitlines() if ln.strip()]
            try:
                return json.loads(lines[-1]) if lines else {}
            except json.JSONDecodeError:  # a line being written right now
                return json.loads(lines[-2]) if len(lines) > 1 else {}
    return {}


def _metrics(step: Step | None, run_dir: Path) -> str:
    if step is None:
        return ""
    m = step.metrics
    if step.kind == "rl" and step.status == "running":
        m = live_metrics(run_dir / step.name)
    if not m:
        return ""
    if step.kind == "rl":
        parts = []
        for label, k in _RL_KEYS:
            v = m.get(k)
            if v is not None:
                parts.append(f"{label} {v:.3g}" if isinstance(v, float) else f"{label} {v}")
        return "  ".join(parts)
    if step.kind == "pareto":
        mi = m.get("merged_above_init", {})
        return f"merged−SFT reward {mi.get('gain', float('nan')):+.4f}" if mi else ""
    return ""


def status_table(run_dir: Path):
    """A rich table of the run's steps (planned ones included)."""
    from rich.table import Table

    run_dir = Path(run_dir)
    if not (run_dir / MANIFEST).is_file():
        raise WarpError(
            f"{run_dir} is not a pipeline run folder (no {MANIFEST}); pass the -o folder of `warp pipeline run`"
        )
    man = Manifest.load(run_dir)
    t = Table(title=f"warp pipeline — {run_dir}")
    for col in ("step", "kind", "status", "device", "time", "metrics"):
        t.add_column(col)
    style = {"done": "green", "failed": "red", "interrupted": "yellow", "pending": "dim"}
    for name, kind in planned_steps(man.config):
        s = man.steps.get(name)
        st = effective_status(s, run_dir)
        dur = ""
        if s is not None and s.started:
            dur = f"{(s.finished or time.time()) - s.started:.0f}s"
        err = f"  {s.error[:80]}" if s is not None and s.error and st == "failed" else ""
        color = style.get(st.split()[0], "cyan")
        t.add_row(
            name, kind, f"[{color}]{st}[/{color}]", (s.device or "") if s else "", dur, _metrics(s, run_dir) + err
        )
    return t


def counts(run_dir: Path) -> dict[str, int]:
    """How many planned steps are in each status (for scripts and tests)."""
    man = Manifest.load(Path(run_dir))
    out: dict[str, int] = {}
    for name, _ in planned_steps(man.config):
        st = effective_status(man.steps.get(name), Path(run_dir)).split()[0]
        out[st] = out.get(st, 0) + 1
    return out
