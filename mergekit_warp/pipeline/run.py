"""The WARP loop (Algorithm 1 of the paper), resumable.

    θ_init ← θ_sft
    for i in 1..I:
        θ_m  ← RL(θ_init, seed_m)            m = 1..M   → iter_i/run_m/
        θ_s  ← SLERP(θ_init, {θ_m})                     → iter_i/slerp/   (M = 1: θ_s = θ_1)
        θ_init ← (1 − η)·θ_target + η·θ_s               → iter_i/liti/    (last iteration: final/)
        Pareto evaluation of iterations 1..i            → iter_i/eval/    (last iteration: eval/)
        delete the weights no later step reads, unless `keep:` names them

Stages exchange folders (the layout is pipeline/layout.py); `run.json` (manifest.py) records each
step. Every input is checked before the run folder is created. With `resume`, an iteration whose
steps are all finished (or pruned) with their recorded hashes is skipped, and so is any other step
whose record is `done` and whose output and inputs still have their recorded hashes; anything else is
redone (an interrupted RL run continues from its own saved state). Every output is published
atomically, and the run folder is locked while a process works in it.
"""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergekit_warp import trackers
from mergekit_warp.errors import WarpError
from mergekit_warp.io.adapter import is_adapter
from mergekit_warp.io.atomic import claim
from mergekit_warp.io.publish import check_disjoint, content_fingerprint, mark_pruned
from mergekit_warp.pipeline.config import PipelineConfig, load_config
from mergekit_warp.pipeline.layout import CONFIG, PARETO_FILES, Layout
from mergekit_warp.pipeline.manifest import Manifest
from mergekit_warp.pipeline.status import disk_bytes
from mergekit_warp.progress import Log, size


@dataclass(frozen=True)
class PipelineResult:
    run_dir: Path
    final: Path
    summary: str | None
    """The Pareto evaluation's summary text (None when evaluation is disabled)."""


def run_pipeline(
    config_path: Path, run_dir: Path | None = None, *, resume: bool = False, progress: bool = True
) -> PipelineResult:
    """Run (or resume) the WARP pipeline described by `config_path` into `run_dir`."""
    config_path = Path(config_path)
    cfg = load_config(config_path)
    run_dir = (Path(run_dir) if run_dir is not None else Path("runs") / config_path.stem).absolute()
    if run_dir.exists() and not run_dir.is_dir():
        raise WarpError(f"run folder {run_dir} is a file; choose another -o")
    sft = preflight(config_path, cfg)  # every input checked before anything is written
    check_disjoint(
        run_dir, [sft, config_path, cfg.prompts.train, *filter(None, [cfg.prompts.heldout]), *_reward_inputs(cfg)]
    )
    run_dir.parent.mkdir(parents=True, exist_ok=True)  # `runs/` need not exist on a fresh clone
    with claim(run_dir):
        return _run(cfg, config_path, run_dir, sft, resume, Log(progress, "warp pipeline"))


def _run(cfg: PipelineConfig, config_path: Path, run_dir: Path, sft: Path, resume: bool, log: Log) -> PipelineResult:
    lay = Layout(run_dir, cfg.iterations, cfg.runs)
    manifest = _open_manifest(lay, cfg, config_path, resume)
    first = _first_todo(cfg, lay, manifest, sft, log) if resume else 1
    init = sft
    for i in range(1, cfg.iterations + 1):
        steps = _inputs(cfg, lay, i, init, sft)
        if i < first:
            log(f"iter_{i}: done (verified), skipped")
            if cfg.eval.enabled:  # its evaluation, redrawn from the stored scores if it went missing
                _pareto_step(cfg, lay, manifest, sft, i, log)
        else:
            (run_dir / f"iter_{i}").mkdir(exist_ok=True)
            runs = _rl_runs(cfg, lay, manifest, i, init, resume, log)

            # -- SLERP of the M task vectors (M = 1: the single run is the "merge")
            merged = lay.merged(i)
            if cfg.runs > 1:
                _merge_step(
                    manifest,
                    lay,
                    "slerp",
                    steps[lay.name(merged)],
                    merged,
                    log,
                    lambda out, force, init=init, runs=runs: _slerp(cfg, runs, init, out, force),
                )

            # -- LITI toward the iteration's init (Algorithm 1) or θ_sft → next init
            last = i == cfg.iterations
            eta = cfg.liti.final_eta if (last and cfg.liti.final_eta is not None) else cfg.liti.eta
            out = lay.liti(i)
            target = steps[lay.name(out)]["target"]
            _merge_step(
                manifest,
                lay,
                "liti",
                steps[lay.name(out)],
                out,
                log,
                lambda o, force, merged=merged, target=target, init=init, eta=eta: _liti(
                    merged, target, init, sft, o, eta, force, log
                ),
            )
            if cfg.eval.enabled:
                _pareto_step(cfg, lay, manifest, sft, i, log)
        _prune(cfg, lay, manifest, i, log)
        init = lay.liti(i)

    summary = (lay.eval / "summary.txt").read_text() if cfg.eval.enabled else None
    steps = [(n, disk_bytes(run_dir / n), manifest.pruned(run_dir / n)) for n, _ in lay.steps(cfg.eval.enabled)]
    log(
        "disk: "
        + ", ".join(f"{n} {size(b)}" + (" (pruned)" if pruned else "") for n, b, pruned in steps)
        + f"; {size(disk_bytes(run_dir))} in all"
    )
    log(f"done: final policy {lay.final}")
    if cfg.push_to_hub:
        from mergekit_warp.io.hub import push

        log(f"pushed {lay.final} to the hub: {push(lay.final, cfg.push_to_hub)}")
    return PipelineResult(run_dir=run_dir, final=lay.final, summary=summary)


def _inputs(cfg: PipelineConfig, lay: Layout, i: int, init: Path, sft: Path) -> dict[str, dict[str, Path]]:
    """The inputs of every step of iteration i (whose init is `init`), by step name."""
    out: dict[str, dict[str, Path]] = {lay.name(r): {"init": init} for r in lay.runs_of(i)}
    if cfg.runs > 1:
        out[lay.name(lay.merged(i))] = {"init": init, **{f"run_{m}": r for m, r in enumerate(lay.runs_of(i), 1)}}
    out[lay.name(lay.liti(i))] = {"merged": lay.merged(i), "target": init if cfg.liti.target == "init" else sft}
    if cfg.lora and i > 1:  # LITI on adapters also reads the init (the adapter's base and its stack/)
        out[lay.name(lay.liti(i))]["init"] = init
    if cfg.eval.enabled:
        out[lay.name(lay.eval_of(i))] = {"latest": lay.liti(i)}
    return out


def _first_todo(cfg: PipelineConfig, lay: Layout, manifest: Manifest, sft: Path, log: Log) -> int:
    """The first iteration a resumed run must work on (I + 1 when none): every step of the iterations
    before it is finished or pruned with the recorded inputs, and evaluated (or its evaluation can be
    redrawn from the stored scores). An iteration whose init was pruned starts from the iteration
    before it, which makes that init again."""
    first, init = cfg.iterations + 1, sft
    for i in range(1, cfg.iterations + 1):
        steps = _inputs(cfg, lay, i, init, sft)
        evals = {lay.name(lay.eval_of(i))} if cfg.eval.enabled else set()
        done = all(manifest.is_done(n, ins, or_pruned=True) for n, ins in steps.items() if n not in evals)
        if not done or (evals and not _evaluated(cfg, lay, manifest, sft, i)):
            first = i
            break
        init = lay.liti(i)
    while 1 < first <= cfg.iterations and manifest.pruned(lay.liti(first - 1)):
        log(
            f"{lay.name(lay.liti(first - 1))}: deleted, and iteration {first} needs it: iteration {first - 1} is made again"
        )
        first -= 1
    return first


def _evaluated(cfg: PipelineConfig, lay: Layout, manifest: Manifest, sft: Path, i: int) -> bool:
    """Iteration i's evaluation is there, or can be redrawn from the scores stored without sampling a
    checkpoint that was deleted."""
    out = lay.eval_of(i)
    if _eval_done(lay, manifest, i):
        return True
    try:
        evaluate_run(lay.root, cfg=cfg, sft=sft, manifest=manifest, upto=i, out=out, force=True, check_only=True)
    except WarpError:
        return False
    return True


def _prune(cfg: PipelineConfig, lay: Layout, manifest: Manifest, i: int, log: Log) -> None:
    """Once iteration i is merged and evaluated: delete the weights no later step reads (the manifest
    says so first, so a kill halfway is finished by --resume), and the RL runs' --save-every
    checkpoints, except what `keep:` names. Without evaluation nothing is deleted: nothing was scored."""
    if not cfg.eval.enabled:
        return
    for path in lay.prune(i, cfg.keep):
        name = lay.name(path)
        if manifest.steps[name].status == "done":
            manifest.prune(name)
        if manifest.pruned(path) and (freed := _drop_weights(path)):
            log(f"{name}: weights deleted ({size(freed)}); `keep:` in the config keeps them")
    if "checkpoints" not in cfg.keep:
        for run in lay.runs_of(i):
            shutil.rmtree(run / "checkpoints", ignore_errors=True)


def _drop_weights(folder: Path) -> int:
    """Delete the safetensors weights (and their index) at the top of `folder`, noting it in its
    model card; returns the bytes freed."""
    files = [*folder.glob("*.safetensors"), *folder.glob("*.safetensors.index.json")]
    freed = sum(f.stat().st_size for f in files)
    for f in files:
        f.unlink()
    if files:
        mark_pruned(folder)
    return freed


# ----------------------------------------------------------------------------------------------------
# Before anything is written


def preflight(config_path: Path, cfg: PipelineConfig) -> Path:
    """Check every input of the run (RL options of every run, the init and its tokenizer, both prompt
    files and their lengths, the reward, held-out prompts of the RL runs) and return θ_sft's folder."""
    from mergekit_warp.lm.models import load_tokenizer, model_context, model_folder
    from mergekit_warp.lm.prompts import check_lengths, read_prompts
    from mergekit_warp.lm.rewards import check_reward
    from mergekit_warp.rl.lora import check_targets

    def where(e: WarpError) -> WarpError:
        return WarpError(f"config {config_path}: {e}")

    try:
        runs = rl_configs(cfg)  # options first: no file is read for a typo
        for rc in runs:  # tracker libraries too (the runs' trackers include the pipeline's)
            trackers.check(rc.report_to)
        sft = model_folder(cfg.init, "init")
        for rc in runs:
            if rc.lora:
                check_targets(sft, rc.lora_targets, str(cfg.init))
        tok = load_tokenizer(sft)
        context = model_context(sft)
        check_reward(cfg.reward)
        # per file: the most new tokens any use of it asks for, and the prompt-length limit every use
        # applies (only RL training truncates prompts; evaluation reads them whole: None)
        files: dict[Path, tuple[int, int | None]] = {}

        def use(path: Path, new_tokens: int, limit: int | None) -> None:
            n, lim = files.get(Path(path), (0, limit))
            files[Path(path)] = (max(n, new_tokens), None if lim is None or limit is None else max(lim, limit))

        for rl in runs:
            use(rl.prompts, rl.max_new_tokens, rl.max_prompt_length)
            if rl.eval_prompts is not None:
                use(rl.eval_prompts, rl.max_new_tokens, None)
        if cfg.eval.enabled:
            settings = cfg.eval.resolved(cfg.rl)
            use(cfg.prompts.heldout or cfg.prompts.train, settings.max_new_tokens, None)
        for path, (new_tokens, limit) in files.items():
            prompts = read_prompts(path, tok)
            if context:
                check_lengths(prompts, tok, context, new_tokens, path, limit)
    except WarpError as e:
        raise where(e) from None
    return sft


def rl_configs(cfg: PipelineConfig) -> list:
    """The RLConfig of every run of the first iteration (option types and ranges; a data-parallel
    group must split the batch evenly), without reading any file."""
    from mergekit_warp.rl.launch import LaunchSpec, check

    out = []
    for m in range(1, cfg.runs + 1):
        rl = _rl_config(cfg, 1, m, Path(cfg.init), Path("/nonexistent/out"), resume=False, progress=False)
        if len(cfg.group(m)) > 1:
            check(LaunchSpec(nproc=len(cfg.group(m))), rl.batch_size, rl.device)
        out.append(rl)
    return out


def _reward_inputs(cfg: PipelineConfig) -> list[Path]:
    from mergekit_warp.lm.rewards import reward_inputs

    return reward_inputs(cfg.reward)


def _open_manifest(lay: Layout, cfg: PipelineConfig, config_path: Path, resume: bool) -> Manifest:
    if resume:
        if not lay.manifest.is_file():
            raise WarpError(f"--resume: {lay.root} has no {lay.manifest.name}; run without --resume to start it")
        manifest = Manifest.load(lay.root)
        if manifest.config_hash != cfg.digest():
            raise WarpError(
                f"--resume: {config_path} differs from the config {lay.root} was started with; "
                "restore it or start a new run folder with -o"
            )
        return manifest
    if lay.root.exists() and any(lay.root.iterdir()):
        raise WarpError(f"run folder {lay.root} already exists; pass --resume to continue it or choose another -o")
    lay.root.mkdir(exist_ok=True)
    shutil.copy2(config_path, lay.root / CONFIG)
    manifest = Manifest(lay.root, cfg.model_dump(mode="json"), cfg.digest())
    manifest.save()
    return manifest


# ----------------------------------------------------------------------------------------------------
# Steps


def _rl_runs(
    cfg: PipelineConfig, lay: Layout, manifest: Manifest, i: int, init: Path, resume: bool, log: Log
) -> list[Path]:
    """Run the M RL runs of iteration i (skipping finished ones); return their output folders."""
    runs = lay.runs_of(i)
    todo = []
    for m, out in enumerate(runs, 1):
        name = lay.name(out)
        if manifest.is_done(name, {"init": init}):
            log(f"{name}: done (verified), skipped")
            continue
        prior = manifest.steps.get(name)
        # Continue the run's own saved state only if it was started from this very init (a pruned
        # run is made again).
        same_init = (
            prior is not None
            and prior.status != "pruned"
            and prior.inputs.get("init", {}).get("hash") == manifest.current_hash(init)
        )
        rl_cfg = _rl_config(
            cfg, i, m, init, out, resume=resume and same_init, progress=log.enabled and not cfg.parallel
        )
        todo.append((name, m, rl_cfg))

    if not cfg.parallel:
        for name, m, rl_cfg in todo:
            group = cfg.group(m)
            log(f"{name}: RL on {','.join(group)}, seed {rl_cfg.seed}, {rl_cfg.steps} steps")
            manifest.start(name, "rl", {"init": init}, device=",".join(group))
            _guarded(manifest, name, lambda rl_cfg=rl_cfg, group=group: _train(rl_cfg, group))
            manifest.finish(name, rl_cfg.out, _rl_metrics(rl_cfg.out))
        return runs

    # Parallel: one worker process per entry of `devices` (a device or a group), each running its
    # entry's runs in order (spawned, so CUDA initialises cleanly in the child; it dies with this
    # process); only this process writes the manifest.
    import multiprocessing

    from mergekit_warp.rl.launch import die_with_parent

    slot = lambda m: (m - 1) % len(cfg.devices)  # noqa: E731
    pools = {
        s: ProcessPoolExecutor(
            max_workers=1, mp_context=multiprocessing.get_context("spawn"), initializer=die_with_parent
        )
        for s in dict.fromkeys(slot(m) for _, m, _ in todo)
    }
    try:
        futures = {}
        for name, m, rl_cfg in todo:
            group = cfg.group(m)
            log(f"{name}: RL on {','.join(group)}, seed {rl_cfg.seed}, {rl_cfg.steps} steps (parallel)")
            manifest.start(name, "rl", {"init": init}, device=",".join(group))
            futures[name] = (pools[slot(m)].submit(_timed_train, rl_cfg, group), rl_cfg)
        errors = []
        for name, (fut, rl_cfg) in futures.items():
            try:
                _, started, finished = fut.result()
            except BaseException as e:  # record every failure, then raise the first
                manifest.fail(name, f"{type(e).__name__}: {e}")
                errors.append(e)
                continue
            manifest.finish(name, rl_cfg.out, _rl_metrics(rl_cfg.out), started=started, finished=finished)
            log(f"{name}: done")
        if errors:
            raise errors[0]
    finally:
        for p in pools.values():
            p.shutdown(cancel_futures=True)
    return runs


def _merge_step(manifest: Manifest, lay: Layout, kind: str, inputs: dict[str, Path], out: Path, log: Log, make) -> None:
    name = lay.name(out)
    if manifest.is_done(name, inputs):
        log(f"{name}: done (verified), skipped")
        return
    log(f"{name}: {kind}")
    manifest.start(name, kind, inputs)
    _guarded(manifest, name, lambda: make(out, out.exists()))
    manifest.finish(name, out)


def _pareto_step(cfg: PipelineConfig, lay: Layout, manifest: Manifest, sft: Path, i: int, log: Log) -> None:
    """The Pareto evaluation of iterations 1..i, into iter_i/eval/ (eval/ after the last): points
    scored by an earlier evaluation are taken from it."""
    out = lay.eval_of(i)
    name, inputs = lay.name(out), {"latest": lay.liti(i)}
    if _eval_done(lay, manifest, i):
        log(f"{name}: done (verified), skipped")
        return
    log(f"{name}: Pareto evaluation of iteration(s) 1..{i} on {cfg.eval_device}")
    manifest.start(name, "pareto", inputs, device=cfg.eval_device)

    def progress(done: int, total: int) -> None:  # shown by `warp pipeline status`
        manifest.steps[name].metrics = {"points_done": done, "points_total": total}
        manifest.save()

    result = _guarded(
        manifest,
        name,
        lambda: evaluate_run(
            lay.root,
            cfg=cfg,
            sft=sft,
            manifest=manifest,
            upto=i,
            out=out,
            force=True,
            progress=log.enabled,
            on_point=progress,
        ),
    )
    manifest.finish(name, None, result.headline)
    if i == cfg.iterations:
        trackers.report(
            cfg.report_to,
            "pareto",
            cfg.model_dump(mode="json"),
            [result.headline],
            [out / f for f in PARETO_FILES],
            group=lay.root.name,
            first_step=cfg.iterations,
        )


def _eval_done(lay: Layout, manifest: Manifest, i: int) -> bool:
    """Iteration i's evaluation is recorded done, from its iteration's LITI as it is now, and every file
    of it is there."""
    out = lay.eval_of(i)
    return manifest.is_done(lay.name(out), {"latest": lay.liti(i)}) and all((out / f).is_file() for f in PARETO_FILES)


def evaluate_run(
    run_dir: Path,
    *,
    cfg: PipelineConfig | None = None,
    sft: Path | None = None,
    manifest: Manifest | None = None,
    upto: int | None = None,
    etas: list[float] | None = None,
    out: Path | None = None,
    force: bool = False,
    device: str | None = None,
    progress: bool = True,
    on_point=None,
    check_only: bool = False,
):
    """The Pareto evaluation of every finished iteration (up to `upto`) of run folder `run_dir`
    (`warp eval pareto`), with the run's own held-out prompts, reward and evaluation settings. Points
    already scored by the run's evaluations are reused: checkpoints pruned since are needed only for
    new points (other η, device or settings). `check_only`: only check that it can be made."""
    from mergekit_warp.eval.pareto import SCORES, Iteration, load_scores, pareto
    from mergekit_warp.lm.models import model_folder

    run_dir = Path(run_dir)
    if manifest is None:
        if not (run_dir / "run.json").is_file():
            raise WarpError(
                f"{run_dir} is not a pipeline run folder (no run.json); pass the -o folder of `warp pipeline run`"
            )
        manifest = Manifest.load(run_dir)
    cfg = cfg or PipelineConfig.model_validate(manifest.config)
    sft = sft or model_folder(cfg.init, "init")
    lay = Layout(run_dir, cfg.iterations, cfg.runs)
    ready = lambda p: manifest.pruned(p) or (p / "config.json").is_file() or is_adapter(p)  # noqa: E731
    iterations, init = [], sft
    for i in range(1, (upto or cfg.iterations) + 1):
        if not all(ready(p) for p in [*lay.runs_of(i), lay.merged(i)]):
            break
        last = i == cfg.iterations
        final = lay.final if last and ready(lay.final) else None
        iterations.append(Iteration(i, init, lay.runs_of(i), lay.merged(i), final))
        if not ready(lay.liti(i)):
            break
        init = lay.liti(i)
    if not iterations:
        raise WarpError(f"{run_dir}: no iteration has finished its RL runs and merge yet; nothing to evaluate")
    settings = cfg.eval.resolved(cfg.rl)
    penalty = f" − {settings.length_penalty:g}·tokens" if settings.length_penalty else ""
    hashes: dict[Path, str] = {}

    def key_of(p: Path) -> str:  # a step's recorded hash; θ_sft's content
        if p not in hashes:
            hashes[p] = manifest.current_hash(p) if manifest.owner(p) else content_fingerprint(p)
        return hashes[p]

    return pareto(
        sft,
        iterations,
        cfg.prompts.heldout or cfg.prompts.train,
        cfg.reward,
        settings,
        Path(out) if out is not None else lay.eval,
        etas=list(etas if etas is not None else cfg.eval.etas),
        target=cfg.eval.target,
        force=force,
        device=device or cfg.eval_device,
        progress=progress,
        title=f"WARP Pareto front ({Path(cfg.init).name}, reward: {Path(cfg.reward).name}{penalty})",
        on_point=on_point,
        known=load_scores([lay.eval_of(j) / SCORES for j in range(1, cfg.iterations + 1)]),
        key_of=key_of,
        gone=lambda p: (
            "had its weights deleted by the pipeline once evaluated (`keep:` in the config keeps them)"
            if manifest.pruned(p)
            else None
        ),
        check_only=check_only,
    )


def _slerp(cfg: PipelineConfig, runs: list[Path], init: Path, out: Path, force: bool) -> Path:
    from mergekit_warp.merge import api

    lam = cfg.slerp.lam if cfg.slerp.lam is not None else 0.5
    return api.slerp(runs, init, out, lam=lam, granularity=cfg.slerp.granularity, force=force, progress=False)


def _liti(merged: Path, target: Path, init: Path, sft: Path, out: Path, eta: float, force: bool, log: Log) -> Path:
    """LITI of the iteration's merge toward `target`. On LoRA adapters (`merged` an adapter of `init`)
    the result is a full model, the next RL runs' base (see `_stack` for final/adapter/)."""
    from mergekit_warp.merge import api

    if not is_adapter(merged):
        return api.liti(merged, target, out, eta=eta, force=force, progress=False)
    if target == init:  # θ_init + η·δ, exactly
        api.liti(merged, init, out, eta=eta, densify=True, force=force, progress=False)
    else:  # toward θ_sft: (1 − η)·θ_sft + η·(θ_init + δ), the adapter applied to its base on the fly
        api.liti(f"{init}+{merged}", target, out, eta=eta, force=force, progress=False)
    skipped = _stack(merged, init, sft, out, eta, toward_sft=target != init)
    if skipped:
        log(f"{out.name}: no {STACK}/ ({skipped}); the full model holds the policy")
    return out


STACK = "adapter"


def _stack(merged: Path, init: Path, sft: Path, out: Path, eta: float, toward_sft: bool) -> str | None:
    """OUT/adapter/: θ_out − θ_sft as one LoRA adapter of θ_sft, exact up to the rounding of the inits
    to the model's dtype. LITI is linear, so with δ_i the merged adapter of iteration i and S_{i−1} the
    previous stack: S_i = S_{i−1} + η·δ_i toward the init, η·(S_{i−1} + δ_i) toward θ_sft. Its rank
    grows by Σ r_m per iteration; it is written only while its factors are smaller than the layers
    they change (beyond that the full model is the smaller form). Returns why it was not written, if not."""
    from mergekit_warp.io.adapter import read_adapter, write_adapter
    from mergekit_warp.io.atomic import staged
    from mergekit_warp.io.publish import write_provenance
    from mergekit_warp.merge import lora
    from mergekit_warp.merge.adapters import sample_of

    delta = read_adapter(merged).modules
    prev = read_adapter(init / STACK).modules if (init / STACK).is_dir() else {}
    if init != sft and not prev:
        return f"the stack of {init.name} was not written"
    a, b = (eta, eta) if toward_sft else (1.0, eta)
    stack = {
        n: lora.combine(
            [c for c, part in ((a, prev.get(n)), (b, delta.get(n))) if part is not None],
            [part for part in (prev.get(n), delta.get(n)) if part is not None],
        )
        for n in sorted({*prev, *delta})
    }
    big = [n for n, f in stack.items() if f.rank * sum(f.shape) >= f.shape[0] * f.shape[1]]
    if big:
        return f"its rank {stack[big[0]].rank} would make {big[0]}'s factors larger than the layer"
    sample = sample_of(sft, sorted(stack))
    with staged(out / STACK, replace=True) as tmp:
        write_adapter(tmp, stack, str(sft))
        write_provenance(
            tmp,
            "warp-pipeline-stack",
            {"base_sample": sample, "ranks_out": sorted({f.rank for f in stack.values()})},
            {"base": sft, "merged": merged},
            [f"the policy as a LoRA adapter of {sft}: rank {max(f.rank for f in stack.values())}"],
        )
    return None


def _train(rl_cfg, group: tuple[str, ...] = ("cpu",)) -> Path:
    """One RL run: in this process on one device, or under torchrun on a device group (its workers'
    output goes to OUT.log beside the run's folder)."""
    if len(group) == 1:
        from mergekit_warp.rl.train import train

        return train(rl_cfg)
    from mergekit_warp.rl.launch import train_on_group

    return train_on_group(rl_cfg, group, log=Path(rl_cfg.out).with_suffix(".log"))


def _timed_train(rl_cfg, group: tuple[str, ...]) -> tuple[Path, float, float]:
    """`_train` in a worker process, with the times it started and ended there."""
    t0 = time.time()
    return _train(rl_cfg, group), t0, time.time()


# ----------------------------------------------------------------------------------------------------
# Plumbing


def _rl_config(cfg: PipelineConfig, i: int, m: int, init: Path, out: Path, *, resume: bool, progress: bool):
    """The RLConfig of run m of iteration i (types and ranges checked by RLConfig)."""
    from mergekit_warp.rl.config import make_config

    fields = dict(
        model=str(init),
        prompts=cfg.prompts.train,
        reward=cfg.reward,
        out=out,
        device=cfg.device(m),
        seed=cfg.run_seed(i, m),
        resume=resume,
        force=out.exists() and not resume,
        progress=progress,
        run_name=f"{out.parent.name}/{out.name}",  # iter_i/run_m, grouped by the run folder
        run_group=out.parent.parent.name,
    )
    fields["save_anchor"] = "anchor" in cfg.keep
    if cfg.report_to:  # the pipeline's trackers (else an rl: report_to of its own, if any)
        fields["report_to"] = list(cfg.report_to)
    section = "rl" if not cfg.per_run or not cfg.per_run[m - 1] else f"rl/per_run.{m - 1}"
    return make_config({**cfg.rl_options(m), **fields}, where=section)


def _guarded(manifest: Manifest, name: str, fn):
    """Run fn; on failure record it in the manifest and re-raise (an interruption as such)."""
    try:
        return fn()
    except KeyboardInterrupt:
        manifest.interrupt(name)
        raise
    except BaseException as e:
        manifest.fail(name, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
        raise


def _rl_metrics(out: Path) -> dict[str, Any]:
    """Last logged step of an RL run (reward, KL, ...), for `warp pipeline status`."""
    from mergekit_warp.pipeline.status import live_metrics

    return {k: v for k, v in live_metrics(out).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
