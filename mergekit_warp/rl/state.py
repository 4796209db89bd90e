"""Files of an RL run: the work folder that makes it resumable, HF checkpoints, the metrics log.

Layout while running (OUT itself appears only at the end, atomically):

    OUT.partial/
      config.json          every RLConfig option of the run (checked on --resume)
      state/               the last resumable state, replaced atomically (state.tmp → state):
        policy.safetensors   policy parameters (fp32 master weights when the policy runs in bf16/fp16)
        anchor.safetensors   fp32 EMA anchor (absent for --anchor init: it is the init)
        optimizer.pt         Adam moments and step counts
        progress.json        {"step": K} = optimiser steps done
      checkpoints/step_K/  HF folders of the policy (--save-every), hard-linked into OUT at the end
      metrics.jsonl        one JSON line per step; lines after the state's step are dropped on resume

All randomness of step K (prompt order, sampling) is a function of (seed, K, rank), so no RNG state is
saved: a resumed run draws exactly what the uninterrupted one would have.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mergekit_warp.io.publish import copy_support_files, publishing, write_provenance
from mergekit_warp.rl.dist_state import copy_full_into, shard_optimizer_state


def partial_dir(out: Path) -> Path:
    return Path(out).parent / f"{Path(out).name}.partial"


def write_hf(model, tokenizer, src: str, folder: Path, state_dict: dict | None = None) -> None:
    """Save `model` as an HF folder with the source's tokenizer files (unchanged when `src` is local).
    `state_dict`: the weights to write instead of the model's own (gathered from FSDP shards)."""
    if Path(src).is_dir():
        copy_support_files(Path(src), folder)
    else:
        tokenizer.save_pretrained(folder)
    kwargs = {"state_dict": dict(state_dict)} if state_dict is not None else {}  # HF pops from it: copy
    model.save_pretrained(folder, **kwargs)  # after the copy: config.json must describe the saved dtype


def write_checkpoint(
    model, tokenizer, src: str, folder: Path, step: int, params: dict, state_dict: dict | None = None
) -> None:
    """Publish checkpoints/step_K atomically (replacing one left by a run that died before its state)."""
    with publishing(folder, force=True) as tmp:
        write_hf(model, tokenizer, src, tmp, state_dict)
        write_provenance(tmp, "warp-rl-checkpoint", {**params, "step": step}, {"init": src})


def _tensors(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in named.items()}


def save_state(
    work: Path,
    step: int,
    policy: dict[str, torch.Tensor],
    anchor: dict[str, torch.Tensor] | None,
    optimizer: torch.optim.Optimizer | dict,
) -> None:
    """Write state.tmp/ completely, then swap it in: a crash leaves either the old or the new state.
    `optimizer`: the optimizer, or its state dict already gathered (`dist.optimizer_full_state`)."""
    tmp, cur, old = work / "state.tmp", work / "state", work / "state.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_tensors(policy), tmp / "policy.safetensors")
    if anchor is not None:
        save_file(_tensors(anchor), tmp / "anchor.safetensors")
    torch.save(optimizer if isinstance(optimizer, dict) else optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "progress.json").write_text(json.dumps({"step": step, "time": time.time()}))
    if cur.exists():
        shutil.rmtree(old, ignore_errors=True)
        cur.rename(old)
    tmp.rename(cur)
    shutil.rmtree(old, ignore_errors=True)


def state_folder(work: Path) -> Path | None:
    """The complete state, if any (state/, or state.old/ when a crash hit the swap)."""
    for name in ("state", "state.old"):
        if (work / name / "progress.json").is_file():
            return work / name
    return None


def load_step(folder: Path) -> int:
    return int(json.loads((folder / "progress.json").read_text())["step"])


@torch.no_grad()
def load_state(
    folder: Path,
    policy: dict[str, torch.Tensor],
    anchor: dict[str, torch.Tensor] | None,
    optimizer: torch.optim.Optimizer,
) -> int:
    """Copy a saved state into the live tensors (in place) and return the step it was taken at.
    Files hold full tensors; FSDP-sharded tensors take their own shard (any --nproc can resume)."""
    for named, f in ((policy, "policy"), (anchor, "anchor")):
        if named is None:
            continue
        saved = load_file(folder / f"{f}.safetensors")
        for k, v in named.items():
            copy_full_into(v, saved[k])
    osd = torch.load(folder / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(shard_optimizer_state(optimizer, osd))
    return load_step(folder)


def trim_after(work: Path, step: int) -> None:
    """Drop metrics lines and checkpoints from steps after `step` (they will be redone identically)."""
    log = work / "metrics.jsonl"
    if log.is_file():
        keep = []
        for ln in log.read_text().splitlines():
            try:
                if json.loads(ln)["step"] <= step:
                    keep.append(ln)
            except (json.JSONDecodeError, KeyError, TypeError):
                pass  # a line cut short by a kill
        log.write_text("".join(ln + "\n" for ln in keep))
    for ck in (work / "checkpoints").iterdir():
        # later steps, and temporary folders of a checkpoint whose writing was killed
        if not ck.name.startswith("step_") or int(ck.name.split("_")[1]) > step:
            shutil.rmtree(ck)


def append_metrics(work: Path, record: dict) -> None:
    with open(work / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps(record) + "\n")


def link_tree(src: Path, dst: Path) -> None:
    """Copy a folder by hard links (instant, no extra disk); plain copies across filesystems."""

    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)

    shutil.copytree(src, dst, copy_function=link)
