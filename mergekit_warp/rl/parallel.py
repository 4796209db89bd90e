"""The two things the RL loop does differently by setting, each behind one small object:

- `Parallel`: one process, DDP or FSDP2 (see dist.py for how each keeps the 1-process result): where
  models load and live, what the loss runs through, this rank's share of a batch, reductions, and how
  full tensors are gathered for saving. With one process every method is the identity or a no-op.
- `MasterWeights`: Adam's fp32 weights. An fp32 policy (or FSDP's fp32 shards) is its own master; a
  bf16/fp16 policy gets fp32 copies (a bf16 weight cannot absorb a 1e-6 step) whose gradients come
  from the policy and which are copied back into it after each step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mergekit_warp.rl import dist, dist_state


@dataclass(frozen=True)
class Parallel:
    info: dist.DistInfo
    mode: str
    """'single', 'ddp' or 'fsdp'."""
    compute_dtype: torch.dtype
    """The policy's compute dtype (FSDP casts its fp32 shards to it when gathering)."""

    @classmethod
    def start(cls, device: str, parallel: str, compute_dtype: torch.dtype) -> Parallel:
        """Join the torchrun job the environment describes (world size 1 without torchrun)."""
        info = dist.init_distributed(device)
        return cls(info, parallel if info.distributed else "single", compute_dtype)

    # -- where things are ---------------------------------------------------------------------------

    @property
    def is_main(self) -> bool:
        """The one rank that writes files and prints."""
        return dist.is_main(self.info)

    @property
    def fsdp(self) -> bool:
        return self.mode == "fsdp"

    @property
    def world_size(self) -> int:
        return self.info.world_size

    def device(self, requested: str) -> str:
        """This rank's device: the requested one, or cuda:LOCAL_RANK / cpu under torchrun."""
        return self.info.device if self.info.distributed else requested

    def load_device(self, requested: str) -> str:
        """Where models are read to: FSDP reads into CPU memory and shards from there (a model larger
        than one device fits); otherwise straight to the device."""
        return "cpu" if self.fsdp else self.device(requested)

    def policy_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype the policy is stored in: FSDP keeps fp32 shards (Adam's master weights) and
        computes in `dtype`."""
        return torch.float32 if self.fsdp else dtype

    def place(self, model: nn.Module) -> nn.Module:
        """A frozen model (anchor, init, reward model) as this mode keeps it: FSDP-sharded like the
        policy (the EMA then stays shard-local), else as is."""
        return dist.shard_model(model, self.info) if self.fsdp else model

    def wrap(self, policy: nn.Module) -> nn.Module:
        """What the loss runs through: the DDP wrapper (its backward all-reduces gradients), the
        FSDP2-sharded policy itself, or the policy."""
        if self.mode == "single":
            return policy
        mp = self.compute_dtype if self.fsdp and self.compute_dtype != torch.float32 else None
        return dist.wrap_policy(policy, self.info, self.mode, compute_dtype=mp)

    def share(self, n: int) -> slice:
        """This rank's contiguous share of a global batch of n prompts."""
        return dist.shard(n, self.info)

    # -- forwards that must line up across ranks ------------------------------------------------------

    @staticmethod
    def share_prefix(model: nn.Module) -> bool:
        """May a prompt prefix common to all rows be run once? Not for DDP wrappers and FSDP models,
        whose forward calls must match across ranks one for one."""
        return not dist.plain_forwards_only(model)

    @staticmethod
    def all_done(model: nn.Module):
        """For sampling: a sharded model keeps stepping until every rank's rows have ended."""
        return lambda done: dist.all_ranks_done(done, model)

    @staticmethod
    def grad_sync(trainer: nn.Module, enabled: bool):
        """Communicate gradients only on the last micro-batch of a step."""
        return dist.grad_sync(trainer, enabled)

    # -- reductions ---------------------------------------------------------------------------------

    def all_sum(self, x: torch.Tensor) -> torch.Tensor:
        return dist.all_sum(x, self.info)

    def mean_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        return dist.reduce_mean(metrics, self.info)

    def all_finite(self, tensors: list[torch.Tensor]) -> bool:
        """Whether every tensor (this rank's shards) is finite, on every rank: one fused norm per tensor
        (a norm that overflows counts as non-finite: weights that large are as broken)."""
        local = [dist.local_tensor(t).detach() for t in tensors]
        ok = (
            torch.stack(torch._foreach_norm(local)).isfinite().all().double().cpu()
            if local
            else torch.ones((), dtype=torch.float64)
        )
        return bool(self.all_sum(ok) == self.world_size)

    def barrier(self) -> None:
        dist.barrier(self.info)

    # -- saving -------------------------------------------------------------------------------------

    def full(self, named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Full tensors to save: gathered from FSDP shards (a collective: every rank calls it), else the
        tensors themselves (DDP replicas are first checked identical by `check`)."""
        return dist_state.full_tensors(named) if self.fsdp else named

    def optimizer_state(self, opt: torch.optim.Optimizer) -> dict:
        return dist_state.optimizer_full_state(opt) if self.fsdp else opt.state_dict()

    def check(self, model: nn.Module, what: str) -> None:
        """DDP replicas must be bit-identical (a difference means a rank diverged)."""
        dist.check_replicas(model, self.info, what)


class MasterWeights:
    """Adam's fp32 weights of the policy's trainable parameters (see the module docstring)."""

    def __init__(self, names: list[str], params: list[nn.Parameter], fp32_start: list[torch.Tensor] | None):
        """`fp32_start`: fp32 tensors equal to the policy's weights (the fp32 anchor at step 0) to copy
        as master weights; None when the parameters are fp32 already."""
        self.names, self.params = names, params
        self.tensors = params if fp32_start is None else [t.detach().clone().requires_grad_(True) for t in fp32_start]

    @property
    def separate(self) -> bool:
        return self.tensors is not self.params

    def named(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.tensors))

    def take_grads(self) -> None:
        """Move the policy's gradients onto the master weights (in fp32)."""
        if self.separate:
            for m, p in zip(self.tensors, self.params):
                m.grad, p.grad = p.grad.float(), None

    @torch.no_grad()
    def push(self) -> None:
        """Copy the master weights into the policy (after a step, after loading a state)."""
        if self.separate:
            torch._foreach_copy_(self.params, self.tensors)
