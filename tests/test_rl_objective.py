"""Closed-form checks of the RL objective's pure functions."""

import pytest
import torch

from mergekit_warp.rl.objective import advantages, baseline, ema_update, lr_at, reinforce_loss, shaped_reward


def test_rloo_baseline_by_hand():
    # two prompts × k=3 samples
    v = torch.tensor([1.0, 2.0, 6.0, -1.0, 0.0, 4.0])
    expected = torch.tensor([(2 + 6) / 2, (1 + 6) / 2, (1 + 2) / 2, (0 + 4) / 2, (-1 + 4) / 2, (-1 + 0) / 2])
    torch.testing.assert_close(baseline(v, 3, "rloo"), expected)
    torch.testing.assert_close(advantages(v, 3, "rloo"), v - expected)
    # RLOO advantage = k/(k-1) · (v − group mean)
    groups = v.view(2, 3)
    torch.testing.assert_close(advantages(v, 3, "rloo"), (1.5 * (groups - groups.mean(-1, keepdim=True))).reshape(-1))


def test_mean_and_none_baselines():
    v = torch.tensor([1.0, 2.0, 3.0, 6.0])
    torch.testing.assert_close(advantages(v, 2, "mean"), v - 3.0)
    torch.testing.assert_close(advantages(v, 2, "none"), v)
    with pytest.raises(ValueError):
        baseline(v, 1, "rloo")


def test_shaped_reward_and_loss():
    r = torch.tensor([1.0, 0.0])
    lp, la = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.0])
    torch.testing.assert_close(shaped_reward(r, lp, la, 0.5), torch.tensor([1.0 - 0.5, 0.0 + 0.5]))
    logp = torch.tensor([-2.0, -1.0], requires_grad=True)
    adv = torch.tensor([3.0, -1.0])
    loss = reinforce_loss(logp, adv, n_total=4)
    assert loss.item() == pytest.approx(-(3 * -2 + -1 * -1) / 4)
    loss.backward()
    torch.testing.assert_close(logp.grad, -adv / 4)


def test_lr_warmup():
    assert lr_at(0, 1.0, 4) == 0.25
    assert lr_at(3, 1.0, 4) == 1.0
    assert lr_at(100, 1.0, 4) == 1.0
    assert lr_at(0, 2e-6, 0) == 2e-6


def test_ema_update_formula():
    g = torch.Generator().manual_seed(0)
    a = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    t = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g).bfloat16()]
    expected = [(1 - 0.3) * x + 0.3 * y.float() for x, y in zip(a, t)]
    ema_update(a, t, 0.3)
    for x, e in zip(a, expected):
        torch.testing.assert_close(x, e, rtol=0, atol=1e-6)
        assert x.dtype == torch.float32
    before = [x.clone() for x in a]
    ema_update(a, t, 0.0)
    assert all(torch.equal(x, b) for x, b in zip(a, before))
    ema_update(a, t, 1.0)
    assert all(torch.equal(x, y.float()) for x, y in zip(a, t))
