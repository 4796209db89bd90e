"""The one streaming loop.

Every method is a `Combine`: given a tensor name and a way to fetch the same element range of that
tensor from each input (stored dtype, on the math device), return the output elements in fp32. The
loop walks the reference input's tensors in file order, each in chunks of `chunk` elements, fetches,
combines, casts once to the output dtype and hands the chunk to the shard writer (on a thread, so the
disk write overlaps the next chunk's math).

Memory and reads: the loop goes unit by unit, a unit being the tensors that share a statistic (a
transformer block for WARP's SLERP, else one tensor). A unit whose bytes over all inputs fit half the
memory budget is read whole into memory on a read-ahead thread while the previous unit is merged, so
reading overlaps the math and a method that needs a statistic of the unit first (an angle, a magnitude
threshold) computes it from memory: every input byte is read from disk once. A unit too large for the
budget is streamed chunk by chunk, and such a method reads it twice (statistics, then output). Methods
compute their statistics lazily, when the unit's first chunk is merged (`gram_pass` accumulates the
Gram matrix of a group of tensors in fp64, chunk by chunk).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

from mergekit_warp.errors import WarpError
from mergekit_warp.io.publish import copy_support_files, set_config_dtype
from mergekit_warp.io.reader import CheckpointReader
from mergekit_warp.io.writer import BackgroundWriter, OutTensor, ShardWriter
from mergekit_warp.merge import math as mmath
from mergekit_warp.progress import Bytes

CHUNK = 1 << 22  # elements per chunk: 16 MB of fp32 per input
BUDGET = 2 * 10**9  # bytes of inputs held in memory at once (the unit being merged and the next one)


class Fetch:
    """One chunk of one tensor: `fetch(i)` is elements [start, stop) of input i, flat, in its stored dtype,
    on the math device (math on it must promote to fp32). It may be a view of a tensor held in memory:
    never modify it in place (`.float()` of fp32 data is the same tensor; `.to(torch.float32, copy=True)`
    is a new one). `shape` is the whole tensor's; methods that draw random numbers or work row by row
    use `start`, `stop` and `shape`."""

    def __init__(self, readers: list[CheckpointReader], name: str, start: int, stop: int, device: torch.device):
        self.readers, self.name, self.start, self.stop, self.device = readers, name, start, stop, device
        self.shape = readers[0].infos[name].shape
        self.seen: set[int] = set()

    def __call__(self, i: int) -> Tensor:
        self.seen.add(i)
        return fetch_raw(self.readers[i], self.name, self.start, self.stop, self.device)


Combine = Callable[[str, Fetch], Tensor]


def chunks(numel: int, chunk: int) -> Iterator[tuple[int, int]]:
    """Consecutive (start, stop) element ranges covering [0, numel); one empty range for numel 0."""
    if numel == 0:
        yield 0, 0
    for start in range(0, numel, chunk):
        yield start, min(start + chunk, numel)


def fetch_raw(reader: CheckpointReader, name: str, start: int, stop: int, device: torch.device) -> Tensor:
    """Elements [start, stop) of `name`, flat, in the stored dtype, on `device` (read-only: see `Fetch`).
    Math on it must promote to fp32 (mixed-dtype torch ops do: `acc.add_(bf16_chunk)` computes in fp32), which fuses the
    upcast with the first operation instead of materialising an fp32 copy of every input."""
    return reader.read(name, start, stop).to(device)


def check_finite(value: Tensor, readers: list[CheckpointReader], name: str, device: torch.device, chunk: int) -> None:
    """NaN/Inf in any input propagates into `value` (a Gram matrix or an output chunk; IEEE: 0·Inf is
    NaN), so one cheap test per chunk guards all inputs. When it fails, find and name the culprit."""
    if bool(torch.isfinite(value.sum())) or bool(torch.isfinite(value).all()):
        return  # (the second test only runs if the sum overflowed)
    for r in readers:
        if not r.infos[name].is_float:
            continue
        for start, stop in chunks(r.infos[name].numel, chunk):
            if not bool(torch.isfinite(fetch_raw(r, name, start, stop, device)).all()):
                raise WarpError(
                    f"tensor {name} in {r.infos[name].file} holds NaN or Inf values; "
                    "this checkpoint is broken: use an earlier one or fix the run that wrote it"
                )
    raise WarpError(
        f"merged tensor {name} overflowed to Inf in the output dtype; check the parameters (e.g. a large --eta) or --dtype"
    )


def gram_pass(
    readers: list[CheckpointReader],
    groups: dict[str, list[str]],
    *,
    device: torch.device,
    chunk: int = CHUNK,
    progress: Bytes | None = None,
    full: bool = False,
) -> dict[str, dict[str, Tensor]]:
    """Per group, the Gram matrix of the task vectors δ_m = θ_m − θ_0 (readers[0] is the init), shape
    (M, M), and with `full` also of the weights θ_0..θ_M, shape (M+1, M+1); fp64 on the CPU.
    Reads one chunk of one tensor from each input at a time."""
    k = len(readers)
    progress = progress or Bytes(False)
    names = [n for g in groups.values() for n in g]
    infos = readers[0].infos
    total = sum(r.infos[n].nbytes for r in readers for n in names)
    out: dict[str, dict[str, Tensor]] = {}
    with progress.task("angles", total, len(names)) as advance:
        for group, members in groups.items():
            g_delta = torch.zeros(k - 1, k - 1, dtype=torch.float64, device=device)
            g_full = torch.zeros(k, k, dtype=torch.float64, device=device) if full else None
            for name in members:
                g_name = torch.zeros_like(g_delta)
                for start, stop in chunks(infos[name].numel, chunk):
                    base = fetch_raw(readers[0], name, start, stop, device).float()  # (n,)
                    d = torch.empty(k - 1, stop - start, device=device)  # (M, n)
                    for m in range(1, k):  # copy_ upcasts any stored dtype (fp64 included) into the fp32 row
                        d[m - 1].copy_(fetch_raw(readers[m], name, start, stop, device)).sub_(base)
                    g_name += mmath.gram(d)
                    if g_full is not None:
                        x = torch.cat([base[None], d + base])  # (k, n): θ_m again (exact up to fp32)
                        g_full += mmath.gram(x)
                        del x
                    del base, d
                    advance(sum(r.infos[name].dtype.itemsize * (stop - start) for r in readers), 0)
                check_finite(g_name, readers, name, device, chunk)
                g_delta += g_name
                advance(0, 1)
            out[group] = {"delta": g_delta.cpu()}
            if g_full is not None:
                out[group]["full"] = g_full.cpu()
    return out


def output_layout(ref: CheckpointReader, dtype: torch.dtype | None) -> list[OutTensor]:
    """The output's tensors: the reference's names, shapes and non-float dtypes; float tensors in
    `dtype` (default: each as the reference stores it)."""
    return [OutTensor(n, (dtype or i.dtype) if i.is_float else i.dtype, i.shape) for n, i in ref.infos.items()]


def write_pass(
    readers: list[CheckpointReader],
    ref: int,
    folder: Path,
    combine: Combine,
    *,
    dtype: torch.dtype | None,
    max_shard_size: int,
    device: torch.device,
    chunk: int = CHUNK,
    progress: Bytes | None = None,
    rows: bool = False,
    groups: dict[str, list[str]] | None = None,
    budget: int = BUDGET,
) -> list[str]:
    """Stream every tensor of `readers[ref]` through `combine` (float tensors) or copy it from the
    reference (non-float tensors: int buffers are never interpolated); return the shard file names.
    `rows`: every chunk holds whole rows (last dimension) of the tensor. `groups`: tensors that share a
    statistic, held in memory together (default: each tensor alone); `budget`: bytes of inputs held."""
    layout = output_layout(readers[ref], dtype)
    writer = BackgroundWriter(ShardWriter(folder, layout, max_shard_size))
    progress = progress or Bytes(False)
    total = sum(r.total_bytes for r in readers)
    plan = units([t.name for t in layout], groups or {}, readers, budget)
    arenas = Arenas(max((_unit_bytes(readers, ns) for ns, held in plan if held), default=0))
    ahead = ThreadPoolExecutor(1, thread_name_prefix="warp-read")

    def load(j: int) -> Future | None:  # read unit j whole on the read-ahead thread, into arena j % 2
        return ahead.submit(_hold, readers, plan[j][0], arenas.get(j % 2)) if j < len(plan) and plan[j][1] else None

    try:
        with progress.task("merge", total, len(layout)) as advance:
            by_name = {t.name: t for t in layout}
            loading = load(0)
            for j, (names, _) in enumerate(plan):
                if loading is not None:
                    loading.result()
                writer.drain()  # unit j − 1 is written: its arena may take unit j + 1
                loading = load(j + 1)
                for name in names:
                    t = by_name[name]
                    row = (t.shape[-1] if len(t.shape) > 1 else max(1, math.prod(t.shape))) if rows else 1
                    _stream_tensor(readers, ref, t, combine, writer, device, max(1, chunk // row) * row, advance)
                    for r in readers:
                        r.release(name)
                    advance(0, 1)
    except BaseException:
        writer.abort()
        raise
    finally:
        ahead.shutdown(wait=True, cancel_futures=True)  # (nothing is pending after the last unit)
        for r in readers:
            r.held.clear()
    writer.close()
    return writer.files


class Arenas:
    """Two reusable buffers of `size` bytes for the units held in memory (the one merged, the one read
    ahead), allocated on first use: the pages are touched once, not once per unit."""

    def __init__(self, size: int):
        self.size, self.buffers = size, [None, None]

    def get(self, i: int) -> memoryview:
        if self.buffers[i] is None:
            self.buffers[i] = torch.empty(self.size, dtype=torch.uint8)
        return memoryview(self.buffers[i].numpy())


def units(
    names: list[str], groups: dict[str, list[str]], readers: list[CheckpointReader], budget: int
) -> list[tuple[list[str], bool]]:
    """The loop's units in order: runs of consecutive tensors of one group (a tensor outside `groups`
    is a group of its own), each with whether it is held in memory: when its bytes over all inputs fit
    half the budget and its group is one run (a group scattered over the file is streamed)."""
    owner = {n: g for g, ns in groups.items() for n in ns}
    runs: list[tuple[str, list[str]]] = []
    for n in names:
        g = owner.get(n, "\0" + n)
        if runs and runs[-1][0] == g:
            runs[-1][1].append(n)
        else:
            runs.append((g, [n]))
    seen: dict[str, int] = {}
    for g, _ in runs:
        seen[g] = seen.get(g, 0) + 1
    return [(ns, seen[g] == 1 and _unit_bytes(readers, ns) <= budget // 2) for g, ns in runs]


ALIGN = 64  # byte alignment of each tensor held in an arena


def _unit_bytes(readers: list[CheckpointReader], names: list[str]) -> int:
    return sum(-(-r.infos[n].nbytes // ALIGN) * ALIGN for r in readers for n in names)


def _hold(readers: list[CheckpointReader], names: list[str], arena: memoryview) -> None:
    pos = 0
    for n in names:
        for r in readers:
            nbytes = r.infos[n].nbytes
            r.hold(n, arena[pos : pos + nbytes])
            pos += -(-nbytes // ALIGN) * ALIGN


def _stream_tensor(
    readers: list[CheckpointReader],
    ref: int,
    t: OutTensor,
    combine: Combine,
    writer: BackgroundWriter,
    device: torch.device,
    chunk: int,
    advance: Callable[[int, int], None],
) -> None:
    info = readers[ref].infos[t.name]
    for start, stop in chunks(info.numel, chunk):
        if not info.is_float:
            writer.write(t.name, readers[ref].read(t.name, start, stop))
            advance(info.dtype.itemsize * (stop - start), 0)
            continue
        fetch = Fetch(readers, t.name, start, stop, device)
        y = combine(t.name, fetch).to(t.dtype)
        # checked after the cast, so an fp16 overflow is caught too
        check_finite(y, [readers[i] for i in sorted(fetch.seen)], t.name, device, chunk)
        writer.write(t.name, y.cpu())
        advance(sum(readers[i].infos[t.name].dtype.itemsize * (stop - start) for i in fetch.seen), 0)


def finish_folder(folder: Path, support_from: Path | None, dtype: torch.dtype | None) -> list[str]:
    """Copy config/tokenizer files; when the output dtype was chosen, say so in config.json so
    `from_pretrained(dtype="auto")` picks it."""
    copied = copy_support_files(support_from, folder) if support_from else []
    if dtype is not None:
        set_config_dtype(folder, dtype)
    return copied


def linear_combine(weights: Callable[[str, Fetch], Tensor]) -> Combine:
    """Σ w_m θ_m with per-tensor weights w (M,) from `weights` (a soup, a full-weight SLERP)."""

    def combine(name: str, fetch: Fetch) -> Tensor:
        w = weights(name, fetch).tolist()
        acc = fetch(0).to(torch.float32, copy=True).mul_(w[0])
        for m in range(1, len(w)):
            acc.add_(fetch(m), alpha=w[m])
        return acc

    return combine


def affine_combine(weights: Callable[[str, Fetch], Tensor]) -> Combine:
    """θ_0 + Σ c_m (θ_m − θ_0) = (1 − Σc)·θ_0 + Σ c_m θ_m with per-tensor weights c (M,) from `weights`:
    SLERP (c from the group's angle), LERP of task vectors (c = w) and LITI (c = (η,)) are all this.

    The second form costs one fused upcast-multiply-add per input; in fp32 its rounding (≈ 6e-8·|θ|)
    is far below the output's (bf16: 4e-3·|θ|), and c = (1, 0, …) still returns θ_1 exactly."""

    def combine(name: str, fetch: Fetch) -> Tensor:
        c = weights(name, fetch).tolist()
        out = fetch(0).to(torch.float32, copy=True).mul_(1.0 - sum(c))
        for m, w in enumerate(c, start=1):
            out.add_(fetch(m), alpha=w)
        return out

    return combine
