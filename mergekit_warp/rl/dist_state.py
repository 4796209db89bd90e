"""Full CPU tensors ↔ FSDP2 shards, for the resumable state of a distributed `warp rl` run.

The state files always hold FULL tensors (gathered from the shards by rank 0's peers, written by rank
0), and loading cuts each rank's shard locally. So a run can resume with another number of processes
or another --parallel mode, and a 1-process run can resume a distributed one (and vice versa).
Gathers are collectives: every rank calls them, in the same order.
"""

from __future__ import annotations

import torch


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A plain CPU copy of `t`; an FSDP2 DTensor is gathered first (collective: all ranks call it)."""
    t = t.detach()
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).to("cpu", copy=True).contiguous()


def full_tensors(named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`full_tensor` of each value, in a fixed order so every rank issues the same collectives."""
    return {k: full_tensor(named[k]) for k in sorted(named)}


def optimizer_full_state(opt: torch.optim.Optimizer) -> dict:
    """`opt.state_dict()` with every state tensor gathered to a full CPU tensor: the same file whatever
    the number of ranks or the parallel mode, so a run can resume with another --nproc / --parallel."""
    osd = opt.state_dict()
    state = {
        i: {k: full_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in sorted(st.items())}
        for i, st in sorted(osd["state"].items())
    }
    return {"state": state, "param_groups": osd["param_groups"]}


@torch.no_grad()
def copy_full_into(live: torch.Tensor, full: torch.Tensor) -> None:
    """Load a full tensor into a live parameter: this rank's shard of it for a DTensor, all of it else."""
    if hasattr(live, "to_local"):
        from torch.distributed.tensor import distribute_tensor

        # src_data_rank=None: every rank holds `full` already and cuts its own shard (no communication).
        part = distribute_tensor(full.to(live.dtype), live.device_mesh, live.placements, src_data_rank=None)
        live.to_local().copy_(part.to_local())
    else:
        live.copy_(full)


def shard_optimizer_state(opt: torch.optim.Optimizer, osd: dict) -> dict:
    """A full optimizer state (see `optimizer_full_state`) made loadable by `opt`: state tensors shaped
    like a sharded parameter become DTensors sharded like it; the identity without DTensors."""
    from torch.distributed.tensor import distribute_tensor

    params = [p for g in opt.param_groups for p in g["params"]]
    state = {}
    for i, st in osd["state"].items():
        p = params[int(i)]
        if not hasattr(p, "to_local"):
            state[i] = st
            continue
        state[i] = {
            k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
            if isinstance(v, torch.Tensor) and v.shape == p.shape
            else v
            for k, v in st.items()
        }
    return {"state": state, "param_groups": osd["param_groups"]}
