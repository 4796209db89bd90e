"""`warp rl` under torchrun on CPU (gloo): 2 processes give the 1-process result, rank 0 alone writes,
a killed rank fails the job cleanly and its last state resumes (with any number of processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import load_state
from torch.testing import assert_close

from mergekit_warp.rl import launch
from mergekit_warp.rl.config import RLConfig
from mergekit_warp.rl.train import train

REWARD = str(Path(__file__).parent / "dist_toy_reward.py") + ":reward"
PROMPTS = [
    "the cat is",
    "hello you",
    "i love this movie",
    "the day was",
    "a dog is very",
    "we love the",
    "this film is",
    "they are",
]
# lr 1e-2 so that 3 steps move the tiny policy visibly; micro-batch 2 → 2 accumulated chunks per rank;
# the batch-mean baseline needs the GLOBAL mean (an all-reduce); RLOO is per prompt, local to a rank
# (covered by the pipeline's device-group test).
OPTS = dict(
    batch_size=4,
    samples_per_prompt=2,
    max_new_tokens=6,
    steps=3,
    lr=1e-2,
    warmup=0,
    mu=0.1,
    micro_batch=2,
    save_every=2,
    seed=3,
    baseline="mean",
    progress=False,
)


def cli_args(init: Path, prompts: Path, out: Path, **extra) -> list[str]:
    args = ["--model", str(init), "--prompts", str(prompts), "--reward", REWARD, "-o", str(out)]
    for k, v in {**OPTS, **extra}.items():
        flag = "--" + k.replace("_", "-")
        args += [flag if v else f"--no-{k.replace('_', '-')}"] if isinstance(v, bool) else [flag, str(v)]
    return args


def warp_rl(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m mergekit_warp rl ARGS` in a fresh process (what a user types, launcher included)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):
        full_env.pop(k, None)
    return subprocess.run(
        [sys.executable, "-m", "mergekit_warp", "rl", *args], env=full_env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_init):
    base = tmp_path_factory.mktemp("dist_rl")
    prompts = base / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    ref = train(RLConfig(model=str(tiny_init), prompts=prompts, reward=REWARD, out=base / "ref", **OPTS))
    return tiny_init, prompts, ref


def assert_same_run(a: Path, b: Path, init: Path) -> None:
    for sub in ("", "anchor", "checkpoints/step_2"):
        sa, sb = load_state(a / sub), load_state(b / sub)
        assert set(sa) == set(sb)
        for k in sa:
            assert_close(sb[k], sa[k], rtol=0, atol=1e-5, msg=f"{sub or 'policy'} {k}")
    moved = max((load_state(a)[k] - v).abs().max().item() for k, v in load_state(init).items())
    assert moved > 1e-2  # the runs really trained (otherwise equality would prove nothing)
    ma, mb = ([json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()] for p in (a, b))
    assert [m["step"] for m in mb] == [1, 2, 3]  # one line per step: rank 0 alone logs
    for x, y in zip(ma, mb):
        for k in ("reward", "reward_shaped", "kl_anchor", "kl_init", "entropy", "completion_len", "loss", "grad_norm"):
            assert y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-6), (x["step"], k)


@pytest.mark.slow
def test_two_processes_equal_one_process(setup, tmp_path):
    """DDP on a CPU device group [cpu, cpu] (what the pipeline runs; it calls `warp rl --nproc 2`).
    FSDP's equality with the 1-process run is checked by the kill-and-resume test below."""
    init, prompts, ref = setup
    out, parallel, log = tmp_path / "out", "ddp", tmp_path.parent / f"{tmp_path.name}.log"
    cfg = RLConfig(model=str(init), prompts=prompts, reward=REWARD, out=out, **OPTS)
    assert launch.train_on_group(cfg, ["cpu", "cpu"], log=log) == out
    assert log.read_text().count(str(out) + "\n") == 1  # the result path printed once, by rank 0
    assert_same_run(ref, out, init)
    # Only one output: OUT itself; no OUT.partial, no temp folders from a second rank.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    prov = json.loads((out / "warp_provenance.json").read_text())
    assert prov["params"]["world_size"] == 2 and prov["params"]["parallel"] == parallel
    # The policy and EMA anchor replicas were compared across ranks at each save and at the end.
    assert any("replicas checked identical" in n and "n/a" not in n for n in prov["notes"])
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)  # a normal HF folder


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_killed_rank_fails_cleanly_and_resumes(setup, tmp_path, parallel):
    init, prompts, ref = setup
    out = tmp_path / "out"
    # Rank 1 SIGKILLs itself in step 3 (its 3rd reward call); state is saved after every step.
    args = cli_args(init, prompts, out, state_every=1, parallel=parallel)
    r = warp_rl(args + ["--nproc", "2"], env={"WARP_TEST_KILL_RANK": "1", "WARP_TEST_KILL_CALL": "3"})
    assert r.returncode == 1, r.stderr[-3000:]
    assert "distributed run failed" in r.stderr and "killed by signal 9" in r.stderr
    assert not out.exists()  # nothing published
    work = tmp_path / "out.partial"
    assert json.loads((work / "state" / "progress.json").read_text())["step"] == 2
    assert [json.loads(x)["step"] for x in (work / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(work / "checkpoints" / "step_2")  # last checkpoint intact
    # The state holds full tensors and sampling does not depend on the split: resume with ONE process
    # (ddp case) or with 2 sharded ones (fsdp case: full tensors cut into shards, Adam state included).
    if parallel == "ddp":
        done = train(
            RLConfig(
                model=str(init), prompts=prompts, reward=REWARD, out=out, resume=True, **{**OPTS, "state_every": 1}
            )
        )
    else:
        r = warp_rl(args + ["--nproc", "2", "--resume"])
        assert r.returncode == 0, r.stderr[-3000:]
        done = out
    assert_same_run(ref, done, init)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # OUT.partial removed once published


def test_launch_refuses_uneven_batch_before_starting(setup, tmp_path):
    init, prompts, _ = setup
    r = warp_rl(cli_args(init, prompts, tmp_path / "o", batch_size=3) + ["--nproc", "2"])
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: --batch-size 3 is not divisible by the 2 processes (--nproc 2 × --nnodes 1)"
    ]


@pytest.mark.slow
def test_user_error_inside_workers_exits_2(setup, tmp_path):
    init, _, _ = setup
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hello"}\n{"prompt": \n')
    r = warp_rl(cli_args(init, bad, tmp_path / "o") + ["--nproc", "2"])
    assert r.returncode == 2, r.stderr[-3000:]
    assert "bad.jsonl:2: malformed JSON" in r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_nccl_bf16_two_gpus_run(setup, tmp_path, parallel):
    init, prompts, _ = setup
    out = tmp_path / "out"
    r = warp_rl(cli_args(init, prompts, out, parallel=parallel, device="cuda", dtype="bf16") + ["--nproc", "2"])
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3 and all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    sd = load_state(out / "anchor")
    assert all(v.dtype == torch.bfloat16 for v in sd.values())  # the fp32 EMA anchor is saved in the policy's dtype
