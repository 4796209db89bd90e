"""Side-by-side scoring: the ±1.5/±1/±0.5/0 mapping, the bootstrap interval, the judge's spread and the
`auto` thresholds, and the reference cases: self against self (common random numbers: exactly 0, all
ties), a judge that always prefers A, the output folder."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from pipeline_fixtures import TOY_REWARD, pipe_init, reference_run  # noqa: F401  (fixtures)
from typer.testing import CliRunner

from mergekit_warp.cli import app
from mergekit_warp.errors import WarpError
from mergekit_warp.eval.settings import EvalSettings
from mergekit_warp.eval.sxs import bootstrap_ci, check_thresholds, judge_spread, score_margins, summarize, sxs

runner = CliRunner()


def test_margin_mapping():
    m = torch.tensor([0.6, -0.3, 0.1, 0.01, -0.5, 0.25, 0.0, -0.05])
    assert score_margins(m, (0.05, 0.25, 0.5)).tolist() == [1.5, -1.0, 0.5, 0.0, -1.5, 1.0, 0.0, -0.5]
    assert score_margins(m, (1.0, 2.0, 3.0)).abs().sum() == 0  # custom thresholds: all ties


def test_bootstrap_ci():
    assert bootstrap_ci(torch.full((20,), 0.5)) == (0.5, 0.5)
    x = torch.randn(400, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    lo, hi = bootstrap_ci(x, n_boot=4000)
    se = x.std().item() / 400**0.5
    assert lo < x.mean().item() < hi
    assert (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.15)  # the normal-theory width


def test_summary_counts():
    r = summarize(torch.tensor([1.0, 0.3, 0.0, -0.1, -1.0]), (0.05, 0.25, 0.5))
    assert (r.wins, r.ties, r.losses, r.n) == (2, 1, 2, 5)
    assert r.mean == pytest.approx((1.5 + 1 + 0 - 0.5 - 1.5) / 5)


def test_bad_thresholds():
    with pytest.raises(WarpError):
        check_thresholds((0.5, 0.25, 0.1))
    with pytest.raises(WarpError):
        check_thresholds((0.1, 0.2))


def _prompts(run):
    return run.parent / "heldout.jsonl"


@pytest.mark.parametrize("copy", [False, True])
def test_self_vs_self_is_exactly_zero(reference_run, tmp_path, copy):
    """The same policy (the same folder, or a copy of it) with a noisy pointwise judge: common random
    numbers give identical answers, so every pair is a tie and the mean is exactly 0."""
    pol = reference_run / "iter_1" / "slerp"
    other = shutil.copytree(pol, tmp_path / "copy") if copy else pol
    r = sxs(
        pol,
        other,
        _prompts(reference_run),
        f"{TOY_REWARD}:words",
        EvalSettings(samples_per_prompt=4, max_new_tokens=6, temperature=2.0),
    )
    assert r.crn and r.n == 32 and (r.wins, r.ties, r.losses) == (0, 32, 0)
    assert r.mean == 0.0 and (r.ci_low, r.ci_high) == (0.0, 0.0)
    assert all(p["a"] == p["b"] and p["margin"] == 0.0 and p["verdict"] == "tie" for p in r.pairs)
    assert r.spread > 0  # the judge did vary between samples: the zero is not a degenerate judge


def test_judge_spread_and_auto_thresholds():
    # two prompts × 2 samples per policy: within-group deviations ±0.5 and ±1 (A), 0 (B)
    a, b = [1.0, 2.0, 0.0, 2.0], [3.0, 3.0, 5.0, 5.0]
    assert judge_spread(a, b, [], 2) == pytest.approx(((0.25 * 2 + 1 * 2) / 4) ** 0.5)
    assert judge_spread([1.0, 3.0], [2.0, 2.0], [], 1) == pytest.approx((2 / 2) ** 0.5)  # one sample: all answers
    assert judge_spread(None, None, [1.0, 3.0], 1) == pytest.approx(2**0.5 / 2**0.5)  # pairwise: std(m)/√2


def test_judge_always_prefers_a(reference_run):
    pol_a, pol_b = reference_run / "final", reference_run / "iter_1" / "run_1"
    r = sxs(
        pol_a,
        pol_b,
        _prompts(reference_run),
        f"{TOY_REWARD}:prefers_a",
        EvalSettings(samples_per_prompt=1, max_new_tokens=6),
    )
    assert r.mean == 1.5 and (r.ci_low, r.ci_high) == (1.5, 1.5) and r.wins == r.n == 8
    assert r.auto and r.spread == 0.0 and r.thresholds == (0.0, 0.0, 0.0)  # a constant margin: no noise at all


def test_sxs_cli(reference_run):
    pol = str(reference_run / "final")
    r = runner.invoke(
        app,
        [
            "eval",
            "sxs",
            pol,
            pol,
            "--prompts",
            str(_prompts(reference_run)),
            "--judge",
            f"{TOY_REWARD}:prefers_a",
            "--max-new-tokens",
            "4",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "+1.500" in r.stdout and "win/tie/loss 16/0/0" in r.stdout and "common random numbers: yes" in r.stdout
    r = runner.invoke(
        app,
        [
            "eval",
            "sxs",
            pol,
            pol,
            "--prompts",
            str(_prompts(reference_run)),
            "--judge",
            "sentiment",
            "--thresholds",
            "0.5,0.2,0.1",
        ],
    )
    assert r.exit_code == 2 and "thresholds" in r.stderr


def test_check_margins_refuses_garbage():
    """NaN would count as a tie and inf as a +1.5 win; strings, bools and a wrong count are refused too."""
    from mergekit_warp.eval.sxs import check_margins

    assert check_margins([0.5, -1, torch.tensor(2.0)], "j", 3) == [0.5, -1.0, 2.0]
    for out, what in (
        ([0.1, float("nan")], "non-finite margin nan for pair 1"),
        ([float("inf"), 0.0], "non-finite margin inf for pair 0"),
        ([0.0, "0.3"], "for pair 1"),
        ([True, False], "for pair 0"),
        ([0.1], "1 margins for 2 pairs"),
        ("ab", "returned str"),
        (None, "returned NoneType"),
    ):
        with pytest.raises(WarpError, match="judge j") as e:
            check_margins(out, "j", 2)
        assert what in str(e.value)


def test_sxs_cli_nan_judge(tmp_path, reference_run):
    judge = tmp_path / "judge.py"
    judge.write_text(
        "def nan(prompts, a, b):\n    return [float('nan')] * len(a)\n\n"
        "def nan_point(prompts, completions):\n    return [float('nan')] * len(completions)\n"
    )
    pol = str(reference_run / "final")
    for fn in ("nan", "nan_point"):
        r = runner.invoke(
            app,
            [
                "eval",
                "sxs",
                pol,
                pol,
                "--prompts",
                str(_prompts(reference_run)),
                "--judge",
                f"{judge}:{fn}",
                "--max-new-tokens",
                "4",
                "-q",
            ],
        )
        assert r.exit_code == 2, r.output
        line = r.stderr.strip()
        assert len(line.splitlines()) == 1 and line.startswith("error:") and f"{judge}:{fn}" in line
        assert "NaN" in line if fn == "nan_point" else "non-finite margin nan for pair 0" in line


def test_sxs_cli_self_and_output_folder(tmp_path, reference_run):
    """A against itself on the command line: +0.000, all ties; -o writes sxs.json and pairs.jsonl, and an
    existing folder is refused without --force."""
    pol = str(reference_run / "final")
    out = tmp_path / "sxs"
    args = ["eval", "sxs", pol, pol, "--prompts", str(_prompts(reference_run)), "--judge", f"{TOY_REWARD}:words"]
    r = runner.invoke(app, [*args, "--max-new-tokens", "5", "--temperature", "3", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "+0.000" in r.stdout and "win/tie/loss 0/16/0" in r.stdout and "judge spread σ" in r.stdout
    assert r.stdout.strip().splitlines()[-1] == str(out) and "[warp eval sxs] step" in r.stderr
    rec = json.loads((out / "sxs.json").read_text())
    assert rec["mean"] == 0.0 and rec["ties"] == 16 and rec["common_random_numbers"] is True
    assert rec["settings"]["max_new_tokens"] == 5 and rec["settings"]["temperature"] == 3.0
    assert rec["thresholds_from"].startswith("auto") and rec["thresholds"] == [
        rec["judge_spread"] * k for k in (1, 2, 3)
    ]
    pairs = [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 16 and set(pairs[0]) >= {"prompt", "a", "b", "score_a", "score_b", "margin", "verdict"}
    r = runner.invoke(app, [*args, "--max-new-tokens", "5", "-o", str(out), "-q"])
    assert r.exit_code == 2 and "--force" in r.stderr and r.stdout == ""
    r = runner.invoke(app, [*args, "--max-new-tokens", "5", "-o", pol, "--force", "-q"])
    assert r.exit_code == 2 and "input" in r.stderr and (reference_run / "final" / "config.json").is_file()
