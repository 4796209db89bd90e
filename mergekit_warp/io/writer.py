"""A size-bounded shard writer that streams.

Every output tensor's name, dtype and shape is known before the first byte is written (they come from
the init's header), so the shard layout and each shard's safetensors header are planned up front and
the data is appended chunk by chunk as the merge loop produces it: memory never holds a shard, only
the chunk being written. Naming follows HF (`model-00001-of-00003.safetensors` +
`model.safetensors.index.json`; a single `model.safetensors` when one shard suffices).
"""

from __future__ import annotations

import contextlib
import json
import queue
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from mergekit_warp.dtypes import CODES
from mergekit_warp.errors import WarpError

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str | int, option: str = "--max-shard-size", zero: bool = False) -> int:
    """'5GB' → 5·10⁹ bytes (HF's convention), '500MiB' → 500·2²⁰, 12345 → 12345."""
    if isinstance(text, int):
        size = text
    elif str(text).strip().startswith("-"):
        raise WarpError(f"{option} {text!r}: must not be negative")
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
        if not m or m.group(2).upper() not in _UNITS:
            raise WarpError(f"{option} {text!r}: not a size; use e.g. 5GB, 500MB or 2GiB")
        size = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if size < 0 or (size == 0 and not zero):
        raise WarpError(f"{option} {text!r}: must be positive")
    return size


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


def plan_shards(tensors: list[OutTensor], max_shard_size: int) -> list[list[OutTensor]]:
    """Greedy, in order: start a new shard when the next tensor would overflow the current one (a
    tensor larger than the limit gets a shard of its own), as `save_pretrained` does."""
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _header(shard: list[OutTensor]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    pos = 0
    for t in shard:
        header[t.name] = {"dtype": CODES[t.dtype], "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
        pos += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
    return len(raw).to_bytes(8, "little") + raw


class ShardWriter:
    """Write the planned tensors in order; call `write(name, chunk)` with consecutive flat chunks of
    each tensor (already in its output dtype) and `close()` at the end."""

    def __init__(self, folder: Path, tensors: list[OutTensor], max_shard_size: int):
        self.folder = Path(folder)
        self.shards = plan_shards(tensors, max_shard_size)
        n = len(self.shards)
        self.files = (
            ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self._queue = [(i, t) for i, shard in enumerate(self.shards) for t in shard]
        self._pos = 0  # index into _queue of the tensor being written
        self._done = 0  # bytes of it written so far
        self._shard = -1
        self._fh = None

    def write(self, name: str, chunk: torch.Tensor) -> None:
        shard, t = self._queue[self._pos]
        if name != t.name or chunk.dtype != t.dtype:
            raise RuntimeError(f"writer expected {t.name} ({t.dtype}), got {name} ({chunk.dtype})")
        if shard != self._shard:
            self._open(shard)
        data = chunk.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._fh.write(data.data)
        self._done += data.nbytes
        if self._done > t.nbytes:
            raise RuntimeError(f"writer got {self._done} bytes for {name}, expected {t.nbytes}")
        if self._done == t.nbytes:
            self._pos, self._done = self._pos + 1, 0

    def _open(self, shard: int) -> None:
        if self._fh:
            self._fh.close()
        self._shard = shard
        self._fh = open(self.folder / self.files[shard], "wb")  # noqa: SIM115  (open across write() calls; closed in close/abort)
        self._fh.write(_header(self.shards[shard]))

    def abort(self) -> None:
        """Close the open shard without finishing (the caller discards the folder). A second error while
        closing (a full disk again) must not hide the first one."""
        if self._fh:
            with contextlib.suppress(OSError):
                self._fh.close()
            self._fh = None

    def close(self) -> None:
        """Check every tensor was written; write the index when sharded."""
        if self._fh:
            self._fh.close()
            self._fh = None
        if self._pos != len(self._queue):
            raise RuntimeError(f"writer closed after {self._pos} of {len(self._queue)} tensors")
        if len(self.files) > 1:
            index = {
                "metadata": {"total_size": sum(t.nbytes for s in self.shards for t in s)},
                "weight_map": {t.name: self.files[i] for i, s in enumerate(self.shards) for t in s},
            }
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


class BackgroundWriter:
    """A `ShardWriter` whose writes run on a thread, so the disk write of one chunk overlaps the math
    of the next. At most `depth` chunks wait in the queue: memory stays bounded by a few chunks."""

    def __init__(self, writer: ShardWriter, depth: int = 2):
        self.writer = writer
        self.files = writer.files
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="warp-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self.writer.write(*item)
                except BaseException as e:  # re-raised in the caller's thread
                    self._error = e
            self._queue.task_done()

    def drain(self) -> None:
        """Wait until every chunk handed over so far is written (its memory may then be reused)."""
        self._queue.join()
        if self._error is not None:
            raise self._error

    def write(self, name: str, chunk: torch.Tensor) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((name, chunk))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        self.writer.close()

    def abort(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self.writer.abort()
