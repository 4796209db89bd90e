"""Same job, two implementations: `warp rl` against TRL's RLOOTrainer, judged by one `warp eval score`.

    python benchmarks/trl_parity.py OUT [--seeds 8] [--steps 100] [--anchor ema|init] [--jobs 2]

Both train the same policy with the same settings: the RLOO baseline over k = 2 samples, the KL to the
reference summed over the completion in the reward (β 0.1), temperature 0.9, Adam with a 10-step linear
warm-up and gradient clipping at 1, and a reference that is either frozen (--anchor init) or an EMA of
the policy updated after every optimiser step (--anchor ema: TRL's sync_ref_model with
ref_model_sync_steps=1 and ref_model_mixup_alpha=μ). TRL runs twice per seed, with its default
learning-rate schedule (`linear`: decay to 0 at the last step) and with `constant_with_warmup`, warp's.
Every final policy is then scored together by `warp eval score` (held-out prompts, the same samples'
seeds for all): reward, KL(π‖π_sft) and completion length, mean ± s.e. over seeds, and each TRL variant's
paired difference to warp.

Without --model the policy is the reproduction's small Llama (examples/reproduce/sft.py, built into
OUT/sft) with its prompts and the `sentiment` reward. Needs `trl` and `datasets` installed (not
dependencies of warp): pip install trl datasets. About 15 minutes with the defaults on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCHEDULES = ("linear", "constant_with_warmup")


def settings(a: argparse.Namespace) -> dict:
    return dict(batch=16, k=2, new=24, lr=a.lr, warmup=10, beta=0.1, mu=0.01, temperature=0.9)


def warp_cmd(a: argparse.Namespace, seed: int, out: Path) -> list[str]:
    s = settings(a)
    return [
        sys.executable, "-m", "mergekit_warp", "rl", "--model", a.model, "--prompts", a.prompts, "--reward", a.reward,
        "-o", out, "--anchor", a.anchor, "--mu", s["mu"], "--beta", s["beta"], "--temperature", s["temperature"],
        "--batch-size", s["batch"], "--samples-per-prompt", s["k"], "--baseline", "rloo", "--lr", s["lr"],
        "--warmup", s["warmup"], "--steps", a.steps, "--max-new-tokens", s["new"], "--seed", seed, "--threads", "1",
        "--no-kl-to-init", "--no-save-anchor", "--state-every", "0", "-q",
    ]  # fmt: skip


def trl_worker(a: argparse.Namespace) -> None:
    """One TRL run (in its own process): trains and saves the final policy to a.out."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import RLOOConfig, RLOOTrainer

    from mergekit_warp.lm.prompts import load_prompts
    from mergekit_warp.lm.rewards import load_reward

    torch.set_num_threads(1)
    s = settings(a)
    tok = AutoTokenizer.from_pretrained(a.model, padding_side="left")
    reward = load_reward(a.reward)
    prompts = load_prompts(Path(a.prompts), tok)

    def reward_fn(prompts, completions, **kw):
        return reward(list(prompts), list(completions))

    args = RLOOConfig(
        output_dir=str(a.out) + ".trl",
        per_device_train_batch_size=s["batch"] * s["k"],
        num_generations=s["k"],
        max_completion_length=s["new"],
        temperature=s["temperature"],
        beta=s["beta"],
        learning_rate=s["lr"],
        warmup_steps=s["warmup"],
        lr_scheduler_type=a.schedule,
        max_grad_norm=1.0,
        weight_decay=0.0,
        sync_ref_model=a.anchor == "ema",
        ref_model_sync_steps=1,
        ref_model_mixup_alpha=s["mu"],
        max_steps=a.steps,
        gradient_checkpointing=False,
        disable_dropout=True,
        use_cpu=True,
        bf16=False,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=a.seed,
    )
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    data = Dataset.from_list([{"prompt": p} for p in prompts])
    trainer = RLOOTrainer(model=model, reward_funcs=reward_fn, args=args, train_dataset=data, processing_class=tok)
    trainer.train()
    trainer.save_model(str(a.out))
    tok.save_pretrained(str(a.out))


def run(argv: list, log: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    with open(log, "w") as f:
        if subprocess.call([str(x) for x in argv], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT):
            raise SystemExit(f"failed: see {log}")


def mean_se(xs: list[float]) -> str:
    se = statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan")
    return f"{statistics.fmean(xs):+.3f} ± {se:.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] + " Needs trl and datasets.")
    p.add_argument("out", type=Path)
    p.add_argument("--model", help="θ_sft (default: the reproduction's small Llama, built into OUT/sft)")
    p.add_argument("--prompts", help="training prompts (default: the reproduction's)")
    p.add_argument("--heldout", help="held-out prompts for the evaluation (default: the reproduction's)")
    p.add_argument("--reward", default="sentiment")
    p.add_argument("--anchor", choices=("ema", "init"), default="ema")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--worker", choices=("trl",), help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--schedule", default="linear", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        a.out = a.out.resolve()
        return trl_worker(a)

    missing = [m for m in ("trl", "datasets") if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"trl_parity.py needs {' and '.join(missing)}: pip install trl datasets")
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if a.model is None:
        a.model = out / "sft"
        if not (a.model / "model.safetensors").exists():
            run([sys.executable, ROOT / "examples" / "reproduce" / "sft.py", a.model], out / "sft.log")
        a.prompts, a.heldout = out / "prompts" / "train.jsonl", out / "prompts" / "heldout.jsonl"
    jobs = []
    for seed in range(1, a.seeds + 1):
        jobs.append((out / f"warp_{seed}", warp_cmd(a, seed, out / f"warp_{seed}")))
        for sched in SCHEDULES:
            dst = out / f"trl-{sched}_{seed}"
            argv = [sys.executable, __file__, dst, "--worker", "trl", "--seed", seed, "--schedule", sched]
            argv += ["--model", a.model, "--prompts", a.prompts, "--reward", a.reward, "--anchor", a.anchor]
            jobs.append((dst, argv + ["--steps", a.steps, "--lr", a.lr]))
    todo = [(d, argv) for d, argv in jobs if not d.exists()]
    print(f"{len(todo)} runs to do ({len(jobs) - len(todo)} done)", flush=True)
    with ThreadPoolExecutor(a.jobs) as pool:
        futures = [pool.submit(run, argv, d.parent / f"{d.name}.log") for d, argv in todo]
        try:
            for f in futures:
                f.result()
        except BaseException:  # the first failure stops the queue
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    scores = out / "scores"
    if not scores.exists():
        ev = [sys.executable, "-m", "mergekit_warp", "eval", "score", *[d for d, _ in jobs], "--init", a.model]
        ev += ["--prompts", a.heldout, "--reward", a.reward, "--samples-per-prompt", "32", "--max-new-tokens", "24"]
        run(ev + ["--batch-size", "64", "-o", scores, "-q"], out / "scores.log")
    by = {Path(s["path"]).name: s for s in json.loads((scores / "scores.json").read_text())["scores"]}
    seeds = range(1, a.seeds + 1)
    print(f"\n{a.anchor} anchor, {a.steps} steps, {a.seeds} seeds; mean ± s.e. over seeds")
    print(f"{'system':<34}{'reward':>16}{'KL(π‖π_sft)':>16}{'length':>16}")
    for system in ["warp", *(f"trl-{s}" for s in SCHEDULES)]:
        cols = [[by[f"{system}_{s}"][key] for s in seeds] for key in ("reward", "kl", "length")]
        print(f"{system:<34}" + "".join(f"{mean_se(c):>16}" for c in cols))
    for system in (f"trl-{s}" for s in SCHEDULES):
        cols = [[by[f"warp_{s}"][key] - by[f"{system}_{s}"][key] for s in seeds] for key in ("reward", "kl", "length")]
        print(f"{'warp − ' + system:<34}" + "".join(f"{mean_se(c):>16}" for c in cols))


if __name__ == "__main__":
    main()
