"""Files of an RL run: the work folder that makes it resumable, HF checkpoints, the metrics log.

Layout while running (OUT itself appears only at the end, atomically):

    OUT.partial/
      config.json          every RLConfig option of the run (checked on --resume)
      state/               the last resumable state, replaced atomically (io.atomic.staged):
        policy.safetensors     policy parameters (fp32 master weights when the policy runs in bf16/fp16)
        anchor.safetensors     fp32 EMA anchor (absent for --anchor init: it is the init)
        optimizer.safetensors  Adam's moments and step counts, keyed `PARAM_INDEX.NAME`
        optimizer.json         Adam's hyper-parameters (param groups); safetensors + JSON carry no code
        progress.json          {"step": K} = optimiser steps done
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
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mergekit_warp.errors import WarpError
from mergekit_warp.io.atomic import recover, staged, write_atomic
from mergekit_warp.io.publish import copy_support_files, set_config_dtype
from mergekit_warp.lm.models import quiet_transformers
from mergekit_warp.rl.dist_state import copy_full_into, shard_optimizer_state

STATE = "state"


def partial_dir(out: Path) -> Path:
    return Path(out).parent / f"{Path(out).name}.partial"


def write_hf(model, src: Path, folder: Path, state_dict: dict | None = None, dtype: torch.dtype | None = None) -> None:
    """Save `model` as an HF folder with the source folder's config/tokenizer files, unchanged.
    `state_dict`: the weights to write instead of the model's own (gathered from FSDP shards, or cast);
    `dtype`: theirs, when it is not the model's (config.json says so)."""
    copy_support_files(Path(src), folder)
    kwargs = {"state_dict": dict(state_dict)} if state_dict is not None else {}  # HF pops from it: copy
    with quiet_transformers():  # no "Writing model shards" bar for every checkpoint
        model.save_pretrained(folder, **kwargs)  # after the copy: config.json must describe the saved dtype
    # transformers may write the weights through a private (0600) temporary file: give them the mode of
    # the config.json it wrote beside them with a plain open() (the process's umask, read without setting it)
    if dtype is not None:
        set_config_dtype(folder, dtype)
    mode = (Path(folder) / "config.json").stat().st_mode & 0o777
    for f in Path(folder).glob("*.safetensors*"):
        os.chmod(f, mode)


def cast(named: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`named` in `dtype`, tensors that shared memory (tied embeddings) still one tensor."""
    done: dict[int, torch.Tensor] = {}
    out = {}
    for k, v in named.items():
        if v.data_ptr() not in done:
            done[v.data_ptr()] = v.to(dtype)
        out[k] = done[v.data_ptr()]
    return out


def _cpu(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in named.items()}


def save_state(
    work: Path, step: int, policy: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor] | None, optimizer: dict
) -> None:
    """Write the resumable state (see the module docstring); a crash leaves the old state or the new.
    `optimizer`: an optimizer state dict with full tensors."""
    tensors, meta = {}, {"param_groups": optimizer["param_groups"], "state": {}}
    for i, st in optimizer["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{i}.{k}"] = v.detach().contiguous().cpu()
            else:
                meta["state"].setdefault(str(i), {})[k] = v
    with staged(work / STATE, replace=True) as tmp:
        save_file(_cpu(policy), tmp / "policy.safetensors")
        if anchor is not None:
            save_file(_cpu(anchor), tmp / "anchor.safetensors")
        save_file(tensors, tmp / "optimizer.safetensors")
        (tmp / "optimizer.json").write_text(json.dumps(meta))
        (tmp / "progress.json").write_text(json.dumps({"step": step, "time": time.time()}))


def repair(work: Path) -> None:
    """Finish or undo a state save that a kill interrupted (call it holding the run's lock)."""
    recover(work / STATE)


def state_step(work: Path) -> int | None:
    """Optimiser steps done by the saved state; None if there is none."""
    if not (work / STATE).is_dir():
        return None
    try:
        return int(json.loads((work / STATE / "progress.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        raise damaged(work, "state/progress.json") from None


def saved_step(work: Path) -> int | None:
    """`state_step`, or None when the state is missing or unreadable (for messages)."""
    try:
        return state_step(work)
    except WarpError:
        return None


def damaged(work: Path, what: str) -> WarpError:
    return WarpError(
        f"the resumable state in {work} is damaged ({what} is missing or unreadable); "
        "rerun with --force to start the run over"
    )


@torch.no_grad()
def load_state(
    work: Path,
    policy: dict[str, torch.Tensor],
    anchor: dict[str, torch.Tensor] | None,
    optimizer: torch.optim.Optimizer,
) -> int:
    """Copy the saved state into the live tensors (in place) and return the step it was taken at.
    Files hold full tensors; FSDP-sharded tensors take their own shard (any --nproc can resume)."""
    folder = work / STATE
    step = state_step(work)
    if step is None:
        raise damaged(work, "state/")
    try:
        for named, f in ((policy, "policy"), (anchor, "anchor")):
            if named is None:
                continue
            saved = load_file(folder / f"{f}.safetensors")
            for k, v in named.items():
                copy_full_into(v, saved[k])
        meta = json.loads((folder / "optimizer.json").read_text())
        state: dict[int, dict] = {}
        for key, v in load_file(folder / "optimizer.safetensors").items():
            i, k = key.split(".", 1)
            state.setdefault(int(i), {})[k] = v
        for i, st in meta["state"].items():
            state.setdefault(int(i), {}).update(st)
        optimizer.load_state_dict(
            shard_optimizer_state(optimizer, {"state": state, "param_groups": meta["param_groups"]})
        )
    except (OSError, SafetensorError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise damaged(work, f"{folder.name}/: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return step


def read_config(work: Path) -> dict:
    try:
        cfg = json.loads((work / "config.json").read_text())
    except (OSError, ValueError):
        raise damaged(work, "config.json") from None
    if not isinstance(cfg, dict):
        raise damaged(work, "config.json")
    return cfg


def start_work(work: Path, config: dict) -> None:
    """A fresh work folder holding the run's config."""
    shutil.rmtree(work, ignore_errors=True)
    (work / "checkpoints").mkdir(parents=True)
    write_atomic(work / "config.json", json.dumps(config, indent=2))


def trim_after(work: Path, step: int) -> None:
    """Drop metrics lines and checkpoints from steps after `step` (they will be redone identically)."""
    log = work / "metrics.jsonl"
    if log.is_file():
        keep = []
        for ln in log.read_text(errors="replace").splitlines():
            try:
                if json.loads(ln)["step"] <= step:
                    keep.append(ln)
            except (json.JSONDecodeError, KeyError, TypeError):
                pass  # a line cut short by a kill
        write_atomic(log, "".join(ln + "\n" for ln in keep))
    ckpts = work / "checkpoints"
    ckpts.mkdir(exist_ok=True)
    for ck in ckpts.iterdir():
        # later steps, and temporary folders of a checkpoint whose writing was killed
        if not (ck.name.startswith("step_") and ck.name[5:].isdigit()) or int(ck.name[5:]) > step:
            shutil.rmtree(ck) if ck.is_dir() else ck.unlink()


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
