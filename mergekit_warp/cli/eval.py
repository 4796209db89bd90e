"""`warp eval`: score checkpoints (the default), `warp eval pareto RUN_DIR`, `warp eval sxs A B`. The
sampling options of `score` and `sxs` are generated from `EvalSettings`, shared with the pipeline."""

from __future__ import annotations

import inspect
import math
import sys
import typing
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup

from mergekit_warp import trackers
from mergekit_warp.cli.common import user_errors, with_parameters
from mergekit_warp.errors import WarpError, build
from mergekit_warp.eval.settings import EvalSettings
from mergekit_warp.pipeline.layout import PARETO_FILES


class _ScoreByDefault(TyperGroup):
    """`warp eval CKPT …` means `warp eval score CKPT …`: any first argument that is not a
    sub-command name (or --help) is routed to `score`."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["score", *args]
        return super().parse_args(ctx, args)


eval_app = typer.Typer(
    rich_markup_mode=None,
    cls=_ScoreByDefault,
    no_args_is_help=True,
    help="Evaluate policies: `warp eval CKPT… --init SFT --prompts P --reward R` (reward and KL), "
    "`warp eval pareto RUN_DIR`, `warp eval sxs A B`.",
)


def _floats(text: str, option: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) for v in values):
        raise WarpError(f"{option} {text!r}: give comma-separated finite numbers, e.g. 0,0.3,1")
    return values


def _sweep(text: str) -> tuple[float, ...]:
    """`--etas` of `warp eval score`: distinct η ≥ 0 (η > 1 extrapolates), as `warp liti` takes them."""
    etas = _floats(text, "--etas")
    if any(e < 0 for e in etas) or len(set(etas)) != len(etas):
        raise WarpError(f"--etas {text!r}: give distinct values ≥ 0, e.g. 0.1,0.3,0.5,0.8,1.3")
    return tuple(etas)


def _param(name: str, annotation, default) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def _sampling(like: bool, skip: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """An option per `EvalSettings` field, unset by default (so a value given on the command line can be
    told from a default), its help stating the default that applies."""
    plain = EvalSettings().resolved()
    params = []
    for name, f in EvalSettings.model_fields.items():
        if name in skip:
            continue
        kind = next((a for a in typing.get_args(f.annotation) if a is not type(None)), f.annotation)
        value = getattr(plain, name)
        shown = "every prompt" if value is None else f"{value:g}" if isinstance(value, float) else str(value)
        if f.default is None and value is not None:
            shown = f"{shown}, warp rl's"
        shown += "; with --like: the run's" if like else ""
        option = typer.Option(
            None, "--" + name.replace("_", "-"), help=f"{f.description.removesuffix('.')} (default: {shown})."
        )
        params.append(_param(name, Optional[kind], option))
    return params


def _given(o: dict) -> dict:
    """The sampling options given on the command line."""
    return {k: o[k] for k in EvalSettings.model_fields if o.get(k) is not None}


QUIET = _param("quiet", bool, typer.Option(False, "--quiet", "-q", help="No progress lines on stderr."))
REPORT_HELP = (
    "Also send the results to these experiment trackers: tensorboard, wandb, trackio, mlflow "
    "(repeat or comma-separate; each needs its extra)."
)
REPORT = _param(
    "report_to", Optional[list[str]], typer.Option(None, "--report-to", help=REPORT_HELP, metavar="TRACKER")
)


def _report(given, name: str, config: dict, rows: list[dict], files: list[Path]) -> None:
    """`trackers.report`, its failures as one line."""
    with user_errors():
        trackers.report(given, name, config, rows, files)


FORCE = _param("force", bool, typer.Option(False, "--force", help="Replace an existing output folder."))


def score_cmd(**o) -> None:
    """Mean reward and KL(π‖π_sft) ± standard error of each CHECKPOINT on held-out prompts: a table,
    and with -o OUT the folder OUT/ (scores.csv; scores.json with the settings used; samples.jsonl).

    Without --like the sampling defaults are warp rl's (64 new tokens, temperature 0.9, no length
    penalty), which are not a pipeline's evaluation settings: to score exactly as a run's Pareto
    evaluation does (same prompts, reward, settings, device), pass --like RUN_DIR."""
    from rich.console import Console

    from mergekit_warp.eval.score import score_checkpoints, scores_table
    from mergekit_warp.eval.settings import make_recipe

    with user_errors():
        trackers.check(o["report_to"])
        etas = _sweep(o["etas"]) if o["etas"] is not None else ()
        recipe = make_recipe(
            like=o["like"],
            init=o["init"],
            prompts=o["prompts"],
            reward=o["reward"],
            device=o["device"],
            options=_given(o),
        )
        ev = score_checkpoints(o["checkpoints"], recipe, o["out"], etas=etas, force=o["force"], progress=not o["quiet"])
    table = scores_table(ev.scores, caption=recipe.describe())
    stream = sys.stdout if ev.out is None else sys.stderr  # the table is the result only without -o
    # In a log or a pipe, full lines rather than a table folded to 80 columns.
    Console(file=stream, width=None if stream.isatty() else 200).print(table)
    if ev.out is not None:
        print(ev.out)
    _report(
        o["report_to"],
        "eval-score",
        {"recipe": recipe.describe(), "checkpoints": [str(c) for c in o["checkpoints"]]},
        [
            {"reward": x.reward, "reward_se": x.reward_se, "kl": x.kl, "kl_se": x.kl_se, "length": x.length}
            for x in ev.scores
        ],
        [ev.out / f for f in ("scores.csv", "scores.json")] if ev.out is not None else [],
    )


def sxs_cmd(**o) -> None:
    """Side-by-side: mean score in [−1.5, 1.5] with a bootstrap 95% interval and win/tie/loss counts,
    A and B sampled with common random numbers when they share a tokenizer (A against itself: exactly
    0). With -o OUT: OUT/sxs.json and OUT/pairs.jsonl (every pair, its margin and verdict)."""
    from mergekit_warp.eval.sxs import SPREADS, sxs

    with user_errors():
        trackers.check(o["report_to"])
        t = None if o["thresholds"].strip() == "auto" else tuple(_floats(o["thresholds"], "--thresholds"))
        settings = build(EvalSettings, _given(o))
        r = sxs(
            o["a"],
            o["b"],
            o["prompts"],
            o["judge"],
            settings,
            thresholds=t,
            device=o["device"],
            out=o["out"],
            force=o["force"],
            progress=not o["quiet"],
        )
    shown = ",".join(f"{x:.4g}" for x in r.thresholds)
    how = f" = {'/'.join(f'{x:g}' for x in SPREADS)} × σ" if r.auto else ""
    print(
        f"SxS {o['a']} vs {o['b']}: {r.mean:+.3f}  95% CI [{r.ci_low:+.3f}, {r.ci_high:+.3f}]  "
        f"win/tie/loss {r.wins}/{r.ties}/{r.losses}  (n={r.n}, thresholds {shown}{how})"
    )
    print(f"judge spread σ = {r.spread:.4g}; common random numbers: {'yes' if r.crn else 'no'} ({r.crn_note})")
    if r.out is not None:
        print(r.out)
    _report(
        o["report_to"],
        "eval-sxs",
        {"a": str(o["a"]), "b": str(o["b"]), "judge": str(o["judge"]), **settings.model_dump(mode="json")},
        [{"sxs": r.mean, "ci_low": r.ci_low, "ci_high": r.ci_high, "wins": r.wins, "ties": r.ties, "losses": r.losses}],
        [r.out / "sxs.json"] if r.out is not None else [],
    )


@eval_app.command("pareto")
def pareto_cmd(
    run_dir: Path = typer.Argument(..., help="A run folder of `warp pipeline run`."),
    etas: Optional[str] = typer.Option(
        None, help="LITI η values, comma-separated (default: the config's; >1 extrapolates)."
    ),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Output folder (default RUN_DIR/eval)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing output folder."),
    device: Optional[str] = typer.Option(None, help="Default: the config's first device."),
    report_to: Optional[list[str]] = typer.Option(None, "--report-to", help=REPORT_HELP, metavar="TRACKER"),
) -> None:
    """KL–reward front of every iteration (RL runs, SLERP, LITI sweep): pareto.csv, pareto.png, summary."""
    from mergekit_warp.pipeline.run import evaluate_run

    with user_errors():
        trackers.check(report_to)
        result = evaluate_run(
            run_dir, etas=_floats(etas, "--etas") if etas is not None else None, out=out, force=force, device=device
        )
    print(result.summary)
    print(result.csv)
    print(result.png)
    folder = Path(result.csv).parent
    _report(report_to, "eval-pareto", {"run_dir": str(run_dir)}, [result.headline], [folder / f for f in PARETO_FILES])


eval_app.command("score")(
    with_parameters(
        score_cmd,
        [
            _param(
                "checkpoints",
                list[Path],
                typer.Argument(..., help="Checkpoints to score: HF folders, hub ids or builtin model names."),
            ),
            _param(
                "etas",
                Optional[str],
                typer.Option(
                    None,
                    "--etas",
                    metavar="η,η,…",
                    help="Also score each checkpoint's LITI interpolations (1 − η)·θ_sft + η·θ toward --init at "
                    "these η (e.g. 0.1,0.3,0.5,0.8,1.3; η > 1 extrapolates), built in memory: nothing is written. "
                    "Rows are named CKPT@η.",
                ),
            ),
            _param(
                "like",
                Optional[Path],
                typer.Option(
                    None,
                    "--like",
                    help="A `warp pipeline run` folder: score as its Pareto evaluation does — its init, held-out "
                    "prompts, reward, evaluation settings and device. Options given here override them.",
                ),
            ),
            _param(
                "init",
                Optional[str],
                typer.Option(
                    None,
                    "--init",
                    help="θ_sft, the reference of KL(π‖π_sft): HF folder, hub id or builtin name "
                    "(required without --like; with --like: the run's).",
                ),
            ),
            _param(
                "prompts",
                Optional[Path],
                typer.Option(
                    None, "--prompts", help="Held-out prompts, JSONL (required without --like; with --like: the run's)."
                ),
            ),
            _param(
                "reward",
                Optional[str],
                typer.Option(
                    None,
                    "--reward",
                    help="Reward spec, as for `warp rl --reward` (required without --like; with --like: the run's).",
                ),
            ),
            _param(
                "out",
                Optional[Path],
                typer.Option(
                    None,
                    "-o",
                    "--out",
                    help="Output folder: OUT/scores.csv, OUT/scores.json (scores, settings, inputs with hashes), "
                    "OUT/samples.jsonl (one line per completion). Without it the table is printed and "
                    "nothing is written.",
                ),
            ),
            FORCE,
            _param(
                "device",
                Optional[str],
                typer.Option(
                    None,
                    "--device",
                    help="cpu, cuda or cuda:N (default: cpu; with --like: the run's evaluation device).",
                ),
            ),
            QUIET,
            REPORT,
            *_sampling(like=True),
        ],
    )
)
eval_app.command("sxs")(
    with_parameters(
        sxs_cmd,
        [
            _param("a", Path, typer.Argument(..., help="Policy A (positive scores favour A).")),
            _param("b", Path, typer.Argument(..., help="Policy B, compared with A.")),
            _param("prompts", Path, typer.Option(..., "--prompts", help="Prompts both policies answer (JSONL).")),
            _param(
                "judge",
                str,
                typer.Option(
                    ...,
                    "--judge",
                    help="Reward spec (pointwise: r(A)−r(B)) or a 3-argument callable f(prompts, a, b) "
                    "returning margins; a Python spec runs that code.",
                ),
            ),
            _param(
                "thresholds",
                str,
                typer.Option(
                    "auto",
                    help="Margins t1,t2,t3 for slightly better / better / much better (±0.5/±1/±1.5); a smaller "
                    "margin is a tie. auto: 1,2,3 × σ, the judge's spread between two answers of one policy "
                    "to one prompt (printed and recorded), below which a margin is noise. To compare several "
                    "SxS results, give fixed values, e.g. from a σ printed earlier.",
                ),
            ),
            _param(
                "out",
                Optional[Path],
                typer.Option(
                    None,
                    "-o",
                    "--out",
                    help="Output folder: OUT/sxs.json (result, thresholds, σ, settings, inputs with hashes) and "
                    "OUT/pairs.jsonl (per pair: prompt, both answers, judge scores, margin, verdict). Without "
                    "it only the result is printed.",
                ),
            ),
            FORCE,
            _param("device", str, typer.Option("cpu", "--device", help="cpu, cuda or cuda:N.")),
            QUIET,
            REPORT,
            *_sampling(like=False, skip=("length_penalty",)),
        ],
    )
)


def register(app: typer.Typer) -> None:
    """Add the `warp eval` group to the top-level app."""
    app.add_typer(eval_app, name="eval")
