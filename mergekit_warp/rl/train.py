"""`warp rl`: REINFORCE on a KL-regularised reward with an EMA anchor (WARP, Algorithm 1, inner loop).

    for t in 1..T:
        y ~ π_θ(·|x) at temperature τ                               # rollout
        R = r(x, y) − β·(log π_θ(y|x) − log π_anchor(y|x))          # reward + KL shaping, no grad
        A = R − baseline (RLOO over the k samples of each prompt)
        θ ← Adam(θ, ∇ −A·log π_θ(y|x)), warm-up, clipping           # loss, step
        θ_anchor ← (1 − μ)·θ_anchor + μ·θ    (fp32; frozen with --anchor init)

`step` is that loop body; `train` = `setup` (validate every input, load the models, resume), `step`
T times with metrics and resumable state on the way, then `publish`. All log-probs are sums over
completion tokens at the sampling temperature τ (see lm/sampling.py). One process, DDP and FSDP2 differ
only inside `Parallel`, fp32 and bf16-with-fp32-master-weights only inside `MasterWeights`
(rl/parallel.py). Under torchrun every rank samples its contiguous share of the step's prompts;
completion i of the GLOBAL batch is drawn from uniforms seeded by (seed, step, i), so the samples do not
depend on how the batch is split, and every rank takes the Adam step of the global batch.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergekit_warp import trackers
from mergekit_warp.devices import resolve_device
from mergekit_warp.dtypes import parse_dtype
from mergekit_warp.errors import WarpError
from mergekit_warp.io.adapter import write_adapter
from mergekit_warp.io.atomic import claim, staged
from mergekit_warp.io.builtin import BUILTIN
from mergekit_warp.io.publish import (
    PROVENANCE,
    check_disjoint,
    check_output_path,
    copy_support_files,
    publishing,
    write_provenance,
)
from mergekit_warp.lm import heldout
from mergekit_warp.lm.models import load_model, load_tokenizer, model_context, model_folder
from mergekit_warp.lm.prompts import Prompt, check_lengths, read_prompts
from mergekit_warp.lm.rewards import RewardFn, describe_reward, load_reward, reward_inputs
from mergekit_warp.lm.sampling import Rollout, add_special_tokens, generate, sequence_logprobs
from mergekit_warp.merge.adapters import sample_of
from mergekit_warp.progress import Steps, duration
from mergekit_warp.rl import state as st
from mergekit_warp.rl.config import ADDED_OPTIONS, RESUMABLE_CHANGES, RLConfig
from mergekit_warp.rl.lora import ALL_LINEAR, Lora, merged_state, target_names
from mergekit_warp.rl.objective import advantages, ema_update, lr_at, reinforce_loss, shaped_reward
from mergekit_warp.rl.parallel import MasterWeights, Parallel

METHOD = "warp-rl"


def seed_of(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (seed, step, rank, chunk)."""
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0]) >> 1


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Prompt indices of a step: consecutive slices of a stream of seeded per-epoch permutations."""
    perms: dict[int, list[int]] = {}
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, i = divmod(pos, n)
        if epoch not in perms:
            g = torch.Generator().manual_seed(seed_of(seed, epoch, 7))
            perms[epoch] = torch.randperm(n, generator=g).tolist()
        out.append(perms[epoch][i])
    return out


@dataclass
class Run:
    """Everything a step reads and changes."""

    cfg: RLConfig
    par: Parallel
    src: Path
    """The init's HF folder (config and tokenizer files are copied from it)."""
    tok: Any
    prompts: list[Prompt]
    eval_prompts: list[str]
    reward_fn: RewardFn
    policy: torch.nn.Module
    """The HF model: sampling, no-grad scoring, saving."""
    trainer: torch.nn.Module
    """What the loss runs through (the DDP wrapper, the FSDP-sharded policy, or the policy)."""
    anchor: torch.nn.Module
    """fp32 EMA of the policy (with --anchor init: the frozen init)."""
    init: torch.nn.Module | None
    """Frozen init for the KL to it (the anchor itself with --anchor init; None when not estimated)."""
    weights: MasterWeights
    opt: torch.optim.Optimizer
    work: Path
    step: int = 0
    lora: Lora | None = None
    """The trained adapter (--lora-r); then `anchor` and `init` are views of the policy's model."""
    base_sample: dict | None = None
    """With --lora-r: a sample of the base's weights, recorded so merges can tell the adapter's base."""
    engine: Any = None
    """With --rollout vllm: the vLLM engine that samples (lm/vllm_engine.py)."""

    @property
    def autocast(self) -> torch.dtype | None:
        """The fp32 anchor runs at the policy's precision (a LoRA anchor shares the policy's base)."""
        dtype = parse_dtype(self.cfg.dtype)
        return dtype if dtype != torch.float32 and self.lora is None else None

    def ema_state(self) -> dict[str, torch.Tensor] | None:
        """The EMA anchor's fp32 tensors by name (what the resumable state saves); None with --anchor init."""
        if self.cfg.anchor != "ema":
            return None
        if self.lora is not None:
            return self.lora.ema
        named = dict(self.anchor.named_parameters())
        return {n: named[n] for n in self.weights.names}

    def push_engine(self) -> float:
        """Load the policy's current weights into the vLLM engine; returns the seconds it took."""
        if self.lora is None:  # (under FSDP every rank gathers the whole model: each has an engine)
            named = self.par.full(dict(self.policy.state_dict()))
        else:
            named = st.cast(merged_state(self.policy, self.lora.deltas()), parse_dtype(self.cfg.dtype))
        return self.engine.push(named)

    def update_anchor(self) -> None:
        """θ_anchor ← (1 − μ)·θ_anchor + μ·θ (on local shards under FSDP: sharded like the policy)."""
        if self.cfg.anchor != "ema":
            return
        if self.lora is not None:
            self.lora.update_anchor(self.cfg.mu)
        else:
            ema = self.ema_state()
            ema_update(
                [_local(ema[n]) for n in self.weights.names], [_local(m) for m in self.weights.tensors], self.cfg.mu
            )


# ---------------------------------------------------------------------------------------------------
# The step


def step(run: Run) -> dict[str, float]:
    """One optimiser step of REINFORCE against the anchor; returns its metrics (means over all ranks)."""
    cfg, par, k, tau = run.cfg, run.par, run.cfg.samples_per_prompt, run.cfg.temperature
    t0, c0 = time.time(), time.process_time()

    # -- rollout (no grad): this rank's prompts, k samples each, prompt-major
    texts, chunks = rollout(run)
    t_gen = time.time() - t0
    if run.engine is not None:
        run.engine.sleep()  # --vllm-sleep on a GPU: its memory is the trainer's until the next push

    # -- reward (sees the prompts as the policy did)
    completions = [y for c in chunks for y in c.completions]
    raw = torch.tensor(run.reward_fn(texts, completions), dtype=torch.float32, device=chunks[0].input_ids.device)

    # -- log-probs and KL shaping (no grad); one chunk: its forward with grad also gives log π
    run.policy.train(cfg.grad_checkpointing)  # HF checkpointing only acts in train mode
    logp_grad = _logp(run.trainer, chunks[0], tau) if len(chunks) == 1 else None
    # (several micro-batches: a no-grad forward, not the log π recorded while sampling: that one differs
    # by float rounding, which the shaped reward would carry into the update)
    logp = logp_grad.detach().float() if logp_grad is not None else _logprobs(run.policy, chunks, tau)  # (b,)
    logp_anchor = _logprobs(run.anchor, chunks, tau, run.autocast)  # (b,)
    logp_init = logp_anchor if run.init is run.anchor else _logprobs(run.init, chunks, tau)  # (b,) or None
    shaped = shaped_reward(raw, logp, logp_anchor, cfg.beta)  # (b,)
    # The batch-mean baseline is the mean of the GLOBAL batch (RLOO stays within a prompt: local).
    center = par.all_sum(shaped.sum()) / (len(texts) * par.world_size) if cfg.baseline == "mean" else None
    adv = advantages(shaped, k, cfg.baseline, center)  # (b,)

    # -- loss: a local mean; averaging the ranks' gradients gives the global batch mean
    loss_sum = 0.0
    for j, (c, a) in enumerate(zip(chunks, adv.split(cfg.chunk))):
        with par.grad_sync(run.trainer, enabled=j == len(chunks) - 1):  # communicate once per step
            lp = logp_grad if logp_grad is not None else _logp(run.trainer, c, tau)
            loss = reinforce_loss(lp.float(), a, len(texts))
            loss.backward()
        loss_sum += loss.item()
    run.policy.eval()

    # -- optimiser step, refused when anything became NaN/Inf (the weights stay as they were)
    run.weights.take_grads()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.weights.tensors, cfg.clip_grad or float("inf"))  # global norm
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    if not math.isfinite(grad_norm):
        values = {"reward": raw, "log π": logp, "log π_anchor": logp_anchor, "loss": torch.tensor(loss_sum)}
        culprit = next((k_ for k_, v in values.items() if not bool(torch.isfinite(v).all())), "gradient")
        _diverged(run, f"the {culprit} became NaN/Inf")
    lr = lr_at(run.step, cfg.lr, cfg.warmup)
    for group in run.opt.param_groups:
        group["lr"] = lr
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    if not par.all_finite(run.weights.tensors):
        _diverged(run, "the weights became NaN/Inf after the optimiser step")
    run.weights.push()

    run.update_anchor()
    t_push = run.push_engine() if run.engine is not None else None
    run.step += 1

    # -- metrics
    lengths = torch.cat([c.lengths for c in chunks]).float()
    ent_len = par.all_sum(torch.stack([torch.cat([c.entropy for c in chunks]).sum(), lengths.sum()]).cpu())
    dt = time.time() - t0
    metrics = {
        "step": run.step,
        "reward": float(raw.mean()),
        "reward_shaped": float(shaped.mean()),
        "kl_anchor": float((logp - logp_anchor).mean()),
        "kl_init": float((logp - logp_init).mean()) if logp_init is not None else None,
        "entropy": float(ent_len[0] / ent_len[1].clamp(min=1)),  # per token, over all ranks
        "completion_len": float(lengths.mean()),
        "loss": loss_sum,
        "grad_norm": grad_norm,
        "lr": lr,
        "tokens_per_s": float(lengths.sum()) / dt,
        "samples_per_s": len(texts) / dt,
        "step_time": dt,
        "step_cpu_time": time.process_time() - c0,  # CPU seconds, all threads: robust on a busy machine
        "gen_time": t_gen,
    }
    if run.engine is not None:  # vLLM's log-probs of its samples against the trainer's, per token
        metrics["entropy"] = None  # (the engine does not return the distributions)
        vllm_logp = torch.cat([c.logprobs for c in chunks])  # (after top-k/top-p, unlike the trainer's: no gap then)
        restricted = cfg.top_k > 0 or cfg.top_p < 1.0
        metrics["vllm_logprob_gap"] = None if restricted else float(((vllm_logp - logp).abs() / lengths).mean())
        metrics["vllm_push_time"] = t_push
    dev = chunks[0].input_ids.device
    if dev.type == "cuda":  # peak accelerator memory of this rank so far
        metrics["gpu_mem_gb"] = torch.cuda.max_memory_allocated(dev) / 2**30
    metrics.update(par.mean_metrics({k_: v for k_, v in metrics.items() if isinstance(v, float) and k_ != "entropy"}))
    for k_ in ("tokens_per_s", "samples_per_s"):  # throughput of the whole job
        metrics[k_] *= par.world_size
    return metrics


def rollout(run: Run) -> tuple[list[str], list[Rollout]]:
    """This rank's share of the step's prompts, k samples each (prompt-major), and their completions in
    micro-batches; completion j of this rank is completion share.start·k + j of the global batch."""
    cfg, k = run.cfg, run.cfg.samples_per_prompt
    mine = run.par.share(cfg.batch_size)
    idx = batch_indices(len(run.prompts), cfg.batch_size, run.step, cfg.seed)[mine]
    texts = [run.prompts[i].text for i in idx for _ in range(k)]
    run.policy.eval()
    if run.engine is not None:  # row j of the step drawn with seed (seed, step, j), whatever the chunking
        first, dev = mine.start * k, next(run.policy.parameters()).device
        return texts, [
            run.engine.sample(
                run.tok,
                texts[c : c + cfg.chunk],
                seeds=[seed_of(cfg.seed, run.step, first + j) for j in range(c, min(c + cfg.chunk, len(texts)))],
                max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                top_k=cfg.top_k,
                max_prompt_length=cfg.max_prompt_length,
                device=dev,
                stop=cfg.stop or (),
            )
            for c in range(0, len(texts), cfg.chunk)
        ]
    chunks = [
        generate(
            run.policy,
            run.tok,
            texts[c : c + cfg.chunk],
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            stop=cfg.stop or (),
            max_prompt_length=cfg.max_prompt_length,
            generator_seed=seed_of(cfg.seed, run.step),
            row_offset=mine.start * k + c,
            share_prefix=run.par.share_prefix(run.policy),
            all_done=run.par.all_done(run.policy),
        )
        for c in range(0, len(texts), cfg.chunk)
    ]
    return texts, chunks


def _logp(model, c: Rollout, tau: float) -> torch.Tensor:
    """(b,) log π(y|x) of one chunk, with grad when grad is enabled."""
    share = Parallel.share_prefix(model)
    return sequence_logprobs(model, c.input_ids, c.attention_mask, c.completion_mask, tau, share_prefix=share)


def _logprobs(model, chunks: list[Rollout], tau: float, autocast: torch.dtype | None = None) -> torch.Tensor | None:
    """(b,) log π of every completion under `model` (no grad), chunk by chunk; None without a model."""
    if model is None:
        return None
    dev = next(model.parameters()).device
    with torch.no_grad(), torch.autocast(dev.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        return torch.cat([_logp(model, c, tau).float() for c in chunks])


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _diverged(run: Run, what: str) -> None:
    last = st.saved_step(run.work)
    kept = f"the last good state (step {last}) stays in {run.work}" if last else "no state was saved yet"
    raise WarpError(
        f"step {run.step + 1}: {what}; the run stopped and nothing was published ({kept}); lower "
        "--lr (or --beta, --length-penalty) and start over with --force"
    )


def evaluate(run: Run) -> dict[str, float]:
    """Mean reward and KL(π‖π_init) on the held-out prompts (fixed seeds, so steps are comparable), the
    completions ending at the run's stop strings as in training."""
    with torch.autocast(
        next(run.policy.parameters()).device.type, dtype=run.autocast or torch.float32, enabled=run.autocast is not None
    ):
        s = heldout.sample_and_score(
            run.policy,
            run.init,
            run.tok,
            run.eval_prompts,
            run.reward_fn,
            max_new_tokens=run.cfg.max_new_tokens,
            temperature=run.cfg.temperature,
            seed=seed_of(run.cfg.seed, 2**31 - 1),
            batch_size=run.cfg.chunk,
            share_prefix=run.par.share_prefix(run.policy),
            all_done=run.par.all_done(run.policy),
            stop=run.cfg.stop or (),  # the completions the run trains on
        )
    return {"eval_reward": float(s.rewards.mean()), "eval_kl_init": float(s.kls.mean())}


# ---------------------------------------------------------------------------------------------------
# Setup


def setup(cfg: RLConfig, par: Parallel, work: Path, resuming: bool) -> Run:
    """Check every input, then load tokenizer, prompts, reward and models, and the saved state when
    resuming. Nothing is written before all inputs have passed."""
    src = model_folder(cfg.model)
    tok = load_tokenizer(src)
    prompts = read_prompts(cfg.prompts, tok)
    eval_prompts = read_prompts(cfg.eval_prompts, tok) if cfg.eval_prompts else []
    context = model_context(src)  # before any weights load: bad input fails in seconds
    for ps, path in ((prompts, cfg.prompts), (eval_prompts, cfg.eval_prompts)):
        if context and ps:
            check_lengths(ps, tok, context, cfg.max_new_tokens, Path(path), cfg.max_prompt_length)
    reward_fn = load_reward(
        cfg.reward, par.device(cfg.device), cfg.length_penalty, tokenizer=tok, prepare=par.place if par.fsdp else None
    )

    dtype, where = parse_dtype(cfg.dtype), par.load_device(cfg.device)
    want_init = cfg.anchor == "init" or cfg.kl_to_init or bool(eval_prompts)
    lora = None
    if cfg.lora:  # one model: the base (frozen, any dtype) with the adapter; init and anchor are views of it
        policy = load_model(src, dtype, where).requires_grad_(False)
        names = target_names(policy, cfg.lora_targets or [ALL_LINEAR], str(cfg.model))
        kind = (cfg.lora_anchor or "factors") if cfg.anchor == "ema" else None
        lora = Lora(policy, names, cfg.lora_r, cfg.lora_alpha or 2.0 * cfg.lora_r, kind, seed_of(cfg.seed, 0x10A))
        anchor = lora.view(policy, "anchor" if cfg.anchor == "ema" else None)
        init = anchor if cfg.anchor == "init" else lora.view(policy, None) if want_init else None
        if cfg.grad_checkpointing:  # the frozen embedding's output must carry grad into checkpointed blocks
            policy.enable_input_require_grads()
    else:
        policy = load_model(src, par.policy_dtype(dtype), where)
        anchor = par.place(load_model(src, "fp32", where).requires_grad_(False))  # fp32 even for a bf16 policy
        init = anchor if cfg.anchor == "init" else None
        if init is None and want_init:
            init = par.place(load_model(src, cfg.dtype, where).requires_grad_(False))  # frozen: policy dtype suffices
    if cfg.grad_checkpointing:  # transformers ≥ 5.2x renamed it; older releases only have the first name
        getattr(policy, "activation_checkpointing_enable", policy.gradient_checkpointing_enable)()
    for m in policy.modules():  # RL wants log π of the sampling policy: no dropout, even in train mode
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    trainer = par.wrap(policy)

    names = [n for n, p in policy.named_parameters() if p.requires_grad]
    params = [p for p in policy.parameters() if p.requires_grad]
    # Adam's weights: the policy's own in fp32 (an adapter always), else fp32 copies of the fp32 anchor
    # (= the init, now).
    separate = par.policy_dtype(dtype) != torch.float32 and lora is None
    anchor_named = dict(anchor.named_parameters()) if separate else {}
    weights = MasterWeights(names, params, [anchor_named[n] for n in names] if separate else None)
    # Fused Adam (CPU and CUDA): one kernel per tensor, no foreach temporaries the size of the model.
    dev_type = torch.device(where if not par.fsdp else par.device(cfg.device)).type
    opt = torch.optim.Adam(weights.tensors, lr=cfg.lr, fused=dev_type in ("cpu", "cuda") and not par.fsdp)

    run = Run(
        cfg,
        par,
        src,
        tok,
        prompts,
        [p.text for p in eval_prompts],
        reward_fn,
        policy,
        trainer,
        anchor,
        init,
        weights,
        opt,
        work,
        lora=lora,
        base_sample=sample_of(src, [f"{n}.weight" for n in lora.names]) if lora is not None else None,
    )
    if cfg.rollout == "vllm":  # one engine per process, each sampling its share of the batch
        from mergekit_warp.lm.vllm_engine import Engine

        # vLLM reserves a KV cache for its longest request: this run's longest prompt and completion
        longest = max(len(tok(p.text, add_special_tokens=add_special_tokens(tok))["input_ids"]) for p in prompts)
        longest = min(longest, cfg.max_prompt_length or longest) + cfg.max_new_tokens
        run.engine = Engine(
            src,
            dtype=dtype,
            device=par.device(cfg.device),
            seed=cfg.seed,
            max_len=min(longest, context) if context else longest,
            gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
            kv_cache_gb=cfg.vllm_kv_cache_gb,
            compiled=cfg.vllm_compile,
            sleep=cfg.vllm_sleep,
            world_size=par.world_size,
            quiet=not cfg.progress,
        )
    if resuming:
        if lora is not None and st.read_config(work).get("base_sample", run.base_sample) != run.base_sample:
            raise WarpError(
                f"--resume: the base {cfg.model} has other weights than when the interrupted run in {work} "
                "started (its adapter means nothing on another base); restore it, or pass --force to start over"
            )
        run.step = st.load_state(work, weights.named(), run.ema_state(), opt)
        weights.push()
        if run.engine is not None:
            run.push_engine()
        if par.is_main:
            st.trim_after(work, run.step)
    elif par.is_main:  # (a LoRA run also records a sample of its base: a resume checks it is the same)
        st.start_work(work, {**cfg.as_dict(), **({"base_sample": run.base_sample} if lora is not None else {})})
    return run


def _inputs(cfg: RLConfig) -> list[Path]:
    """What the run reads, for the output-path checks: the init, the prompt files, a reward file/folder."""
    return [
        model_folder(cfg.model),
        Path(cfg.prompts),
        *([Path(cfg.eval_prompts)] if cfg.eval_prompts else []),
        *reward_inputs(cfg.reward),
    ]


def _plan(cfg: RLConfig, out: Path, work: Path) -> str:
    """What this invocation does with OUT and OUT.partial: 'done' (resume of a finished run),
    'resume' (continue the saved state) or 'start'. Refuses what must not be written."""
    inputs = _inputs(cfg)
    if cfg.resume and out.exists():
        prov = out / PROVENANCE
        if prov.is_file() and f'"method": "{METHOD}"' in prov.read_text(errors="replace"):
            diff = _differing(cfg, _recorded_options(prov))
            if diff:
                raise WarpError(
                    f"--resume: {out} is a finished run made with other options "
                    f"({', '.join('--' + d.replace('_', '-') for d in diff)}); choose another -o, or drop "
                    "--resume and pass --force to replace it"
                )
            if work.exists():  # killed between publishing OUT and removing the work folder
                shutil.rmtree(work, ignore_errors=True)
            return "done"
        raise WarpError(f"--resume: {out} exists but is not a finished `warp rl` output; choose another -o")
    if work.exists() and not cfg.force:
        st.repair(work)
        if not (work / st.STATE).exists():
            shutil.rmtree(work)  # nothing resumable in it (a run stopped before its first state)
    if cfg.resume and work.exists():
        diff = _differing(cfg, st.read_config(work))
        if diff:
            raise WarpError(
                f"--resume: options {', '.join('--' + d.replace('_', '-') for d in diff)} differ from "
                f"the interrupted run in {work}; restore them or pass --force to start over"
            )
        return "resume"
    check_output_path(out, inputs, cfg.force)
    if work.exists() and not cfg.force and not cfg.resume:
        raise WarpError(f"an interrupted run is in {work}; pass --resume to continue it or --force to restart")
    return "start"


def _differing(cfg: RLConfig, saved: dict) -> list[str]:
    """The options of `cfg` that differ from those a run was `saved` with (changes a resume cannot
    take), options added since that run counting at their defaults."""
    saved = {**ADDED_OPTIONS, **saved}
    return sorted(k for k, v in _comparable(cfg.as_dict()).items() if _comparable(saved).get(k) != v)


def _recorded_options(prov: Path) -> dict:
    """The `warp rl` options a finished output's provenance records."""
    try:
        params = json.loads(prov.read_text()).get("params", {})
    except (OSError, ValueError, AttributeError):
        raise WarpError(f"--resume: {prov} is damaged; choose another -o, or pass --force to replace it") from None
    return {k: v for k, v in params.items() if k in RLConfig.model_fields}


def _comparable(d: dict) -> dict:
    norm = {k: (str(Path(v).resolve()) if k in ("prompts", "out", "eval_prompts") and v else v) for k, v in d.items()}
    return {k: v for k, v in norm.items() if k not in RESUMABLE_CHANGES}


# ---------------------------------------------------------------------------------------------------
# The run


def train(cfg: RLConfig) -> Path:
    """Run RL as configured and return the published OUT folder (see state.py for the work folder).
    Rank 0 holds the output's lock for the whole run (a second run on the same -o is refused)."""
    from transformers.utils import logging as hf_logging

    # Process-wide settings of this run, restored afterwards (train() may be called from a pipeline).
    was_on, threads = hf_logging.is_progress_bar_enabled(), torch.get_num_threads()
    if not cfg.progress or os.environ.get("RANK", "0") != "0":  # --no-progress (and ranks > 0) silence
        hf_logging.disable_progress_bar()  # transformers' load/save bars too
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        out, inputs = Path(cfg.out).absolute(), _inputs(cfg)
        check_disjoint(out, inputs)  # before the lock file is made beside OUT
        check_disjoint(st.partial_dir(out), inputs)
        if os.environ.get("RANK", "0") != "0":
            return _train(cfg)
        with claim(out):
            return _train(cfg)
    finally:
        torch.set_num_threads(threads)
        if was_on:
            hf_logging.enable_progress_bar()


def _train(cfg: RLConfig) -> Path:
    out = Path(cfg.out).absolute()
    work = st.partial_dir(out)
    trackers.check(cfg.report_to)  # a missing tracker library fails before any work
    par = Parallel.start(cfg.device, cfg.parallel, parse_dtype(cfg.dtype))
    resolve_device(par.device(cfg.device))  # a bad --device fails before anything is read
    plan = _plan(cfg, out, work) if par.is_main else "start"
    plan = _agree(par, plan)
    if plan == "done":
        return out
    par.barrier()  # every rank has checked OUT and OUT.partial before rank 0 writes
    tracker = (  # opened before anything is written: a tracker that cannot start stops the run here
        trackers.open_run(cfg.report_to, name=cfg.run_name or out.name, group=cfg.run_group, config=_options(cfg, par))
        if par.is_main
        else None
    )
    try:
        run = setup(cfg, par, work, resuming=plan == "resume")
    except BaseException:
        if tracker is not None:
            tracker.close()
        raise
    fresh = plan == "start"

    view = Steps("rl", cfg.progress and par.is_main, cfg.steps, run.step)
    t_run, stopped, first, warned = time.time(), "steps", run.step, False
    try:
        while run.step < cfg.steps:
            metrics = step(run)
            metrics["wall_time"] = time.time() - t_run
            every = cfg.eval_every and run.step % cfg.eval_every == 0
            if run.eval_prompts and (every or run.step == cfg.steps):
                metrics.update(evaluate(run))
            if par.is_main and run.step == first + 1 and cfg.steps > run.step:
                view.note(
                    f"step {run.step} took {metrics['step_time']:.1f} s: the {cfg.steps - first} steps of this run "
                    f"take about {duration(metrics['step_time'] * (cfg.steps - first))} at this pace"
                )
            if par.is_main:
                st.append_metrics(work, metrics)
                if tracker is not None:
                    tracker.log(metrics, run.step)
                gap = metrics.get("vllm_logprob_gap")  # None: no engine, or top-k/top-p (see step)
                view.update(
                    run.step,
                    f"reward {metrics['reward']:+.3f}  KL {metrics['kl_anchor']:.2f}  "
                    f"{metrics['tokens_per_s']:.0f} tok/s" + (f"  vLLM gap {gap:.3g}" if gap is not None else ""),
                )
                if gap is not None and gap > cfg.vllm_gap_warning and not warned:
                    warned = True
                    view.note(
                        f"step {run.step}: vLLM's log-probs of its samples differ from the trainer's by {gap:.3g} "
                        f"per token (> {cfg.vllm_gap_warning}): the rollouts are off-policy by that much "
                        "(bf16 engine?); see vllm_logprob_gap in metrics.jsonl"
                    )
            ckpt = cfg.save_every and run.step % cfg.save_every == 0
            if ckpt or (cfg.state_every and run.step % cfg.state_every == 0):
                save(run, checkpoint=bool(ckpt))
            if cfg.kl_stop is not None and metrics["kl_init"] >= cfg.kl_stop:
                stopped = f"kl_stop: KL to init {metrics['kl_init']:.3g} ≥ {cfg.kl_stop} after step {run.step}"
                break
    except BaseException as e:
        if par.is_main and fresh and st.saved_step(work) is None:
            shutil.rmtree(work, ignore_errors=True)  # nothing resumable: leave nothing behind
        if isinstance(e, KeyboardInterrupt) and par.is_main:
            last = st.saved_step(work)
            view.note(
                f"interrupted in step {run.step + 1}: "
                + (
                    f"the state of step {last} is in {work}; run the same command with --resume to continue"
                    if last
                    else "no state was saved yet (every --state-every steps), nothing to resume"
                )
            )
        if isinstance(e, WarpError) and not str(e).startswith("step "):
            last = st.saved_step(work)
            where = (
                f"resumable state of step {last} kept in {work}; fix it and rerun with --resume"
                if last
                else "nothing was saved; fix it and rerun"
            )
            raise WarpError(f"{e} (at step {run.step + 1}; {where})") from None
        raise
    finally:
        view.close()
        if tracker is not None:
            tracker.close()
        if run.engine is not None:
            run.engine.close()
    return publish(run, out, stopped)


def _agree(par: Parallel, plan: str) -> str:
    """Rank 0's plan on every rank (a rank that plans alone could leave the others in a collective)."""
    if par.world_size == 1:
        return plan
    from mergekit_warp.rl import dist

    return dist.broadcast_object(plan, par.info)


def save(run: Run, checkpoint: bool) -> None:
    """checkpoints/step_K (when `checkpoint`) and the resumable state; rank 0 writes. FSDP shards are
    gathered first (every rank must take part), DDP replicas are checked equal first."""
    par = run.par
    par.check(run.policy, "policy")  # (an adapter is part of it)
    if run.lora is None:
        par.check(run.anchor, "anchor")
    policy_sd = par.full(dict(run.policy.state_dict())) if checkpoint and par.fsdp else None
    master = par.full(run.weights.named())
    ema = run.ema_state()
    ema = par.full(ema) if ema is not None else None
    osd = par.optimizer_state(run.opt)
    if par.is_main:
        if checkpoint:
            folder = run.work / "checkpoints" / f"step_{run.step}"
            with staged(folder, replace=True) as tmp:  # replacing one left by a run that died before its state
                _write_policy(run, tmp, policy_sd)
                write_provenance(tmp, "warp-rl-checkpoint", {**_record(run), "step": run.step}, {"init": run.src})
        st.save_state(run.work, run.step, master, ema, osd)


def _write_policy(run: Run, folder: Path, state_dict: dict | None = None) -> None:
    """The policy as an HF folder, or with --lora-r as a peft adapter folder of its base (tokenizer files
    beside it, no config.json: nothing should take it for a full model)."""
    if run.lora is None:
        st.write_hf(run.policy, run.src, folder, state_dict)
        return
    write_adapter(folder, run.lora.factors(), _base_name(run))
    for f in copy_support_files(run.src, folder):
        if f in ("config.json", "generation_config.json"):
            (folder / f).unlink()


def _base_name(run: Run) -> str:
    """The base an adapter names in its adapter_config.json: a hub id as given, else the absolute folder."""
    local = Path(run.cfg.model).exists() or run.cfg.model in BUILTIN
    return str(Path(run.src).absolute()) if local else run.cfg.model


def _record(run: Run) -> dict:
    """The parameters recorded in every output's provenance (and a tracker run's config); with --lora-r
    the base's name (`adapter_of`: the card of an adapter folder names it) and a sample of its weights."""
    if run.lora is None:
        return _options(run.cfg, run.par)
    return {**_options(run.cfg, run.par), "adapter_of": _base_name(run), "base_sample": run.base_sample}


def _full(record: dict) -> dict:
    """The record of a full-model output of a LoRA run (merged/, the exact anchor): not an adapter."""
    return {k: v for k, v in record.items() if k != "adapter_of"}


def _anchor_note(run: Run) -> str:
    cfg = run.cfg
    if cfg.anchor == "init":
        return "init (frozen: the init itself, so nothing is saved in anchor/)"
    if not cfg.save_anchor:
        return "ema (fp32 while training; not saved: --no-save-anchor)"
    if run.lora is None:
        return f"ema (fp32 while training; saved in {cfg.dtype} in anchor/)"
    if run.lora.anchor == "factors":
        return "ema of the LoRA factors (saved as an fp32 adapter in anchor/)"
    return f"exact ema of the LoRA deltas (fp32 while training; saved in {cfg.dtype} as a full model in anchor/)"


def _options(cfg: RLConfig, par: Parallel) -> dict:
    return {
        **cfg.as_dict(),
        "logprob_temperature": cfg.temperature,
        "reward_identity": describe_reward(cfg.reward),
        "world_size": par.world_size,
    }


def publish(run: Run, out: Path, stopped: str) -> Path:
    """Write OUT (policy, anchor/, checkpoints/, metrics.jsonl) atomically, then drop the work folder."""
    cfg, par, work = run.cfg, run.par, run.work
    par.check(run.policy, "policy")
    if run.lora is None:
        par.check(run.anchor, "anchor")
    policy_sd = par.full(dict(run.policy.state_dict())) if par.fsdp else None  # collective
    anchor_sd = par.full(dict(run.anchor.state_dict())) if par.fsdp and cfg.save_anchor else None
    if not par.is_main:
        par.barrier()  # return once rank 0 has published
        return out
    record = {**_record(run), "steps_done": run.step}
    saved_force = st.read_config(work).get("force", False)
    dtype = parse_dtype(cfg.dtype)
    with publishing(out, _inputs(cfg), force=cfg.force or saved_force) as tmp:
        _write_policy(run, tmp, policy_sd)
        if cfg.save_anchor and cfg.anchor == "ema":  # in the policy's dtype, like the policy (fp32 in the state)
            (tmp / "anchor").mkdir()
            if run.lora is None:
                sd = anchor_sd if anchor_sd is not None else dict(run.anchor.state_dict())
                st.write_hf(run.anchor, run.src, tmp / "anchor", st.cast(sd, dtype), dtype=dtype)
            elif run.lora.anchor == "factors":  # an adapter like the policy
                write_adapter(tmp / "anchor", run.lora.factors(anchor=True), _base_name(run))
            else:  # the exact EMA of the deltas has full rank: the base with it added, a full model
                sd = st.cast(merged_state(run.policy, run.lora.deltas(anchor=True)), dtype)
                st.write_hf(run.policy, run.src, tmp / "anchor", sd, dtype=dtype)
            full = run.lora is not None and run.lora.anchor == "exact"
            write_provenance(tmp / "anchor", f"{METHOD}-anchor", _full(record) if full else record, {"init": run.src})
        if cfg.merge_adapter:
            (tmp / "merged").mkdir()
            sd = st.cast(merged_state(run.policy, run.lora.deltas()), dtype)
            st.write_hf(run.policy, run.src, tmp / "merged", sd, dtype=dtype)
            write_provenance(tmp / "merged", f"{METHOD}-merged", _full(record), {"init": run.src})
        st.link_tree(work / "checkpoints", tmp / "checkpoints")
        shutil.copy2(work / "metrics.jsonl", tmp / "metrics.jsonl")
        inputs: dict[str, Any] = {"init": run.src, "prompts": cfg.prompts}
        if reward_inputs(cfg.reward):
            inputs["reward"] = reward_inputs(cfg.reward)[0]
        notes = [
            f"stopped by {stopped}; {run.step} optimiser steps",
            f"log-probs (loss and KL) use the sampling temperature {cfg.temperature} over the full vocabulary "
            f"(top-p {cfg.top_p} and top-k {cfg.top_k or 'off'} only restrict the draws)",
            f"anchor: {_anchor_note(run)}, baseline: {cfg.baseline}, seed: {cfg.seed}",
        ]
        if run.lora is not None:
            notes.append(
                f"a LoRA adapter of rank {cfg.lora_r} (scale {run.lora.scale:g}, folded into lora_B) on "
                f"{len(run.lora.names)} linear layers of the frozen base {run.src}"
                + (f"; anchor: {run.lora.anchor} EMA" if run.lora.anchor else "")
                + ("; merged/ holds the base with the adapter added" if cfg.merge_adapter else "")
            )
        if par.world_size > 1:
            notes.append(
                f"{par.world_size} ranks ({cfg.parallel}), {cfg.batch_size // par.world_size} prompts "
                "per rank; replicas checked identical" + (" (n/a: sharded)" if par.fsdp else "")
            )
        write_provenance(tmp, METHOD, {**record, "stopped": stopped}, inputs, notes)
    shutil.rmtree(work, ignore_errors=True)
    par.barrier()
    return out
