"""PEFT LoRA adapter folders: read them as factors per base tensor, write merged ones.

A folder with `adapter_config.json` and `adapter_model.safetensors` (what `peft` saves). The tensor
`base_model.model.<module>.lora_A.weight` (r × in) and its `lora_B` (out × r) change the base tensor
`<module>.weight` by s·B·A, s = lora_alpha / r (lora_alpha / √r with rsLoRA; `rank_pattern` and
`alpha_pattern` override them per module). Plain LoRA on linear layers only: the variants that are
not a low-rank product of that form (DoRA, biases, extra trained modules, …) are refused by name.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergekit_warp.errors import WarpError
from mergekit_warp.merge.lora import Factors

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<side>[AB])(?:\.[^.]+)?\.weight$")

# Options that make an adapter something other than s·B·A on linear weights: (key, value that is fine).
_UNSUPPORTED = (
    ("use_dora", False),
    ("use_qalora", False),
    ("use_bdlora", None),
    ("lora_bias", False),
    ("fan_in_fan_out", False),
    ("modules_to_save", None),
    ("layer_replication", None),
    ("target_parameters", None),
    ("trainable_token_indices", None),
    ("alora_invocation_tokens", None),
)


@dataclass(frozen=True)
class Adapter:
    path: Path
    config: dict[str, Any]
    modules: dict[str, Factors]
    """Factors (scale folded into B, fp32) by the name of the base tensor they change."""

    @property
    def base(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def ranks(self) -> set[int]:
        return {f.rank for f in self.modules.values()}


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / CONFIG).is_file()


def read_adapter(path: str | Path) -> Adapter:
    """The adapter in folder `path`, every problem one WarpError naming the file and what to do."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    cfg_file = path / CONFIG
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise WarpError(f"{cfg_file}: not readable JSON ({type(e).__name__}); re-save the adapter with peft") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        kind = cfg.get("peft_type") if isinstance(cfg, dict) else None
        raise WarpError(f"{cfg_file}: peft_type {kind!r}; only LoRA adapters can be merged")
    for key, fine in _UNSUPPORTED:
        v = cfg.get(key, fine)
        if v not in (fine, None, False, [], {}):
            raise WarpError(
                f"{cfg_file}: {key} = {v!r} is not supported (only plain LoRA, s·B·A on linear layers); "
                "merge the adapter into its base with peft's merge_and_unload and merge full checkpoints"
            )
    if cfg.get("bias", "none") != "none":
        raise WarpError(f"{cfg_file}: bias = {cfg['bias']!r} is not supported (trained biases); use bias 'none'")
    weights = path / WEIGHTS
    if not weights.is_file():
        raise WarpError(f"{path}: no {WEIGHTS} beside {CONFIG}; re-save the adapter with peft (safetensors)")
    sides: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(weights, "pt") as f:
            for key in f.keys():  # noqa: SIM118  (a safe_open handle has keys(), no __iter__)
                m = _KEY.match(key)
                if m is None:
                    hint = (
                        " (peft saved the whole weight of a targeted embedding or head: save the adapter with "
                        "save_embedding_layers=False)"
                        if key.endswith("base_layer.weight")
                        else ""
                    )
                    raise WarpError(
                        f"{weights}: tensor {key} is not a LoRA factor of a linear layer (lora_A/lora_B){hint}; "
                        "only plain LoRA adapters can be merged"
                    )
                sides.setdefault(m["module"], {})[m["side"]] = f.get_tensor(key)
    except SafetensorError as e:
        raise WarpError(f"{weights}: not a readable safetensors file ({e}); re-save the adapter") from None
    modules = {}
    for module, ab in sorted(sides.items()):
        if set(ab) != {"A", "B"}:
            raise WarpError(f"{weights}: module {module} has lora_{''.join(ab)} but not both factors; re-save it")
        A, B = ab["A"], ab["B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise WarpError(
                f"{weights}: module {module}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} are not r × in "
                "and out × r; re-save the adapter"
            )
        r = A.shape[0]
        if r == 0:
            raise WarpError(f"{weights}: module {module} has rank 0; re-save the adapter")
        s = scale(cfg, module, r, cfg_file)
        if not all(torch.isfinite(t).all() for t in (A, B)):
            raise WarpError(f"{weights}: module {module} holds NaN/inf values; the adapter is corrupt")
        modules[f"{module}.weight"] = Factors(B.float() * s, A.float())
    if not modules:
        raise WarpError(f"{weights}: holds no LoRA factors; nothing to merge")
    return Adapter(path, cfg, modules)


def scale(cfg: dict[str, Any], module: str, r: int, where: Path) -> float:
    """s of `module` (rank r as stored): its alpha (`alpha_pattern`, else lora_alpha) over r, or √r."""
    alpha = _pattern(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", 8))
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise WarpError(f"{where}: lora_alpha of {module} is {alpha!r}; it must be a positive number")
    return float(alpha) / (math.sqrt(r) if cfg.get("use_rslora") else r)


def _pattern(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """The value of the first pattern that matches the end of `module` (peft's rule), else `default`."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def write_adapter(
    folder: Path,
    modules: dict[str, Factors],
    base: str,
    dtype: torch.dtype = torch.float32,
    task_type: str | None = "CAUSAL_LM",
) -> None:
    """A peft LoRA folder holding `modules` (by base tensor name) with scale 1 (lora_alpha = r, per
    module through rank_pattern/alpha_pattern when ranks differ)."""
    from safetensors.torch import save_file

    ranks = {name.removesuffix(".weight"): f.rank for name, f in modules.items()}
    r = max(set(ranks.values()), key=list(ranks.values()).count)  # the most common rank
    other = {m: k for m, k in ranks.items() if k != r}
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": {re.escape(m): k for m, k in other.items()},
        "alpha_pattern": {re.escape(m): k for m, k in other.items()},
        "target_modules": sorted(ranks),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    tensors = {}
    for name, f in modules.items():
        m = name.removesuffix(".weight")
        tensors[f"{_PREFIX}{m}.lora_A.weight"] = f.A.to(dtype).contiguous()
        tensors[f"{_PREFIX}{m}.lora_B.weight"] = f.B.to(dtype).contiguous()
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
