"""Atomic, self-describing output folders.

Everything the toolkit writes (a merge, an RL policy, a pipeline stage) goes through `publishing`: the
content is written into a hidden temporary sibling of the output path and renamed into place only when
complete, so a crash, a kill or Ctrl-C never leaves something at the output path that looks finished.
Each folder carries `warp_provenance.json` (method, parameters, inputs with hashes, version, command
line) and a short model card.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from mergekit_warp import __version__
from mergekit_warp.errors import WarpError
from mergekit_warp.io.atomic import staged
from mergekit_warp.io.reader import header_bytes

PROVENANCE = "warp_provenance.json"
# Files copied from the init (or first model) so the output loads like its source in `transformers`.
SUPPORT_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


def tidy_path(path: Path | str) -> Path:
    """`path` made absolute, `..` and `.` folded away where that names the same place (`link/..` is not
    always the link's own folder)."""
    path = Path(path).absolute()
    tidy = Path(os.path.normpath(path))
    return tidy if tidy.resolve() == path.resolve() else path


def check_disjoint(out: Path, inputs: Iterable[Path | str] = ()) -> Path:
    """Refuse an output path that would write into, or (replaced) delete, something the command reads:
    `out` must not be an input, lie inside one, or contain one, symlinks resolved (a link to an input
    counts as the input). `inputs`: checkpoints, prompt and reward files, configs; missing ones are
    skipped. Returns `out` made absolute, `..` and `.` folded away where that names the same place."""
    out = tidy_path(out)
    real = out.resolve()
    for src in inputs:
        src = Path(src).absolute()
        if not os.path.lexists(src):
            continue
        s = src.resolve()
        if real == s or s in real.parents or (out.exists() and os.path.samefile(out, s)):
            raise WarpError(
                f"output {out} is {'the input' if real == s else 'inside the input'} {src}; "
                "choose an -o path outside every input"
            )
        if real in s.parents:
            raise WarpError(
                f"output {out} contains the input {src} (replacing it would delete it); "
                "choose an -o path outside every input"
            )
    return out


def check_output_path(out: Path, inputs: Iterable[Path | str] = (), force: bool = False) -> Path:
    """`check_disjoint`, then refuse an existing `out` without `force` (or one that is a file), and a
    missing parent folder."""
    out = check_disjoint(out, inputs)
    if out.exists() and not force:
        raise WarpError(f"output {out} already exists; pass --force to replace it or choose another -o path")
    if out.exists() and not out.is_dir():
        raise WarpError(f"output {out} is a file, not an output folder; remove it or choose another -o path")
    if not out.parent.is_dir():
        raise WarpError(f"the folder {out.parent} for output {out.name} does not exist; create it first")
    return out


@contextlib.contextmanager
def publishing(out: Path, inputs: Iterable[Path | str] = (), force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it becomes `out`, on any failure it is
    deleted (`atomic.staged`). `out` is checked first (`check_output_path`); with `force` an existing
    `out` is replaced only once the new content is complete. Call it while holding `atomic.claim(out)`."""
    out = check_output_path(out, inputs, force)
    with staged(out, replace=force) as tmp:
        yield tmp


def copy_support_files(src: Path, dst: Path) -> list[str]:
    """Copy config, generation config and tokenizer files from HF folder `src` (when present)."""
    copied = []
    for name in SUPPORT_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def set_config_dtype(folder: Path, dtype) -> None:
    """Say in FOLDER/config.json that the weights are `dtype` (a torch dtype), so
    `from_pretrained(dtype="auto")` picks it; nothing without a config.json."""
    from mergekit_warp.dtypes import hf_name

    cfg = Path(folder) / "config.json"
    if not cfg.is_file():
        return
    data = json.loads(cfg.read_text())
    for key in ("torch_dtype", "dtype"):
        if key in data:
            data[key] = hf_name(dtype)
    cfg.write_text(json.dumps(data, indent=2) + "\n")


def fingerprint(path: Path) -> str:
    """A content hash of a checkpoint that is cheap for 70B models: sha256 over the safetensors index
    and every shard's header (names, dtypes, shapes, offsets) plus file sizes, not the full bytes.
    For any other file: sha256 of its bytes; for a folder without safetensors: of its file listing."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if path.is_dir() and (path / "model.safetensors.index.json").is_file():
        h.update((path / "model.safetensors.index.json").read_bytes())
    for f in files:
        h.update(f.name.encode())
        if f.suffix == ".safetensors":
            raw, size = header_bytes(f)
            h.update(raw)
            h.update(str(size).encode())
        else:
            h.update(f.read_bytes())
    if path.is_dir() and not files:
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f"{f.relative_to(path)}:{f.stat().st_size}".encode())
    return "sha256:" + h.hexdigest()


PRUNED = (
    "**The weights of this checkpoint were deleted** by `warp pipeline run` once no later step read them; "
    "its metrics and provenance remain. List `policy` (RL runs) or `merges` (SLERP, LITI) under `keep:` in "
    "the pipeline config to keep them."
)


def mark_pruned(folder: Path) -> None:
    """Say in `folder`'s model card, after its metadata, that the pipeline deleted its weights."""
    card = Path(folder) / "README.md"
    text = card.read_text() if card.is_file() else ""
    if PRUNED in text:
        return
    head, sep, body = text.partition("\n---\n") if text.startswith("---\n") else ("", "", text)
    card.write_text(head + sep + PRUNED + "\n\n" + body)


def pruned_hint(folder: Path) -> str:
    """' (its weights were deleted by the pipeline …)' for a folder `mark_pruned` marked, else ''."""
    card = Path(folder) / "README.md"
    try:
        return "; " + PRUNED.replace("**", "") if card.is_file() and PRUNED in card.read_text() else ""
    except OSError:
        return ""


def content_fingerprint(path: Path) -> str:
    """`fingerprint`, plus the sha256 of the first 64 KiB of every shard's data: two checkpoints of one
    architecture share their headers, not their weights (still cheap for 70B models)."""
    path = Path(path)
    h = hashlib.sha256(fingerprint(path).encode())
    for f in sorted(path.glob("*.safetensors")) if path.is_dir() else [path] if path.suffix == ".safetensors" else []:
        with open(f, "rb") as fh:
            fh.seek(8 + len(header_bytes(f)[0]))
            h.update(fh.read(1 << 16))
    return "sha256:" + h.hexdigest()


def describe_inputs(inputs: dict[str, Path | str | list]) -> dict[str, Any]:
    """Each input of each role (a path or a list of paths) as its resolved path and `fingerprint`."""

    def describe(p: Path | str) -> dict[str, str]:
        p = Path(p)
        return {"path": str(p.resolve()), "hash": fingerprint(p) if p.exists() else "missing"}

    return {
        role: [describe(p) for p in v] if isinstance(v, (list, tuple)) else describe(v) for role, v in inputs.items()
    }


def write_provenance(
    folder: Path, method: str, params: dict[str, Any], inputs: dict[str, Path | str | list], notes: list[str] = ()
) -> dict[str, Any]:
    """Write `warp_provenance.json` and a model card README.md into `folder`; return the record.

    `inputs` maps a role ("init", "models", "policy", ...) to a path (or list of paths); each is
    recorded with its resolved path and `fingerprint`.
    """
    record = {
        "tool": "mergekit-warp",
        "version": __version__,
        "method": method,
        "params": params,
        "inputs": describe_inputs(inputs),
        "notes": list(notes),
        "command": sys.argv,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (Path(folder) / PROVENANCE).write_text(json.dumps(record, indent=2, default=str) + "\n")
    lines = card_lines(record)
    (Path(folder) / "README.md").write_text("\n".join(lines))
    return record


def card_lines(record: dict[str, Any]) -> list[str]:
    """The model card (README.md) of an output, from its provenance record."""
    method, params, notes = record["method"], record.get("params", {}), record.get("notes", [])
    # a peft adapter of its base: a merge of adapters, or a LoRA RL run's adapter (`adapter_of`)
    adapter = (method.endswith("-lora") and not params.get("densify")) or bool(params.get("adapter_of"))
    base = params.get("base_as_given") or params.get("adapter_of")
    return [
        "---",
        "library_name: peft" if adapter else "library_name: transformers",
        *([f"base_model: {base}"] if adapter and base else []),
        "tags: [mergekit-warp, warp, " + method + "]",
        "---",
        f"# {method} — made with mergekit-warp {record.get('version', '')}",
        "",
        f"Method: `{method}`. Parameters: " + ", ".join(f"`{k}={v}`" for k, v in params.items()) + ".",
        "",
        "Inputs:",
        *[
            f"- {role}: " + ", ".join(f"`{d['path']}`" for d in (v if isinstance(v, list) else [v]))
            for role, v in record.get("inputs", {}).items()
        ],
        *([""] + [f"Note: {n}" for n in notes] if notes else []),
        "",
        f"Full provenance (hashes, command line): `{PROVENANCE}`.",
        "",
    ]
