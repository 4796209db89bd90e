"""A lazy checkpoint reader: names, shapes and dtypes come from the safetensors headers; tensor bytes
are read only when the loop asks for them, and only the element range it asks for.

Why `os.pread` rather than `safe_open`: `safe_open` memory-maps the whole file, and every page the
loop touches stays resident (and counted in RSS) until the handle closes, so reading a 5 GB shard
through it grows the process to 5 GB. Reading exactly the byte range of one chunk keeps memory bounded
by the chunk, and lets a 1 GB embedding matrix be merged in small pieces. The file format is the same
(8-byte header length, JSON header, raw little-endian data), and the header is validated here so a
truncated or corrupt file is named before any math.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from mergekit_warp.dtypes import SAFETENSORS
from mergekit_warp.errors import WarpError
from mergekit_warp.io.source import Source

MAX_HEADER = 100_000_000  # the safetensors spec's own limit


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype, shape and absolute byte offset of its data."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def is_float(self) -> bool:
        return self.dtype.is_floating_point


class _Duplicate(ValueError):
    """A JSON object in the header repeats a key (raised from `object_pairs_hook`)."""

    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise _Duplicate(k)
            seen.add(k)
    return obj


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _is_uint(x: object) -> bool:
    return type(x) is int and x >= 0  # `type(...) is int`: refuses bools (an int subclass) and floats


def header_bytes(file: Path) -> tuple[bytes, int]:
    """The raw JSON header of a safetensors file and the file's size (the header's length checked
    against the file and the format's bound)."""
    file = Path(file)
    size = file.stat().st_size
    bad = f"{file}: truncated or corrupt safetensors file"
    with open(file, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise WarpError(f"{bad} (only {size} bytes); re-download or re-save it")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise WarpError(f"{bad} (header length {n} does not fit in {size} bytes); re-download or re-save it")
        raw = fh.read(n)
    if len(raw) != n:
        raise WarpError(f"{bad} (header cut short: {len(raw)} of {n} bytes); re-download or re-save it")
    return raw, size


def read_header(file: Path) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors file's header; `WarpError` naming the file if it is
    truncated, corrupt or not safetensors at all.

    The rules are the safetensors library's own: a JSON object with unique keys; `__metadata__`, if
    present, maps str → str; every tensor has a known dtype, a shape of non-negative ints and
    `data_offsets` [start, stop] with stop - start = numel × itemsize; and the tensors, sorted by
    offset, tile the data buffer exactly (first at 0, no overlap, no hole, nothing after the last).
    """
    file = Path(file)
    raw, size = header_bytes(file)
    n = len(raw)
    bad = f"{file}: truncated or corrupt safetensors file"
    fix = "re-download or re-save it"
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except _Duplicate as e:
        raise WarpError(f"{bad} (header repeats the key {e.key!r}); {fix}") from None
    except UnicodeDecodeError:
        raise WarpError(f"{bad} (header is not UTF-8 text); {fix}") from None
    except RecursionError:
        raise WarpError(f"{bad} (header JSON is nested too deeply); {fix}") from None
    except ValueError:
        raise WarpError(f"{bad} (header is not JSON); {fix}") from None
    if not isinstance(header, dict):
        raise WarpError(f"{bad} (header is not a JSON object); {fix}")
    meta = header.get("__metadata__")  # null is accepted, as the safetensors library accepts it
    if meta is not None and (not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values())):
        raise WarpError(f"{bad} (__metadata__ is not an object of string values); {fix}")
    data_len = size - 8 - n
    infos: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise WarpError(f"{bad} (bad entry for tensor {name}: not an object); {fix}")
        code = entry.get("dtype")
        dtype = SAFETENSORS.get(code) if isinstance(code, str) else None
        if dtype is None:
            what = "no dtype" if code is None else f"unknown dtype {code!r}"
            raise WarpError(f"{bad} (tensor {name}: {what}); {fix}")
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(_is_uint(s) for s in shape):
            raise WarpError(f"{bad} (tensor {name}: shape {shape!r} is not a list of non-negative integers); {fix}")
        offsets = entry.get("data_offsets")
        if not (isinstance(offsets, list) and len(offsets) == 2 and _is_uint(offsets[0]) and _is_uint(offsets[1])):
            raise WarpError(f"{bad} (tensor {name}: data_offsets {offsets!r} are not two non-negative integers); {fix}")
        start, stop = offsets
        if start > stop:
            raise WarpError(f"{bad} (tensor {name}: data_offsets start {start} after stop {stop}); {fix}")
        numel = 1
        for s in shape:
            numel *= s
        if stop - start != numel * dtype.itemsize:
            raise WarpError(f"{bad} (tensor {name}: {stop - start} bytes for shape {shape}); {fix}")
        infos[name] = TensorInfo(name, file, dtype, tuple(shape), 8 + n + start, stop - start)
        spans.append((start, stop, name))
    # The tensors must tile the data buffer: sorted by offsets, each starts where the previous stopped.
    spans.sort()
    end, prev = 0, None
    for start, stop, name in spans:
        if start < end:
            raise WarpError(f"{bad} (tensor {name} overlaps tensor {prev} at data bytes {start}-{end}); {fix}")
        if start > end:
            where = f"between tensors {prev} and {name}" if prev is not None else f"before the first tensor {name}"
            raise WarpError(f"{bad} (a hole of {start - end} unused data bytes {where}); {fix}")
        end, prev = stop, name
    if end > data_len:
        raise WarpError(f"{bad} (data ends at byte {8 + n + end}, file has {size}); {fix}")
    if end < data_len:
        raise WarpError(f"{bad} ({data_len - end} unexpected bytes after the last tensor's data); {fix}")
    return infos


class CheckpointReader:
    """Every tensor of one `Source`, read on demand.

    `names` keeps file order (and offset order within a file) so a pass over the model reads each
    file front to back.
    """

    def __init__(self, source: Source):
        self.source = source
        self.infos: dict[str, TensorInfo] = {}
        for f in source.files:
            for name, info in sorted(read_header(f).items(), key=lambda kv: kv[1].offset):
                if name in self.infos:
                    raise WarpError(
                        f"{source.spec}: tensor {name} appears in two shards ({self.infos[name].file.name}, {f.name})"
                    )
                self.infos[name] = info
        if not self.infos:
            raise WarpError(f"{source.spec}: the checkpoint holds no tensors")
        self._fds: dict[Path, int] = {}
        self._open_lock = threading.Lock()
        self.held: dict[str, torch.Tensor] = {}
        """Tensors read whole ahead of time (`hold`), served from memory until `release`."""

    @property
    def names(self) -> list[str]:
        return list(self.infos)

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.infos.values())

    def read(self, name: str, start: int = 0, stop: int | None = None, into: memoryview | None = None) -> torch.Tensor:
        """Elements [start, stop) of tensor `name`, flattened, in its stored dtype (CPU). A held tensor
        is served from memory as a view, which the caller must not modify; `into`: the buffer to read
        into (exactly the bytes of the range), else a new one."""
        stop = self.infos[name].numel if stop is None else stop
        held = self.held.get(name)
        if held is not None:
            return held[start:stop]
        return self._read_raw(name, start, stop, into)

    def _read_raw(self, name: str, start: int, stop: int, into: memoryview | None) -> torch.Tensor:
        """`read` from the file, never from the held copies."""
        info = self.infos[name]
        item = info.dtype.itemsize
        want = (stop - start) * item
        if want == 0:
            return torch.empty(0, dtype=info.dtype)
        out = torch.empty(want, dtype=torch.uint8) if into is None else None  # not zero-filled
        view = memoryview(out.numpy()) if out is not None else into
        assert view is not None and view.nbytes == want
        fd = self._fds.get(info.file)
        if fd is None:
            with self._open_lock:  # `hold` may run on a read-ahead thread
                fd = self._fds.get(info.file)
                if fd is None:
                    fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
        pos, got = info.offset + start * item, 0
        while got < want:  # pread may return short counts on large reads
            n = os.preadv(fd, [view[got:]], pos + got)
            if n <= 0:
                raise WarpError(f"{info.file}: truncated while reading tensor {name}; re-download or re-save it")
            got += n
        return (out if out is not None else torch.frombuffer(into, dtype=torch.uint8)).view(info.dtype)

    def hold(self, name: str, into: memoryview | None = None) -> None:
        """Read tensor `name` whole into memory (into `into` when given); later reads of it are views of
        that copy: one disk read for a method that passes over a tensor twice (statistics, then output)."""
        if name not in self.held:
            self.held[name] = self.read(name, into=into)

    def release(self, name: str) -> None:
        self.held.pop(name, None)

    def close(self) -> None:
        self.held.clear()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
