"""Every spelling of a dtype the toolkit reads or writes, in one place: the names users give
(`--dtype bf16`, `dtype: fp32` in a config), the names HF configs carry (`"bfloat16"`), and the codes
of the safetensors format (`"BF16"`)."""

from __future__ import annotations

import torch

from mergekit_warp.errors import WarpError

# Float dtypes a user may choose: short name → (torch dtype, HF config name). Long names are accepted too.
FLOATS: dict[str, tuple[torch.dtype, str]] = {
    "fp32": (torch.float32, "float32"),
    "bf16": (torch.bfloat16, "bfloat16"),
    "fp16": (torch.float16, "float16"),
}
CHOICES = tuple(FLOATS)
_ALIASES = {hf: short for short, (_, hf) in FLOATS.items()}

# The safetensors format's dtype codes.
SAFETENSORS: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
}
CODES: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS.items()}


def short_name(text: str, option: str = "--dtype") -> str:
    """'bf16', 'BF16' or 'bfloat16' → 'bf16'; anything else is a WarpError naming `option`."""
    key = str(text).lower()
    key = _ALIASES.get(key, key)
    if key not in FLOATS:
        raise WarpError(f"{option} {text!r}: choose one of {', '.join(CHOICES)}")
    return key


def parse_dtype(text: str | torch.dtype, option: str = "--dtype") -> torch.dtype:
    """The torch dtype a user's spelling names (a torch dtype passes through)."""
    if isinstance(text, torch.dtype):
        return text
    return FLOATS[short_name(text, option)][0]


def short_of(dtype: torch.dtype) -> str | None:
    """'bf16' for torch.bfloat16 …; None for a dtype users do not choose (fp64, ints)."""
    return next((short for short, (dt, _) in FLOATS.items() if dt == dtype), None)


def hf_name(dtype: torch.dtype) -> str:
    """The name HF configs use for a float dtype ('bfloat16')."""
    return next(hf for dt, hf in FLOATS.values() if dt == dtype)
