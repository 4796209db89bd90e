"""Resolve what the user named (an HF folder, a single .safetensors file, or a hub repo id) into the
list of safetensors files to read and the folder that holds config/tokenizer files.

PyTorch pickle checkpoints (`*.bin`, `*.pt`) are refused: unpickling runs arbitrary code, and the
conversion is one call away (see `PICKLE_HELP`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from mergekit_warp.errors import WarpError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
PICKLE_HELP = (
    "convert it to safetensors first, e.g. `AutoModelForCausalLM.from_pretrained(path)"
    ".save_pretrained(new_path, safe_serialization=True)` in Python (only for a checkpoint you trust)"
)
# Files fetched for a hub id: the weights, config/generation/tokenizer json, sentencepiece and BPE files.
HUB_PATTERNS = ["*.safetensors", "*.json", "tokenizer.model", "*.txt", "*.jinja"]
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SHARD = re.compile(r"^model-\d+-of-\d+\.safetensors$")


@dataclass(frozen=True)
class Source:
    """A resolved checkpoint: where its tensors live and where its support files live."""

    spec: str
    """What the user wrote (a path or a hub id)."""
    path: Path
    """The local folder or file that holds it (for a hub id: the snapshot folder in the HF cache)."""
    files: tuple[Path, ...]
    """The safetensors files, in index order."""
    revision: str | None = None
    """The hub revision asked for (hub ids only)."""

    @property
    def folder(self) -> Path | None:
        """The HF folder with config/tokenizer files, or None for a bare .safetensors file."""
        return self.path if self.path.is_dir() else None


def resolve_source(spec: str | Path, revision: str | None = None) -> Source:
    """Resolve `spec` — a builtin asset name (`smollm2-135m-instruct`), a local folder or .safetensors
    file, or a hub id — to a `Source`. Every command resolves checkpoints here. `WarpError` for a
    missing path, a folder that holds no checkpoint, a pickle checkpoint, or a hub id that cannot be
    had (offline and not cached)."""
    from mergekit_warp.io import builtin

    text = str(spec)
    if text in builtin.BUILTIN:
        return _local(text, builtin.builtin_folder(text), None)
    path = Path(text).expanduser()
    if path.exists():
        return _local(text, path, None)
    if HUB_ID.match(text) and not text.startswith((".", "/", "~")):
        snapshot = _download(text, revision)
        if not any(snapshot.glob("*.safetensors")):  # only *.bin on the hub: the patterns skipped them
            raise WarpError(
                f"{text}: no safetensors weights at revision {revision or 'main'} (a PyTorch pickle-only repo?); "
                f"{PICKLE_HELP}, or pick a revision that has them"
            )
        return _local(text, snapshot, revision)
    raise WarpError(f"{text}: no such file or folder; check the path (or give a hub id as owner/name)")


def _local(spec: str, path: Path, revision: str | None) -> Source:
    if path.is_file():
        if path.suffix == ".safetensors":
            return Source(spec, path, (path,), revision)
        if path.suffix in PICKLE_SUFFIXES:
            raise WarpError(f"{path}: PyTorch pickle checkpoints are refused (unsafe to load); {PICKLE_HELP}")
        raise WarpError(f"{path}: not a checkpoint; give an HF folder with safetensors weights or a .safetensors file")
    index = path / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            raise WarpError(
                f"{index}: unreadable shard index ({type(e).__name__}: {e}); re-save the checkpoint"
            ) from None
        if not isinstance(weight_map, dict):
            raise WarpError(f"{index}: unreadable shard index (weight_map is not an object); re-save the checkpoint")
        for tensor, name in weight_map.items():
            if not isinstance(name, str):
                raise WarpError(
                    f"{index}: unreadable shard index (tensor {tensor} maps to {name!r}, not a file name); "
                    "re-save the checkpoint"
                )
            # A plain name in this folder (no separator, not `.`/`..`, no drive like `C:`), judged as written,
            # never by resolving links: HF cache snapshots are symlinks into blobs/ and must keep working.
            if name in ("", ".", "..") or any(c in name for c in "/\\\0") or name[1:2] == ":":
                raise WarpError(
                    f"{index}: shard {name!r} (tensor {tensor}) is not a plain file name inside {path}; "
                    "refusing to read outside the checkpoint folder; re-download or re-save it"
                )
        names = list(dict.fromkeys(weight_map.values()))
        files = tuple(path / n for n in names)
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise WarpError(
                f"{index} names shards that are missing: {', '.join(missing[:3])}; re-download or re-save it"
            )
        return Source(spec, path, files, revision)
    if (path / SINGLE).is_file():
        return Source(spec, path, (path / SINGLE,), revision)
    shards = sorted(p for p in path.glob("*.safetensors") if _SHARD.match(p.name))
    if shards:  # sharded but the index went missing: the shard names still give the order
        return Source(spec, path, tuple(shards), revision)
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise WarpError(f"{path} holds a PyTorch pickle checkpoint ({pickles[0]}), which is refused; {PICKLE_HELP}")
    from mergekit_warp.io.publish import pruned_hint  # (publish reads checkpoints: imported here)

    if hint := pruned_hint(path):
        raise WarpError(f"{path}: not a checkpoint (no model.safetensors){hint}")
    raise WarpError(f"{path}: not a checkpoint (no model.safetensors, no {INDEX}); give an HF model folder")


def _download(repo_id: str, revision: str | None) -> Path:
    """The snapshot folder of `repo_id` (safetensors, json and tokenizer files only). Honours
    HF_HUB_OFFLINE and the local cache, as `huggingface_hub` does."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
    except LocalEntryNotFoundError:
        raise WarpError(
            f"{repo_id}: not a local path, and not in the local HF cache at this revision ({revision or 'main'}) "
            "while offline; download it first or give a local folder"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise WarpError(
            f"{repo_id}: cannot fetch from the hub ({first}); check the id/--revision or give a local folder"
        ) from None
