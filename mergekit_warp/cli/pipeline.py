"""`warp pipeline run|status`: the WARP loop (thin commands over mergekit_warp.pipeline)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from mergekit_warp.cli.common import user_errors


def register(app: typer.Typer) -> None:
    """Add `warp pipeline run` and `warp pipeline status` to the top-level app."""
    pipe = typer.Typer(
        rich_markup_mode=None,
        help="The WARP loop: M RL runs → SLERP → LITI, for I iterations, then the Pareto evaluation.",
        no_args_is_help=True,
    )

    @pipe.command("run")
    def run_cmd(
        config: Path = typer.Argument(..., help="Pipeline YAML (see examples/demo.yaml)."),
        out: Optional[Path] = typer.Option(None, "-o", "--out", help="Run folder (default: runs/CONFIG_STEM)."),
        resume: bool = typer.Option(
            False, "--resume", help="Continue a run folder: skip verified steps, redo the rest."
        ),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress on stderr."),
    ) -> None:
        """Run the WARP pipeline of CONFIG; print the Pareto summary and the final policy's path."""
        from mergekit_warp.pipeline.run import run_pipeline

        with user_errors():
            try:
                result = run_pipeline(config, out, resume=resume, progress=not quiet)
            except KeyboardInterrupt:
                where = out or Path("runs") / Path(config).stem
                print(
                    f"interrupted: the finished steps stay in {where}; run the same command with --resume to "
                    "continue (an interrupted RL run goes on from its last saved state)",
                    file=sys.stderr,
                )
                raise typer.Exit(130) from None
        if result.summary:
            print(result.summary)
        print(result.final)

    @pipe.command("status")
    def status_cmd(
        run_dir: Path = typer.Argument(..., help="A run folder of `warp pipeline run`."),
        as_json: bool = typer.Option(False, "--json", help="Print the status as JSON (for scripts)."),
        watch: bool = typer.Option(False, "--watch", "-w", help="Refresh until no step is running (Ctrl-C stops)."),
        every: float = typer.Option(5.0, "--every", min=0.5, help="Seconds between refreshes with --watch."),
    ) -> None:
        """Show each step of RUN_DIR: done, running (step N/T and the time left at its pace), interrupted,
        failed or pending, with key metrics."""
        import json
        import time

        from rich.console import Console
        from rich.live import Live

        from mergekit_warp.pipeline.status import status_rows, status_table

        with user_errors():
            data = status_rows(run_dir)
            if as_json:
                print(json.dumps(data, indent=1))
                return
            if not watch:
                Console().print(status_table(data))
                return
            try:
                with Live(status_table(data), auto_refresh=False) as live:
                    while any(r["status"] == "running" for r in data["steps"]):
                        time.sleep(every)
                        data = status_rows(run_dir)
                        live.update(status_table(data), refresh=True)
            except KeyboardInterrupt:  # the way to leave a watch: nothing to report
                return

    app.add_typer(pipe, name="pipeline")
