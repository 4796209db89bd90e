"""Pipeline device groups: `devices: [[cpu, cpu], cpu]` runs RL run 1 data-parallel on a 2-process gloo
group (under torchrun) and run 2 on one process, both at once; the merges wait for both."""

from __future__ import annotations

import json

import pytest
import torch
from pipeline_fixtures import RL, pipe_init, reference_run, write_config  # noqa: F401  (fixtures)
from tiny import load_state

from mergekit_warp.errors import WarpError
from mergekit_warp.pipeline.config import load_config
from mergekit_warp.pipeline.manifest import Manifest
from mergekit_warp.pipeline.run import run_pipeline


@pytest.mark.slow
def test_device_groups_match_sequential(tmp_path, pipe_init, reference_run):
    cfg = write_config(tmp_path, pipe_init, iterations=1, devices=[["cpu", "cpu"], "cpu"], eval={"enabled": False})
    run = tmp_path / "run"
    run_pipeline(cfg, run, progress=False)
    man = Manifest.load(run)
    assert man.steps["iter_1/run_1"].device == "cpu,cpu" and man.steps["iter_1/run_2"].device == "cpu"
    assert all(man.steps[n].status == "done" for n in ("iter_1/run_1", "iter_1/run_2", "iter_1/slerp", "final"))
    worlds = [
        json.loads((run / f"iter_1/run_{m}/warp_provenance.json").read_text())["params"]["world_size"] for m in (1, 2)
    ]
    assert worlds == [2, 1]
    # Iteration 1 depends only on the init and the seeds: the same as the sequential 1-process reference.
    for step in ("iter_1/run_1", "iter_1/run_2", "iter_1/slerp"):
        a, b = load_state(run / step), load_state(reference_run / step)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=f"{step} {k}")
    assert (run / "iter_1/run_1.log").is_file()  # the torchrun workers' output


@pytest.mark.parametrize(
    ("devices", "rl", "match"),
    [
        ([["cpu", "cuda:0"]], RL, "does not exist here|mixes kinds"),
        ([["cpu", "cpu", "cpu"]], RL, r"batch-size 4 is not divisible by the 3 processes"),
    ],
)
def test_bad_device_groups(tmp_path, pipe_init, devices, rl, match):
    cfg = write_config(tmp_path, pipe_init, devices=devices, rl=rl)
    with pytest.raises(WarpError, match=match):
        run_pipeline(cfg, tmp_path / "run", progress=False)


def test_group_config_parses(tmp_path, pipe_init):
    cfg = load_config(write_config(tmp_path, pipe_init, runs=3, devices=[["cpu", "cpu"], "cpu"]))
    assert [cfg.group(m) for m in (1, 2, 3)] == [("cpu", "cpu"), ("cpu",), ("cpu", "cpu")]
    assert [cfg.device(m) for m in (1, 2, 3)] == ["cpu", "cpu", "cpu"] and cfg.eval_device == "cpu"
