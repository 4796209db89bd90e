"""Pipeline config validation: every bad config is one line on stderr and exit status 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from pipeline_fixtures import RL, pipe_init, write_config  # noqa: F401  (fixture)
from typer.testing import CliRunner

from mergekit_warp.cli import app
from mergekit_warp.errors import WarpError
from mergekit_warp.pipeline.config import load_config

runner = CliRunner()


def _edit(path: Path, fn) -> Path:
    cfg = yaml.safe_load(path.read_text())
    fn(cfg)
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(*args: str):
    return runner.invoke(app, ["pipeline", "run", *map(str, args)])


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda c: c.pop("reward"), "missing required key 'reward'"),
        (lambda c: c.pop("prompts"), "missing required key 'prompts'"),
        (lambda c: c.__setitem__("iteration", 2), "unknown key 'iteration'"),
        (lambda c: c["liti"].__setitem__("etaa", 0.3), "unknown key 'liti.etaa'"),
        (lambda c: c["rl"].__setitem__("stepz", 3), "unknown key 'rl.stepz'"),
        (lambda c: c["rl"].__setitem__("seed", 3), "'rl.seed' is not allowed"),
        (lambda c: c.__setitem__("per_run", [{}, {"lrr": 1}]), "unknown key 'per_run.1.lrr'"),
        (lambda c: c.__setitem__("runs", 0), "key 'runs'"),
        (lambda c: c.__setitem__("iterations", 0), "key 'iterations'"),
        (lambda c: c["liti"].__setitem__("eta", -0.2), "allow_extrapolation"),
        (lambda c: c["liti"].__setitem__("eta", 1.5), "allow_extrapolation"),
        (lambda c: c.__setitem__("devices", ["cuda:7"]), "does not exist"),
        (lambda c: c.__setitem__("devices", ["tpu0"]), "not a device name"),
        (lambda c: c.__setitem__("devices", []), "devices"),
        (lambda c: c.__setitem__("seeds", [1, 2, 3]), "seeds"),
        (lambda c: c["prompts"].__setitem__("train", "nope.jsonl"), "prompts.train"),
        (lambda c: c["rl"].__setitem__("steps", "many"), "steps"),
        (lambda c: c["rl"].__setitem__("baseline", "rloo") or c["rl"].__setitem__("samples_per_prompt", 1), "rloo"),
        (lambda c: c["eval"].__setitem__("etas", [-1.0]), "eval.etas"),
    ],
)
def test_bad_config_is_one_line_exit_2(tmp_path, pipe_init, edit, expected):
    cfg = _edit(write_config(tmp_path, pipe_init), edit)
    r = _run(cfg, "-o", tmp_path / "run")
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(cfg) in lines[0], r.stderr
    assert expected in lines[0], lines[0]
    assert "Traceback" not in r.output
    assert not (tmp_path / "run").exists()  # nothing started


def test_negative_eta_allowed_with_extrapolation(tmp_path, pipe_init):
    cfg = _edit(write_config(tmp_path, pipe_init), lambda c: c["liti"].update(eta=-0.2, allow_extrapolation=True))
    assert load_config(cfg).liti.eta == -0.2


def test_relative_paths_and_seeds(tmp_path, pipe_init):
    cfg = load_config(write_config(tmp_path, pipe_init, seeds=[5, 9]))
    assert cfg.prompts.train == tmp_path / "train.jsonl" and cfg.prompts.heldout.is_file()
    assert [cfg.run_seed(1, 1), cfg.run_seed(1, 2), cfg.run_seed(2, 2)] == [5, 9, 1009]
    assert load_config(write_config(tmp_path, pipe_init)).run_seed(2, 1) == 7 + 1000
    assert cfg.device(2) == "cpu" and not cfg.parallel


def test_per_run_overrides(tmp_path, pipe_init):
    cfg = load_config(write_config(tmp_path, pipe_init, per_run=[{}, {"length_penalty": 0.0005}]))
    assert "length_penalty" not in cfg.rl_options(1) and cfg.rl_options(2)["length_penalty"] == 0.0005
    assert cfg.rl_options(2)["steps"] == 3


def test_bad_yaml_and_missing_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("init: [unclosed\n")
    with pytest.raises(WarpError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    r = _run(tmp_path / "missing.yaml")
    assert r.exit_code == 2 and "does not exist" in r.stderr


def test_existing_run_dir_and_resume_without_manifest(tmp_path, pipe_init):
    cfg = write_config(tmp_path, pipe_init)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "x").write_text("x")
    r = _run(cfg, "-o", tmp_path / "run")
    assert r.exit_code == 2 and "--resume" in r.stderr
    r = _run(cfg, "-o", tmp_path / "run2", "--resume")
    assert r.exit_code == 2 and "run.json" in r.stderr


def test_demo_config_is_valid():
    cfg = load_config(Path(__file__).parents[1] / "examples" / "demo.yaml")
    assert cfg.iterations == 2 and cfg.runs == 2 and cfg.reward == "sentiment"
    assert cfg.init == "smollm2-135m-instruct" and cfg.prompts.heldout.is_file()


def test_gpu_example_is_valid():
    from mergekit_warp.pipeline.run import rl_configs

    path = Path(__file__).parents[1] / "examples" / "gpu.yaml"
    cfg = load_config(path, check_devices=False)
    assert len(rl_configs(cfg)) == cfg.runs  # every run's RLConfig builds (types and ranges)
    assert cfg.parallel and cfg.rl_options(2)["length_penalty"] == 0.0005 and 1.5 in cfg.eval.etas


def test_missing_init_leaves_no_run_folder(tmp_path, pipe_init):
    cfg = write_config(tmp_path, tmp_path / "no_such_model")
    r = _run(cfg, "-o", tmp_path / "run")
    assert r.exit_code == 2 and "no_such_model" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_preflight_counts_prompts_as_the_rl_runs_truncate_them(tmp_path, pipe_init):
    """A training prompt longer than the context passes when `rl.max_prompt_length` truncates it; the
    held-out prompts are read whole by the evaluation, so a long one there is still refused."""
    from mergekit_warp.pipeline.run import preflight

    long = " ".join(["good"] * 200)  # 200 tokens; the tiny model's context is 128
    rl = dict(RL, max_prompt_length=16)
    cfg_path = write_config(tmp_path, pipe_init, rl=rl)
    with open(tmp_path / "train.jsonl", "a") as f:
        f.write(json.dumps({"prompt": long}) + "\n")
    assert preflight(cfg_path, load_config(cfg_path)) is not None
    cfg_path = write_config(tmp_path, pipe_init, rl=dict(RL))
    with open(tmp_path / "train.jsonl", "a") as f:
        f.write(json.dumps({"prompt": long}) + "\n")
    with pytest.raises(WarpError, match=r"train\.jsonl:13: prompt of 200 tokens"):
        preflight(cfg_path, load_config(cfg_path))
    cfg_path = write_config(tmp_path, pipe_init, rl=rl)
    with open(tmp_path / "heldout.jsonl", "a") as f:
        f.write(json.dumps({"prompt": long}) + "\n")
    with pytest.raises(WarpError, match=r"heldout\.jsonl:9: prompt of 200 tokens"):
        preflight(cfg_path, load_config(cfg_path))


def test_relative_paths_are_tidied(tmp_path, pipe_init):
    (tmp_path / "x").mkdir()
    cfg = load_config(write_config(tmp_path, pipe_init, prompts={"train": "x/../train.jsonl", "heldout": None}))
    assert cfg.prompts.train == tmp_path.absolute() / "train.jsonl"
