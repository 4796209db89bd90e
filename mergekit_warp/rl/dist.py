"""torch.distributed helpers for `warp rl` under torchrun: data parallel (DDP) or fully sharded (FSDP2).

One process per device. torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; a
plain `warp rl` (no torchrun) is world size 1 and never touches torch.distributed, so every helper here
is a no-op (or the identity) there. NCCL on CUDA (rank r uses cuda:LOCAL_RANK), gloo on CPU.

How the RL loop stays equal to a 1-process run with the same global batch:
- `shard` gives each rank a contiguous share of the global prompt batch (k samples of one prompt stay
  on one rank, so RLOO baselines need no communication);
- each rank's loss is a mean over its LOCAL samples: DDP averages gradients over ranks, so the sum
  equals the gradient of the mean over the GLOBAL batch (equal shards);
- identical gradients → identical Adam steps → identical policies and EMA anchors on every rank
  (`check_replicas` verifies this at checkpoints);
- anything global (the batch-mean baseline, metrics, the KL stop decision) goes through
  `all_sum` / `reduce_mean` so every rank takes the same branch (a rank that leaves a collective
  early would hang the others).
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as tdist
from torch import nn

from mergekit_warp.errors import WarpError

PARALLEL_MODES = ("ddp", "fsdp")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    """Global rank, 0..world_size-1; rank 0 alone writes files."""
    world_size: int = 1
    """Number of processes (devices) in the job."""
    local_rank: int = 0
    """Rank on this node; picks the CUDA device."""
    device: str = "cpu"
    """The torch device this rank computes on ("cpu" or "cuda:LOCAL_RANK")."""

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise WarpError(f"environment variable {name}={raw!r} is not an integer; launch with torchrun") from None


def init_distributed(device: str = "cpu", timeout_s: float = 1800.0) -> DistInfo:
    """Join the torchrun job described by the environment (or return the 1-process `DistInfo`).

    `device` is the user's `--device`: under torchrun with world size > 1 it must be "cpu" (gloo) or
    "cuda" (NCCL; each rank takes cuda:LOCAL_RANK — restrict the visible GPUs with CUDA_VISIBLE_DEVICES,
    not with cuda:N). Idempotent: a process group that already exists is reused.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise WarpError(f"bad torchrun environment RANK={rank} WORLD_SIZE={world} LOCAL_RANK={local}")
    kind = device.split(":")[0]
    if world == 1:
        return DistInfo(0, 1, 0, device)
    if kind == "cpu":
        backend, dev = "gloo", "cpu"
    elif kind == "cuda":
        if device != "cuda":
            raise WarpError(
                f"--device {device}: under torchrun each rank uses cuda:LOCAL_RANK; pass --device cuda "
                "and choose the GPUs with CUDA_VISIBLE_DEVICES"
            )
        if not torch.cuda.is_available():
            raise WarpError("--device cuda under torchrun, but this machine has no CUDA; use --device cpu")
        if local >= torch.cuda.device_count():
            raise WarpError(f"LOCAL_RANK {local} but only {torch.cuda.device_count()} visible GPU(s); lower --nproc")
        backend, dev = "nccl", f"cuda:{local}"
        torch.cuda.set_device(local)
    else:
        raise WarpError(f"--device {device}: distributed runs support cpu (gloo) and cuda (nccl) only")
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise WarpError("WORLD_SIZE > 1 but MASTER_ADDR/MASTER_PORT are unset; launch with torchrun or warp rl --nproc")
    if not tdist.is_initialized():
        kwargs = {"device_id": torch.device(dev)} if backend == "nccl" else {}
        tdist.init_process_group(
            backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s), **kwargs
        )
    return DistInfo(rank, world, local, dev)


def teardown() -> None:
    """Leave the process group (safe to call when there is none)."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def is_main(info: DistInfo) -> bool:
    """True on the one rank that writes checkpoints, metrics, progress and the output folder."""
    return info.rank == 0


def barrier(info: DistInfo) -> None:
    if info.distributed:
        if info.device.startswith("cuda"):
            tdist.barrier(device_ids=[info.local_rank])
        else:
            tdist.barrier()


def shard(n: int, info: DistInfo, what: str = "--batch-size") -> slice:
    """This rank's contiguous share of a global batch of `n` items (rank r gets [r·n/W, (r+1)·n/W))."""
    if n % info.world_size:
        raise WarpError(
            f"{what} {n} is not divisible by the number of processes ({info.world_size}); "
            f"use a multiple of {info.world_size}"
        )
    per = n // info.world_size
    return slice(info.rank * per, (info.rank + 1) * per)


# ---------------------------------------------------------------------------------------------------
# Collectives on small host values


def all_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over ranks (returned on the tensor's original device, float64 for the reduction)."""
    if not info.distributed:
        return values
    buf = values.detach().to(device=info.device, dtype=torch.float64).clone()
    tdist.all_reduce(buf, op=tdist.ReduceOp.SUM)
    return buf.to(device=values.device, dtype=values.dtype)


def reduce_mean(metrics: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Mean of each metric over ranks (every rank must pass the same keys). Means of per-rank means
    equal global means because shards are equal; sum-type figures (tokens/s) multiply by world_size."""
    if not info.distributed or not metrics:
        return dict(metrics)
    keys = sorted(metrics)
    vals = all_sum(torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64), info)
    return {k: float(v) / info.world_size for k, v in zip(keys, vals.tolist())}


def plain_forwards_only(model: nn.Module) -> bool:
    """True for models whose forward calls must line up exactly: FSDP2 (each forward gathers weights
    with the other ranks) and DDP wrappers (one forward per backward). Rollout tricks that change the
    number of forwards with the batch (prefilling a shared prompt prefix once) are off for them."""
    return hasattr(model, "require_backward_grad_sync") or is_sharded(model)


def all_ranks_done(done: bool, model: nn.Module) -> bool:
    """`done` on every rank? Only asked of FSDP-sharded models, whose every forward all-gathers weights:
    all ranks must run the same number of forwards, so a rank whose samples all ended keeps stepping
    (on pads) until every rank is done. Anything else: `done` as is, no communication."""
    if not (tdist.is_available() and tdist.is_initialized()) or not is_sharded(model):
        return done
    flag = torch.tensor([int(done)], device=next(model.parameters()).device)
    tdist.all_reduce(flag, op=tdist.ReduceOp.MIN)
    return bool(flag.item())


def broadcast_object(obj, info: DistInfo):
    """Rank 0's `obj` on every rank (picklable objects; for small things like a resume step)."""
    if not info.distributed:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0, device=torch.device(info.device) if info.device != "cpu" else None)
    return box[0]


# ---------------------------------------------------------------------------------------------------
# Model wrapping


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks FSDP shards one by one (HF models name their class in `_no_split_modules`;
    none found → the model is sharded as one unit, which still splits its storage over the ranks)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def shard_model(model: nn.Module, info: DistInfo, compute_dtype: torch.dtype | None = None) -> nn.Module:
    """FSDP2: `fully_shard` each decoder layer, then the root (embeddings, final norm, head, tied
    weights). Parameters become DTensors holding 1/W of each tensor; forward all-gathers a layer at a
    time. Works for frozen models too (the anchor, the init). `compute_dtype` (e.g. bf16): the stored
    shards stay in their dtype (fp32 master weights for Adam) and are cast when gathered for compute;
    gradients are reduced in fp32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(info.device.split(":")[0], (info.world_size,))
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32 if compute_dtype else None)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    # FSDP2 keeps the ROOT's gathered weights after a forward (training gathers them again at once for
    # backward). A frozen model never runs backward, so they would stay gathered, and stale after an
    # in-place update of the shards (the EMA): reshard it after every forward.
    frozen = not any(p.requires_grad for p in model.parameters())
    fully_shard(model, mesh=mesh, mp_policy=mp, **({"reshard_after_forward": True} if frozen else {}))
    return model


def wrap_policy(
    model: nn.Module, info: DistInfo, mode: str = "ddp", compute_dtype: torch.dtype | None = None
) -> nn.Module:
    """Wrap the trainable policy for `mode` ("ddp" | "fsdp"); the identity in a 1-process run.

    DDP broadcasts rank 0's weights at construction, so all replicas start equal; generate with
    `unwrap(model)`, train through the wrapper (its backward all-reduces gradients). FSDP2 changes
    `model` in place (same object, parameters sharded; see `shard_model` for `compute_dtype`)."""
    if mode not in PARALLEL_MODES:
        raise WarpError(f"--parallel {mode}: choose one of {', '.join(PARALLEL_MODES)}")
    if not info.distributed:
        return model
    if mode == "fsdp":
        return shard_model(model, info, compute_dtype)
    from torch.nn.parallel import DistributedDataParallel

    ids = [info.local_rank] if info.device.startswith("cuda") else None
    # Buffers (rotary tables) are computed identically everywhere; no need to broadcast them per step.
    newer = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    sync = {"forward_sync_buffers": False} if newer else {"broadcast_buffers": False}
    ddp = DistributedDataParallel(model, device_ids=ids, **sync)
    if any(p.dtype != torch.float32 for p in model.parameters()):
        ddp.register_comm_hook(None, _fp32_allreduce)
    return ddp


def _fp32_allreduce(group, bucket):
    """DDP comm hook: average a bf16/fp16 gradient bucket in fp32 (summing 8 ranks in bf16 loses bits)."""
    group = group or tdist.group.WORLD
    buf = bucket.buffer()
    full = buf.float().div_(tdist.get_world_size(group))
    fut = tdist.all_reduce(full, group=group, async_op=True).get_future()

    def back(f):
        buf.copy_(f.value()[0])
        return buf

    return fut.then(back)


def unwrap(model: nn.Module) -> nn.Module:
    """The HF model inside a DDP wrapper (FSDP2 models are their own module)."""
    return model.module if hasattr(model, "require_backward_grad_sync") else model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(unwrap(model), FSDPModule)


@contextlib.contextmanager
def grad_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce / reduce-scatter on micro-batches that are not the last one of a
    step (gradient accumulation): communication once per step, same result."""
    if enabled:
        yield
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif is_sharded(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 DTensor (a view: in-place updates land in the parameter), or `t`."""
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def check_replicas(model: nn.Module, info: DistInfo, what: str = "policy") -> float:
    """Max |θ_rank − θ_rank0| over all parameters (all-reduced, so every rank gets it); raises
    RuntimeError when replicas differ at all. DDP replicas must stay bit-identical: any difference
    means a rank diverged (different data order, a non-deterministic op) and the run is invalid.
    Sharded (FSDP) models have no replicas: returns 0."""
    if not info.distributed or is_sharded(model):
        return 0.0
    worst = torch.zeros((), dtype=torch.float64, device=info.device)
    for p in unwrap(model).parameters():
        ref = p.detach().clone()
        tdist.broadcast(ref, src=0)
        worst = torch.maximum(worst, (p.detach().double() - ref.double()).abs().max())
    tdist.all_reduce(worst, op=tdist.ReduceOp.MAX)
    diff = float(worst)
    if diff != 0.0:
        raise RuntimeError(f"ranks disagree on the {what}: max |Δθ| = {diff:.3e} vs rank 0")
    return diff
