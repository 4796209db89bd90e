"""How far the `factors` EMA anchor of a LoRA run drifts from the `exact` one.

    python benchmarks/lora_anchor_drift.py                      # SmolLM2-135M-Instruct, sentiment reward
    python benchmarks/lora_anchor_drift.py --tiny --steps 200   # a random tiny Llama and a toy reward

WARP's anchor is the EMA of the policy's weights. With θ = W0 + s·B·A, `--lora-anchor exact` keeps the
EMA of the dense deltas s·B·A; `--lora-anchor factors` keeps EMAs of A and of B, whose product is not
the EMA of the products. This runs `warp rl --lora-anchor exact` (it steers the run) and keeps the
factor EMAs beside it, updated after the same steps with the same μ, so both anchors see one
trajectory. Printed every --every steps: the relative Frobenius distance ‖Δ_factors − Δ_exact‖ /
‖Δ_exact‖ over all adapted layers; at the end, KL(exact ‖ factors) per completion on held-out
completions sampled from the exact anchor, and the exact anchor's KL to the policy for scale. Both
are sums over each completion's tokens of the full-vocabulary KL of the next-token distributions (by
the chain rule their mean over completions drawn from the exact anchor is the sequence KL, with far
less variance than a difference of sampled log-probs).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from rl_bench import PROMPTS as RL_BENCH_PROMPTS  # (benchmarks/ is on sys.path when run as a script)

PROMPTS = RL_BENCH_PROMPTS[:12]  # the training prompts of rl_bench.py (its last four are held out here)
HELDOUT = ["Tell me about your commute.", "Describe an old bicycle.", "What do you think about winter?"]
TOY = "def reward(prompts, completions):\n    return [c.split().count('good') / max(len(c.split()), 1) for c in completions]\n"


def drift(lora, shadow: dict[str, torch.Tensor]) -> float:
    """‖s·B_f·A_f − D_exact‖ / ‖D_exact‖ over every adapted layer."""
    num = den = 0.0
    for i in range(len(lora.names)):
        d = lora.ema[f"D.{i}"]
        f = shadow[f"B.{i}"] @ shadow[f"A.{i}"] * lora.scale
        num += float((f - d).double().square().sum())
        den += float(d.double().square().sum())
    return (num / den) ** 0.5 if den > 0 else 0.0


def next_token_logp(model, ro) -> torch.Tensor:
    """(b, L − 1, V) log-softmax of the next-token logits at temperature 1."""
    from mergekit_warp.lm.sampling import positions

    mask = ro.attention_mask
    logits = model(input_ids=ro.input_ids, attention_mask=mask, position_ids=positions(mask)).logits
    return torch.log_softmax(logits[:, :-1].float(), -1)


def chain_kl(lp: torch.Tensor, lq: torch.Tensor, ro) -> float:
    """Mean over completions of Σ_t KL(p(·|y<t) ‖ q(·|y<t)) over the completion's tokens."""
    per_token = (lp.exp() * (lp - lq)).sum(-1) * ro.completion_mask[:, 1:]
    return float(per_token.sum(1).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="HF folder (default: SmolLM2-135M-Instruct, builtin)")
    p.add_argument("--tiny", action="store_true", help="a random tiny Llama and a toy reward (seconds)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--mu", type=float, default=0.01)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--every", type=int, default=10, help="print the distance every K steps")
    p.add_argument("--samples", type=int, default=16, help="held-out completions per prompt for the KL")
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()

    from mergekit_warp.lm.sampling import generate
    from mergekit_warp.rl import lora as rl_lora
    from mergekit_warp.rl import train as tr
    from mergekit_warp.rl.config import RLConfig
    from mergekit_warp.rl.objective import ema_update

    work = Path(tempfile.mkdtemp(prefix="warp-drift-"))
    prompts, reward, targets, model = PROMPTS, "sentiment", None, a.model or "smollm2-135m-instruct"
    if a.tiny:
        sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
        from tiny import WORDS, make_tiny_llama

        model = str(make_tiny_llama(work / "tiny", seed=0))
        prompts, HELDOUT[:] = (
            [" ".join(WORDS[i : i + 3]) for i in range(12)],
            [" ".join(WORDS[-i - 3 :][:3]) for i in range(3)],
        )
        (work / "toy.py").write_text(TOY)
        reward, targets = f"{work / 'toy.py'}:reward", ["lm_head", "o_proj", "down_proj"]
    (work / "p.jsonl").write_text("".join(json.dumps({"prompt": x}) + "\n" for x in prompts))

    shadow: dict[str, torch.Tensor] = {}
    rows: list[tuple[int, float]] = []
    exact_update = rl_lora.Lora.update_anchor

    def both(self, mu: float) -> None:  # the run's exact EMA, and the factor EMAs beside it
        if not shadow:
            shadow.update({f"A.{i}": x.detach().clone() for i, x in enumerate(self.A)})
            shadow.update({f"B.{i}": torch.zeros_like(x) for i, x in enumerate(self.B)})
        exact_update(self, mu)
        n = len(self.names)
        ema_update([shadow[f"{s}.{i}"] for s in "AB" for i in range(n)], [*self.A, *self.B], mu)
        both.step += 1
        if both.step % a.every == 0 or both.step == a.steps:
            rows.append((both.step, drift(self, shadow)))
            print(f"step {both.step:5d}  relative distance of the anchors' deltas {rows[-1][1]:.3e}", flush=True)

    both.step = 0
    result: dict[str, float] = {}
    real_publish = tr.publish

    def measure(run, out, stopped):  # at the end: KL between the two anchors on held-out completions
        lo = run.lora
        texts = [q for q in HELDOUT for _ in range(a.samples)]
        with torch.no_grad():
            ro = generate(run.anchor, run.tok, texts, max_new_tokens=24, temperature=1.0, generator_seed=1)
            lp_exact, lp_policy = next_token_logp(run.anchor, ro), next_token_logp(run.policy, ro)
            kept = dict(lo.ema)
            lo.anchor = "factors"  # the same hooks, reading the factor EMAs
            lo.ema.update(shadow)
            lp_factors = next_token_logp(run.anchor, ro)
            lo.anchor = "exact"
            lo.ema.clear()
            lo.ema.update(kept)
        result["kl_exact_factors"] = chain_kl(lp_exact, lp_factors, ro)
        result["kl_exact_policy"] = chain_kl(lp_exact, lp_policy, ro)
        result["tokens"] = float(ro.completion_mask.sum(1).float().mean())
        return real_publish(run, out, stopped)

    rl_lora.Lora.update_anchor, tr.publish = both, measure
    cfg = RLConfig(
        model=model,
        prompts=work / "p.jsonl",
        reward=reward,
        out=work / "out",
        steps=a.steps,
        batch_size=4,
        samples_per_prompt=2,
        max_new_tokens=24,
        lr=a.lr,
        warmup=0,
        mu=a.mu,
        lora_r=a.r,
        lora_targets=targets,
        lora_anchor="exact",
        state_every=0,
        kl_to_init=False,
        progress=False,
        threads=a.threads,
    )
    tr.train(cfg)
    print(
        f"\nmodel {model}; LoRA r={a.r}, {a.steps} steps, μ={a.mu}, lr={a.lr}\n"
        f"relative distance ‖Δ_factors − Δ_exact‖/‖Δ_exact‖ at the end: {rows[-1][1]:.3e} "
        f"(max over the run {max(d for _, d in rows):.3e})\n"
        f"KL(exact anchor ‖ factors anchor) per completion: {result['kl_exact_factors']:.3e} nats "
        f"(~{result['tokens']:.0f} tokens); KL(exact anchor ‖ policy): {result['kl_exact_policy']:.3e} nats"
    )
    print(json.dumps({"model": model, "r": a.r, "steps": a.steps, "mu": a.mu, "lr": a.lr, "drift": rows, **result}))


if __name__ == "__main__":
    main()
