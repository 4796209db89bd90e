"""`warp pipeline status RUN_DIR`: what is done, running, interrupted or failed, with key metrics."""

from __future__ import annotations

import json
import stat
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


def _rl_steps(config: dict, name: str) -> int:
    """T, the optimiser steps RL step `name` (iter_i/run_m) was configured with."""
    from mergekit_warp.rl.config import RLConfig

    m = int(name.rsplit("_", 1)[1])
    per_run = config.get("per_run") or []
    steps = {**(config.get("rl") or {}), **(per_run[m - 1] if m <= len(per_run) else {})}.get("steps")
    return int(steps if steps is not None else RLConfig.model_fields["steps"].default)


def _progress(step: Step, status: str, m: dict, config: dict) -> tuple[str, float | None]:
    """'step N/T' or 'point N/T' of a running step (`m`: its metrics), and the seconds it still needs at
    its pace so far."""
    if status != "running" or step.started is None:
        return "", None
    if step.kind == "rl":
        done, total, unit = int(m.get("step", 0)), _rl_steps(config, step.name), "step"
    elif step.kind == "pareto" and "points_total" in m:
        done, total, unit = m["points_done"], m["points_total"], "point"
    else:
        return "", None
    elapsed = time.time() - step.started
    eta = elapsed / done * (total - done) if done else None
    return f"{unit} {done}/{total}", eta


def _metrics(step: Step | None, status: str, run_dir: Path) -> dict:
    """The step's metrics: an unfinished RL run's from its own log, else the manifest's."""
    if step is None:
        return {}
    if step.kind == "rl" and status in ("running", "interrupted"):
        return live_metrics(run_dir / step.name)
    return step.metrics


def _shown(step: Step | None, m: dict) -> dict:
    """The key metrics of a step, by name."""
    if step is None:
        return {}
    if step.kind == "rl":
        return {k: m[k] for _, k in _RL_KEYS if m.get(k) is not None}
    if step.kind == "pareto" and m.get("iterations"):  # the evaluation's last iteration: the one it added
        last = m["iterations"][max(m["iterations"], key=int)]
        return {"merged_minus_sft_reward": last.get("merged_above_init", {}).get("gain")}
    return {}


def disk_bytes(*paths: Path) -> int:
    """Bytes of the files under `paths` (files or folders; missing ones count 0), each hard-linked file
    once (an RL run's checkpoints are linked from its work folder into its output)."""
    seen, total = set(), 0
    for path in paths:
        if not path.exists():
            continue
        for p in [path] if not path.is_dir() else path.rglob("*"):
            st = p.lstat()
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def status_rows(run_dir: Path) -> dict:
    """The run's state as data: the init and, per planned step, its kind, status, progress and ETA of a
    running step, device, seconds, key metrics and error (`warp pipeline status --json`)."""
    run_dir = Path(run_dir)
    if not (run_dir / MANIFEST).is_file():
        raise WarpError(
            f"{run_dir} is not a pipeline run folder (no {MANIFEST}); pass the -o folder of `warp pipeline run`"
        )
    man = Manifest.load(run_dir)
    first = man.steps.get("iter_1/run_1")
    init_path = (first.inputs.get("init") or {}).get("path") if first else None
    rows = []
    for name, kind in planned_steps(man.config):
        s = man.steps.get(name)
        status = effective_status(s, run_dir)
        m = _metrics(s, status, run_dir)
        progress, eta = _progress(s, status, m, man.config) if s else ("", None)
        seconds = (s.finished or time.time()) - s.started if s is not None and s.started else None
        rows.append(
            {
                "step": name,
                "kind": kind,
                "status": status,
                "progress": progress,
                "eta_s": eta,
                "device": (s.device if s else None) or "",
                "seconds": seconds,
                "disk_bytes": disk_bytes(run_dir / name, run_dir / f"{name}.partial"),
                "metrics": _shown(s, m),
                "error": s.error if s is not None and status == "failed" else None,
            }
        )
    return {
        "run": str(run_dir.resolve()),
        "init": man.config.get("init"),
        "init_path": init_path,
        "disk_bytes": disk_bytes(run_dir),
        "steps": rows,
    }


_LABELS = {k: label for label, k in _RL_KEYS} | {"merged_minus_sft_reward": "merged−SFT reward"}


def _show(k: str, v) -> str:
    if k == "merged_minus_sft_reward":
        return f"{_LABELS[k]} {v:+.4f}"
    return f"{_LABELS.get(k, k)} {v:.3g}" if isinstance(v, float) else f"{_LABELS.get(k, k)} {v}"


def status_table(data: dict):
    """A rich table of a run's `status_rows`."""
    from rich.table import Table

    from mergekit_warp.progress import duration, size

    init = data["init"] if data["init_path"] in (None, data["init"]) else f"{data['init']} ({data['init_path']})"
    t = Table(
        title=f"warp pipeline — {data['run']} ({size(data['disk_bytes'])} on disk)\ninit θ_sft: {init}",
        caption="KL_init: KL to the iteration's own init (θ_sft in iteration 1, iter_{i−1}/liti after)",
    )
    for col in ("step", "kind", "status", "device", "time", "disk", "metrics"):
        t.add_column(col)
    style = {"done": "green", "failed": "red", "interrupted": "yellow", "pending": "dim", "pruned": "blue"}
    for r in data["steps"]:
        status = r["status"]
        if r["progress"]:
            left = f", {duration(r['eta_s'])} left" if r["eta_s"] is not None else ""
            status += f" ({r['progress']}{left})"
        time_ = duration(r["seconds"]) if r["seconds"] is not None else ""
        shown = "  ".join(_show(k, v) for k, v in r["metrics"].items())
        if r["error"]:
            shown += f"  {r['error'][:80]}"
        color = style.get(r["status"], "cyan")
        disk = size(r["disk_bytes"]) if r["disk_bytes"] else ""
        t.add_row(r["step"], r["kind"], f"[{color}]{status}[/{color}]", r["device"], time_, disk, shown)
    return t


def counts(run_dir: Path) -> dict[str, int]:
    """How many planned steps are in each status (for scripts and tests)."""
    out: dict[str, int] = {}
    for r in status_rows(run_dir)["steps"]:
        out[r["status"]] = out.get(r["status"], 0) + 1
    return out
