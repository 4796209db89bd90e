"""Tiny local checkpoints for the tests: a random Llama (2 layers, width 32) and a word-level tokenizer
built here, so nothing is downloaded. Shared by the merge, RL, pipeline and eval tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WORDS = [
    "the",
    "a",
    "good",
    "bad",
    "happy",
    "sad",
    "great",
    "awful",
    "love",
    "hate",
    "movie",
    "film",
    "day",
    "night",
    "cat",
    "dog",
    "is",
    "was",
    "very",
    "not",
    "and",
    "or",
    "but",
    "i",
    "you",
    "we",
    "they",
    "it",
    "this",
    "that",
    "so",
    "really",
    "quite",
    "nice",
    "terrible",
    "wonderful",
    "okay",
    "fine",
    "yes",
    "no",
    "maybe",
    "please",
    "thanks",
    "hello",
    "bye",
    "red",
    "blue",
    "green",
    "big",
    "small",
    "fast",
    "slow",
    "one",
    "two",
    "three",
]
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def make_tokenizer(chat_template: bool = False, pad: bool = True):
    """A word-level `PreTrainedTokenizerFast` over `WORDS` (plus ':' and the role names)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS + [":", "user", "assistant", "system"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kwargs = dict(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if pad:
        kwargs["pad_token"] = "<pad>"
    fast = PreTrainedTokenizerFast(**kwargs)
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(vocab_size: int, tie: bool = False, layers: int = 2, head_dim: int = 8):
    """Width 32 with 4 heads of 8 by default; `head_dim` 32 gives width 64, 2 heads (vLLM's CPU attention
    takes head sizes of 32 and more)."""
    from transformers import LlamaConfig

    heads = 4 if head_dim == 8 else 2
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=heads * head_dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        intermediate_size=2 * heads * head_dim,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
    )


def make_tiny_llama(
    out: Path,
    seed: int = 0,
    *,
    dtype: torch.dtype = torch.float32,
    tie: bool = False,
    layers: int = 2,
    max_shard_size: str | None = None,
    chat_template: bool = False,
    head_dim: int = 8,
) -> Path:
    """Write a random tiny Llama HF folder (safetensors, config, tokenizer) to `out` and return it."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    tok = make_tokenizer(chat_template=chat_template)
    model = LlamaForCausalLM(tiny_config(len(tok), tie=tie, layers=layers, head_dim=head_dim)).to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    tok.save_pretrained(out)
    return Path(out)


def perturb(src: Path, out: Path, seed: int, scale: float = 0.02) -> Path:
    """Copy HF folder `src` to `out` with every float tensor moved by N(0, scale²) noise (an 'RL run')."""
    import shutil

    shutil.copytree(src, out)
    g = torch.Generator().manual_seed(seed)
    for f in sorted(Path(out).glob("*.safetensors")):
        sd = load_file(f)
        for k, v in sd.items():
            if v.is_floating_point():
                sd[k] = (v.float() + scale * torch.randn(v.shape, generator=g)).to(v.dtype)
        save_file(sd, f, metadata={"format": "pt"})
    return Path(out)


def load_state(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF folder (sharded or not), dense, as stored."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    )
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(folder / f))
    return sd
