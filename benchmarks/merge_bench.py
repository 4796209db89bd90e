"""How close is `warp merge slerp` to the I/O floor, and how much memory does it hold?

For two model sizes (SIZE/2 and SIZE, default 1.5 GB of bf16 weights each, Llama-like layout, sharded
at 500 MB) it builds an init and two perturbed copies, then measures:
  (a) the I/O floor: read every input tensor with plain `safetensors.torch.load_file` and write one
      output of the same size with `save_file`;
  (b) `warp merge slerp A B --init INIT` (block angles), as a subprocess, wall time;
  (c) the peak RSS of (b), sampled with psutil.
It prints (b)/(a) and (c). Targets: ratio ≤ 1.25, peak RSS ≤ 1 GB and flat in model size.
Every file is in the page cache for both (a) and (b) (they were just written): this compares the
engine's overhead with the cheapest possible read-and-write of the same bytes, not disk speed.

    python benchmarks/merge_bench.py                  # 0.75 GB and 1.5 GB (needs ~10 GB of disk)
    python benchmarks/merge_bench.py --size 200MB     # a quick run
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load, save_file

from mergekit_warp.io.source import resolve_source
from mergekit_warp.io.writer import OutTensor, ShardWriter, parse_size

HIDDEN, INTER, VOCAB = 2048, 5632, 32000


def layout(size: int) -> list[OutTensor]:
    """A Llama-like bf16 tensor list of about `size` bytes (embeddings + head fixed, blocks vary)."""
    bf = torch.bfloat16
    head = [OutTensor("model.embed_tokens.weight", bf, (VOCAB, HIDDEN))]
    per_block = []
    for p in ("q", "k", "v", "o"):
        per_block.append((f"self_attn.{p}_proj.weight", (HIDDEN, HIDDEN)))
    per_block += [
        ("mlp.gate_proj.weight", (INTER, HIDDEN)),
        ("mlp.up_proj.weight", (INTER, HIDDEN)),
        ("mlp.down_proj.weight", (HIDDEN, INTER)),
        ("input_layernorm.weight", (HIDDEN,)),
        ("post_attention_layernorm.weight", (HIDDEN,)),
    ]
    block_bytes = sum(2 * torch.Size(s).numel() for _, s in per_block)
    fixed = 2 * 2 * VOCAB * HIDDEN
    n_layers = max(1, round((size - fixed) / block_bytes))
    blocks = [OutTensor(f"model.layers.{i}.{n}", bf, s) for i in range(n_layers) for n, s in per_block]
    tail = [OutTensor("model.norm.weight", bf, (HIDDEN,)), OutTensor("lm_head.weight", bf, (VOCAB, HIDDEN))]
    return head + blocks + tail


def build(folder: Path, tensors: list[OutTensor], seed: int, base: Path | None) -> Path:
    """Write a random checkpoint (or `base` plus small noise: an 'RL run') tensor by tensor."""
    folder.mkdir()
    g = torch.Generator().manual_seed(seed)
    reader = None
    if base is not None:
        from mergekit_warp.io.reader import CheckpointReader

        reader = CheckpointReader(resolve_source(base))
    w = ShardWriter(folder, tensors, parse_size("500MB"))
    for t in tensors:
        if reader is None:
            x = torch.randn(t.shape, generator=g) * 0.02
        else:
            x = reader.read(t.name).float().reshape(t.shape) + 0.002 * torch.randn(t.shape, generator=g)
        w.write(t.name, x.to(t.dtype))
        del x
    w.close()
    return folder


def io_floor(inputs: list[Path], out: Path) -> float:
    """Seconds to read every shard of `inputs` into tensors and write the last one's shards back out.
    (`safetensors.torch.load` of the file's bytes: `load_file` maps the file lazily and would not
    touch the data at all.)"""
    out.mkdir()
    t0 = time.perf_counter()
    for i, folder in enumerate(inputs):
        for f in resolve_source(folder).files:
            sd = load(f.read_bytes())
            if i == len(inputs) - 1:
                save_file(sd, out / f.name, metadata={"format": "pt"})
            del sd
    return time.perf_counter() - t0


def run_child(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in bytes) of a child process, RSS sampled every 10 ms with psutil.

    (Not `ru_maxrss`: for a child forked from this big process it counts the parent's pages that the
    child held between fork and exec.)"""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)  # returns after the exec
    peak, ps = 0, psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss)
        except psutil.Error:
            break
        time.sleep(0.01)
    proc.wait()
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with status {proc.returncode}")
    return seconds, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1.5GB", help="the larger model size; the smaller is half (default 1.5GB)")
    ap.add_argument("--workdir", default=None, help="where to build checkpoints (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints afterwards")
    args = ap.parse_args()
    big = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="warp-bench-", dir=args.workdir))
    warp = [sys.executable, "-m", "mergekit_warp"]
    startup, _ = run_child([*warp, "--help"])
    rows = []
    try:
        for size in (big // 2, big):
            d = work / f"s{size}"
            d.mkdir()
            tensors = layout(size)
            nbytes = sum(t.nbytes for t in tensors)
            print(f"building 3 checkpoints of {nbytes / 1e9:.2f} GB in {d} …", file=sys.stderr)
            init = build(d / "init", tensors, 0, None)
            a, b = build(d / "a", tensors, 1, init), build(d / "b", tensors, 2, init)
            floor = io_floor([init, a, b], d / "floor")
            merge, rss = run_child(
                [*warp, "merge", "slerp", str(a), str(b), "--init", str(init), "-o", str(d / "m"), "-q"]
            )
            rows.append((nbytes, floor, merge, rss))
            shutil.rmtree(d)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"interpreter + import start-up of `warp` (included in (b)): {startup:.2f} s")
    print(
        f"{'model size':>10} {'(a) I/O floor':>14} {'(b) warp slerp':>15} {'(b)/(a)':>8} {'(b)-startup / (a)':>18} {'(c) peak RSS':>13}"
    )
    for nbytes, floor, merge, rss in rows:
        print(
            f"{nbytes / 1e9:>8.2f}GB {floor:>12.2f} s {merge:>13.2f} s {merge / floor:>8.2f} "
            f"{(merge - startup) / floor:>18.2f} {rss / 2**20:>10.0f} MiB"
        )


if __name__ == "__main__":
    main()
