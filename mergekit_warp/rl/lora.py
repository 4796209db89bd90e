"""`warp rl` on a LoRA adapter: the base model frozen (any dtype), the adapter trained in fp32, the init
and the anchor computed by the same model with the adapter switched.

A targeted linear layer W0 computes y = W0·x + s·B·(A·x) with s = α / r; A (r × in) starts uniform in
±1/√in (as an `nn.Linear` and peft do), B (out × r) at zero, so the run starts at the init. The
adapter hooks into the layers' outputs (the model keeps its structure and tensor names); `mode` says
what the hooks add:

- "policy": s·B·A, the trained factors;
- "anchor": the EMA anchor θ_ema ← (1 − μ)·θ_ema + μ·θ, kept in one of two ways:
  - `factors` (default): EMAs of A and of B, an anchor the size of the adapter. The EMA of the
    factors is NOT the EMA of their product (s·B_ema·A_ema ≠ EMA of s·B·A), so this anchor is an
    approximation; benchmarks/lora_anchor_drift.py measures how far it drifts.
  - `exact`: an fp32 EMA of the dense deltas s·B·A of the targeted layers: exact, at the cost of one
    fp32 copy of those layers;
- None: nothing, i.e. the base model = the init (also the anchor with `--anchor init`).

`View` runs the policy's model in another mode, so the RL loop reads the init and the anchor as models
without a second copy of the base.
"""

from __future__ import annotations

import math
import re
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from mergekit_warp.errors import WarpError
from mergekit_warp.merge.lora import Factors
from mergekit_warp.rl.objective import ema_update

ALL_LINEAR = "all-linear"
ATTRIBUTE = "warp_lora"
"""The adapter's name as a submodule of the policy (its parameters train, DDP reduces their gradients)."""


def target_names(model: nn.Module, targets: list[str], where: str) -> list[str]:
    """The linear layers of `model` that `targets` names: `all-linear` (every linear layer but the
    output head, as peft) or names each layer's name equals or ends with (`q_proj`, `self_attn.v_proj`)."""
    head = model.get_output_embeddings()
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if targets == [ALL_LINEAR]:
        names = [n for n in linear if model.get_submodule(n) is not head]
    else:
        names = [n for n in linear if any(n == t or n.endswith("." + t) for t in targets)]
        unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in linear)]
        if unmatched:
            kinds = sorted({n.rsplit(".", 1)[-1] for n in linear})
            raise WarpError(
                f"--lora-targets {','.join(unmatched)}: no linear layer of {where} has that name; its linear "
                f"layers end in {', '.join(kinds)} (or use {ALL_LINEAR})"
            )
    tied = model.get_input_embeddings()
    if (
        head is not None
        and tied is not None
        and head.weight is tied.weight
        and any(model.get_submodule(n) is head for n in names)
    ):
        raise WarpError(
            f"--lora-targets: the output layer of {where} shares its weights with the input embedding; "
            "LoRA on it is not supported: target other layers"
        )
    if not names:
        raise WarpError(f"--lora-targets: {where} has no linear layer to adapt")
    return names


def check_targets(folder, targets: list[str] | None, where: str) -> None:
    """`target_names` on the model of HF folder `folder` built on the meta device (no weight is read):
    targets that match nothing fail before any work."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from mergekit_warp.lm.models import quiet_transformers

    with quiet_transformers(), torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    target_names(model, targets or [ALL_LINEAR], where)


class Lora(nn.Module):
    """The adapter of a policy and its anchor (see the module docstring)."""

    def __init__(self, model: nn.Module, names: list[str], r: int, alpha: float, anchor: str | None, seed: int):
        """Attach to `model` (as its submodule `warp_lora`, hooks on the layers `names`). `anchor`:
        'factors', 'exact' or None (no EMA anchor); `seed` draws A."""
        super().__init__()
        self.names, self.rank, self.scale, self.anchor = names, r, alpha / r, anchor
        self.mode: str | None = "policy"
        g = torch.Generator().manual_seed(seed)
        self.A, self.B = nn.ParameterList(), nn.ParameterList()
        layers = [model.get_submodule(n) for n in names]
        for lin in layers:
            dev, bound = lin.weight.device, 1.0 / math.sqrt(lin.in_features)
            a = (torch.rand(r, lin.in_features, generator=g, dtype=torch.float64) * 2 - 1) * bound
            self.A.append(nn.Parameter(a.float().to(dev)))
            self.B.append(nn.Parameter(torch.zeros(lin.out_features, r, device=dev)))
        self.ema: dict[str, torch.Tensor] = {}
        """The anchor's fp32 state: A.i and B.i (factors) or D.i, the dense s·B·A (exact)."""
        for i, (a, b) in enumerate(zip(self.A, self.B)):
            if anchor == "factors":
                self.ema[f"A.{i}"], self.ema[f"B.{i}"] = a.detach().clone(), b.detach().clone()
            elif anchor == "exact":
                self.ema[f"D.{i}"] = torch.zeros(b.shape[0], a.shape[1], device=a.device)
        model.add_module(ATTRIBUTE, self)
        for i, lin in enumerate(layers):
            lin.register_forward_hook(partial(self._add, i))

    def _add(self, i: int, layer: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        if self.mode is None:
            return out
        x = args[0].float()
        if self.mode == "policy":
            d = F.linear(F.linear(x, self.A[i]), self.B[i]) * self.scale
        elif self.anchor == "exact":
            d = F.linear(x, self.ema[f"D.{i}"])
        else:
            d = F.linear(F.linear(x, self.ema[f"A.{i}"]), self.ema[f"B.{i}"]) * self.scale
        return out + d.to(out.dtype)

    @torch.no_grad()
    def update_anchor(self, mu: float) -> None:
        """θ_ema ← (1 − μ)·θ_ema + μ·θ: of the factors, or of each layer's dense delta."""
        if self.anchor == "factors":
            ema_update([self.ema[f"{s}.{i}"] for s in "AB" for i in range(len(self.names))], [*self.A, *self.B], mu)
        elif self.anchor == "exact":
            for i in range(len(self.names)):  # one dense delta at a time
                ema_update([self.ema[f"D.{i}"]], [self.B[i] @ self.A[i] * self.scale], mu)

    def factors(self, anchor: bool = False) -> dict[str, Factors]:
        """The policy's (or the factors anchor's) s·B·A by base tensor name, the scale folded into B."""
        if anchor:
            parts = [(self.ema[f"B.{i}"], self.ema[f"A.{i}"]) for i in range(len(self.names))]
        else:
            parts = list(zip(self.B, self.A))
        return {f"{n}.weight": Factors(b.detach() * self.scale, a.detach()) for n, (b, a) in zip(self.names, parts)}

    def deltas(self, anchor: bool = False) -> dict[str, torch.Tensor]:
        """Dense fp32 deltas by base tensor name: the policy's, or the anchor's."""
        if anchor and self.anchor == "exact":
            return {f"{n}.weight": self.ema[f"D.{i}"] for i, n in enumerate(self.names)}
        return {n: f.dense() for n, f in self.factors(anchor).items()}

    def view(self, model: nn.Module, mode: str | None) -> View:
        return View(model, self, mode)


class View:
    """`model` (the policy) run with its adapter in `mode`: 'anchor', or None for the init."""

    def __init__(self, model: nn.Module, lora: Lora, mode: str | None):
        self.model, self.lora, self.mode = model, lora, mode

    def __call__(self, *args, **kwargs):
        was, self.lora.mode = self.lora.mode, self.mode
        try:
            return self.model(*args, **kwargs)
        finally:
            self.lora.mode = was

    def __getattr__(self, name: str):  # parameters(), config, generation_config, forward's signature
        return getattr(self.model, name)


def parse_targets(v) -> list[str] | None:
    """`--lora-targets`: a comma list or repeated names; `all-linear` alone or not at all."""
    if v is None:
        return None
    items = [v] if isinstance(v, str) else list(v)
    names = [t.strip() for item in items for t in str(item).split(",") if t.strip()]
    if not names:
        raise ValueError("give layer names (q_proj,v_proj) or all-linear")
    if ALL_LINEAR in names and len(names) > 1:
        raise ValueError(f"{ALL_LINEAR} cannot be combined with layer names")
    bad = [t for t in names if not re.fullmatch(r"[A-Za-z0-9_.\-]+", t)]
    if bad:
        raise ValueError(f"{bad[0]!r} is not a layer name")
    return names


def merged_state(model: nn.Module, deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's own tensors (not the adapter's), `deltas` added to theirs in fp32."""
    return {
        k: v.float() + deltas[k].to(v.device) if k in deltas else v
        for k, v in model.state_dict().items()
        if not k.startswith(ATTRIBUTE + ".")
    }
