"""How close are `warp merge` methods to the I/O floor, and how much memory do they hold?

For two model sizes (SIZE/2 and SIZE, default 1.5 GB of bf16 weights each, Llama-like layout, sharded
at 500 MB) it builds an init and two perturbed copies (3 checkpoints), then measures:
  (a) the I/O floor: read every input tensor with plain `safetensors.torch.load` and write one output
      of the same size with `save_file`;
  (b) each method as a `warp merge` subprocess, wall time: WARP's `slerp A B --init INIT` (block
      angles), and `ties`, `dare_ties`, `model_stock`, `multislerp` on the same base and models; and
      `slerp/2pass`: the same SLERP with `--memory-budget 0`, so no block is held in memory and the
      angle pass and the write pass each read the inputs (the engine before its one-read pass);
  (c) the peak RSS of (b), sampled with psutil;
  (d) with `--mergekit PATH/mergekit-yaml`: mergekit on the YAML warp wrote beside each output
      (`merge_config.yml`), same inputs: wall time and peak RSS.
It prints (b)/(a) and (c) (and (d)/(b)), and (b) less the start-up of a process that imports the
engine (the interpreter and torch: the floor runs inside this process and pays neither). Targets:
≤ 1.25× the floor for block SLERP and the methods without a statistics pass, ≤ 1.5× for those with
one, peak RSS ≤ the memory budget (2 GB) + 0.5 GB and flat in model size.
Every file is in the page cache for (a), (b) and (d) (they were just written): this compares the
engine's overhead with the cheapest possible read-and-write of the same bytes, not disk speed.

    python benchmarks/merge_bench.py                  # 0.75 GB and 1.5 GB (needs ~20 GB of disk)
    python benchmarks/merge_bench.py --size 200MB --methods slerp,ties     # a quick run
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load, save_file

from mergekit_warp.io.source import resolve_source
from mergekit_warp.io.writer import OutTensor, ShardWriter, parse_size

HIDDEN, INTER, VOCAB = 2048, 5632, 32000
# method → how it takes the init; the extra options it is timed with (mergekit's usual settings)
METHODS = {
    "slerp": "--init",
    "slerp/2pass": "--init",
    "ties": "--base",
    "dare_ties": "--base",
    "model_stock": "--base",
    "multislerp": "--base",
}
EXTRA = {
    "slerp/2pass": ["--memory-budget", "0"],
    "ties": ["--weight", "1", "--density", "0.5"],
    "dare_ties": ["--weight", "1", "--density", "0.5"],
    "multislerp": ["--weight", "1"],
}


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
    n_layers = 1 + max(int(t.name.split(".")[2]) for t in tensors if t.name.startswith("model.layers."))
    config = {  # a Llama config, so that mergekit (and transformers) take the folder for a model
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": n_layers,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "vocab_size": VOCAB,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
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
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    ap.add_argument("--mergekit", default=None, help="path of mergekit-yaml, to time mergekit on the same configs")
    args = ap.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    big = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="warp-bench-", dir=args.workdir))
    warp = [sys.executable, "-m", "mergekit_warp"]
    startup, _ = run_child([sys.executable, "-c", "import mergekit_warp.merge.api"])
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
            for method in methods:
                out = d / method.replace("/", "-")
                seconds, rss = run_child(
                    [
                        *warp,
                        "merge",
                        method.split("/")[0],
                        str(a),
                        str(b),
                        METHODS[method],
                        str(init),
                        "-o",
                        str(out),
                        "-q",
                        *EXTRA.get(method, []),
                    ]
                )
                mk = None
                if args.mergekit and (out / "merge_config.yml").is_file():
                    cfg = yaml.safe_load((out / "merge_config.yml").read_text())
                    cfg.pop("tokenizer_source", None)  # the benchmark's checkpoints carry no tokenizer
                    (d / "mk.yml").write_text(yaml.safe_dump(cfg))
                    mk = run_child([args.mergekit, str(d / "mk.yml"), str(d / "mk"), "--no-copy-tokenizer"])
                    shutil.rmtree(d / "mk")
                rows.append((nbytes, method, floor, seconds, rss, mk))
                shutil.rmtree(out)
            shutil.rmtree(d)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"start-up: interpreter + import of the engine and torch (included in (b)): {startup:.2f} s")
    print(
        f"{'model size':>10} {'method':>12} {'(a) I/O floor':>14} {'(b) warp':>10} {'(b)/(a)':>8} "
        f"{'(b)-startup / (a)':>18} {'(c) peak RSS':>13} {'(d) mergekit':>13} {'(d)/(b)':>8} {'its RSS':>9}"
    )
    for nbytes, method, floor, merge, rss, mk in rows:
        theirs = f"{mk[0]:>11.2f} s {mk[0] / merge:>8.2f} {mk[1] / 2**20:>5.0f} MiB" if mk else ""
        print(
            f"{nbytes / 1e9:>8.2f}GB {method:>12} {floor:>12.2f} s {merge:>8.2f} s {merge / floor:>8.2f} "
            f"{(merge - startup) / floor:>18.2f} {rss / 2**20:>9.0f} MiB {theirs}"
        )


if __name__ == "__main__":
    main()
