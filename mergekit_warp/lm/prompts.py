"""Prompt files: JSONL with one `{"prompt": "..."}` or `{"messages": [{"role", "content"}, ...]}` per line.

When the tokenizer has a chat template, it is applied (with the generation prompt) and the result is
tokenized later WITHOUT special tokens (the template already carries them); without a template the
prompt text is used as is and tokenized WITH the tokenizer's special tokens (see `sampling.add_special_tokens`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mergekit_warp.errors import WarpError


@dataclass(frozen=True)
class Prompt:
    text: str
    """What the policy is conditioned on (chat template applied)."""
    line: int
    """1-based line number in the file, for error messages."""


def _messages(rec: object, path: Path, n: int) -> list[dict]:
    if isinstance(rec, dict) and isinstance(rec.get("prompt"), str):
        return [{"role": "user", "content": rec["prompt"]}]
    if isinstance(rec, dict) and isinstance(rec.get("messages"), list) and rec["messages"]:
        msgs = rec["messages"]
        if all(isinstance(m, dict) and isinstance(m.get("content"), str) and "role" in m for m in msgs):
            return msgs
    raise WarpError(f'{path}:{n}: expected {{"prompt": "..."}} or {{"messages": [{{"role", "content"}}, ...]}}')


def read_prompts(path: str | Path, tokenizer) -> list[Prompt]:
    """Every prompt of the file with its line number; a WarpError for a malformed line or no prompts."""
    path = Path(path)
    if not path.is_file():
        raise WarpError(f"prompts file {path} does not exist")
    try:
        lines = path.read_bytes().decode("utf-8").split("\n")  # (not splitlines: JSON strings may hold U+2028)
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise WarpError(
            f"{path}:{line}: not UTF-8 text (byte 0x{e.object[e.start]:02x}); re-save the file as UTF-8"
        ) from None
    except OSError as e:
        raise WarpError(f"prompts file {path} cannot be read ({e.strerror})") from None
    out = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise WarpError(f"{path}:{n}: malformed JSON ({e.msg}); one JSON object per line") from None
        msgs = _messages(rec, path, n)
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        else:
            text = "\n".join(m["content"] for m in msgs)
        if not text.strip():
            raise WarpError(f"{path}:{n}: the prompt is empty")
        out.append(Prompt(text, n))
    if not out:
        raise WarpError(f"prompts file {path} holds no prompts; add one JSON object per line")
    return out


def load_prompts(path: str | Path, tokenizer) -> list[str]:
    """The prompts of a JSONL file as the policy sees them (chat template applied when there is one)."""
    return [p.text for p in read_prompts(path, tokenizer)]


def check_lengths(prompts: list[Prompt], tokenizer, context: int, max_new_tokens: int, path: Path) -> None:
    """Refuse a prompt that leaves no room for `max_new_tokens` in the model's context window."""
    from mergekit_warp.lm.sampling import add_special_tokens

    special = add_special_tokens(tokenizer)
    for p in prompts:
        n = len(tokenizer(p.text, add_special_tokens=special)["input_ids"])
        if n + max_new_tokens > context:
            raise WarpError(
                f"{path}:{p.line}: prompt of {n} tokens + --max-new-tokens {max_new_tokens} exceeds the "
                f"model context of {context} tokens; shorten it or lower --max-new-tokens"
            )
