"""`warp eval`: score checkpoints (the default), `warp eval pareto RUN_DIR`, `warp eval sxs A B`. The
sampling options of `score` and `sxs` are generated from `EvalSettings`, shared with the pipeline."""

from __future__ import annotations

import inspect
import math
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup

from mergekit_warp.cli.common import options_from, user_errors, with_parameters
from mergekit_warp.errors import WarpError, build
from mergekit_warp.eval.settings import EvalSettings


class _ScoreByDefault(TyperGroup):
    """`warp eval CKPT …` means `warp eval score CKPT …`: any first argument that is not a
    sub-command name (or --help) is routed to `score`."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["score", *args]
        return super().parse_args(ctx, args)


eval_app = typer.Typer(
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


def _param(name: str, annotation, default) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def _settings(o: dict) -> EvalSettings:
    return build(EvalSettings, {k: o[k] for k in EvalSettings.model_fields})


DEVICE = _param("device", str, typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."))


def score_cmd(**o) -> None:
    """Mean reward and KL(π‖π_sft) with standard errors for each CHECKPOINT: a table, CSV and JSON."""
    from rich.console import Console

    from mergekit_warp.eval.score import check_output, evaluate, scores_table, write_scores
    from mergekit_warp.lm.rewards import reward_inputs

    with user_errors():
        settings = _settings(o)
        inputs = [*o["checkpoints"], o["init"], o["prompts"], *reward_inputs(o["reward"])]
        check_output(o["out"], inputs)  # before any model is loaded: a bad -o must not cost a whole evaluation
        scores = evaluate(o["checkpoints"], o["init"], o["prompts"], o["reward"], settings, o["device"])
        paths = write_scores(scores, o["out"])
    Console(stderr=True).print(scores_table(scores))
    print("\n".join(map(str, paths)))


def sxs_cmd(**o) -> None:
    """Side-by-side: mean score in [−1.5, 1.5] with a bootstrap 95% interval and win/tie/loss counts."""
    from mergekit_warp.eval.sxs import sxs

    with user_errors():
        thresholds = tuple(_floats(o["thresholds"], "--thresholds"))
        r = sxs(o["a"], o["b"], o["prompts"], o["judge"], _settings(o), thresholds=thresholds, device=o["device"])
    print(
        f"SxS {o['a']} vs {o['b']}: {r.mean:+.3f}  95% CI [{r.ci_low:+.3f}, {r.ci_high:+.3f}]  "
        f"win/tie/loss {r.wins}/{r.ties}/{r.losses}  (n={r.n}, thresholds {r.thresholds})"
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
) -> None:
    """KL–reward front of every iteration (RL runs, SLERP, LITI sweep): pareto.csv, pareto.png, summary."""
    from mergekit_warp.pipeline.run import evaluate_run

    with user_errors():
        result = evaluate_run(
            run_dir, etas=_floats(etas, "--etas") if etas else None, out=out, force=force, device=device
        )
    print(result.summary)
    print(result.csv)
    print(result.png)


_SAMPLING = options_from(EvalSettings)
eval_app.command("score")(
    with_parameters(
        score_cmd,
        [
            _param("checkpoints", list[Path], typer.Argument(..., help="Policy folders to score.")),
            _param("init", Path, typer.Option(..., "--init", help="θ_sft: the reference of KL(π‖π_sft).")),
            _param("prompts", Path, typer.Option(..., "--prompts", help="Held-out prompts (JSONL).")),
            _param("reward", str, typer.Option(..., "--reward", help="Reward spec, as for `warp rl --reward`.")),
            _param("out", Path, typer.Option(Path("warp_eval"), "-o", "--out", help="Writes OUT.csv and OUT.json.")),
            DEVICE,
            *_SAMPLING,
        ],
    )
)
eval_app.command("sxs")(
    with_parameters(
        sxs_cmd,
        [
            _param("a", Path, typer.Argument(..., help="Policy A (positive scores favour A).")),
            _param("b", Path, typer.Argument(..., help="Policy B.")),
            _param("prompts", Path, typer.Option(..., "--prompts", help="Prompts (JSONL).")),
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
                    "0.05,0.25,0.5", help="Margins for slightly better / better / much better (±0.5/±1/±1.5)."
                ),
            ),
            DEVICE,
            *_SAMPLING,
        ],
    )
)


def register(app: typer.Typer) -> None:
    """Add the `warp eval` group to the top-level app."""
    app.add_typer(eval_app, name="eval")
