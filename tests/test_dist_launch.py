"""The `warp rl --nproc N` launcher: the torchrun command it builds and the launches it refuses."""

from __future__ import annotations

import sys

import pytest

from mergekit_warp.errors import WarpError
from mergekit_warp.rl import launch
from mergekit_warp.rl.launch import LaunchSpec


def test_strip_launch_options_both_forms():
    argv = [
        "--model",
        "m",
        "--nproc",
        "8",
        "--nnodes=2",
        "--rdzv-endpoint",
        "h:29500",
        "--node-rank",
        "1",
        "--rdzv-id=job7",
        "--batch-size",
        "16",
        "--parallel",
        "fsdp",
    ]
    assert launch.strip_launch_options(argv) == ["--model", "m", "--batch-size", "16", "--parallel", "fsdp"]


def test_single_node_uses_a_private_rendezvous():
    argv = launch.torchrun_argv(LaunchSpec(nproc=8), ["--model", "m", "--nproc", "8"])
    assert argv == [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "8",
        "--max-restarts",
        "0",
        "-m",
        "mergekit_warp",
        "rl",
        "--model",
        "m",
    ]


def test_multi_node_uses_c10d_rendezvous():
    spec = LaunchSpec(nproc=8, nnodes="2", rdzv_endpoint="node001:29500", rdzv_id="42", node_rank=1)
    assert launch.torchrun_options(spec) == [
        "--nnodes",
        "2",
        "--nproc-per-node",
        "8",
        "--max-restarts",
        "0",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "node001:29500",
        "--rdzv-id",
        "42",
        "--node-rank",
        "1",
    ]
    # The options are ones torchrun itself accepts.
    from torch.distributed.run import parse_args

    a = parse_args([*launch.torchrun_options(spec), "-m", "mergekit_warp", "rl"])
    assert (a.nnodes, a.nproc_per_node, a.rdzv_endpoint, a.node_rank, a.module) == ("2", "8", "node001:29500", 1, True)


@pytest.mark.parametrize(
    ("spec", "kwargs", "match"),
    [
        (LaunchSpec(nproc=0), {}, "--nproc 0"),
        (LaunchSpec(nproc=2, nnodes="2"), {}, "needs --rdzv-endpoint"),
        (LaunchSpec(nproc=2, nnodes="x"), {}, "--nnodes x"),
        (LaunchSpec(nproc=4), {"batch_size": 6}, "--batch-size 6 is not divisible by the 4 processes"),
        (LaunchSpec(nproc=2, nnodes="2", rdzv_endpoint="h:1"), {"batch_size": 6}, "4 processes"),
        (LaunchSpec(nproc=2), {"device": "cuda:1"}, "pass --device cuda"),
        (LaunchSpec(nproc=2), {"device": "mps"}, "cpu \\(gloo\\) and cuda \\(nccl\\) only"),
    ],
)
def test_check_refuses_bad_launches(spec, kwargs, match):
    with pytest.raises(WarpError, match=match):
        launch.check(spec, **kwargs)


def test_check_accepts_elastic_and_even_batches():
    launch.check(LaunchSpec(nproc=2), batch_size=8)
    launch.check(LaunchSpec(nproc=2, nnodes="1:4", rdzv_endpoint="h:1"), batch_size=6)  # checked per rank later


def test_no_relaunch_inside_torchrun(monkeypatch):
    for k in ("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert launch.wanted(LaunchSpec(nproc=2)) and not launch.wanted(LaunchSpec(nproc=1))
    assert launch.wanted(LaunchSpec(nproc=1, nnodes="2", rdzv_endpoint="h:1"))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not launch.wanted(LaunchSpec(nproc=2))


@pytest.mark.parametrize(
    ("group", "device", "env"),
    [
        (["cpu", "cpu"], "cpu", {}),
        (["cuda:2", "cuda:3"], "cuda", {"CUDA_VISIBLE_DEVICES": "2,3"}),
        (["cuda:5"], "cuda", {"CUDA_VISIBLE_DEVICES": "5"}),
    ],
)
def test_group_device(group, device, env):
    assert launch.group_device(group) == (device, env)


@pytest.mark.parametrize(
    ("group", "match"),
    [
        ([], "empty"),
        (["cpu", "cuda:0"], "mixes kinds"),
        (["cuda"], "without an index"),
        (["cuda:1", "cuda:1"], "lists a GPU twice"),
    ],
)
def test_group_device_refuses(group, match):
    with pytest.raises(WarpError, match=match):
        launch.group_device(group)


def test_rl_cli_args_round_trip(monkeypatch, tmp_path):
    """The argv built for a group's `warp rl` parses back to the very same RLConfig."""
    from typer.testing import CliRunner

    from mergekit_warp.cli import app
    from mergekit_warp.rl import train as train_mod
    from mergekit_warp.rl.config import RLConfig

    cfg = RLConfig(
        model="m",
        prompts=tmp_path / "p.jsonl",
        reward="sentiment",
        out=tmp_path / "o",
        beta=0.5,
        micro_batch=4,
        batch_size=8,
        kl_stop=12.5,
        progress=False,
        resume=True,
        seed=7,
        stop=["\n", "END"],  # a repeatable option: the flag once per value
        top_k=5,
        max_prompt_length=64,
    )
    seen = []
    monkeypatch.setattr(train_mod, "train", lambda c: seen.append(c) or c.out)
    r = CliRunner().invoke(app, ["rl", *launch.rl_cli_args(cfg)])
    assert r.exit_code == 0, r.output
    assert seen == [cfg]
