"""Closed forms of the pure merge math (WARP App. B) against independent dense computations."""

import math

import pytest
import torch

from mergekit_warp.merge import math as mmath
from mergekit_warp.merge.plan import Schedule, group_of, layer_index, value_at


def dense_slerp(d1: torch.Tensor, d2: torch.Tensor, lam: float) -> torch.Tensor:
    """Textbook SLERP in fp64, written independently of the module."""
    a, b = d1.double().flatten(), d2.double().flatten()
    omega = torch.arccos((a @ b) / (a.norm() * b.norm()))
    return ((torch.sin((1 - lam) * omega) * a + torch.sin(lam * omega) * b) / torch.sin(omega)).reshape(d1.shape)


def pair_with_angle(n: int, deg: float, norm: float = 1.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(n, generator=g, dtype=torch.float64)
    v = torch.randn(n, generator=g, dtype=torch.float64)
    u /= u.norm()
    v -= (v @ u) * u
    v /= v.norm()
    w = math.cos(math.radians(deg)) * u + math.sin(math.radians(deg)) * v
    return (norm * u).float(), (norm * w).float()


def slerp2(d1: torch.Tensor, d2: torch.Tensor, lam: float) -> torch.Tensor:
    """SLERP of two vectors the way the merge engine does it: weights from their Gram matrix."""
    x = torch.stack([d1.double().flatten(), d2.double().flatten()])
    c = mmath.slerp_weights(mmath.gram(x), lam)
    return (c @ x).reshape(d1.shape)


@pytest.mark.parametrize("deg", [10.0, 60.0, 90.0, 150.0])
@pytest.mark.parametrize("lam", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_slerp_matches_dense_and_keeps_norm(deg, lam):
    d1, d2 = pair_with_angle(4096, deg, norm=3.0)
    got = slerp2(d1, d2, lam)
    torch.testing.assert_close(got.double(), dense_slerp(d1, d2, lam), atol=1e-5, rtol=1e-5)
    assert got.double().norm().item() == pytest.approx(3.0, rel=1e-5)  # App. B: ‖δ‖ kept


def test_slerp_ends_are_the_inputs():
    d1, d2 = pair_with_angle(1000, 80.0, seed=3)
    torch.testing.assert_close(slerp2(d1, d2, 0.0).float(), d1)
    torch.testing.assert_close(slerp2(d1, d2, 1.0).float(), d2)


@pytest.mark.parametrize("deg", [30.0, 90.0, 120.0])
@pytest.mark.parametrize("lam", [0.2, 0.5])
def test_lerp_shrinks_norm_by_closed_form(deg, lam):
    d1, d2 = pair_with_angle(4096, deg, norm=2.0, seed=1)
    got = mmath.lerp(d1, d2, lam).double().norm().item()
    want = 2.0 * math.sqrt(1 - 2 * (1 - math.cos(math.radians(deg))) * (lam - lam * lam))
    assert got == pytest.approx(want, rel=1e-5)
    assert got < slerp2(d1, d2, lam).norm().item()  # strictly shorter than the SLERP result


def test_lerp_fallback_when_colinear_or_zero():
    d = torch.randn(100)
    n = float(d.double().norm())
    assert mmath.slerp_coeffs(n * n, n, n, 0.3) == (0.7, 0.3)  # exactly colinear: LERP
    assert mmath.slerp_coeffs(-n * n, n, n, 0.3) == (0.7, 0.3)  # opposite: LERP, not a 0/0
    assert mmath.slerp_coeffs(0.0, n, 0.0, 0.3) == (0.7, 0.3)  # a zero task vector
    torch.testing.assert_close(slerp2(d, 2 * d, 0.5).float(), 1.5 * d)
    torch.testing.assert_close(slerp2(d, torch.zeros(100), 0.25).float(), 0.75 * d)
    torch.testing.assert_close(slerp2(torch.zeros(100), torch.zeros(100), 0.5).float(), torch.zeros(100))


def test_iterative_rule_for_three_matches_dense():
    ds = [torch.randn(300, dtype=torch.float64) * s for s in (1.0, 2.0, 0.5)]
    s2 = dense_slerp(ds[0], ds[1], 0.5)
    s3 = dense_slerp(s2, ds[2], 1 / 3)
    x = torch.stack(ds)
    c = mmath.slerp_weights(x @ x.T)
    torch.testing.assert_close(c @ x, s3, atol=1e-10, rtol=1e-10)
    # two vectors: λ is honoured; one angle from the Gram matrix
    c2 = mmath.slerp_weights(x[:2] @ x[:2].T, 0.8)
    torch.testing.assert_close(c2 @ x[:2], dense_slerp(ds[0], ds[1], 0.8), atol=1e-10, rtol=1e-10)


def test_liti_closed_forms():
    a, b = torch.randn(10, 3), torch.randn(10, 3)
    torch.testing.assert_close(mmath.liti(a, b, 0.0), a)
    torch.testing.assert_close(mmath.liti(a, b, 1.0), b)
    torch.testing.assert_close(mmath.liti(a, b, 2.0), 2 * b - a)
    # bf16 inputs are promoted before the arithmetic
    assert mmath.liti(a.bfloat16(), b.bfloat16(), 0.5).dtype == torch.float32


def test_grouping_and_schedules():
    assert layer_index("model.layers.12.mlp.up_proj.weight") == 12
    assert layer_index("transformer.h.3.attn.c_attn.weight") == 3
    assert layer_index("model.embed_tokens.weight") is None
    assert group_of("model.layers.12.mlp.up_proj.weight", "block") == "model.layers.12"
    assert group_of("model.norm.weight", "block") == "model.norm.weight"
    assert group_of("model.layers.1.x", "tensor") == "model.layers.1.x"
    assert group_of("model.layers.1.x", "model") == "model"
    assert value_at([0.0, 1.0], 0, 5) == 0.0 and value_at([0.0, 1.0], 4, 5) == 1.0
    assert value_at([0.0, 1.0], 2, 5) == pytest.approx(0.5)
    assert value_at([0.0, 1.0, 0.0], 1, 3) == pytest.approx(1.0)
    s = Schedule.build("--lambda", [0.2, 0.6])
    assert s.at("model.norm.weight", 4) == pytest.approx(0.4)  # the mean by default
    assert Schedule.build("--lambda", [0.2, 0.6], 0.9).at("lm_head.weight", 4) == 0.9
    assert Schedule.build("--lambda", 0.3, 0.7).at("lm_head.weight", 4) == 0.7


@pytest.mark.parametrize("n", [5, 4096 * 3, 4096 * 5 + 123])
def test_blocked_gram_matches_fp64(n):
    x = torch.randn(3, n) * torch.tensor([[1.0], [0.01], [100.0]])
    want = x.double() @ x.double().T
    got = mmath.gram(x)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-9 * float(want.abs().max()))
