"""`warp rl`: REINFORCE on a KL-regularised reward with an EMA anchor (WARP, Algorithm 1, inner loop).

    for t in 1..T:
        y ~ π_θ(·|x) at temperature τ                               # rollout
        R = r(x, y) − β·(log π_θ(y|x) − log π_anchor(y|x))          # reward + KL shaping, no grad
        A = R − baseline (RLOO over the k samples of each prompt)
        θ ← Adam(θ, ∇ −A·log π_θ(y|x)), warm-up, clipping           # loss, step
        θ_anchor ← (1 − μ)·θ_anchor + μ·θ    (fp32; frozen with --anchor init)

All log-probs are sums over completion tokens at the sampling temperature τ (see rollout.py). With a
bf16/fp16 policy, Adam updates fp32 master weights (a bf16 weight cannot absorb a 1e-6 step) that are
copied into the policy after each step; the anchor also follows the fp32 master weights.

Under torchrun (issue 5, see dist.py) every rank samples its contiguous share of the step's prompts;
completion i of the GLOBAL batch is drawn from uniforms seeded by (seed, step, i), so the samples do not
depend on how the batch is split. Each rank's loss is its local mean, DDP averages the gradients (FSDP2
reduce-scatters them), so every rank takes the Adam step of the global batch and keeps an identical EMA
anchor. Batch-mean baselines, metrics and the KL stop are reduced over ranks; rank 0 alone writes.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from mergekit_warp.devices import resolve_device
from mergekit_warp.errors import WarpError
from mergekit_warp.io.publish import check_output_path, publishing, write_provenance
from mergekit_warp.rl import dist, dist_state
from mergekit_warp.rl import state as st
from mergekit_warp.rl.config import RESUMABLE_CHANGES, RLConfig, config_dict
from mergekit_warp.rl.data import check_lengths, read_prompts
from mergekit_warp.rl.models import load_model, load_tokenizer, model_context, resolve_dtype
from mergekit_warp.rl.objective import advantages, ema_update, lr_at, reinforce_loss, shaped_reward
from mergekit_warp.rl.rewards import describe_reward, load_reward
from mergekit_warp.rl.rollout import Rollout, generate, sequence_logprobs

METHOD = "warp-rl"


def seed_of(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (seed, step, rank, chunk)."""
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


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


def _local(src: str) -> list[Path]:
    return [Path(src)] if Path(src).exists() else []


def _comparable(d: dict) -> dict:
    skip = RESUMABLE_CHANGES
    norm = {k: (str(Path(v).resolve()) if k in ("prompts", "out", "eval_prompts") and v else v) for k, v in d.items()}
    return {k: v for k, v in norm.items() if k not in skip}


def _logprobs(
    model, chunks: list[Rollout], temperature: float, autocast: torch.dtype | None, share: bool = True
) -> torch.Tensor:
    """(b,) log π of every completion under `model` (no grad), chunk by chunk."""
    dev = next(model.parameters()).device
    with torch.no_grad(), torch.autocast(dev.type, dtype=autocast or torch.float32, enabled=autocast is not None):
        return torch.cat([
            sequence_logprobs(model, c.input_ids, c.attention_mask, c.completion_mask, temperature, share).float()
            for c in chunks
        ])


class LiveView:
    """Step, reward, KL, tokens/s and ETA on stderr (rich), or nothing."""

    def __init__(self, enabled: bool, total: int, start: int):
        self.progress = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("rl"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[stats]}"),
                TimeRemainingColumn(), console=Console(stderr=True),
            )
            self.task = self.progress.add_task("rl", total=total, completed=start, stats="")
            self.progress.start()

    def update(self, m: dict) -> None:
        if self.progress:
            stats = f"reward {m['reward']:+.3f}  KL {m['kl_anchor']:.2f}  {m['tokens_per_s']:.0f} tok/s"
            self.progress.update(self.task, completed=m["step"], stats=stats)

    def close(self) -> None:
        if self.progress:
            self.progress.stop()


def evaluate(policy, init, tok, prompts: list[str], reward_fn, cfg: RLConfig, autocast) -> dict:
    """Mean reward and KL(π‖π_init) on held-out prompts (fixed sampling seed, so steps are comparable)."""
    chunks = [
        generate(policy, tok, prompts[i : i + cfg.chunk], max_new_tokens=cfg.max_new_tokens,
                 temperature=cfg.temperature, generator_seed=seed_of(cfg.seed, 2**31 - 1, i))
        for i in range(0, len(prompts), cfg.chunk)
    ]
    reward = reward_fn([p for c in chunks for p in c.prompts], [y for c in chunks for y in c.completions])
    kl = _logprobs(policy, chunks, cfg.temperature, autocast) - _logprobs(init, chunks, cfg.temperature, autocast)
    return {"eval_reward": float(np.mean(reward)), "eval_kl_init": float(kl.mean())}


def train(cfg: RLConfig) -> Path:
    """Run RL as configured and return the published OUT folder (see state.py for the work folder)."""
    from transformers.utils import logging as hf_logging

    # Process-wide settings of this run, restored afterwards (train() may be called from a pipeline).
    was_on, threads = hf_logging.is_progress_bar_enabled(), torch.get_num_threads()
    if not cfg.progress or os.environ.get("RANK", "0") != "0":  # --no-progress (and ranks > 0) silence
        hf_logging.disable_progress_bar()  # transformers' load/save bars too
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg)
    finally:
        torch.set_num_threads(threads)
        if was_on:
            hf_logging.enable_progress_bar()


def _train(cfg: RLConfig) -> Path:
    # ---------------------------------------------------------------- setup: paths and resume
    out, src = Path(cfg.out).absolute(), str(cfg.model)
    work = st.partial_dir(out)
    info = dist.init_distributed(cfg.device)  # world size 1 (no torchrun): no process group, no-ops
    is_main = dist.is_main(info)
    fsdp = info.distributed and cfg.parallel == "fsdp"
    device = info.device if info.distributed else cfg.device  # under torchrun: cuda:LOCAL_RANK or cpu
    if cfg.resume and out.exists() and not work.exists():
        if (out / "warp_provenance.json").is_file():
            return out  # finished earlier: resuming it is a no-op
        raise WarpError(f"--resume: {out} exists but is not a finished `warp rl` output; choose another -o")
    resuming = cfg.resume and st.state_folder(work) is not None
    if not resuming:
        check_output_path(out, _local(src), cfg.force)
        if work.exists() and not cfg.force and not cfg.resume:
            raise WarpError(f"an interrupted run is in {work}; pass --resume to continue it or --force to restart")
    else:
        saved = json.loads((work / "config.json").read_text())
        diff = sorted(k for k, v in _comparable(config_dict(cfg)).items() if _comparable(saved).get(k) != v)
        if diff:
            raise WarpError(f"--resume: options {', '.join(diff)} differ from the interrupted run in {work}")
    dist.barrier(info)  # every rank has checked OUT and OUT.partial before rank 0 changes them
    if not resuming and is_main:
        shutil.rmtree(work, ignore_errors=True)

    dev, dtype = resolve_device(device), resolve_dtype(cfg.dtype)
    autocast = dtype if dtype != torch.float32 else None  # fp32 anchor/init run at the policy's precision
    k = cfg.samples_per_prompt

    # ---------------------------------------------------------------- setup: data, reward, models
    tok = load_tokenizer(src)
    prompts = read_prompts(cfg.prompts, tok)
    eval_prompts = read_prompts(cfg.eval_prompts, tok) if cfg.eval_prompts else []
    context = model_context(src)  # checked before any weights load: bad input fails in seconds
    for ps, path in ((prompts, cfg.prompts), (eval_prompts, cfg.eval_prompts)):
        if context and ps:
            check_lengths(ps, tok, context, cfg.max_new_tokens, Path(path))
    eval_prompts = [p.text for p in eval_prompts]
    # FSDP: every model is read into CPU memory, then sharded (fully_shard moves each layer's shard to
    # this rank's device), so a model larger than one device fits; the anchor, the init and a reward
    # MODEL are sharded exactly like the policy (the EMA is then shard-local). Otherwise: as is.
    load_dev = "cpu" if fsdp else device
    place = (lambda m: dist.shard_model(m, info)) if fsdp else (lambda m: m)  # noqa: E731
    reward_fn = load_reward(cfg.reward, device, cfg.length_penalty, tokenizer=tok, prepare=place if fsdp else None)
    # FSDP keeps fp32 shards as Adam's master weights and computes in cfg.dtype (mixed precision).
    policy = load_model(src, "fp32" if fsdp else cfg.dtype, load_dev)
    anchor = place(load_model(src, "fp32", load_dev).requires_grad_(False))  # fp32 even for a bf16 policy
    init = anchor if cfg.anchor == "init" else None
    if init is None and (cfg.kl_to_init or eval_prompts):
        init = place(load_model(src, cfg.dtype, load_dev).requires_grad_(False))  # frozen: policy dtype suffices
    if cfg.grad_checkpointing:  # transformers ≥ 5.2x renamed it; older releases only have the first name
        getattr(policy, "activation_checkpointing_enable", policy.gradient_checkpointing_enable)()
    for m in policy.modules():  # RL wants log π of the sampling policy: no dropout, even in train mode
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    # `trainer`: what the loss runs through (DDP wrapper: its backward all-reduces the gradients);
    # `policy`: the HF model itself, for sampling, no-grad scoring and saving. One object under FSDP.
    trainer = dist.wrap_policy(policy, info, cfg.parallel, compute_dtype=dtype if fsdp and dtype != torch.float32 else None)

    names = [n for n, p in policy.named_parameters() if p.requires_grad]
    params = [p for n, p in policy.named_parameters() if p.requires_grad]
    anchor_named = dict(anchor.named_parameters())
    anchor_params = [anchor_named[n] for n in names]
    # Adam's weights: the policy's own in fp32, else fp32 master copies (taken from the fp32 anchor = init).
    master = params if dtype == torch.float32 or fsdp else [a.detach().clone().requires_grad_(True) for a in anchor_params]
    # Fused Adam (CPU and CUDA): one kernel per tensor, no foreach temporaries the size of the model.
    opt = torch.optim.Adam(master, lr=cfg.lr, fused=dev.type in ("cpu", "cuda") and not fsdp)

    share = True  # run the prompts' common prefix once (sequence_logprobs turns it off under checkpointing)
    start = 0
    if resuming:
        folder = st.state_folder(work)
        ema = dict(zip(names, anchor_params)) if cfg.anchor == "ema" else None
        start = st.load_state(folder, dict(zip(names, master)), ema, opt)
        if master is not params:
            with torch.no_grad():
                torch._foreach_copy_(params, master)
        if is_main:
            st.trim_after(work, start)
    elif is_main:
        (work / "checkpoints").mkdir(parents=True)
        (work / "config.json").write_text(json.dumps(config_dict(cfg), indent=2))

    params_record = {
        **config_dict(cfg), "logprob_temperature": cfg.temperature, "reward_identity": describe_reward(cfg.reward),
        "world_size": info.world_size,
    }
    mine = dist.shard(cfg.batch_size, info)  # this rank's prompts of each step
    n_local = (mine.stop - mine.start) * k  # completions per rank and step
    view = LiveView(cfg.progress and is_main, cfg.steps, start)
    t_run, stopped, step, done = time.time(), "steps", start, start
    try:
        for step in range(start, cfg.steps):
            t0, c0 = time.time(), time.process_time()
            # ------------------------------------------------------------ rollout (no grad)
            idx = batch_indices(len(prompts), cfg.batch_size, step, cfg.seed)[mine]
            texts = [prompts[i].text for i in idx for _ in range(k)]  # prompt-major: k samples in a row
            policy.eval()
            chunks = [  # completion j of this rank is completion mine.start·k + j of the global batch
                generate(policy, tok, texts[c : c + cfg.chunk], max_new_tokens=cfg.max_new_tokens,
                         temperature=cfg.temperature, generator_seed=seed_of(cfg.seed, step),
                         row_offset=mine.start * k + c)
                for c in range(0, len(texts), cfg.chunk)
            ]
            t_gen = time.time() - t0

            # ------------------------------------------------------------ reward (sees prompts as the policy did)
            completions = [y for c in chunks for y in c.completions]
            raw = torch.tensor(reward_fn(texts, completions), dtype=torch.float32, device=dev)  # (b,)

            # ------------------------------------------------------------ log-probs + KL shaping
            policy.train(cfg.grad_checkpointing)  # HF checkpointing only acts in train mode
            keep_graph = len(chunks) == 1  # one chunk: its forward with grad also gives log π (saves a pass)
            if keep_graph:
                c = chunks[0]
                logp_grad = sequence_logprobs(trainer, c.input_ids, c.attention_mask, c.completion_mask, cfg.temperature,
                                              share_prefix=share)
                logp = logp_grad.detach().float()
            else:
                logp = _logprobs(policy, chunks, cfg.temperature, None, share)
            logp_anchor = _logprobs(anchor, chunks, cfg.temperature, autocast)
            logp_init = logp_anchor if init is anchor else None
            if init is not None and init is not anchor:
                logp_init = _logprobs(init, chunks, cfg.temperature, None)
            shaped = shaped_reward(raw, logp, logp_anchor, cfg.beta)  # (b,)
            # The batch-mean baseline is the mean of the GLOBAL batch (RLOO stays within a prompt: local).
            center = dist.all_sum(shaped.sum(), info) / (n_local * info.world_size) if cfg.baseline == "mean" else None
            adv = advantages(shaped, k, cfg.baseline, center)  # (b,)

            # ------------------------------------------------------------ loss (micro-batches accumulate)
            # Local mean: averaging the ranks' gradients (DDP, FSDP) gives the global batch mean.
            loss_sum = 0.0
            for j, (c, a) in enumerate(zip(chunks, adv.split(cfg.chunk))):
                with dist.grad_sync(trainer, enabled=j == len(chunks) - 1):  # communicate once per step
                    lp = logp_grad if keep_graph else sequence_logprobs(
                        trainer, c.input_ids, c.attention_mask, c.completion_mask, cfg.temperature, share_prefix=share)
                    loss = reinforce_loss(lp.float(), a, n_local)
                    loss.backward()
                loss_sum += loss.item()
            policy.eval()

            # ------------------------------------------------------------ optimiser step
            if master is not params:
                for m, p in zip(master, params):
                    m.grad, p.grad = p.grad.float(), None
            grad_norm = torch.nn.utils.clip_grad_norm_(master, cfg.clip_grad or float("inf"))  # global norm
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            lr = lr_at(step, cfg.lr, cfg.warmup)
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step()
            opt.zero_grad(set_to_none=True)
            if master is not params:
                with torch.no_grad():
                    torch._foreach_copy_(params, master)

            # ------------------------------------------------------------ anchor update
            if cfg.anchor == "ema":  # on local shards under FSDP (anchor sharded like the policy)
                ema_update([dist.local_tensor(a) for a in anchor_params], [dist.local_tensor(m) for m in master], cfg.mu)

            # ------------------------------------------------------------ logging
            lengths = torch.cat([c.lengths for c in chunks]).float()
            ent_len = dist.all_sum(torch.stack([torch.cat([c.entropy for c in chunks]).sum(), lengths.sum()]).cpu(), info)
            dt = time.time() - t0
            metrics = {
                "step": step + 1,
                "reward": float(raw.mean()),
                "reward_shaped": float(shaped.mean()),
                "kl_anchor": float((logp - logp_anchor).mean()),
                "kl_init": float((logp - logp_init).mean()) if logp_init is not None else None,
                "entropy": float(ent_len[0] / ent_len[1].clamp(min=1)),  # per token, over all ranks
                "completion_len": float(lengths.mean()),
                "loss": loss_sum,
                "grad_norm": float(grad_norm),
                "lr": lr,
                "tokens_per_s": float(lengths.sum()) / dt,
                "samples_per_s": len(texts) / dt,
                "step_time": dt,
                "step_cpu_time": time.process_time() - c0,  # CPU seconds, all threads: robust on a busy machine
                "gen_time": t_gen,
                "wall_time": time.time() - t_run,
            }
            metrics.update(dist.reduce_mean({k_: v for k_, v in metrics.items() if isinstance(v, float) and k_ != "entropy"}, info))
            for k_ in ("tokens_per_s", "samples_per_s"):  # throughput of the whole job
                metrics[k_] *= info.world_size
            if eval_prompts and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == cfg.steps):
                metrics.update(evaluate(policy, init, tok, eval_prompts, reward_fn, cfg, autocast))
            if is_main:
                st.append_metrics(work, metrics)
                view.update(metrics)

            # ------------------------------------------------------------ checkpoint + resumable state
            done = step + 1
            ckpt = cfg.save_every and done % cfg.save_every == 0
            if ckpt or (cfg.state_every and done % cfg.state_every == 0):
                _save(cfg, work, done, bool(ckpt), policy, anchor, tok, src, names, master, anchor_params, opt,
                      params_record, info, fsdp)
            if cfg.kl_stop is not None and metrics["kl_init"] >= cfg.kl_stop:
                stopped = f"kl_stop: KL to init {metrics['kl_init']:.3g} ≥ {cfg.kl_stop} after step {done}"
                break
    except WarpError as e:
        last = st.state_folder(work)
        where = f"resumable state of step {st.load_step(last)} kept in {work}" if last else f"no state yet in {work}"
        raise WarpError(f"{e} (at step {step + 1}; {where}; fix it and rerun with --resume)") from None
    finally:
        view.close()

    # ---------------------------------------------------------------- publish OUT atomically
    steps_done = done
    dist.check_replicas(policy, info, "policy")
    dist.check_replicas(anchor, info, "anchor")
    policy_sd = dist_state.full_tensors(dict(policy.state_dict())) if fsdp else None  # collective
    anchor_sd = dist_state.full_tensors(dict(anchor.state_dict())) if fsdp else None
    if not is_main:
        dist.barrier(info)  # return once rank 0 has published
        return out
    saved_force = json.loads((work / "config.json").read_text()).get("force", False)
    with publishing(out, _local(src), force=cfg.force or saved_force) as tmp:
        st.write_hf(policy, tok, src, tmp, policy_sd)
        (tmp / "anchor").mkdir()
        st.write_hf(anchor, tok, src, tmp / "anchor", anchor_sd)
        write_provenance(tmp / "anchor", f"{METHOD}-anchor", {**params_record, "steps_done": steps_done}, {"init": src})
        st.link_tree(work / "checkpoints", tmp / "checkpoints")
        shutil.copy2(work / "metrics.jsonl", tmp / "metrics.jsonl")
        inputs = {"init": src, "prompts": cfg.prompts}
        if ":" in str(cfg.reward) and Path(str(cfg.reward).rsplit(":", 1)[0]).is_file():
            inputs["reward"] = str(cfg.reward).rsplit(":", 1)[0]
        elif Path(str(cfg.reward)).is_dir():
            inputs["reward"] = str(cfg.reward)
        notes = [
            f"stopped by {stopped}; {steps_done} optimiser steps",
            f"log-probs (loss and KL) use the sampling temperature {cfg.temperature}",
            f"anchor: {cfg.anchor} (fp32), baseline: {cfg.baseline}, seed: {cfg.seed}",
        ]
        if info.distributed:
            notes.append(f"{info.world_size} ranks ({cfg.parallel}), {cfg.batch_size // info.world_size} prompts "
                         "per rank; replicas checked identical" + (" (n/a: sharded)" if fsdp else ""))
        write_provenance(tmp, METHOD, {**params_record, "steps_done": steps_done, "stopped": stopped}, inputs, notes)
    shutil.rmtree(work, ignore_errors=True)
    dist.barrier(info)
    return out


def _save(cfg: RLConfig, work: Path, done: int, ckpt: bool, policy, anchor, tok, src: str, names: list[str],
          master: list, anchor_params: list, opt, params_record: dict, info: dist.DistInfo, fsdp: bool) -> None:
    """checkpoints/step_K (when `ckpt`) and the resumable state; rank 0 writes. FSDP shards are
    gathered first (every rank must take part), DDP replicas are checked equal first."""
    dist.check_replicas(policy, info, "policy")
    dist.check_replicas(anchor, info, "anchor")
    if fsdp:
        policy_sd = dist_state.full_tensors(dict(policy.state_dict())) if ckpt else None
        master_sd = dist_state.full_tensors(dict(zip(names, master)))
        ema = dist_state.full_tensors(dict(zip(names, anchor_params))) if cfg.anchor == "ema" else None
        osd = dist_state.optimizer_full_state(opt)
    else:
        policy_sd, master_sd, osd = None, dict(zip(names, master)), opt
        ema = dict(zip(names, anchor_params)) if cfg.anchor == "ema" else None
    if dist.is_main(info):
        if ckpt:
            st.write_checkpoint(policy, tok, src, work / "checkpoints" / f"step_{done}", done, params_record, policy_sd)
        st.save_state(work, done, master_sd, ema, osd)
