"""torch.distributed helpers (mergekit_warp.rl.dist) on CPU with gloo: 2 real processes, compared with
the same computation done here in one process."""

from __future__ import annotations

import dist_workers as W
import pytest
import torch
from torch.testing import assert_close

from mergekit_warp.errors import WarpError
from mergekit_warp.rl import dist
from mergekit_warp.rl.dist import DistInfo


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("dist_core")
    rm = W.make_reward_model(out / "rm")
    W.spawn(W.core_checks, 2, str(out), str(rm))
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)] + [out]


# --- pure pieces, no process group ------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_shard_partitions_the_batch(world):
    n = 16
    slices = [dist.shard(n, DistInfo(rank=r, world_size=world)) for r in range(world)]
    covered = [i for s in slices for i in range(n)[s]]
    assert covered == list(range(n))  # disjoint, contiguous, in rank order
    assert {s.stop - s.start for s in slices} == {n // world}


def test_shard_refuses_uneven_batch():
    with pytest.raises(WarpError, match="--batch-size 6 is not divisible by the number of processes \\(4\\)"):
        dist.shard(6, DistInfo(rank=1, world_size=4))


def test_single_process_is_a_no_op(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    info = dist.init_distributed("cpu")
    assert info == DistInfo(0, 1, 0, "cpu") and not info.distributed
    assert not torch.distributed.is_initialized()
    m = torch.nn.Linear(2, 2)
    assert dist.wrap_policy(m, info, "fsdp") is m and dist.unwrap(m) is m
    assert dist.reduce_mean({"x": 3.0}, info) == {"x": 3.0}
    # the RL loop's one interface: every method the identity or a no-op with one process
    from mergekit_warp.rl.parallel import Parallel

    par = Parallel.start("cpu", "fsdp", torch.float32)
    assert par.mode == "single" and not par.fsdp and par.is_main and par.world_size == 1
    assert par.wrap(m) is m and par.place(m) is m and par.share(6) == slice(0, 6)
    assert par.mean_metrics({"x": 3.0}) == {"x": 3.0} and par.full({"w": m.weight})["w"] is m.weight
    assert par.all_finite([m.weight]) and not par.all_finite([m.weight, torch.tensor([1.0, float("nan")])])


@pytest.mark.parametrize(
    ("env", "device", "match"),
    [
        ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}, "cuda:1", "each rank uses cuda:LOCAL_RANK"),
        ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}, "mps", "cpu \\(gloo\\) and cuda \\(nccl\\) only"),
        ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}, "cpu", "MASTER_ADDR/MASTER_PORT are unset"),
        ({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"}, "cpu", "bad torchrun environment"),
        ({"WORLD_SIZE": "two"}, "cpu", "WORLD_SIZE='two' is not an integer"),
    ],
)
def test_init_distributed_bad_combinations(monkeypatch, env, device, match):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(WarpError, match=match):
        dist.init_distributed(device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_init_distributed_cuda_without_gpu(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(WarpError, match="no CUDA"):
        dist.init_distributed("cuda")


def test_wrap_policy_unknown_mode():
    with pytest.raises(WarpError, match="--parallel zero3"):
        dist.wrap_policy(torch.nn.Linear(1, 1), DistInfo(), "zero3")


# --- two gloo processes -------------------------------------------------------------------------------


def test_ranks_know_who_they_are(two_ranks):
    r0, r1, _ = two_ranks
    assert r0["info"] == (0, 2, 0, "cpu") and r1["info"] == (1, 2, 1, "cpu")
    assert r0["shard"] == (0, 2) and r1["shard"] == (2, 4)
    assert r0["bcast"] == r1["bcast"] == {"step": 5}


def test_reduce_mean_averages_over_ranks(two_ranks):
    for r in two_ranks[:2]:
        assert r["mean"] == pytest.approx({"a": 1.5, "b": 5.0})


def test_ddp_gradient_equals_single_process_gradient_on_global_batch(two_ranks):
    ref = W.tiny_model(seed=0)  # rank 0's init; rank 1 started elsewhere and got it from DDP's broadcast
    (W.seq_loss(ref, W.batch()).mean()).backward()
    for r in two_ranks[:2]:
        grads = r["ddp_grads"]
        assert set(grads) == {k for k, _ in ref.named_parameters()}
        for k, p in ref.named_parameters():
            assert_close(grads[k], p.grad, rtol=1e-5, atol=1e-6, msg=k)
    assert two_ranks[0]["replicas_equal"] == 0.0
    # bf16 replicas (fp32 all-reduce hook): the same gradient at bf16 precision, identical on both ranks.
    for k, p in ref.named_parameters():
        assert torch.equal(two_ranks[0]["bf16_grads"][k], two_ranks[1]["bf16_grads"][k]), k
        assert_close(two_ranks[0]["bf16_grads"][k], p.grad, rtol=0.05, atol=0.02 * p.grad.abs().max().item(), msg=k)


def test_check_replicas_detects_divergence(two_ranks):
    assert two_ranks[0]["replicas_diverged_detected"] and two_ranks[1]["replicas_diverged_detected"]


def test_fsdp_full_state_dict_round_trip_and_step(two_ranks):
    r0, r1, out = two_ranks
    assert r0["fsdp_sharded"] and r1["fsdp_sharded"]
    ref = W.tiny_model(seed=0)
    assert r0["fsdp_local_rows"] == ref.model.layers[0].mlp.up_proj.weight.shape[0] // 2  # really sharded
    init = {k: v.clone() for k, v in ref.state_dict().items()}
    assert set(r0["fsdp_before"]) == set(init)
    for k, v in init.items():
        assert r0["fsdp_before"][k].device.type == "cpu"
        assert torch.equal(r0["fsdp_before"][k], v), k  # gather is exact
    assert r1["fsdp_same_on_other_rank"]  # every rank receives the full tensors

    # Same SGD step in one process on the whole batch (loss = mean over the global batch).
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    W.seq_loss(ref, W.batch()).mean().backward()
    opt.step()
    for k, v in ref.state_dict().items():
        assert_close(r0["fsdp_after"][k], v, rtol=1e-5, atol=1e-6, msg=k)
        ema = 0.75 * init[k] + 0.25 * v
        assert_close(r0["fsdp_ema"][k], ema, rtol=1e-5, atol=1e-6, msg=k)

    # The sharded anchor computes with the updated weights (FSDP2 re-gathers after the in-place EMA).
    ema_model = W.tiny_model(seed=0)
    ema_model.load_state_dict(r0["fsdp_ema"])
    with torch.no_grad():
        for r in (r0, r1):
            lo, hi = r["shard"]
            assert_close(r["fsdp_ema_logits"], ema_model(input_ids=W.batch()[lo:hi]).logits, rtol=1e-5, atol=1e-5)

    from transformers import LlamaForCausalLM

    reloaded = LlamaForCausalLM.from_pretrained(out / "fsdp_hf")
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, r0["fsdp_after"][k]), k


def test_fsdp_sharded_reward_model_scores_like_unsharded(two_ranks):
    from mergekit_warp.lm.rewards import reward_model

    r0, r1, out = two_ranks
    assert r0["rm_sharded"] and r1["rm_sharded"]
    ref = reward_model(str(out / "rm"), "cpu")(*W.RM_TEXTS)
    assert len(set(ref)) == 4  # distinct scores: a swapped or stale row would show
    assert r0["rm_scores"] + r1["rm_scores"] == pytest.approx(ref, rel=1e-5, abs=1e-6)


def test_mean_baseline_takes_the_global_mean():
    from mergekit_warp.rl.objective import advantages

    local = torch.tensor([1.0, 2.0, 3.0, 4.0])  # one rank's share; the global batch mean is 10
    assert_close(advantages(local, 2, "mean", torch.tensor(10.0)), local - 10.0)
    assert_close(advantages(local, 2, "mean"), local - 2.5)  # 1 process: its own mean
