"""`warp eval` scoring and the Pareto sweep: endpoints against independent references, files, CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from pipeline_fixtures import TOY_REWARD, pipe_init, reference_run  # noqa: F401  (fixtures)
from typer.testing import CliRunner

from mergekit_warp.cli import app
from mergekit_warp.eval.pareto import front_gap
from mergekit_warp.eval.score import Evaluator
from mergekit_warp.eval.settings import EvalSettings
from mergekit_warp.lm.heldout import mean_se
from mergekit_warp.pipeline.manifest import Manifest

runner = CliRunner()


def _rows(run: Path) -> list[dict]:
    with open(run / "eval" / "pareto.csv") as f:
        return list(csv.DictReader(f))


def _evaluator(sft: Path, run: Path, reward: str = f"{TOY_REWARD}:words") -> Evaluator:
    return Evaluator(sft, run.parent / "heldout.jsonl", reward, EvalSettings(max_new_tokens=6, samples_per_prompt=2))


def test_pipeline_wrote_pareto_files(reference_run):
    out = reference_run / "eval"
    rows = _rows(reference_run)
    kinds = [(r["iteration"], r["kind"]) for r in rows]
    assert kinds.count(("1", "rl")) == 2 and kinds.count(("2", "liti")) == 3 and ("2", "final") in kinds
    assert ("0", "sft") in kinds and ("2", "init") in kinds and ("1", "slerp") in kinds
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    head = json.loads((out / "summary.json").read_text())
    assert set(head) >= {"sft_reward", "merged_above_init", "front_2_vs_1"}
    assert "SLERP merge above the init" in (out / "summary.txt").read_text()
    sft = next(r for r in rows if r["kind"] == "sft")
    # θ_sft against itself: 0 up to the rounding between the sampled log-probs and a forward of θ_sft
    assert abs(float(sft["kl"])) < 1e-5 and int(sft["n"]) == 16


def test_sweep_endpoints(reference_run):
    """η=0 toward θ_sft is θ_sft (KL ≈ 0); η=1 reproduces the SLERP checkpoint's numbers; KL grows in between."""
    sft = Path(Manifest.load(reference_run).config["init"])
    slerp = reference_run / "iter_1" / "slerp"
    ev = _evaluator(sft, reference_run)
    ev.load_liti(sft, slerp, 0.0)
    s0 = ev.score("eta0")
    ev.load_folder(sft)
    s_sft = ev.score("sft")
    ev.load_liti(sft, slerp, 1.0)
    s1 = ev.score("eta1")
    ev.load_folder(slerp)
    s_slerp = ev.score("slerp")
    ev.load_liti(sft, slerp, 0.5)
    s_half = ev.score("half")
    assert abs(s0.kl) < 1e-5 and s0.kl_se < 1e-5 and s0.reward == s_sft.reward
    assert s1.reward == pytest.approx(s_slerp.reward, abs=1e-9)
    assert s1.kl == pytest.approx(s_slerp.kl, abs=1e-4) and s1.length == s_slerp.length
    assert s_slerp.kl > 0.01 and s_half.kl != pytest.approx(s0.kl, abs=1e-4)
    # the pipeline's CSV holds the same endpoint relations for iteration 1
    rows = {(r["iteration"], r["kind"], r["eta"]): r for r in _rows(reference_run)}
    assert abs(float(rows[("1", "liti", "0.0")]["kl"])) < 1e-5
    for col in ("reward", "kl"):
        assert float(rows[("1", "liti", "1.0")][col]) == pytest.approx(float(rows[("1", "slerp", "")][col]), abs=1e-4)


def test_kl_matches_manual_estimate(reference_run):
    """KL = mean over samples of Σ_t log π_τ − log π_sft,τ, recomputed here with plain transformers."""
    from transformers import AutoModelForCausalLM

    from mergekit_warp.lm.sampling import generate

    sft = Path(Manifest.load(reference_run).config["init"])
    run1 = reference_run / "iter_1" / "run_1"
    ev = _evaluator(sft, reference_run)
    st = ev.s
    ev.load_folder(run1)
    got = ev.score("run1")
    pi, ref = AutoModelForCausalLM.from_pretrained(run1), AutoModelForCausalLM.from_pretrained(sft)
    ro = generate(pi, ev.tok, ev.prompts, max_new_tokens=6, temperature=st.temperature, generator_seed=st.seed)
    kls = []
    with torch.no_grad():
        for i in range(len(ev.prompts)):
            ids = ro.input_ids[i][ro.attention_mask[i].bool()][None]  # this row alone, padding dropped
            n = int(ro.completion_mask[i].sum())
            lp = [torch.log_softmax(m(ids).logits[0, -n - 1 : -1] / st.temperature, -1) for m in (pi, ref)]
            tgt = ids[0, -n:]
            kls.append(float((lp[0] - lp[1]).gather(-1, tgt[:, None]).sum()))
    mean, se = mean_se(torch.tensor(kls))
    assert got.kl == pytest.approx(mean, abs=1e-4) and got.kl_se == pytest.approx(se, abs=1e-4)


def test_eval_cli_default_command(tmp_path, reference_run):
    sft = Manifest.load(reference_run).config["init"]
    out = tmp_path / "scores"
    r = runner.invoke(
        app,
        [
            "eval",
            str(sft),
            str(reference_run / "final"),
            "--init",
            str(sft),
            "--prompts",
            str(reference_run.parent / "heldout.jsonl"),
            "--reward",
            f"{TOY_REWARD}:reward",
            "--max-new-tokens",
            "6",
            "-o",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    rows = json.loads((out / "scores.json").read_text())["scores"]
    assert [Path(x["path"]).name for x in rows] == ["sft", "final"]
    assert abs(rows[0]["kl"]) < 1e-5 and abs(rows[1]["kl"]) > 1e-3 and rows[0]["n"] == 16
    with open(out / "scores.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    r = runner.invoke(
        app, ["eval", str(tmp_path / "nope"), "--init", str(sft), "--prompts", "x", "--reward", "sentiment"]
    )
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1


def test_eval_pareto_cli_with_extrapolation(tmp_path, reference_run):
    out = tmp_path / "pareto"
    r = runner.invoke(app, ["eval", "pareto", str(reference_run), "--etas", "0,1,1.5", "-o", str(out)])
    assert r.exit_code == 0, r.output
    with open(out / "pareto.csv") as f:
        etas = {(row["iteration"], row["eta"]) for row in csv.DictReader(f) if row["kind"] == "liti"}
    assert etas == {(i, e) for i in ("1", "2") for e in ("0.0", "1.0", "1.5")}
    assert (out / "pareto.png").stat().st_size < 200_000
    r = runner.invoke(app, ["eval", "pareto", str(reference_run), "-o", str(out)])
    assert r.exit_code == 2 and "--force" in r.stderr
    r = runner.invoke(app, ["eval", "pareto", str(tmp_path)])
    assert r.exit_code == 2 and "run.json" in r.stderr


def test_front_gap():
    import numpy as np

    a = (np.array([0.0, 1.0, 2.0]), np.array([0.0, 1.0, 1.5]))
    b = (np.array([0.0, 2.0, 4.0]), np.array([0.5, 2.0, 3.0]))
    gap, lo, hi = front_gap(a, b, n=3)  # grid 0, 1, 2: b = 0.5, 1.25, 2.0; a = 0, 1, 1.5
    assert (lo, hi) == (0.0, 2.0) and gap == pytest.approx((0.5 + 0.25 + 0.5) / 3)
    assert front_gap(a, (np.array([3.0, 4.0]), np.array([0.0, 1.0]))) is None
