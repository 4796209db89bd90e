"""The `warp` command line. Each sub-module holds thin commands: parse, call one library function, print."""

from __future__ import annotations

import typer

from mergekit_warp.cli import eval as eval_cli
from mergekit_warp.cli import generate as generate_cli
from mergekit_warp.cli import merge as merge_cli
from mergekit_warp.cli import pipeline as pipeline_cli
from mergekit_warp.cli import push as push_cli
from mergekit_warp.cli import rl as rl_cli

app = typer.Typer(
    rich_markup_mode=None,
    help="WARP: RL fine-tuning with EMA anchors, SLERP of task vectors and LITI, on a streaming merge engine.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from mergekit_warp import __version__

        print(f"warp {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", help="Print warp's version and exit.", is_eager=True, callback=_version
    ),
) -> None:
    pass


merge_cli.register(app)
rl_cli.register(app)
pipeline_cli.register(app)
eval_cli.register(app)
generate_cli.register(app)
push_cli.register(app)


def main() -> None:
    """`warp`: usage errors in one line (exit 2), SIGTERM unwinds like Ctrl-C (temporary folders are
    removed), and a `warp rl` started by a pipeline worker dies with it."""
    import os
    import signal
    import sys

    from mergekit_warp.rl.launch import DIE_WITH_PARENT, die_with_parent, under_torchrun

    if os.environ.pop(DIE_WITH_PARENT, None):
        die_with_parent()
    if not under_torchrun():  # torchrun stops its workers with SIGTERM: let them die quietly
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        code = app(standalone_mode=False)
    except typer.Abort:
        sys.exit(130)
    except Exception as e:
        if not hasattr(e, "format_message"):  # not click's (typer's) own usage/parameter error
            raise
        if type(e).__name__.startswith("NoArgsIsHelp"):  # a bare group: its help, as `--help` prints it
            print(e.format_message())
            sys.exit(getattr(e, "exit_code", 2))
        ctx, msg = getattr(e, "ctx", None), " ".join(e.format_message().split())
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        if msg:  # click's "no arguments: here is the help" has printed the help and carries no message
            print(f"error: {msg}{hint}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 2))
    sys.exit(code if isinstance(code, int) else 0)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
