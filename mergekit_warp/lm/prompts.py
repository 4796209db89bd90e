"""Prompt files. One prompt per JSONL line, Parquet row or row of a local HF `datasets` folder (what
`Dataset.save_to_disk` writes: .arrow files with state.json), given as a "prompt" string or a
"messages" list of {"role", "content"} (a "prompt" holding such a list, TRL's conversational format,
counts as messages). Parquet and datasets folders are read with pyarrow, which is optional.

When the tokenizer has a chat template, it is applied (with the generation prompt) and the result is
tokenized later WITHOUT special tokens (the template already carries them); without a template the
prompt text is used as is and tokenized WITH the tokenizer's special tokens (see `sampling.add_special_tokens`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mergekit_warp.errors import WarpError

EXPECTED = 'expected {"prompt": "..."} or {"messages": [{"role", "content"}, ...]}'


@dataclass(frozen=True)
class Prompt:
    text: str
    """What the policy is conditioned on (chat template applied)."""
    line: int
    """1-based line (JSONL) or row (Parquet, datasets) number in the file, for error messages."""
    plain: str = ""
    """The messages' contents, one per line, without a template: what to show a person."""
    where: str = ""
    """Where it came from in error messages: `FILE:LINE`, `FILE row N` or `--prompt N`."""


def _messages(rec: object, where: str) -> list[dict]:
    if isinstance(rec, dict) and isinstance(rec.get("prompt"), str):
        return [{"role": "user", "content": rec["prompt"]}]
    for key in ("messages", "prompt"):
        msgs = rec.get(key) if isinstance(rec, dict) else None
        ok = isinstance(msgs, list) and msgs
        if ok and all(isinstance(m, dict) and isinstance(m.get("content"), str) and "role" in m for m in msgs):
            return msgs
    raise WarpError(f"{where}: {EXPECTED}")


def make_prompt(msgs: list[dict], tokenizer, n: int, where: str, chat: bool = True) -> Prompt:
    """The prompt of `msgs` (chat template applied when `chat` and the tokenizer has one)."""
    plain = "\n".join(m["content"] for m in msgs)
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    else:
        text = plain
    if not text.strip():
        raise WarpError(f"{where}: the prompt is empty")
    return Prompt(text, n, plain, where)


def read_prompts(path: str | Path, tokenizer, chat: bool = True) -> list[Prompt]:
    """Every prompt of the file or datasets folder with its line/row number; a WarpError for a
    malformed record or no prompts. `chat=False`: no chat template even when the tokenizer has one."""
    path = Path(path)
    if not path.exists():
        raise WarpError(f"prompts file {path} does not exist")
    table = path.is_dir() or path.suffix == ".parquet" or _starts_with(path, b"PAR1")
    records = _table_records(path) if table else _jsonl_records(path)
    out = [make_prompt(_messages(rec, where), tokenizer, n, where, chat) for n, where, rec in records]
    if not out:
        hint = "it has no rows" if table else "add one JSON object per line"
        raise WarpError(f"prompts file {path} holds no prompts; {hint}")
    return out


def load_prompts(path: str | Path, tokenizer) -> list[str]:
    """The prompts of a file as the policy sees them (chat template applied when there is one)."""
    return [p.text for p in read_prompts(path, tokenizer)]


def _starts_with(path: Path, magic: bytes) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False


def _jsonl_records(path: Path) -> Iterator[tuple[int, str, object]]:
    try:
        lines = path.read_bytes().decode("utf-8").split("\n")  # (not splitlines: JSON strings may hold U+2028)
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise WarpError(
            f"{path}:{line}: not UTF-8 text (byte 0x{e.object[e.start]:02x}); re-save the file as UTF-8"
        ) from None
    except OSError as e:
        raise WarpError(f"prompts file {path} cannot be read ({e.strerror})") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise WarpError(f"{path}:{n}: malformed JSON ({e.msg}); one JSON object per line") from None
        yield n, f"{path}:{n}", rec


def _table_records(path: Path) -> Iterator[tuple[int, str, object]]:
    """The rows of a Parquet file or a `save_to_disk` folder as dicts of their prompt/messages columns."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise WarpError(
            f"{path}: reading Parquet files and datasets folders needs pyarrow; pip install pyarrow"
        ) from None
    kind = "datasets folder" if path.is_dir() else "Parquet file"
    try:
        table = _dataset_folder(path, pa) if path.is_dir() else pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise WarpError(f"{path}: cannot be read as a {kind} ({first}); re-save it") from None
    columns = [c for c in ("prompt", "messages") if c in table.column_names]
    if not columns:
        raise WarpError(
            f'{path}: no "prompt" or "messages" column (it has {", ".join(table.column_names) or "none"}); '
            "rename the prompt column"
        )
    for n, rec in enumerate(table.select(columns).to_pylist(), start=1):
        yield n, f"{path} row {n}", rec


def _dataset_folder(path: Path, pa):
    """The table of a `Dataset.save_to_disk` folder: its .arrow files (Arrow streams) in state.json's order."""
    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())
        raise WarpError(
            f"{path} holds several splits ({', '.join(splits) or 'none'}); give one split's folder, "
            f"e.g. {path / (splits[0] if splits else 'train')}"
        )
    state = path / "state.json"
    if state.is_file():
        try:
            names = [d["filename"] for d in json.loads(state.read_text())["_data_files"]]
        except (ValueError, KeyError, TypeError) as e:
            raise WarpError(f"{state}: unreadable ({type(e).__name__}: {e}); re-save the dataset") from None
        bad = [n for n in names if not isinstance(n, str) or Path(n).name != n or n in ("", ".", "..")]
        if bad:
            raise WarpError(
                f"{state}: data file {bad[0]!r} is not a plain file name inside {path}; re-save the dataset"
            )
        files = [path / n for n in names]
    else:
        files = sorted(path.glob("*.arrow"))
    if not files:
        raise WarpError(
            f"{path}: not a datasets folder (no state.json, no .arrow files); give a JSONL or Parquet file "
            "or the folder `Dataset.save_to_disk` wrote"
        )
    tables = []
    for f in files:
        with pa.memory_map(str(f)) as src:
            try:
                tables.append(pa.ipc.open_stream(src).read_all())
            except pa.ArrowInvalid:  # an Arrow IPC file rather than a stream
                src.seek(0)
                tables.append(pa.ipc.open_file(src).read_all())
    return pa.concat_tables(tables)


def check_lengths(
    prompts: list[Prompt],
    tokenizer,
    context: int,
    max_new_tokens: int,
    path: Path,
    max_prompt_length: int | None = None,
    special_tokens: bool | None = None,
) -> None:
    """Refuse a prompt that leaves no room for `max_new_tokens` in the model's context window (counting
    at most `max_prompt_length` of its tokens: the sampler keeps only its last ones)."""
    from mergekit_warp.lm.sampling import add_special_tokens

    special = add_special_tokens(tokenizer) if special_tokens is None else special_tokens
    for p in prompts:
        n = len(tokenizer(p.text, add_special_tokens=special)["input_ids"])
        n = min(n, max_prompt_length or n)
        if n + max_new_tokens > context:
            limit = " (or set --max-prompt-length)" if max_prompt_length is None else " (or --max-prompt-length)"
            raise WarpError(
                f"{p.where or f'{path}:{p.line}'}: prompt of {n} tokens + --max-new-tokens {max_new_tokens} "
                f"exceeds the model context of {context} tokens; shorten it or lower --max-new-tokens{limit}"
            )
