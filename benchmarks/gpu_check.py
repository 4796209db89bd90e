"""The GPU paths of warp, exercised end to end on one CUDA machine, with figures.

    python benchmarks/gpu_check.py --out results/          # on a machine with a CUDA GPU
    python benchmarks/gpu_check.py --device cpu --quick    # a dry run of the script itself, on CPU

It builds a random Llama with SmolLM2-135M's shape (30 layers, width 576, vocab 49152; random weights and a
synthetic word-level tokenizer, so nothing is downloaded) and a learnable toy reward (the share of words
whose number is even), then runs, each as its own `warp` subprocess:
  1. `warp rl` in bf16 and in fp32 at the paper's batch (128 prompts × 2 samples × 64 new tokens):
     s/step (median after the first), generated tokens/s, peak GPU memory, all metrics finite;
  2. `warp rl --nproc 1` under DDP and FSDP2 (torchrun, NCCL);
  3. kill-and-resume: a run killed (SIGKILL) after its first saved state and resumed, against the same
     run uninterrupted (max |Δ| of the final weights: 0 means bit-identical);
  4. `warp merge slerp` (WARP, block angles), `ties`, `model_stock` and `warp liti` with --device cuda
     and --device cpu on the RL outputs: wall time each, max |cuda − cpu| over all tensors;
  5. `warp eval score` on cuda;
  6. `warp pipeline run` on cuda (1 iteration, 2 runs of 3 steps, a 3-point LITI sweep);
  7. where vLLM is installed, `warp rl --rollout vllm` as in 1 (bf16; the engine compiled, with CUDA graphs):
     s/step against the built-in sampler's, the weight push per step, vLLM's log-prob gap to the trainer's.
Each check reports ok/FAILED with its figures and goes on; everything is also written to OUT/gpu_check.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", PYTHONUNBUFFERED="1")
REWARD = '''
def score(prompts, completions):
    """Share of the completion's words whose number is even (learnable by a random model)."""
    out = []
    for c in completions:
        w = [x for x in c.split() if x[1:].isdigit()]
        out.append(sum(int(x[1:]) % 2 == 0 for x in w) / max(1, len(w)))
    return out
'''


def build(work: Path, quick: bool) -> tuple[Path, int]:
    """A random SmolLM2-shaped Llama (or a small one with --quick) with a word-level tokenizer."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab_size = 2048 if quick else 49152
    names = ["<pad>", "<unk>", "<s>", "</s>", ":", "user", "assistant", "system"]
    names += [f"w{i}" for i in range(vocab_size - len(names))]
    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(names)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant : {% endif %}"
    )
    shape = (
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)
        if quick
        else dict(
            hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3
        )
    )
    config = LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        rope_theta=100000.0,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
        **shape,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    out = work / "init"
    model.save_pretrained(out)
    fast.save_pretrained(out)
    (work / "reward.py").write_text(REWARD)
    import random

    rng = random.Random(0)
    for name, n in (("train", 512), ("heldout", 64)):
        with open(work / f"{name}.jsonl", "w") as f:
            for _ in range(n):
                words = " ".join(f"w{rng.randrange(vocab_size - 8)}" for _ in range(rng.randrange(4, 12)))
                f.write(json.dumps({"messages": [{"role": "user", "content": words}]}) + "\n")
    return out, sum(p.numel() for p in model.parameters())


class Checks:
    def __init__(self, out: Path):
        self.out, self.results = out, {}

    def run(self, name: str, argv: list[str], timeout: float = 300) -> tuple[bool, float, str]:
        """`warp ARGV` as a subprocess: (ok, wall seconds, the last lines of its output)."""
        t = time.time()
        try:
            p = subprocess.run(
                [sys.executable, "-m", "mergekit_warp", *argv], env=ENV, capture_output=True, text=True, timeout=timeout
            )
            ok, text = p.returncode == 0, (p.stdout + p.stderr)
        except subprocess.TimeoutExpired as e:
            ok, text = False, f"timed out after {timeout} s: {e.stderr or ''}"
        dt = time.time() - t
        tail = "\n".join(str(text).strip().splitlines()[-6:])
        if not ok:
            self.record(name, ok=False, wall_s=dt, output=tail)
        return ok, dt, tail

    def record(self, name: str, **figures) -> None:
        self.results[name] = figures
        status = "ok" if figures.get("ok", True) else "FAILED"
        shown = {
            k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in figures.items() if k not in ("ok", "output")
        }
        print(f"[{status}] {name}: {shown}", flush=True)
        if "output" in figures:
            print("    " + figures["output"].replace("\n", "\n    "), flush=True)
        (self.out / "gpu_check.json").write_text(json.dumps(self.results, indent=1, default=str))


def metrics_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def rl_figures(run: Path) -> dict:
    import math

    m = [r for r in metrics_of(run) if "step_time" in r]
    times = [r["step_time"] for r in m[1:]] or [m[0]["step_time"]]
    finite = all(math.isfinite(v) for r in m for v in r.values() if isinstance(v, float))
    return {
        "steps": len(m),
        "s_per_step": statistics.median(times),
        "gen_s": statistics.median(r["gen_time"] for r in m[1:] or m),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in m[1:] or m),
        "gpu_mem_gb": max((r.get("gpu_mem_gb", 0.0) for r in m), default=0.0),
        "reward_first": m[0]["reward"],
        "reward_last": m[-1]["reward"],
        "kl_init_last": m[-1].get("kl_init"),
        "all_finite": finite,
        "ok": finite,
    }


def max_diff(a: Path, b: Path) -> float:
    """max |a − b| over every tensor of two HF folders (fp32 math)."""
    from safetensors.torch import load_file

    worst = 0.0
    for f in sorted(Path(a).glob("*.safetensors")):
        x, y = load_file(f), load_file(Path(b) / f.name)
        for k in x:
            worst = max(worst, float((x[k].float() - y[k].float()).abs().max()))
    return worst


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("gpu_check"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="small model, small batches (a dry run of the script)")
    ap.add_argument("--workdir", type=Path, help="keep the models here (default: a temporary folder)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="warp-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    dev, q = args.device, args.quick
    c = Checks(args.out)

    import torch

    c.record(
        "environment",
        torch=torch.__version__,
        cuda=torch.version.cuda,
        gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        python=sys.version.split()[0],
    )
    t = time.time()
    init, params = build(work, q)
    c.record("build model", wall_s=time.time() - t, params_m=params / 1e6)
    reward = f"{work / 'reward.py'}:score"
    batch = ["--batch-size", "8", "--max-new-tokens", "8"] if q else ["--batch-size", "128", "--max-new-tokens", "64"]
    common = ["--model", str(init), "--prompts", str(work / "train.jsonl"), "--reward", reward, "--no-progress"]
    common += ["--device", dev, "--warmup", "0", "--lr", "1e-5", "--samples-per-prompt", "2"]

    # 1. bf16 and fp32 at the paper's batch
    runs = {}
    for dtype in ("bf16", "fp32"):
        out = work / f"rl_{dtype}"
        ok, dt, tail = c.run(f"rl {dtype}", ["rl", *common, *batch, "--dtype", dtype, "--steps", "6", "-o", str(out)])
        if ok:
            runs[dtype] = out
            c.record(f"rl {dtype}", wall_s=dt, **rl_figures(out))
    if len(runs) == 2:
        a, b = (c.results[f"rl {d}"]["s_per_step"] for d in ("bf16", "fp32"))
        c.record("rl bf16 vs fp32", speedup=b / a)

    # 2. torchrun, one process, DDP and FSDP2
    small = ["--batch-size", "8", "--max-new-tokens", "16"]
    for par in ("ddp", "fsdp"):
        out = work / f"rl_{par}"
        argv = ["rl", *common, *small, "--dtype", "bf16", "--steps", "3", "--nproc", "1", "--parallel", par]
        ok, dt, tail = c.run(f"rl --nproc 1 --parallel {par}", [*argv, "-o", str(out)])
        if ok:
            c.record(f"rl --nproc 1 --parallel {par}", wall_s=dt, **rl_figures(out))

    # 3. kill after the first saved state, resume, compare with the uninterrupted run
    argv = ["rl", *common, *small, "--dtype", "bf16", "--steps", "4", "--state-every", "2"]
    ok, _, _ = c.run("resume: reference", [*argv, "-o", str(work / "ref")])
    killed = work / "killed"
    p = subprocess.Popen(
        [sys.executable, "-m", "mergekit_warp", *argv, "-o", str(killed)],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    partial, deadline, seen = Path(f"{killed}.partial"), time.time() + 240, False
    while time.time() < deadline and p.poll() is None:
        if (partial / "state" / "progress.json").exists():
            seen = True
            time.sleep(0.5)  # inside step 3 by now, or still writing: both must resume cleanly
            break
        time.sleep(0.05)
    if p.poll() is None:
        os.kill(p.pid, signal.SIGKILL)
    p.wait()
    if ok:
        ok2, dt, tail = c.run("resume", [*argv, "-o", str(killed), "--resume"])
        if ok2:
            c.record(
                "resume",
                killed_after_state=seen,
                killed_rc=p.returncode,
                max_abs_diff_vs_uninterrupted=max_diff(work / "ref", killed),
                ok=True,
            )

    # 4. merges on cuda and cpu
    if len(runs) == 2:
        a, b = str(runs["bf16"]), str(runs["fp32"])
        jobs = {
            "merge slerp": ["merge", "slerp", a, b, "--init", str(init)],
            "merge ties": ["merge", "ties", a, b, "--base", str(init), "--density", "0.5", "--weight", "1"],
            "merge model_stock": ["merge", "model_stock", a, b, "--base", str(init)],
        }
        for name, argv in jobs.items():
            outs, walls = {}, {}
            for tag, d in (("cpu", "cpu"), ("dev", dev)):
                o = work / f"{name.replace(' ', '_')}_{tag}"
                ok, walls[tag], _ = c.run(f"{name} --device {d}", [*argv, "--device", d, "-o", str(o)])
                if ok:
                    outs[tag] = o
            if len(outs) == 2:
                diff = max_diff(outs["cpu"], outs["dev"])
                c.record(name, cpu_s=walls["cpu"], dev_s=walls["dev"], max_abs_dev_vs_cpu=diff)
        slerp = work / "merge_slerp_dev"
        if slerp.exists():
            outs = {}
            for tag, d in (("cpu", "cpu"), ("dev", dev)):
                o = work / f"liti_{tag}"
                ok, _, _ = c.run(
                    f"liti --device {d}",
                    ["liti", str(slerp), "--init", str(init), "--eta", "0.3", "--device", d, "-o", str(o)],
                )
                outs[tag] = o if ok else None
            if all(outs.values()):
                c.record("liti", max_abs_dev_vs_cpu=max_diff(outs["cpu"], outs["dev"]))

    # 5. held-out evaluation on the GPU
    if runs:
        o = work / "score"
        argv = ["eval", "score", str(init), *map(str, runs.values()), "--init", str(init)]
        argv += ["--prompts", str(work / "heldout.jsonl"), "--reward", reward, "--device", dev, "-o", str(o)]
        argv += ["--max-new-tokens", "16"] if q else []
        ok, dt, tail = c.run("eval score", argv)
        if ok:
            c.record("eval score", wall_s=dt, table=json.loads((o / "scores.json").read_text())["scores"])

    # 6. the pipeline on the GPU
    import yaml

    cfg = {
        "init": str(init),
        "prompts": {"train": str(work / "train.jsonl"), "heldout": str(work / "heldout.jsonl")},
        "reward": reward,
        "iterations": 1,
        "runs": 2,
        "rl": {"steps": 3, "lr": 1e-5, "warmup": 0, "batch_size": 8, "max_new_tokens": 16, "dtype": "bf16"},
        "devices": [dev],
        "eval": {"etas": [0.0, 0.5, 1.0], "max_prompts": 16},
    }
    (work / "pipeline.yaml").write_text(yaml.safe_dump(cfg))
    ok, dt, tail = c.run(
        "pipeline run", ["pipeline", "run", str(work / "pipeline.yaml"), "-o", str(work / "pipe")], 400
    )
    if ok:
        c.record("pipeline run", wall_s=dt, summary=tail)

    # 7. vLLM rollouts, where vLLM is installed (on CPU, for the dry run: fp32, heads of 32 for its attention)
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        c.record("rl --rollout vllm", skipped="vLLM is not installed: pip install 'mergekit-warp[vllm]'")
    else:
        dtype = "bf16" if dev.startswith("cuda") else "fp32"
        out = work / "rl_vllm"
        argv = ["rl", *common, *batch, "--dtype", dtype, "--steps", "6", "--rollout", "vllm", "-o", str(out)]
        ok, dt, tail = c.run("rl --rollout vllm", argv, 900)
        if ok:
            m = metrics_of(out)[1:] or metrics_of(out)
            gaps = [r["vllm_logprob_gap"] for r in m if r.get("vllm_logprob_gap") is not None]
            push = statistics.median(r["vllm_push_time"] for r in m)
            gap = statistics.median(gaps) if gaps else None
            c.record("rl --rollout vllm", wall_s=dt, dtype=dtype, **rl_figures(out), push_s=push, logprob_gap=gap)
            if f"rl {dtype}" in c.results and "s_per_step" in c.results[f"rl {dtype}"]:
                builtin = c.results[f"rl {dtype}"]["s_per_step"]
                c.record("rl vllm vs builtin", speedup=builtin / c.results["rl --rollout vllm"]["s_per_step"])
    failed = [k for k, v in c.results.items() if not v.get("ok", True)]
    print(f"\n{len(c.results) - len(failed)} checks ok, {len(failed)} failed: {failed}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
