"""Side-by-side scoring: the ±1.5/±1/±0.5/0 mapping, the bootstrap interval, and the two reference
cases of the issue (self against self, a judge that always prefers A)."""

from __future__ import annotations

import pytest
import torch
from pipeline_fixtures import TOY_REWARD, pipe_init, reference_run  # noqa: F401  (fixtures)
from typer.testing import CliRunner

from mergekit_warp.cli import app
from mergekit_warp.errors import WarpError
from mergekit_warp.eval.settings import EvalSettings
from mergekit_warp.eval.sxs import bootstrap_ci, check_thresholds, score_margins, summarize, sxs

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


def test_self_vs_self_is_zero_within_ci(reference_run):
    """Independent samples of the same policy, judged by a noisy pointwise reward: mean ≈ 0, CI ∋ 0."""
    pol = reference_run / "iter_1" / "slerp"
    r = sxs(
        pol,
        pol,
        _prompts(reference_run),
        f"{TOY_REWARD}:words",
        EvalSettings(samples_per_prompt=4, max_new_tokens=6),
        thresholds=(0.1, 0.3, 0.6),
    )
    assert r.n == 32 and r.ci_low <= 0.0 <= r.ci_high and abs(r.mean) < 0.5
    assert r.wins > 0 and r.losses > 0  # the samples really differed: not a degenerate all-ties test


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
    assert "+1.500" in r.stdout and "win/tie/loss 16/0/0" in r.stdout
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
            ],
        )
        assert r.exit_code == 2, r.output
        line = r.stderr.strip()
        assert len(line.splitlines()) == 1 and line.startswith("error:") and f"{judge}:{fn}" in line
        assert "NaN" in line if fn == "nan_point" else "non-finite margin nan for pair 0" in line
