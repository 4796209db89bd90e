"""`warp pipeline status`: progress and time left of running steps, the init, --json and --watch, on a
manifest written by hand (no run needed)."""

import json
import os
import time

import pytest
from typer.testing import CliRunner

from mergekit_warp.cli import app
from mergekit_warp.pipeline.manifest import Manifest
from mergekit_warp.pipeline.status import counts, status_rows

CONFIG = {"init": "my-sft", "iterations": 1, "runs": 2, "rl": {"steps": 8}, "per_run": [{}, {"steps": 20}]}


def _run_dir(tmp_path, *, rl_running: bool, eval_points: tuple[int, int] | None = None):
    man = Manifest(tmp_path, CONFIG, "h")
    for name, kind in (("iter_1/run_1", "rl"), ("iter_1/run_2", "rl")):
        s = man.step(name, kind)
        s.status, s.started, s.pid = "done", time.time() - 100, os.getpid()
        s.finished, s.metrics = time.time() - 50, {"step": 8, "reward": 0.5, "kl_init": 1.25}
        s.inputs = {"init": {"path": "/models/my-sft", "hash": "x"}}
    if rl_running:
        s = man.steps["iter_1/run_2"]
        s.status, s.finished, s.started = "running", None, time.time() - 10
        partial = tmp_path / "iter_1" / "run_2.partial"
        partial.mkdir(parents=True)
        lines = [{"step": k, "reward": 0.1 * k, "kl_init": 0.5} for k in (1, 2, 3, 4, 5)]
        (partial / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if eval_points:
        s = man.step("eval", "pareto")
        s.status, s.started, s.pid = "running", time.time() - 20, os.getpid()
        s.metrics = {"points_done": eval_points[0], "points_total": eval_points[1]}
    man.save()
    return tmp_path


def test_running_rl_shows_step_of_its_own_total_and_time_left(tmp_path):
    data = status_rows(_run_dir(tmp_path, rl_running=True))
    row = {r["step"]: r for r in data["steps"]}["iter_1/run_2"]
    assert row["status"] == "running" and row["progress"] == "step 5/20"  # per_run overrides rl.steps
    assert 25 < row["eta_s"] < 35  # 10 s for 5 steps → 15 more steps ≈ 30 s
    assert row["metrics"]["reward"] == 0.5  # the live metrics of the last logged step
    assert data["init"] == "my-sft" and data["init_path"] == "/models/my-sft"
    assert counts(tmp_path) == {"done": 1, "running": 1, "pending": 3}


def test_evaluation_progress(tmp_path):
    data = status_rows(_run_dir(tmp_path, rl_running=False, eval_points=(4, 12)))
    row = data["steps"][-1]
    assert row["step"] == "eval" and row["progress"] == "point 4/12" and 35 < row["eta_s"] < 45


def test_dead_process_is_interrupted_and_json_and_watch(tmp_path):
    run = _run_dir(tmp_path, rl_running=True)
    man = Manifest.load(run)
    man.steps["iter_1/run_2"].pid = 2**22 + 12345  # no such process
    man.save()
    r = CliRunner().invoke(app, ["pipeline", "status", str(run), "--json"])
    assert r.exit_code == 0, r.output
    rows = {x["step"]: x for x in json.loads(r.stdout)["steps"]}
    assert rows["iter_1/run_2"]["status"] == "interrupted" and rows["iter_1/run_2"]["progress"] == ""
    w = CliRunner().invoke(app, ["pipeline", "status", str(run), "--watch", "--every", "0.5"])
    assert w.exit_code == 0 and "interrupted" in w.stdout and "KL_init" in w.stdout  # nothing running: returns
    bad = CliRunner().invoke(app, ["pipeline", "status", str(tmp_path / "nope"), "--json"])
    assert bad.exit_code == 2 and "not a pipeline run folder" in bad.stderr


def test_ctrl_c_marks_the_step_interrupted_not_failed(tmp_path):
    from mergekit_warp.pipeline.run import _guarded

    man = Manifest(tmp_path, CONFIG, "h")
    man.start("iter_1/run_1", "rl", {})

    def stop():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _guarded(man, "iter_1/run_1", stop)
    s = Manifest.load(tmp_path).steps["iter_1/run_1"]
    assert s.status == "interrupted" and s.error is None


def test_ctrl_c_leaves_a_watch_quietly(tmp_path, monkeypatch):
    run = _run_dir(tmp_path, rl_running=True)  # a live step: the watch would go on

    def ctrl_c(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(time, "sleep", ctrl_c)
    r = CliRunner().invoke(app, ["pipeline", "status", str(run), "--watch"])
    assert r.exit_code == 0 and r.stderr == "" and "running" in r.stdout
