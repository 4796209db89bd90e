"""The WARP loop end to end on tiny models: a 2×2 run, its manifest, its merges against an independent
dense computation, kill-and-resume equivalence (at a step boundary and in the middle of an RL step),
and parallel runs across devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pipeline_fixtures import RL, pipe_init, reference_run, write_config  # noqa: F401  (fixtures)
from tiny import load_state
from typer.testing import CliRunner

from mergekit_warp.cli import app
from mergekit_warp.pipeline.manifest import Manifest, output_hash
from mergekit_warp.pipeline.run import run_pipeline
from mergekit_warp.pipeline.status import counts, planned_steps

STEPS = [
    "iter_1/run_1",
    "iter_1/run_2",
    "iter_1/slerp",
    "iter_1/liti",
    "iter_1/eval",
    "iter_2/run_1",
    "iter_2/run_2",
    "iter_2/slerp",
    "final",
    "eval",
]


def _same_weights(a: Path, b: Path, exact: bool = True) -> None:
    sa, sb = load_state(a), load_state(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        if exact:
            assert torch.equal(sa[k], sb[k]), k
        else:
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6, msg=k)


def test_two_by_two_run_completes(reference_run):
    run = reference_run
    man = Manifest.load(run)
    assert [n for n, _ in planned_steps(man.config)] == STEPS
    for name in STEPS:
        s = man.steps[name]
        assert s.status == "done", (name, s)
        if not name.endswith("eval"):
            assert s.output == name and s.hash == output_hash(run / name) and s.hash.startswith("sha256:")
    assert man.steps["iter_2/run_1"].inputs["init"]["hash"] == output_hash(run / "iter_1/liti")
    assert man.steps["iter_1/run_1"].metrics["step"] == 3  # the RL run's last logged step
    assert counts(run) == {"done": len(STEPS)}
    for d in ("iter_1/run_1", "iter_1/slerp", "iter_1/liti", "final"):
        assert (run / d / "warp_provenance.json").is_file()
    assert not list(run.rglob(".*.tmp-*"))  # nothing half-written left behind
    # the runs of an iteration differ (different seeds) and moved away from their init
    a, b, init = load_state(run / "iter_1/run_1"), load_state(run / "iter_1/run_2"), load_state(man.config["init"])
    k = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(a[k], b[k]) and not torch.equal(a[k], init[k])


def test_final_loads_in_transformers(reference_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(reference_run / "final")
    tok = AutoTokenizer.from_pretrained(reference_run / "final")
    ids = tok("the good day", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()


def test_liti_steps_match_dense_formula(reference_run):
    """iter_1/liti = 0.7·θ_sft + 0.3·θ_slerp1 and final = 0.7·θ_init2 + 0.3·θ_slerp2 (target: init)."""
    run = reference_run
    sft = load_state(Manifest.load(run).config["init"])
    for target, merged, out in (
        (sft, load_state(run / "iter_1/slerp"), run / "iter_1/liti"),
        (load_state(run / "iter_1/liti"), load_state(run / "iter_2/slerp"), run / "final"),
    ):
        got = load_state(out)
        for k in got:
            torch.testing.assert_close(got[k], 0.7 * target[k] + 0.3 * merged[k], rtol=1e-5, atol=1e-6)


def test_status_command(reference_run):
    r = CliRunner().invoke(app, ["pipeline", "status", str(reference_run)])
    assert r.exit_code == 0, r.output
    for name in STEPS:
        assert name in r.stdout
    assert "pending" not in r.stdout and "failed" not in r.stdout
    data = json.loads(CliRunner().invoke(app, ["pipeline", "status", str(reference_run), "--json"]).stdout)
    from mergekit_warp.pipeline.status import disk_bytes

    by_step = {row["step"]: row["disk_bytes"] for row in data["steps"]}
    weights = sum(f.stat().st_size for f in (reference_run / "iter_1/run_1").glob("*.safetensors"))
    assert weights <= by_step["iter_1/run_1"] < weights + 2_000_000  # weights, metrics, provenance; no anchor
    assert not (reference_run / "iter_1/run_1/anchor").exists()  # the pipeline keeps no anchors by default
    assert data["disk_bytes"] == disk_bytes(reference_run) >= sum(by_step.values())
    assert "disk" in r.stdout
    r = CliRunner().invoke(app, ["pipeline", "status", str(reference_run / "iter_1")])
    assert r.exit_code == 2 and "run.json" in r.stderr


def _cli(
    cfg: Path, out: Path, *extra: str, env: dict | None = None, kill_after: str | None = None
) -> subprocess.CompletedProcess:
    entry = [str(Path(__file__).with_name("kill_after.py")), kill_after] if kill_after else ["-m", "mergekit_warp"]
    cmd = [sys.executable, *entry, "pipeline", "run", str(cfg), "-o", str(out), "-q", *extra]
    return subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_kill_at_step_boundary_then_resume(tmp_path, pipe_init, reference_run):
    cfg = write_config(tmp_path, pipe_init, eval={"enabled": False})
    run = tmp_path / "run"
    p = _cli(cfg, run, kill_after="iter_1/slerp")
    assert p.returncode == -9, p.stderr
    man = Manifest.load(run)
    assert man.steps["iter_1/slerp"].status == "done" and "iter_1/liti" not in man.steps
    assert not (run / "final").exists()
    started = {n: man.steps[n].started for n in ("iter_1/run_1", "iter_1/run_2", "iter_1/slerp")}

    run_pipeline(cfg, run, resume=True, progress=False)
    man = Manifest.load(run)
    assert all(man.steps[n].started == t for n, t in started.items())  # verified and skipped, not redone
    assert all(s.status == "done" for s in man.steps.values())  # without evaluation nothing is deleted
    _same_weights(run / "final", reference_run / "final")


@pytest.mark.slow
def test_kill_mid_rl_step_then_resume(tmp_path, pipe_init, reference_run):
    """The toy reward SIGKILLs the process at its 8th call: iteration 1 used 6 (2 runs × 3 steps), so the
    kill lands inside iter_2/run_1's second step, after its step-1 state was saved."""
    cfg = write_config(tmp_path, pipe_init, eval={"enabled": False})
    run = tmp_path / "run"
    p = _cli(cfg, run, env={"WARP_TEST_KILL_AT": "8", "WARP_TEST_KILL_COUNTER": str(tmp_path / "calls")})
    assert p.returncode == -9, p.stderr
    man = Manifest.load(run)
    assert man.steps["iter_2/run_1"].status == "running" and man.steps["iter_1/liti"].status == "done"
    assert (run / "iter_2/run_1.partial").is_dir() and not (run / "iter_2/run_1").exists()
    r = CliRunner().invoke(app, ["pipeline", "status", str(run)])
    assert "interrupted" in r.stdout

    p = _cli(cfg, run, "--resume")
    assert p.returncode == 0, p.stderr
    assert Manifest.load(run).steps["final"].status == "done"
    _same_weights(run / "final", reference_run / "final")


def test_resume_refuses_changed_config(tmp_path, pipe_init, reference_run):
    cfg = write_config(tmp_path, pipe_init)
    run = tmp_path / "run"
    run_pipeline(
        write_config(tmp_path, pipe_init, name="other.yaml", iterations=1, eval={"enabled": False}), run, progress=False
    )
    r = CliRunner().invoke(app, ["pipeline", "run", str(cfg), "-o", str(run), "--resume"])
    assert r.exit_code == 2 and "differs" in r.stderr


def test_resume_redoes_step_whose_output_changed(tmp_path, pipe_init):
    cfg = write_config(tmp_path, pipe_init, iterations=1, eval={"enabled": False}, keep=["policy", "merges"])
    run = tmp_path / "run"
    run_pipeline(cfg, run, progress=False)
    before = Manifest.load(run)
    (run / "final" / "warp_provenance.json").write_text("{}")  # tampered: hash no longer matches
    run_pipeline(cfg, run, resume=True, progress=False)
    after = Manifest.load(run)
    assert after.steps["iter_1/run_1"].started == before.steps["iter_1/run_1"].started
    assert after.steps["final"].started > before.steps["final"].started
    assert json.loads((run / "final" / "warp_provenance.json").read_text())["method"]


@pytest.mark.slow
def test_parallel_devices_match_sequential(tmp_path, pipe_init, reference_run):
    """devices: [cpu, cpu] runs the two RL runs of each iteration in two worker processes."""
    cfg = write_config(tmp_path, pipe_init, devices=["cpu", "cpu"], eval={"enabled": False}, keep=["policy"])
    run = tmp_path / "run"
    run_pipeline(cfg, run, progress=False)
    man = Manifest.load(run)
    r1, r2 = man.steps["iter_1/run_1"], man.steps["iter_1/run_2"]
    # the runs overlapped in time, as measured inside the two workers (sequentially, run 2 starts after run 1)
    assert r2.started < r1.finished and r1.started < r2.finished
    ref = Manifest.load(reference_run)
    assert ref.steps["iter_1/run_2"].started >= ref.steps["iter_1/run_1"].finished
    _same_weights(run / "iter_1/run_2", reference_run / "iter_1/run_2", exact=False)
    _same_weights(run / "final", reference_run / "final", exact=False)


def test_single_run_and_sft_target(tmp_path, pipe_init):
    """M = 1: the run is its own merge (no SLERP step); target sft: every LITI interpolates toward θ_sft."""
    cfg = write_config(
        tmp_path,
        pipe_init,
        runs=1,
        liti={"eta": 0.4, "target": "sft"},
        eval={"enabled": False},
        rl={**RL, "steps": 2},
        keep=["policy", "merges"],
    )
    run = tmp_path / "run"
    run_pipeline(cfg, run, progress=False)
    man = Manifest.load(run)
    assert [n for n, _ in planned_steps(man.config)] == ["iter_1/run_1", "iter_1/liti", "iter_2/run_1", "final"]
    assert set(man.steps) == {"iter_1/run_1", "iter_1/liti", "iter_2/run_1", "final"}
    sft = load_state(pipe_init)
    for merged, out in (("iter_1/run_1", "iter_1/liti"), ("iter_2/run_1", "final")):
        m, got = load_state(run / merged), load_state(run / out)
        for k in got:
            torch.testing.assert_close(got[k], 0.6 * sft[k] + 0.4 * m[k], rtol=1e-5, atol=1e-6)
    assert man.steps["iter_2/run_1"].inputs["init"]["path"] == str(run / "iter_1/liti")
