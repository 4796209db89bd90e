"""The `warp` command line. Each sub-module holds thin commands: parse, call one library function, print."""

from __future__ import annotations

import typer

from mergekit_warp.cli import eval as eval_cli
from mergekit_warp.cli import merge as merge_cli
from mergekit_warp.cli import pipeline as pipeline_cli
from mergekit_warp.cli import rl as rl_cli

app = typer.Typer(
    help="WARP: RL fine-tuning with EMA anchors, SLERP of task vectors and LITI, on a streaming merge engine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
merge_cli.register(app)
rl_cli.register(app)
pipeline_cli.register(app)
eval_cli.register(app)


def main() -> None:
    app()
