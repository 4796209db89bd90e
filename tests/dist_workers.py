"""Code that runs inside the worker processes of the distributed tests (2 ranks, gloo, CPU).

Kept out of the test modules so `torch.multiprocessing.spawn` can import it in a fresh interpreter.
Each worker writes what it saw to OUT/rank{r}.pt; the test process compares with its own 1-process
computation.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch

GLOBAL_BATCH = 4
SEQ = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world: int, *args) -> None:
    """Run `fn(rank, world, *args)` in `world` fresh processes joined by a gloo process group."""
    import torch.multiprocessing as mp

    mp.spawn(_entry, args=(fn, world, free_port(), args), nprocs=world, join=True)


def _entry(rank: int, fn, world: int, port: int, args) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    try:
        fn(rank, world, *args)
    finally:
        from mergekit_warp.rl.dist import teardown

        teardown()


def tiny_model(seed: int):
    from tiny import tiny_config
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(63, layers=2)).float()


def batch() -> torch.Tensor:
    """The global batch (GLOBAL_BATCH, SEQ) of token ids, identical in every process."""
    g = torch.Generator().manual_seed(7)
    return torch.randint(4, 63, (GLOBAL_BATCH, SEQ), generator=g)


def seq_loss(model, ids: torch.Tensor) -> torch.Tensor:
    """Per-sequence negative log-likelihood summed over tokens: (b,)."""
    logits = model(input_ids=ids).logits[:, :-1].float()  # (b, S-1, V)
    lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]  # (b, S-1)
    return -lp.sum(-1)


RM_TEXTS = (["the cat is", "hello", "i love this movie very much", "a dog"], [" good", " bad bad", " nice", " sad"])


def make_reward_model(folder: Path) -> Path:
    """A tiny random 1-label Llama sequence classifier with the test tokenizer."""
    from tiny import make_tokenizer, tiny_config
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(5)
    tok = make_tokenizer()
    cfg = tiny_config(len(tok))
    cfg.num_labels = 1
    LlamaForSequenceClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def core_checks(rank: int, world: int, out: str, rm: str) -> None:
    from mergekit_warp.lm.rewards import reward_model
    from mergekit_warp.rl import dist
    from mergekit_warp.rl.dist_state import full_tensors

    info = dist.init_distributed("cpu")
    res: dict = {"info": (info.rank, info.world_size, info.local_rank, info.device)}
    sl = dist.shard(GLOBAL_BATCH, info)
    res["shard"] = (sl.start, sl.stop)
    res["mean"] = dist.reduce_mean({"a": rank + 1.0, "b": 10.0 * rank}, info)
    res["bcast"] = dist.broadcast_object({"step": 5} if rank == 0 else None, info)

    # DDP: rank 1 starts from other weights (DDP must broadcast rank 0's); local loss = mean over LOCAL
    # rows, accumulated over 2 micro-batches of 1 row with the all-reduce only on the last.
    model = dist.wrap_policy(tiny_model(seed=0 if rank == 0 else 99), info, "ddp")
    rows = batch()[sl]
    n_local = rows.shape[0]
    for i in range(n_local):
        with dist.grad_sync(model, enabled=i == n_local - 1):
            (seq_loss(model, rows[i : i + 1]).sum() / n_local).backward()
    res["ddp_grads"] = {k: p.grad.clone() for k, p in dist.unwrap(model).named_parameters()}
    res["replicas_equal"] = dist.check_replicas(model, info)
    with torch.no_grad():
        if rank == 1:
            next(dist.unwrap(model).parameters()).add_(1e-3)
    try:
        dist.check_replicas(model, info)
        res["replicas_diverged_detected"] = False
    except RuntimeError as e:
        res["replicas_diverged_detected"] = "disagree" in str(e)

    # A bf16 DDP model averages its gradients in fp32 (comm hook): ≈ the fp32 gradient at bf16 precision.
    half = dist.wrap_policy(tiny_model(seed=0).to(torch.bfloat16), info, "ddp")
    (seq_loss(half, rows).sum() / n_local).backward()
    res["bf16_grads"] = {k: p.grad.float() for k, p in dist.unwrap(half).named_parameters()}

    # FSDP2: shard per decoder layer + root, one SGD step on the local rows, gather the full weights.
    policy = dist.wrap_policy(tiny_model(seed=0), info, "fsdp")
    res["fsdp_sharded"] = dist.is_sharded(policy)
    w = policy.model.layers[0].mlp.up_proj.weight
    res["fsdp_local_rows"] = dist.local_tensor(w).shape[0]
    before = full_tensors(dict(dist.unwrap(policy).state_dict()))  # collective: every rank
    opt = torch.optim.SGD(policy.parameters(), lr=0.1)
    (seq_loss(policy, rows).sum() / n_local).backward()
    opt.step()
    after = full_tensors(dict(dist.unwrap(policy).state_dict()))
    # EMA on the local shards of an identically sharded anchor: θ_a ← (1-μ)θ_a + μθ.
    anchor = dist.shard_model(tiny_model(seed=0).requires_grad_(False), info)
    with torch.no_grad():
        anchor(input_ids=rows)  # a forward first: the root's gathered weights must not go stale
        for a, p in zip(anchor.parameters(), policy.parameters()):
            dist.local_tensor(a).lerp_(dist.local_tensor(p), 0.25)
        res["fsdp_ema_logits"] = anchor(input_ids=rows).logits
    ema = full_tensors(dict(anchor.state_dict()))
    if rank == 0:
        res.update(fsdp_before=before, fsdp_after=after, fsdp_ema=ema)
        # The gathered dict saves as a normal HF folder.
        dist.unwrap(policy).save_pretrained(Path(out) / "fsdp_hf", state_dict=dict(after))  # it pops keys
    else:
        res["fsdp_same_on_other_rank"] = all(
            torch.equal(before[k], v) for k, v in full_tensors(dict(tiny_model(seed=0).state_dict())).items()
        )
    # A reward model sharded like the policy scores this rank's completions like an unsharded one.
    prepared = []
    score = reward_model(
        rm, "cpu", batch=1, prepare=lambda m: prepared.append(dist.shard_model(m, info)) or prepared[-1]
    )
    res["rm_sharded"] = len(prepared) == 1 and dist.is_sharded(prepared[0])
    res["rm_scores"] = score(RM_TEXTS[0][sl], RM_TEXTS[1][sl])
    dist.barrier(info)
    torch.save(res, Path(out) / f"rank{rank}.pt")
