"""Loading policies and tokenizers for RL: local HF folders or hub ids, a validated device and dtype."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from mergekit_warp.devices import resolve_device
from mergekit_warp.errors import WarpError

DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# "owner/name" with the characters the hub allows; anything else that is not a local folder is a typo.
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPE:
        raise WarpError(f"dtype {dtype!r}: use one of {', '.join(DTYPE)}")
    return DTYPE[dtype]


def _check_source(src: str | Path, what: str) -> str:
    s = str(src)
    if Path(s).is_dir():
        return s
    if Path(s).exists() or not _HUB_ID.match(s):
        raise WarpError(f"{what} {s}: not an HF model folder (config.json + weights) nor a hub id")
    return s


def load_model(src: str | Path, dtype: str = "fp32", device: str = "cpu"):
    """An `AutoModelForCausalLM` in `dtype` on `device`, in eval mode (RL wants no dropout)."""
    from transformers import AutoModelForCausalLM

    s = _check_source(src, "model")
    dt, dev = resolve_dtype(dtype), resolve_device(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(s, dtype=dt)
    except (OSError, ValueError) as e:
        raise WarpError(f"model {s}: cannot be loaded as a causal LM ({str(e).splitlines()[0]})") from None
    return model.to(dev).eval()


def model_context(src: str | Path) -> int | None:
    """The model's context window in tokens, read from its config alone (no weights), if it states one."""
    from transformers import AutoConfig

    s = _check_source(src, "model")
    try:
        cfg = AutoConfig.from_pretrained(s)
    except (OSError, ValueError) as e:
        raise WarpError(f"model {s}: no usable config.json ({str(e).splitlines()[0]})") from None
    cfg = getattr(cfg, "text_config", None) or cfg
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if isinstance(getattr(cfg, name, None), int):
            return getattr(cfg, name)
    return None


def load_tokenizer(src: str | Path):
    """The model's tokenizer, left-padded for generation, with a pad token (eos or unk when missing)."""
    from transformers import AutoTokenizer

    s = _check_source(src, "tokenizer of")
    try:
        tok = AutoTokenizer.from_pretrained(s)
    except (OSError, ValueError) as e:
        raise WarpError(f"tokenizer of {s}: cannot be loaded ({str(e).splitlines()[0]})") from None
    if tok.pad_token is None:
        # Any existing token will do: padded positions are masked out everywhere (attention and loss),
        # and the generated EOS is located by the sampling loop, never by comparing with pad ids.
        fallback = tok.eos_token or tok.unk_token
        if fallback is None:
            raise WarpError(f"tokenizer of {s} has no pad, eos or unk token; add a pad token to it")
        tok.pad_token = fallback
    tok.padding_side = "left"
    return tok
