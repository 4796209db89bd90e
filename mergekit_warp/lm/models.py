"""Loading language models and tokenizers for RL and evaluation.

A model is named by any checkpoint spec the merge commands accept (HF folder, hub id, the builtin
`smollm2-135m-instruct`), resolved by `io.source.resolve_source`: pickles are refused there, shard
headers are validated before transformers sees them, only safetensors weights are read, no code from
the checkpoint ever runs (`trust_remote_code=False`), and every weight is checked finite once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from mergekit_warp.devices import resolve_device
from mergekit_warp.dtypes import parse_dtype
from mergekit_warp.errors import WarpError

HEADS = ("causal", "reward")


def model_folder(spec: str | Path, what: str = "model") -> Path:
    """The local HF folder of `spec`, with every shard header validated (a truncated file is named
    here, not by a traceback inside transformers)."""
    from mergekit_warp.io.reader import read_header
    from mergekit_warp.io.source import resolve_source

    src = resolve_source(str(spec))
    if src.folder is None:
        raise WarpError(
            f"{what} {spec}: a bare .safetensors file has no config.json or tokenizer; give an HF model folder"
        )
    for f in src.files:
        read_header(f)
    return src.folder


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No multi-line load reports or progress bars from transformers: the loaders below check the
    loading info themselves and report problems in one line."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_model(spec: str | Path, dtype: str | torch.dtype = "fp32", device: str = "cpu", *, head: str = "causal"):
    """`spec` as an `AutoModelForCausalLM` (head "causal") or a one-label
    `AutoModelForSequenceClassification` (head "reward"), in `dtype` on `device`, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    what = "model" if head == "causal" else "reward model"
    folder = model_folder(spec, what)
    dt, dev = parse_dtype(dtype), resolve_device(device)
    auto = AutoModelForCausalLM if head == "causal" else AutoModelForSequenceClassification
    try:
        with quiet_transformers():
            model, info = auto.from_pretrained(
                folder, dtype=dt, trust_remote_code=False, use_safetensors=True, output_loading_info=True
            )
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise WarpError(
            f"{what} {spec}: cannot be loaded ({_first_line(e)}); give an HF folder with config.json "
            "and safetensors weights of a supported architecture"
        ) from None
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise WarpError(
            f"{what} {spec}: its weights lack {len(missing)} tensor(s) the model needs (e.g. "
            f"{', '.join(missing[:3])}); it is not a complete {'reward model' if head == 'reward' else 'causal LM'} checkpoint"
        )
    mismatched = list(info.get("mismatched_keys") or ())
    if mismatched:
        raise WarpError(
            f"{what} {spec}: tensor shapes differ from config.json (e.g. {mismatched[0]}); re-save the checkpoint"
        )
    check_finite(model, f"{what} {spec}")
    return model.to(dev).eval()


@torch.no_grad()
def check_finite(model: torch.nn.Module, what: str) -> None:
    """WarpError naming the first float tensor of `model` that holds NaN or Inf."""
    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise WarpError(
                f"{what}: tensor {name} holds NaN or Inf values; the checkpoint is broken: use an "
                "earlier one or fix the run that wrote it"
            )


def model_context(spec: str | Path) -> int | None:
    """The model's context window in tokens, read from its config alone (no weights), if it states one."""
    from transformers import AutoConfig

    folder = model_folder(spec)
    try:
        cfg = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise WarpError(
            f"model {spec}: no usable config.json ({_first_line(e)}); checkpoints that need their "
            "own Python code are not supported"
        ) from None
    cfg = getattr(cfg, "text_config", None) or cfg
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if isinstance(getattr(cfg, name, None), int):
            return getattr(cfg, name)
    return None


def load_tokenizer(spec: str | Path, padding_side: str | None = "left"):
    """The model's tokenizer with a pad token (eos or unk when it has none); left-padded for generation
    by default (`padding_side=None` keeps the tokenizer's own)."""
    from transformers import AutoTokenizer

    folder = model_folder(spec, "tokenizer of")
    try:
        with quiet_transformers():
            tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as e:  # (older transformers: ImportError)
        raise WarpError(
            f"tokenizer of {spec}: cannot be loaded ({_first_line(e)}); the folder needs the "
            "tokenizer files of its model"
        ) from None
    if not tok.get_vocab():  # some transformers releases load an empty tokenizer from a folder without one
        raise WarpError(f"tokenizer of {spec}: the folder holds no tokenizer files; copy those of its model into it")
    if tok.pad_token is None:
        # Any existing token will do: padded positions are masked out everywhere (attention and loss),
        # and the generated EOS is located by the sampling loop, never by comparing with pad ids.
        fallback = tok.eos_token or tok.unk_token
        if fallback is None:
            raise WarpError(f"tokenizer of {spec} has no pad, eos or unk token; add a pad token to it")
        tok.pad_token = fallback
    if padding_side is not None:
        tok.padding_side = padding_side
    return tok
