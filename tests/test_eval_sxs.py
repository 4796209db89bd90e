"""Side-by-side scoring: the ±1.5/±1/±0.5/0 mapping, the bootstrap interval, and the two reference
cases of the issue (self against self, a judge that always prefers A)."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from mergekit_warp.cli import app
from mergekit_warp.errors import WarpError
from mergekit_warp.eval.sxs import bootstrap_ci, check_thresholds, score_margins, summarize, sxs
from pipeline_fixtures import TOY_REWARD, pipe_init, reference_run  # noqa: F401  (fixtures)

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
    r = sxs(pol, pol, _prompts(reference_run), f"{TOY_REWARD}:words", thresholds=(0.1, 0.3, 0.6),
            samples_per_prompt=4, max_new_tokens=6)
    assert r.n == 32 and r.ci_low <= 0.0 <= r.ci_high and abs(r.mean) < 0.5
    assert r.wins > 0 and r.losses > 0  # the samples really differed: not a degenerate all-ties test


def test_judge_always_prefers_a(reference_run):
    pol_a, pol_b = reference_run / "final", reference_run / "iter_1" / "run_1"
    r = sxs(pol_a, pol_b, _prompts(reference_run), f"{TOY_REWARD}:prefers_a", max_new_tokens=6)
    assert r.mean == 1.5 and (r.ci_low, r.ci_high) == (1.5, 1.5) and r.wins == r.n == 8


def test_sxs_cli(reference_run):
    pol = str(reference_run / "final")
    r = runner.invoke(app, ["eval", "sxs", pol, pol, "--prompts", str(_prompts(reference_run)),
                            "--judge", f"{TOY_REWARD}:prefers_a", "--max-new-tokens", "4"])
    assert r.exit_code == 0, r.output
    assert "+1.500" in r.stdout and "win/tie/loss 8/0/0" in r.stdout
    r = runner.invoke(app, ["eval", "sxs", pol, pol, "--prompts", str(_prompts(reference_run)),
                            "--judge", "sentiment", "--thresholds", "0.5,0.2,0.1"])
    assert r.exit_code == 2 and "thresholds" in r.stderr
