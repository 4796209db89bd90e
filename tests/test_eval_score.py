"""`warp eval score`: -o is an output folder published atomically (or nothing is written), --like scores
exactly as a pipeline run's evaluation, progress on stderr (-q silences it), and every option has help."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import typer
from pipeline_fixtures import TOY_REWARD, pipe_init, reference_run  # noqa: F401  (fixtures)
from typer.testing import CliRunner

from mergekit_warp.cli import app
from mergekit_warp.pipeline.manifest import Manifest

runner = CliRunner()
SETTINGS = (
    "init",
    "prompts",
    "reward",
    "max_new_tokens",
    "temperature",
    "samples_per_prompt",
    "max_prompts",
    "length_penalty",
    "seed",
    "batch_size",
    "device",
)


def _sft(run: Path) -> str:
    return Manifest.load(run).config["init"]


def _score(run: Path, *args: str):
    base = ["--init", _sft(run), "--prompts", str(run.parent / "heldout.jsonl"), "--reward", f"{TOY_REWARD}:reward"]
    return runner.invoke(app, ["eval", str(run / "final"), *base, "--max-new-tokens", "4", *args])


def _error_line(r) -> str:
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert r.exit_code == 2, r.output
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    return lines[0]


def _nothing_beside(folder: Path, name: str) -> None:
    """No OUT, no staged or lock file of it."""
    assert not (folder / name).exists()
    assert not [p.name for p in folder.iterdir() if p.name.startswith(f".{name}.")]


def test_without_out_prints_the_table_and_writes_nothing(tmp_path, reference_run, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = _score(reference_run, "-q")
    assert r.exit_code == 0, r.output
    assert "KL(π‖π_sft)" in r.stdout and "final" in r.stdout and "≤ 4 new tokens" in r.stdout
    assert r.stderr == ""  # -q: no progress
    assert list(tmp_path.iterdir()) == []


def test_out_is_a_folder_with_the_settings(tmp_path, reference_run):
    out = tmp_path / "scores"
    r = _score(reference_run, "-o", str(out), "--seed", "7", "--max-prompts", "3")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip().splitlines()[-1] == str(out)
    assert "[warp eval] step 1/1" in r.stderr  # progress lines when stderr is not a terminal
    assert sorted(p.name for p in out.iterdir()) == ["samples.jsonl", "scores.csv", "scores.json"]
    rec = json.loads((out / "scores.json").read_text())
    st = rec["settings"]
    assert set(SETTINGS) <= set(st)
    assert (st["max_new_tokens"], st["seed"], st["max_prompts"], st["samples_per_prompt"]) == (4, 7, 3, 2)
    assert (st["temperature"], st["length_penalty"], st["batch_size"], st["device"]) == (0.9, 0.0, 32, "cpu")
    assert st["init"] == _sft(reference_run) and st["reward"] == f"{TOY_REWARD}:reward" and st["like"] is None
    assert rec["inputs"]["prompts"]["hash"].startswith("sha256:")
    [score] = rec["scores"]
    assert score["n"] == 6 and Path(score["path"]).name == "final"
    with open(out / "scores.csv") as f:
        assert float(next(csv.DictReader(f))["reward"]) == score["reward"]
    samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and sum(s["reward"] for s in samples) / 6 == pytest.approx(score["reward"])
    assert [(s["prompt_index"], s["sample"]) for s in samples[:3]] == [(0, 0), (0, 1), (1, 0)]

    # an existing OUT: refused without --force, untouched; replaced with it
    before = (out / "scores.json").read_text()
    line = _error_line(_score(reference_run, "-o", str(out), "-q"))
    assert str(out) in line and "--force" in line and (out / "scores.json").read_text() == before
    r = _score(reference_run, "-o", str(out), "-q", "--force")
    assert r.exit_code == 0, r.output
    assert json.loads((out / "scores.json").read_text())["settings"]["seed"] == 1234
    _nothing_beside(tmp_path, "nope")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_etas_score_liti_in_memory_as_warp_liti_writes_it(tmp_path, reference_run):
    """`--etas`: the same scores as LITI folders written by `warp liti` and scored as checkpoints (the same
    samples; the KL up to float rounding: `warp liti` forms θ_sft + η·(θ − θ_sft), the evaluation
    (1 − η)·θ_sft + η·θ); η = 0 is θ_sft itself (KL exactly 0 on this model)."""
    sft, final = _sft(reference_run), reference_run / "final"
    for eta in ("0", "0.5", "1.3"):
        r = runner.invoke(app, ["liti", str(final), "--init", sft, "--eta", eta, "-o", str(tmp_path / f"eta{eta}")])
        assert r.exit_code == 0, r.output
    r = _score(reference_run, "--etas", "0,0.5,1.3", "-o", str(tmp_path / "mem"), "-q")
    assert r.exit_code == 0, r.output
    folders = [str(tmp_path / f"eta{e}") for e in ("0", "0.5", "1.3")]
    r = runner.invoke(app, ["eval", *folders, *_score_args(reference_run), "-o", str(tmp_path / "disk"), "-q"])
    assert r.exit_code == 0, r.output
    mem = json.loads((tmp_path / "mem" / "scores.json").read_text())["scores"]
    disk = json.loads((tmp_path / "disk" / "scores.json").read_text())["scores"]
    assert [(s["name"], s["eta"]) for s in mem] == [(str(final), None), (f"{final}@0", 0.0), (f"{final}@0.5", 0.5), (f"{final}@1.3", 1.3)]  # fmt: skip
    for m, d in zip(mem[1:], disk):
        assert (m["reward"], m["length"]) == (d["reward"], d["length"])
        assert m["kl"] == pytest.approx(d["kl"], rel=1e-4, abs=1e-6)
    assert mem[1]["kl"] == 0.0
    assert mem[2]["kl"] != mem[3]["kl"]  # two different policies
    rows = [json.loads(x)["checkpoint"] for x in (tmp_path / "mem" / "samples.jsonl").read_text().splitlines()]
    assert rows.count(f"{final}@0.5") == rows.count(str(final)) == mem[0]["n"]

    for bad in ("0.3,x", "0.5,-1", "0.3,0.3"):
        line = _error_line(_score(reference_run, "--etas", bad, "-q"))
        assert "--etas" in line and bad in line


def _score_args(run: Path) -> list[str]:
    return ["--init", _sft(run), "--prompts", str(run.parent / "heldout.jsonl"), "--reward", f"{TOY_REWARD}:reward", "--max-new-tokens", "4"]  # fmt: skip


def test_out_that_is_or_holds_an_input_is_refused(tmp_path, reference_run):
    final = reference_run / "final"
    for out in (final, final / "sub", reference_run):
        line = _error_line(_score(reference_run, "-o", str(out), "--force", "-q"))
        assert str(out) in line and "input" in line
    assert (final / "config.json").is_file() and not (final / "sub").exists()
    line = _error_line(_score(reference_run, "-o", str(tmp_path / "no" / "such"), "-q"))
    assert str(tmp_path / "no") in line and "does not exist" in line
    assert not (tmp_path / "no").exists()


def test_bad_input_writes_nothing(tmp_path, reference_run):
    r = runner.invoke(
        app,
        ["eval", str(reference_run / "final"), "--init", _sft(reference_run), "--reward", "sentiment"]
        + ["--prompts", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "out")],
    )
    assert "--prompts" in _error_line(r) and "missing.jsonl" in r.stderr
    line = _error_line(_score(reference_run, "--temperature", "-1", "-o", str(tmp_path / "out")))
    assert "--temperature" in line
    line = _error_line(runner.invoke(app, ["eval", str(reference_run / "final"), "--prompts", "x"]))
    assert "--init is required" in line and "--like" in line
    _nothing_beside(tmp_path, "out")


def test_like_scores_as_the_pipeline(tmp_path, reference_run):
    """--like RUN: the run's init, held-out prompts, reward and eval settings: the same numbers as its
    Pareto evaluation; a flag given overrides the run's value."""
    out = tmp_path / "like"
    slerp = reference_run / "iter_1" / "slerp"
    r = runner.invoke(app, ["eval", "--like", str(reference_run), str(slerp), "-o", str(out), "-q"])
    assert r.exit_code == 0, r.output
    rec = json.loads((out / "scores.json").read_text())
    cfg = Manifest.load(reference_run).config
    st = rec["settings"]
    assert st["like"] == str(reference_run) and st["init"] == cfg["init"] and st["reward"] == cfg["reward"]
    assert st["prompts"] == cfg["prompts"]["heldout"] and st["max_new_tokens"] == 6
    with open(reference_run / "eval" / "pareto.csv") as f:
        row = next(x for x in csv.DictReader(f) if (x["iteration"], x["kind"]) == ("1", "slerp"))
    [score] = rec["scores"]
    assert (score["reward"], score["kl"], score["n"]) == (float(row["reward"]), float(row["kl"]), int(row["n"]))

    r = runner.invoke(app, ["eval", "--like", str(reference_run), str(slerp), "--max-new-tokens", "3", "-q"])
    assert r.exit_code == 0, r.output
    assert "≤ 3 new tokens" in r.stdout and "as in run" in r.stdout
    line = _error_line(runner.invoke(app, ["eval", "--like", str(tmp_path), str(slerp)]))
    assert f"--like {tmp_path}" in line and "run.json" in line


@pytest.mark.parametrize("command", ["score", "sxs"])
def test_every_option_has_help(command):
    group = typer.main.get_command(app).commands["eval"]
    params = [p for p in group.commands[command].params if p.name != "help"]
    assert params
    for p in params:
        text = getattr(p, "help", None) or ""
        assert len(text) > 10, p.name
        for internal in ("eval_prompts", "·k", "batch_size", "_"):
            assert internal not in text.replace("_sft", ""), (p.name, text)
