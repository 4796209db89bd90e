"""`warp push FOLDER REPO_ID`: upload a finished warp output to the Hugging Face hub."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from mergekit_warp.cli.common import user_errors


def push_cmd(
    folder: Path = typer.Argument(..., help="A finished warp output: a merge, an RL run's OUT, a pipeline's final/."),
    repo_id: str = typer.Argument(..., help="Model repo on the hub, e.g. you/warp-merge (created if missing)."),
    private: bool = typer.Option(False, "--private", help="Create the repo private (an existing repo keeps its own)."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch to commit to (created if missing)."),
) -> None:
    """Upload FOLDER to REPO_ID in one commit, with a model card from its provenance (method, parameters,
    inputs, the mergekit YAML of a merge, a pipeline's Pareto summary); prints the commit URL. Log in first
    (huggingface-cli login, or HF_TOKEN)."""
    from mergekit_warp.io.hub import push

    with user_errors():
        print(push(folder, repo_id, private=private, revision=revision))


def register(app: typer.Typer) -> None:
    app.command("push")(push_cmd)
