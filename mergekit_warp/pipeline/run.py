"""The WARP loop (Algorithm 1 of the paper), resumable.

    θ_init ← θ_sft
    for i in 1..I:
        θ_m  ← RL(θ_init, seed_m)            m = 1..M   → iter_i/run_m/
        θ_s  ← SLERP(θ_init, {θ_m})                     → iter_i/slerp/   (M = 1: θ_s = θ_1)
        θ_init ← (1 − η)·θ_target + η·θ_s               → iter_i/liti/    (last iteration: final/)
    Pareto evaluation of every iteration                → eval/pareto.csv, eval/pareto.png

Stages exchange folders; `run.json` (see manifest.py) records each step. With `resume`, a step whose
record is `done` and whose output and inputs still have their recorded hashes is skipped; anything
else is redone (an interrupted RL run continues from its own saved state). Every output is published
atomically, so a kill at any point leaves either nothing or a finished folder at each step's path.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergekit_warp.errors import WarpError
from mergekit_warp.pipeline.config import PipelineConfig, load_config
from mergekit_warp.pipeline.manifest import MANIFEST, Manifest, output_hash

# Test hook: SIGKILL this process right after the named step is recorded `done` (a kill at a step
# boundary). Used by the kill-and-resume tests; harmless when unset.
KILL_AFTER_ENV = "WARP_PIPELINE_KILL_AFTER"


@dataclass(frozen=True)
class PipelineResult:
    run_dir: Path
    final: Path
    summary: str | None
    """The Pareto evaluation's summary text (None when evaluation is disabled)."""


def run_pipeline(config_path: Path, run_dir: Path | None = None, *, resume: bool = False, progress: bool = True) -> PipelineResult:
    """Run (or resume) the WARP pipeline described by `config_path` into `run_dir`."""
    from mergekit_warp.assets import resolve_model

    config_path = Path(config_path)
    cfg = load_config(config_path)
    run_dir = Path(run_dir) if run_dir is not None else Path("runs") / config_path.stem
    _check_rl_configs(config_path, cfg)
    sft = resolve_model(cfg.init)  # before anything is written: a bad init leaves no run folder behind
    manifest = _open_manifest(run_dir, cfg, config_path, resume)
    log = _Log(progress)
    _clean_stale_temps(run_dir)

    init = sft
    for i in range(1, cfg.iterations + 1):
        it = run_dir / f"iter_{i}"
        it.mkdir(exist_ok=True)
        runs = _rl_runs(cfg, manifest, i, init, it, resume, log)

        # -- SLERP of the M task vectors ------------------------------------------------------------
        if cfg.runs == 1:
            merged = runs[0]  # nothing to merge: the single run is the "merge"
        else:
            merged = it / "slerp"
            inputs = {"init": init, **{f"run_{m}": r for m, r in enumerate(runs, 1)}}
            _merge_step(manifest, f"iter_{i}/slerp", "slerp", inputs, merged, log, lambda out, force: _slerp(cfg, runs, init, out, force))

        # -- LITI toward the iteration's init (Algorithm 1) or θ_sft → next init -------------------
        last = i == cfg.iterations
        target = init if cfg.liti.target == "init" else sft
        eta = cfg.liti.final_eta if (last and cfg.liti.final_eta is not None) else cfg.liti.eta
        out = run_dir / "final" if last else it / "liti"
        _merge_step(
            manifest, out.relative_to(run_dir).as_posix(), "liti", {"merged": merged, "target": target}, out, log,
            lambda o, force, merged=merged, target=target, eta=eta: _liti(merged, target, o, eta, force),
        )
        init = out

    summary = None
    if cfg.eval.enabled:
        summary = _pareto_step(cfg, manifest, run_dir, log)
    log(f"done: final policy {run_dir / 'final'}")
    return PipelineResult(run_dir=run_dir, final=run_dir / "final", summary=summary)


# ----------------------------------------------------------------------------------------------------
# Steps


def _rl_runs(cfg: PipelineConfig, manifest: Manifest, i: int, init: Path, it: Path, resume: bool, log: "_Log") -> list[Path]:
    """Run the M RL runs of iteration i (skipping finished ones); return their output folders."""
    runs = [it / f"run_{m}" for m in range(1, cfg.runs + 1)]
    todo = []
    for m, out in enumerate(runs, 1):
        name = f"iter_{i}/run_{m}"
        if manifest.is_done(name, {"init": init}):
            log(f"{name}: done (verified), skipped")
            continue
        prior = manifest.steps.get(name)
        # Continue the run's own saved state only if it was started from this very init.
        same_init = prior is not None and prior.inputs.get("init", {}).get("hash") == output_hash(init)
        rl_cfg = _rl_config(cfg, i, m, init, out, resume=resume and same_init, progress=log.enabled and not cfg.parallel)
        todo.append((name, m, rl_cfg))

    if not cfg.parallel:
        for name, m, rl_cfg in todo:
            group = cfg.group(m)
            log(f"{name}: RL on {','.join(group)}, seed {rl_cfg.seed}, {rl_cfg.steps} steps")
            manifest.start(name, "rl", {"init": init}, device=",".join(group))
            _guarded(manifest, name, lambda: _train(rl_cfg, group))
            manifest.finish(name, rl_cfg.out, _rl_metrics(rl_cfg.out))
            _maybe_kill(name)
        return runs

    # Parallel: one worker process per entry of `devices` (a device or a group), each running its
    # entry's runs in order (spawned, so CUDA initialises cleanly in the child); only this process
    # writes the manifest.
    slot = lambda m: (m - 1) % len(cfg.devices)  # noqa: E731
    pools = {s: ProcessPoolExecutor(max_workers=1, mp_context=_spawn()) for s in dict.fromkeys(slot(m) for _, m, _ in todo)}
    try:
        futures = {}
        for name, m, rl_cfg in todo:
            group = cfg.group(m)
            log(f"{name}: RL on {','.join(group)}, seed {rl_cfg.seed}, {rl_cfg.steps} steps (parallel)")
            manifest.start(name, "rl", {"init": init}, device=",".join(group))
            futures[name] = (pools[slot(m)].submit(_train, rl_cfg, group), rl_cfg)
        errors = []
        for name, (fut, rl_cfg) in futures.items():
            try:
                fut.result()
            except BaseException as e:  # record every failure, then raise the first
                manifest.fail(name, f"{type(e).__name__}: {e}")
                errors.append(e)
                continue
            manifest.finish(name, rl_cfg.out, _rl_metrics(rl_cfg.out))
            log(f"{name}: done")
            _maybe_kill(name)
        if errors:
            raise errors[0]
    finally:
        for p in pools.values():
            p.shutdown(cancel_futures=True)
    return runs


def _merge_step(manifest: Manifest, name: str, kind: str, inputs: dict[str, Path], out: Path, log: "_Log", make) -> None:
    if manifest.is_done(name, inputs):
        log(f"{name}: done (verified), skipped")
        return
    log(f"{name}: {kind}")
    manifest.start(name, kind, inputs)
    _guarded(manifest, name, lambda: make(out, out.exists()))
    manifest.finish(name, out)
    _maybe_kill(name)


def _pareto_step(cfg: PipelineConfig, manifest: Manifest, run_dir: Path, log: "_Log") -> str:
    from mergekit_warp.eval.pareto import pareto

    name = "eval"
    inputs = {"final": run_dir / "final"}
    out = run_dir / "eval"
    if manifest.is_done(name, inputs) and (out / "summary.txt").is_file():
        log(f"{name}: done (verified), skipped")
        return (out / "summary.txt").read_text()
    log(f"{name}: Pareto evaluation of {cfg.iterations} iteration(s) on {cfg.eval_device}")
    manifest.start(name, "pareto", inputs, device=cfg.eval_device)
    result = _guarded(manifest, name, lambda: pareto(run_dir, force=True, progress=log.enabled))
    manifest.finish(name, None, result.headline)
    return result.summary


def _slerp(cfg: PipelineConfig, runs: list[Path], init: Path, out: Path, force: bool) -> Path:
    from mergekit_warp.merge import api

    lam = cfg.slerp.lam if cfg.slerp.lam is not None else 0.5
    return api.slerp(runs, init, out, lam=lam, granularity=cfg.slerp.granularity, force=force, progress=False)


def _liti(merged: Path, target: Path, out: Path, eta: float, force: bool) -> Path:
    from mergekit_warp.merge import api

    return api.liti(merged, target, out, eta=eta, force=force, progress=False)


def _train(rl_cfg, group: tuple[str, ...] = ("cpu",)) -> Path:
    """One RL run: in this process on one device, or under torchrun on a device group (its workers'
    output goes to OUT.log beside the run's folder)."""
    if len(group) == 1:
        from mergekit_warp.rl.train import train

        return train(rl_cfg)
    from mergekit_warp.rl.launch import train_on_group

    return train_on_group(rl_cfg, group, log=Path(rl_cfg.out).with_suffix(".log"))


# ----------------------------------------------------------------------------------------------------
# Plumbing


def _rl_config(cfg: PipelineConfig, i: int, m: int, init: Path, out: Path, *, resume: bool, progress: bool):
    """The RLConfig of run m of iteration i; option types are checked here (pydantic), ranges by RLConfig."""
    from pydantic import TypeAdapter, ValidationError

    from mergekit_warp.rl.config import RLConfig

    fields = dict(
        model=str(init), prompts=cfg.prompts.train, reward=cfg.reward, out=out, device=cfg.device(m),
        seed=cfg.run_seed(i, m), resume=resume, force=out.exists() and not resume, progress=progress,
    )
    try:
        return TypeAdapter(RLConfig).validate_python({**cfg.rl_options(m), **fields})
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(x) for x in err["loc"])
        raise WarpError(f"RL option '{key}' of run {m}: {err['msg']}") from None


def _check_rl_configs(config_path: Path, cfg: PipelineConfig) -> None:
    """Build every run's RLConfig once before any work, so a bad option fails in seconds, not hours."""
    from mergekit_warp.rl.launch import LaunchSpec, check

    for m in range(1, cfg.runs + 1):
        try:
            rl_cfg = _rl_config(cfg, 1, m, Path(cfg.init), Path("/nonexistent/out"), resume=False, progress=False)
        except WarpError as e:
            raise WarpError(f"config {config_path}: {e}") from None
        if len(cfg.group(m)) > 1:  # a data-parallel run: the batch must split evenly over the group
            try:
                check(LaunchSpec(nproc=len(cfg.group(m))), rl_cfg.batch_size, rl_cfg.device)
            except WarpError as e:
                raise WarpError(f"config {config_path}: run {m} on devices {list(cfg.group(m))}: {e}") from None


def _open_manifest(run_dir: Path, cfg: PipelineConfig, config_path: Path, resume: bool) -> Manifest:
    if resume:
        if not (run_dir / MANIFEST).is_file():
            raise WarpError(f"--resume: {run_dir} has no {MANIFEST}; run without --resume to start it")
        manifest = Manifest.load(run_dir)
        if manifest.config_hash != cfg.digest():
            raise WarpError(f"--resume: {config_path} differs from the config {run_dir} was started with; "
                            "restore it or start a new run folder with -o")
        return manifest
    if run_dir.exists() and any(run_dir.iterdir()):
        raise WarpError(f"run folder {run_dir} already exists; pass --resume to continue it or choose another -o")
    if run_dir.exists() and not run_dir.is_dir():
        raise WarpError(f"run folder {run_dir} is a file; choose another -o")
    run_dir.mkdir(parents=True, exist_ok=True)  # `runs/` need not exist on a fresh clone
    shutil.copy2(config_path, run_dir / "config.yaml")
    manifest = Manifest(run_dir, cfg.model_dump(mode="json"), cfg.digest())
    manifest.save()
    return manifest


def _clean_stale_temps(run_dir: Path) -> None:
    """Remove temporary folders left by a killed publish (`.NAME.tmp-PID-…`); finished outputs and
    RL state folders (`run_m.partial/`) are kept."""
    for d in [run_dir, *run_dir.glob("iter_*")]:
        for tmp in d.glob(".*.tmp-*"):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)


def _guarded(manifest: Manifest, name: str, fn):
    """Run fn; on failure record it in the manifest and re-raise (Ctrl-C included)."""
    try:
        return fn()
    except BaseException as e:
        manifest.fail(name, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
        raise


def _rl_metrics(out: Path) -> dict[str, Any]:
    """Last logged step of an RL run (reward, KL, ...), for `warp pipeline status`."""
    from mergekit_warp.pipeline.status import live_metrics

    return {k: v for k, v in live_metrics(out).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _maybe_kill(name: str) -> None:
    if os.environ.get(KILL_AFTER_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _spawn():
    import multiprocessing

    return multiprocessing.get_context("spawn")


class _Log:
    """Step lines on stderr (stdout is kept for results)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.t0 = time.time()

    def __call__(self, msg: str) -> None:
        if self.enabled:
            print(f"[warp pipeline {time.time() - self.t0:7.1f}s] {msg}", file=sys.stderr, flush=True)
