"""Build the reproduction's SFT policy: a small Llama trained from scratch on a synthetic English corpus.

    python examples/reproduce/sft.py OUT [--steps 500] [--seed 0]

The corpus is short reviews drawn from a fixed grammar ("the movie was really good but a bit long .").
Their adjectives are a third positive, a third negative and a third neutral in VADER's lexicon, so the SFT
policy's mean sentiment is near 0 and the `sentiment` reward has room to grow. Completions end with
</s> after one to three sentences. The folder written is a normal HF folder (config, safetensors, a
word-level tokenizer that adds <s>), readable by `warp` and `transformers`. Also writes the training and
held-out prompt files next to it (OUT/../prompts/{train,heldout}.jsonl): subjects of the grammar, the
held-out ones never used as RL prompts.

Deterministic for a given seed: about a minute on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

import torch

POSITIVE = ["good", "great", "nice", "happy", "lovely", "wonderful", "fun", "sweet", "excellent", "beautiful"]
NEGATIVE = ["bad", "sad", "awful", "boring", "terrible", "ugly", "horrible", "poor", "angry", "dull"]
NEUTRAL = ["long", "short", "new", "old", "big", "small", "quiet", "busy", "red", "late"]
INTENSIFIERS = ["very", "really", "quite", "so", "a bit"]
VERBS = ["was", "seemed", "felt", "looked", "is"]
SUBJECTS = [
    "the movie", "the food", "my friend", "the teacher", "our team", "the weather", "my work", "the trip",
    "the hotel", "the book", "the game", "the music", "my day", "the city", "the party", "the room",
    "the show", "the class", "the car", "the garden", "my phone", "the park", "the film", "the coffee",
    "the dinner", "the song", "the beach", "the house", "my boss", "the market",
]  # fmt: skip
HELDOUT = 10  # the last subjects: held-out prompts only
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
LINKS = ["and", "but", "."]


def words() -> list[str]:
    vocab: list[str] = []
    for group in (SUBJECTS, INTENSIFIERS, VERBS, POSITIVE, NEGATIVE, NEUTRAL, LINKS, ["it", "also", "then"]):
        for phrase in group:
            vocab += [w for w in phrase.split() if w not in vocab]
    return vocab


def adjective(rng: random.Random) -> str:
    group = rng.choice([POSITIVE, NEGATIVE, NEUTRAL])
    adj = rng.choice(group)
    return f"{rng.choice(INTENSIFIERS)} {adj}" if rng.random() < 0.3 else adj


def review(rng: random.Random, subject: str) -> str:
    """`subject` plus one to three sentences: the completion is everything after the subject."""
    out = [subject]
    for s in range(rng.choice([1, 1, 2, 2, 3])):
        head = f"{rng.choice(VERBS)}" if s == 0 else f"{rng.choice(['it', 'it also', 'then it'])} {rng.choice(VERBS)}"
        body = adjective(rng)
        if rng.random() < 0.5:
            body += f" {rng.choice(['and', 'but'])} {adjective(rng)}"
        out.append(f"{head} {body} .")
    return " ".join(out)


def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + words())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tok.decoder = decoders.WordPiece()  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def train(out: Path, steps: int, seed: int) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    rng = random.Random(seed)
    torch.manual_seed(seed)
    tok = tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=256,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: min(1.0, (t + 1) / 50) * 0.5 * (1 + math.cos(math.pi * t / steps))
    )
    batch = 64
    for step in range(steps):
        texts = [review(rng, rng.choice(SUBJECTS)) + " </s>" for _ in range(batch)]
        enc = tok(texts, return_tensors="pt", padding=True)
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps - 1:
            print(f"step {step}: loss {loss.item():.3f}", flush=True)
    model.generation_config.do_sample = True
    model.save_pretrained(out)
    tok.save_pretrained(out)


def write_prompts(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, subjects in (("train", SUBJECTS[:-HELDOUT]), ("heldout", SUBJECTS[-HELDOUT:])):
        lines = [json.dumps({"prompt": s}) for s in subjects]
        (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.steps < 1:
        ap.error("--steps must be at least 1")
    if args.out.exists() and not args.out.is_dir():
        ap.error(f"{args.out} exists and is not a folder")
    train(args.out, args.steps, args.seed)
    write_prompts(args.out.parent / "prompts")


if __name__ == "__main__":
    main()
