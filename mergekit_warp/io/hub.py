"""`warp push`: upload a finished `warp` output (a merge, an RL policy, a pipeline's `final/`) to the
Hugging Face hub with `huggingface_hub`, in one commit, with a model card written from its provenance:
method, parameters, inputs, the mergekit YAML that reproduces a merge, and for a pipeline's `final/` the
Pareto summary of its run. The folder itself is not modified (the card is uploaded from memory)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mergekit_warp.errors import WarpError
from mergekit_warp.io.publish import PROVENANCE, card_lines, pruned_hint

MERGEKIT_YAML = "merge_config.yml"


def check_repo_id(repo_id: str) -> str:
    """`repo_id` if the hub would accept it as a model repo id (checked before any work), else a WarpError."""
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except Exception as e:
        raise WarpError(
            f"repo id {repo_id!r} is not valid on the hub ({str(e).splitlines()[0]}); use NAME/REPO"
        ) from None
    if "/" not in repo_id:
        raise WarpError(f"repo id {repo_id!r}: give the owner too, NAME/REPO")
    return repo_id


def finished_output(folder: Path) -> dict[str, Any]:
    """The provenance record of `folder`, or a WarpError saying why it is not a finished `warp` output."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WarpError(f"{folder}: not a folder; give the output folder of a warp command")
    if folder.name.endswith(".partial"):
        raise WarpError(f"{folder}: an unfinished run's work folder; finish it (--resume) and push its output")
    try:
        record = json.loads((folder / PROVENANCE).read_text())
    except (OSError, ValueError):
        raise WarpError(
            f"{folder}: no readable {PROVENANCE}, so not a finished warp output; push the output of warp merge, "
            "warp rl or a pipeline's final/"
        ) from None
    if not isinstance(record, dict) or record.get("tool") != "mergekit-warp":
        raise WarpError(f"{folder}/{PROVENANCE} was not written by mergekit-warp; nothing pushed")
    if not any(folder.glob("*.safetensors")):
        raise WarpError(f"{folder}: no .safetensors weights; nothing to push{pruned_hint(folder)}")
    return record


def model_card(folder: Path, record: dict[str, Any]) -> str:
    """README.md for the hub: the card every output carries, plus the mergekit YAML and, for a pipeline's
    `final/`, its Pareto summary."""
    lines = card_lines(record)
    yml = folder / MERGEKIT_YAML
    if yml.is_file():
        lines += ["## Reproduce with mergekit", "", "```yaml", yml.read_text().rstrip(), "```", ""]
    summary = folder.parent / "eval" / "summary.txt"
    if folder.name == "final" and (folder.parent / "run.json").is_file() and summary.is_file():
        lines += ["## WARP run: Pareto summary", "", "```", summary.read_text().rstrip(), "```", ""]
    return "\n".join(lines)


def push(folder: Path | str, repo_id: str, *, private: bool = False, revision: str | None = None, api=None) -> str:
    """Upload `folder` to model repo `repo_id` (created if missing; branch `revision` too) in one commit;
    return the commit's URL. `api`: an `HfApi` (default: one with the saved or `HF_TOKEN` login)."""
    folder = Path(folder)
    record = finished_output(folder)
    check_repo_id(repo_id)
    from huggingface_hub import CommitOperationAdd, HfApi

    files = [
        p
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "README.md" and not any(s.startswith(".") for s in p.relative_to(folder).parts)
    ]
    ops = [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p)) for p in files]
    ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=model_card(folder, record).encode()))
    api = api or HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(
            repo_id,
            operations=ops,
            commit_message=f"{record.get('method', 'warp')} output, uploaded with mergekit-warp",
            revision=revision,
        )
    except Exception as e:  # HTTP errors, no login, no network (httpx's own errors): one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WarpError(
            f"push of {folder} to {repo_id} failed: {first}; check the repo id, your login (huggingface-cli login "
            "or HF_TOKEN) and the network"
        ) from None
    return str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}")
