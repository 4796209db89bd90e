"""What a pipeline leaves on disk: by default only final/, the evaluations and the records keep their
weights once no later step reads them; the printed results are those of a run that keeps everything;
`--resume` and `warp eval pareto` keep working on a pruned run; `keep:` chooses what stays."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pipeline_fixtures import RL, pipe_init, reference_run, write_config  # noqa: F401  (fixtures)
from tiny import load_state, make_tiny_llama
from typer.testing import CliRunner

from mergekit_warp.cli import app
from mergekit_warp.eval import score
from mergekit_warp.pipeline.manifest import Manifest
from mergekit_warp.pipeline.run import run_pipeline
from mergekit_warp.pipeline.status import disk_bytes

runner = CliRunner()
PRUNED = {"iter_1/run_1", "iter_1/run_2", "iter_1/slerp", "iter_1/liti", "iter_2/run_1", "iter_2/run_2", "iter_2/slerp"}


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory, pipe_init) -> tuple[Path, int]:
    """The reference run's config with the default `keep:` (nothing), and how many points it sampled."""
    base = tmp_path_factory.mktemp("pipe_pruned")
    cfg = write_config(base, pipe_init)
    calls = []
    sample = score.Evaluator.sample
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(score.Evaluator, "sample", lambda self, *a, **k: calls.append(1) or sample(self, *a, **k))
        run_pipeline(cfg, base / "run", progress=False)
    return base / "run", len(calls)


def _points(folder: Path) -> list[dict]:
    """The rows of pareto.csv without the checkpoints' paths."""
    with open(folder / "pareto.csv") as f:
        return [{k: v for k, v in row.items() if k != "path"} for row in csv.DictReader(f)]


def _weights(folder: Path) -> list[Path]:
    return sorted(p.relative_to(folder) for p in folder.rglob("*.safetensors"))


def test_default_keeps_final_and_evaluations_with_the_same_results(pruned_run, reference_run):
    run, sampled = pruned_run
    man = Manifest.load(run)
    assert {n for n, s in man.steps.items() if s.status == "pruned"} == PRUNED
    assert {n for n, s in man.steps.items() if s.status == "done"} == {"final", "iter_1/eval", "eval"}
    assert _weights(run) == [Path("final/model.safetensors")]
    # records stay: metrics and provenance of every step, and a card saying where the weights went
    assert (run / "iter_1/run_1/metrics.jsonl").is_file() and (run / "iter_1/slerp/warp_provenance.json").is_file()
    card = (run / "iter_2/run_2/README.md").read_text()
    assert "weights of this checkpoint were deleted" in card and card.startswith("---\n")  # after the metadata
    # the same results as a run that keeps everything: weights, front, summary
    for k, v in load_state(run / "final").items():
        assert torch.equal(v, load_state(reference_run / "final")[k]), k
    for f in ("eval", "iter_1/eval"):
        assert (run / f / "summary.txt").read_text() == (reference_run / f / "summary.txt").read_text()
        assert _points(run / f) == _points(reference_run / f)
    assert "iteration 2" not in (run / "iter_1/eval/summary.txt").read_text()
    # iteration 1's points are not sampled again by the final evaluation: θ_sft, 2 runs, SLERP, η=0.5,
    # η=1 (η=0 is θ_sft) in iteration 1; init, 2 runs, SLERP, η=0.5, η=1 and final/ in iteration 2
    assert sampled == 6 + 7
    ref_disk = disk_bytes(reference_run)
    assert disk_bytes(run) < ref_disk - 7 * disk_bytes(run / "final" / "model.safetensors") * 0.99
    r = runner.invoke(app, ["pipeline", "status", str(run)])
    assert r.exit_code == 0 and r.stdout.count("pruned") >= len(PRUNED), r.output


def test_resume_of_a_pruned_run_redoes_nothing(pruned_run):
    run, _ = pruned_run
    before = Manifest.load(run)
    summary = (run / "eval" / "summary.txt").read_text()
    result = run_pipeline(run.parent / "cfg.yaml", run, resume=True, progress=False)
    after = Manifest.load(run)
    assert {n: s.started for n, s in after.steps.items()} == {n: s.started for n, s in before.steps.items()}
    assert result.summary == summary


def test_eval_pareto_uses_the_stored_scores(tmp_path, pruned_run):
    run = Path(shutil.copytree(pruned_run[0], tmp_path / "run"))  # a moved run: its paths are the new ones
    out = tmp_path / "again"
    r = runner.invoke(app, ["eval", "pareto", str(run), "-o", str(out)])  # the pruned weights are not read
    assert r.exit_code == 0, r.output
    assert _points(out) == _points(run / "eval")
    with open(out / "pareto.csv") as f:
        assert not any(str(pruned_run[0]) in row["path"] for row in csv.DictReader(f))
    # redrawing the run's own eval/ with fewer η keeps every stored score
    r = runner.invoke(app, ["eval", "pareto", str(run), "--etas", "0,1", "--force"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["eval", "pareto", str(run), "-o", str(tmp_path / "all")])
    assert r.exit_code == 0 and _points(tmp_path / "all") == _points(out), r.output
    r = runner.invoke(app, ["eval", "pareto", str(run), "--etas", "", "-o", str(tmp_path / "none")])
    assert r.exit_code == 2 and "--etas" in r.stderr
    r = runner.invoke(app, ["eval", "pareto", str(run), "--etas", "0.25", "-o", str(tmp_path / "new")])
    assert r.exit_code == 2 and "iter_1/slerp" in r.stderr
    assert "weights deleted by the pipeline" in r.stderr and "keep:" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "new").exists()


def test_a_lost_evaluation_is_redrawn_from_the_stored_scores(tmp_path, pruned_run):
    run = Path(shutil.copytree(pruned_run[0], tmp_path / "run"))
    before = Manifest.load(run)
    summary = (run / "iter_1/eval/summary.txt").read_text()
    shutil.rmtree(run / "iter_1/eval")
    run_pipeline(pruned_run[0].parent / "cfg.yaml", run, resume=True, progress=False)
    after = Manifest.load(run)
    assert (run / "iter_1/eval/summary.txt").read_text() == summary
    assert all(after.steps[n].started == s.started for n, s in before.steps.items() if n != "iter_1/eval")
    # a folder whose weights were deleted says so when given to another command
    r = runner.invoke(app, ["liti", str(run / "iter_1/slerp"), "--init", str(run / "final"), "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and "deleted by `warp pipeline run`" in r.stderr and "keep:" in r.stderr


def test_stored_scores_know_the_reward_file_and_the_init(tmp_path, pipe_init):
    from mergekit_warp.eval.pareto import score_recipe
    from mergekit_warp.eval.settings import EvalSettings
    from mergekit_warp.io.publish import content_fingerprint, fingerprint

    prompts, reward = tmp_path / "p.jsonl", tmp_path / "r.py"
    prompts.write_text('{"prompt": "hi"}\n')
    reward.write_text("def reward(p, c):\n    return [0.0 for _ in c]\n")
    settings = EvalSettings(max_new_tokens=4).resolved()
    before = score_recipe(prompts, f"{reward}:reward", settings, "cpu")
    reward.write_text("def reward(p, c):\n    return [1.0 for _ in c]\n")
    assert score_recipe(prompts, f"{reward}:reward", settings, "cpu") != before
    twin = make_tiny_llama(tmp_path / "twin", seed=4)  # θ_sft's architecture, other weights
    assert fingerprint(twin) == fingerprint(pipe_init) and content_fingerprint(twin) != content_fingerprint(pipe_init)


def test_without_evaluation_nothing_is_deleted(tmp_path, pipe_init):
    cfg = write_config(tmp_path, pipe_init, iterations=1, eval={"enabled": False}, keep="merges")
    run_pipeline(cfg, tmp_path / "run", progress=False)
    assert {s.status for s in Manifest.load(tmp_path / "run").steps.values()} == {"done"}
    assert _weights(tmp_path / "run/iter_1/run_1") == [Path("model.safetensors")]


def _cli(cfg: Path, out: Path, *extra: str, kill_after: str | None = None) -> subprocess.CompletedProcess:
    entry = [str(Path(__file__).with_name("kill_after.py")), kill_after] if kill_after else ["-m", "mergekit_warp"]
    cmd = [sys.executable, *entry, "pipeline", "run", str(cfg), "-o", str(out), "-q", *extra]
    return subprocess.run(cmd, env=dict(os.environ), capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_kill_after_pruning_then_resume_and_a_damaged_final(tmp_path, pipe_init, reference_run):
    cfg = write_config(tmp_path, pipe_init)
    run = tmp_path / "run"
    p = _cli(cfg, run, kill_after="iter_2/run_1")
    assert p.returncode == -9, p.stderr
    man = Manifest.load(run)
    assert {n for n, s in man.steps.items() if s.status == "pruned"} == {"iter_1/run_1", "iter_1/run_2", "iter_1/slerp"}
    assert man.steps["iter_1/liti"].status == "done"  # iteration 2's init stays until iteration 2 is evaluated
    first = man.steps["iter_1/run_1"].started

    p = _cli(cfg, run, "--resume")
    assert p.returncode == 0, p.stderr
    assert Manifest.load(run).steps["iter_1/run_1"].started == first  # iteration 1 was skipped
    assert (run / "eval/summary.txt").read_text() == (reference_run / "eval/summary.txt").read_text()

    # final/ damaged once everything else was pruned: iteration 2 needs its init, so iteration 1 is made
    # again (the same weights, seeds fixed), then iteration 2
    (run / "final" / "warp_provenance.json").write_text("{}")
    p = _cli(cfg, run, "--resume")
    assert p.returncode == 0, p.stderr
    man = Manifest.load(run)
    assert man.steps["iter_1/run_1"].started > first and man.steps["final"].status == "done"
    for k, v in load_state(run / "final").items():
        assert torch.equal(v, load_state(reference_run / "final")[k]), k
    assert (run / "eval/summary.txt").read_text() == (reference_run / "eval/summary.txt").read_text()


def test_keep_chooses_what_stays(tmp_path, pipe_init):
    rl = {**RL, "save_every": 1}
    one = dict(iterations=1, rl=rl)
    a = tmp_path / "a"
    run_pipeline(write_config(tmp_path, pipe_init, name="a.yaml", keep=["policy"], **one), a, progress=False)
    assert _weights(a / "iter_1/run_1") == [Path("model.safetensors")]  # the policy stays,
    assert not (a / "iter_1/run_1/checkpoints").exists()  # its save_every checkpoints do not
    assert _weights(a / "iter_1/slerp") == [] and Manifest.load(a).steps["iter_1/slerp"].status == "pruned"

    b = tmp_path / "b"
    run_pipeline(
        write_config(tmp_path, pipe_init, name="b.yaml", keep=["checkpoints", "merges"], **one), b, progress=False
    )
    assert _weights(b / "iter_1/run_2") == [Path(f"checkpoints/step_{k}/model.safetensors") for k in (1, 2, 3)]
    assert _weights(b / "iter_1/slerp") == [Path("model.safetensors")]

    r = runner.invoke(
        app,
        [
            "pipeline",
            "run",
            str(write_config(tmp_path, pipe_init, name="c.yaml", keep=["all"])),
            "-o",
            str(tmp_path / "c"),
        ],
    )
    assert r.exit_code == 2 and "keep" in r.stderr and "policy" in r.stderr
