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
from dataclasses import dataclass
from pathlib import Path

import torch

from mergekit_warp.errors import WarpError
from mergekit_warp.io.source import Source

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
}
CODES = {v: k for k, v in DTYPES.items()}
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


def read_header(file: Path) -> dict[str, TensorInfo]:
    """Parse and validate one safetensors file's header; `WarpError` naming the file if it is
    truncated, corrupt or not safetensors at all."""
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
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, ValueError):
            raise WarpError(f"{bad} (header is not JSON); re-download or re-save it") from None
    if not isinstance(header, dict):
        raise WarpError(f"{bad} (header is not a JSON object); re-download or re-save it")
    infos: dict[str, TensorInfo] = {}
    end = 0
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[meta["dtype"]]
            shape = tuple(int(s) for s in meta["shape"])
            start, stop = (int(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise WarpError(f"{bad} (bad entry for tensor {name}); re-download or re-save it") from None
        numel = 1
        for s in shape:
            numel *= s
        if stop - start != numel * dtype.itemsize or start < 0:
            raise WarpError(f"{bad} (tensor {name}: {stop - start} bytes for shape {list(shape)}); re-save it")
        infos[name] = TensorInfo(name, file, dtype, shape, 8 + n + start, stop - start)
        end = max(end, stop)
    if 8 + n + end > size:
        raise WarpError(f"{bad} (data ends at byte {8 + n + end}, file has {size}); re-download or re-save it")
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
                    raise WarpError(f"{source.spec}: tensor {name} appears in two shards ({self.infos[name].file.name}, {f.name})")
                self.infos[name] = info
        if not self.infos:
            raise WarpError(f"{source.spec}: the checkpoint holds no tensors")
        self._fds: dict[Path, int] = {}

    @property
    def names(self) -> list[str]:
        return list(self.infos)

    @property
    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.infos.values())

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Elements [start, stop) of tensor `name`, flattened, in its stored dtype (CPU)."""
        info = self.infos[name]
        stop = info.numel if stop is None else stop
        item = info.dtype.itemsize
        want = (stop - start) * item
        buf = bytearray(want)
        fd = self._fds.get(info.file)
        if fd is None:
            fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
        view, pos, got = memoryview(buf), info.offset + start * item, 0
        while got < want:  # pread may return short counts on large reads
            n = os.preadv(fd, [view[got:]], pos + got)
            if n <= 0:
                raise WarpError(f"{info.file}: truncated while reading tensor {name}; re-download or re-save it")
            got += n
        if want == 0:
            return torch.empty(0, dtype=info.dtype)
        return torch.frombuffer(buf, dtype=info.dtype)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
