"""`warp eval`: score checkpoints (the default), `warp eval pareto RUN_DIR`, `warp eval sxs A B`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperGroup

from mergekit_warp.cli.common import user_errors
from mergekit_warp.cli.pipeline import quiet_transformers


class _ScoreByDefault(TyperGroup):
    """`warp eval CKPT …` means `warp eval score CKPT …`: any first argument that is not a
    sub-command name (or --help) is routed to `score`."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["score", *args]
        return super().parse_args(ctx, args)


def _floats(text: str, option: str) -> list[float]:
    from mergekit_warp.errors import WarpError

    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise WarpError(f"{option} {text!r}: give comma-separated numbers, e.g. 0,0.3,1") from None


def register(app: typer.Typer) -> None:
    """Add the `warp eval` group to the top-level app."""
    ev = typer.Typer(cls=_ScoreByDefault, no_args_is_help=True,
                     help="Evaluate policies: `warp eval CKPT… --init SFT --prompts P --reward R` (reward and KL), "
                          "`warp eval pareto RUN_DIR`, `warp eval sxs A B`.")

    @ev.command("score")
    def score_cmd(
        checkpoints: list[Path] = typer.Argument(..., help="Policy folders to score."),
        init: Path = typer.Option(..., "--init", help="θ_sft: the reference of KL(π‖π_sft)."),
        prompts: Path = typer.Option(..., "--prompts", help="Held-out prompts (JSONL)."),
        reward: str = typer.Option(..., "--reward", help="Reward spec, as for `warp rl --reward`."),
        out: Path = typer.Option(Path("warp_eval"), "-o", "--out", help="Writes OUT.csv and OUT.json."),
        samples_per_prompt: int = typer.Option(2, min=1, help="Completions per prompt and checkpoint."),
        max_new_tokens: int = typer.Option(64, min=1),
        temperature: float = typer.Option(0.9, min=1e-6, help="Sampling temperature (KL uses the same)."),
        length_penalty: float = typer.Option(0.0, min=0.0, help="Subtracted per completion token, as in `warp rl`."),
        max_prompts: Optional[int] = typer.Option(None, min=1, help="Use only the first N prompts."),
        seed: int = typer.Option(1234, help="Sampling seed (the same for every checkpoint)."),
        device: str = typer.Option("cpu"),
    ) -> None:
        """Mean reward and KL(π‖π_sft) with standard errors for each CHECKPOINT: a table, CSV and JSON."""
        from rich.console import Console

        from mergekit_warp.eval.score import EvalSettings, evaluate, scores_table, write_scores

        quiet_transformers()
        with user_errors():
            settings = EvalSettings(prompts=prompts, reward=reward, max_new_tokens=max_new_tokens, temperature=temperature,
                                    samples_per_prompt=samples_per_prompt, max_prompts=max_prompts,
                                    length_penalty=length_penalty, seed=seed, device=device)
            scores = evaluate(checkpoints, init, settings)
            paths = write_scores(scores, out)
        Console(stderr=True).print(scores_table(scores))
        print("\n".join(map(str, paths)))

    @ev.command("pareto")
    def pareto_cmd(
        run_dir: Path = typer.Argument(..., help="A run folder of `warp pipeline run`."),
        etas: Optional[str] = typer.Option(None, help="LITI η values, comma-separated (default: the config's; >1 extrapolates)."),
        out: Optional[Path] = typer.Option(None, "-o", "--out", help="Output folder (default RUN_DIR/eval)."),
        force: bool = typer.Option(False, "--force", help="Overwrite an existing output folder."),
        device: Optional[str] = typer.Option(None, help="Default: the config's first device."),
    ) -> None:
        """KL–reward front of every iteration (RL runs, SLERP, LITI sweep): pareto.csv, pareto.png, summary."""
        from mergekit_warp.eval.pareto import pareto

        quiet_transformers()
        with user_errors():
            result = pareto(run_dir, etas=_floats(etas, "--etas") if etas else None, out=out, force=force, device=device)
        print(result.summary)
        print(result.csv)
        print(result.png)

    @ev.command("sxs")
    def sxs_cmd(
        a: Path = typer.Argument(..., help="Policy A (positive scores favour A)."),
        b: Path = typer.Argument(..., help="Policy B."),
        prompts: Path = typer.Option(..., "--prompts"),
        judge: str = typer.Option(..., "--judge", help="Reward spec (pointwise: r(A)−r(B)) or a 3-argument callable f(prompts, a, b)."),
        thresholds: str = typer.Option("0.05,0.25,0.5", help="Margins for slightly better / better / much better (±0.5/±1/±1.5)."),
        samples_per_prompt: int = typer.Option(1, min=1),
        max_new_tokens: int = typer.Option(64, min=1),
        temperature: float = typer.Option(0.9, min=1e-6),
        max_prompts: Optional[int] = typer.Option(None, min=1),
        seed: int = typer.Option(0),
        device: str = typer.Option("cpu"),
    ) -> None:
        """Side-by-side: mean score in [−1.5, 1.5] with a bootstrap 95% interval and win/tie/loss counts."""
        from mergekit_warp.eval.sxs import sxs

        quiet_transformers()
        with user_errors():
            r = sxs(a, b, prompts, judge, thresholds=tuple(_floats(thresholds, "--thresholds")),
                    samples_per_prompt=samples_per_prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                    seed=seed, max_prompts=max_prompts, device=device)
        print(f"SxS {a} vs {b}: {r.mean:+.3f}  95% CI [{r.ci_low:+.3f}, {r.ci_high:+.3f}]  "
              f"win/tie/loss {r.wins}/{r.ties}/{r.losses}  (n={r.n}, thresholds {r.thresholds})")

    app.add_typer(ev, name="eval")
