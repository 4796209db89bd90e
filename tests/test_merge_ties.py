"""The task-vector methods on a base (task_arithmetic, ties, dare_*, breadcrumbs*, della*), each against an
independent dense implementation written here from its paper (TIES: Yadav et al. 2023; DARE: Yu et al.
2023; Model Breadcrumbs: Davari & Belilovsky 2023; DELLA: Deep et al. 2024) with mergekit's documented
choices (counts rounded down, L1 rescale, weighted sign election): whole state dicts, fp64, compared.
Random drops use the framework's seeded uniforms, so the dense versions draw the very same numbers."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_merge_api import reshard
from tiny import load_state, make_tiny_llama, perturb
from typer.testing import CliRunner

from mergekit_warp.cli import app
from mergekit_warp.merge import api
from mergekit_warp.merge.methods import REGISTRY, sparsify
from mergekit_warp.merge.methods.base import REQUIRED, uniform

ATOL = 2e-6
NAMES = [
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
]
KIND = {  # method → (drop, sign consensus)
    "task_arithmetic": (None, False),
    "ties": ("magnitude", True),
    "dare_linear": ("random", False),
    "dare_ties": ("random", True),
    "breadcrumbs": ("outliers", False),
    "breadcrumbs_ties": ("outliers", True),
    "della": ("della", True),
    "della_linear": ("della", False),
}


# ---- the dense reference ---------------------------------------------------------------------------


def top_k(d: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim: the k = max(1, ⌊density·n⌋) largest |δ| (all of equal magnitude at the k-th: warp's rule)."""
    a = d.abs().flatten()
    k = max(1, int(density * a.numel()))
    return d.abs() >= a.topk(k).values[-1]


def band(d: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs: drop the ⌊gamma·n⌋ largest (fewer when they and ⌊density·n⌋ exceed n), keep the next
    ⌊density·n⌋ by magnitude (equal magnitudes go together: dropped at the top, kept at the bottom)."""
    n = d.numel()
    target = int(density * n)
    top = n - max(0, n - target - int(gamma * n)) - target
    ranked = d.abs().flatten().sort(descending=True).values
    high = ranked[top - 1] if top > 0 else math.inf
    low = ranked[top + target - 1] if target > 0 else math.inf
    return (d.abs() >= low) & (d.abs() < high)


def magprune(d: torch.Tensor, density: float, epsilon: float, u: torch.Tensor) -> torch.Tensor:
    """DELLA MagPrune: keep with probability density − ε … density + ε by rank of |δ| within each row."""
    x = d.abs().reshape(-1, d.shape[-1]) if d.dim() > 1 else d.abs().reshape(1, -1)
    n = x.shape[1]
    r = x.argsort(dim=1, stable=True).argsort(dim=1).double()
    p = density - epsilon + 2 * epsilon * r / (n - 1) if n > 1 else torch.full_like(x, density, dtype=torch.float64)
    return u.reshape(x.shape).double() < p.reshape(x.shape)


def sparse(kind, d, name, m, prm, rescale, seed):
    density = prm.get("density", 1.0)
    if kind is None or density >= 1:
        return d
    if kind == "magnitude":
        keep = top_k(d, density)
    elif kind == "outliers":
        keep = band(d, density, prm.get("gamma", 0.01))
    else:
        u = uniform(seed, name, m, 0, d.numel()).reshape(d.shape)
        keep = u.double() < density if kind == "random" else magprune(d, density, prm.get("epsilon", 0.15), u)
    s = torch.where(keep.reshape(d.shape), d, torch.zeros_like(d))
    before, after = d.abs().sum(), s.abs().sum()
    return s * (before / after) if rescale and before >= 1e-7 and after >= 1e-7 else s


def dense(method, init, models, per, *, normalize=None, rescale=None, vote="sum", lam=1.0, seed=0):
    """θ_base + λ·Σ_m c_m·w_m·s(δ_m) / D on whole fp64 state dicts (per: one dict of parameters per model)."""
    kind, consensus = KIND[method]
    normalize = REGISTRY[method].param("normalize").default if normalize is None else normalize
    rescale = bool(kind) and (REGISTRY[method].param("rescale").default if rescale is None else rescale)
    base = {k: v.double() for k, v in load_state(init).items()}
    states = [load_state(m) for m in models]
    w = [p["weight"] for p in per]
    out = {}
    for k, b in base.items():
        t = torch.stack(
            [w[m] * sparse(kind, s[k].double() - b, k, m, per[m], rescale, seed) for m, s in enumerate(states)]
        )
        if consensus:  # elect a sign per element, keep the agreeing task vectors (a zero agrees with none)
            elected = t.sum(0).sign() if vote == "sum" else t.sign().sum(0).sign()
            elected[elected == 0] = 1
            agree = t.sign() == elected
            mixed = (t * agree).sum(0)
            div = (torch.tensor(w, dtype=torch.float64).view(-1, *[1] * b.dim()) * agree).sum(0)
            div[div == 0] = 1
        else:
            mixed, div = t.sum(0), sum(w)
        out[k] = b + lam * (mixed / div if normalize else mixed)
    return out


def assert_state_close(got: dict, want: dict, atol: float = ATOL) -> None:
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k].double(), want[k].double(), atol=atol, rtol=1e-5, msg=k)


def run(method, init, models, out, per, seed=0, **top):
    return load_state(
        api.merge(method, models, out, base=init, params=top, model_params=per, seed=seed, progress=False)
    )


def same_bytes(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def four_runs(tiny_init, tiny_runs, tmp_path_factory) -> list[Path]:
    return [*tiny_runs, perturb(tiny_init, tmp_path_factory.mktemp("run4") / "run3", seed=103)]


# ---- each method against its dense definition ------------------------------------------------------


@pytest.mark.parametrize("normalize", [False, True])
def test_task_arithmetic_matches_dense(tiny_init, tiny_runs, tmp_path, normalize):
    per = [{"weight": 1.0}, {"weight": 0.5}, {"weight": -0.3}]
    got = run("task_arithmetic", tiny_init, tiny_runs, tmp_path / "m", per, normalize=normalize)
    assert_state_close(got, dense("task_arithmetic", tiny_init, tiny_runs, per, normalize=normalize))


def test_task_arithmetic_lambda_scales_the_merged_vector(tiny_init, tiny_runs, tmp_path):
    per = [{"weight": 0.7}, {"weight": 0.4}]
    got = run("task_arithmetic", tiny_init, tiny_runs[:2], tmp_path / "m", per, **{"lambda": 0.6})
    assert_state_close(got, dense("task_arithmetic", tiny_init, tiny_runs[:2], per, lam=0.6))
    base, d1, d2 = load_state(tiny_init), load_state(tiny_runs[0]), load_state(tiny_runs[1])
    k = "model.layers.1.mlp.up_proj.weight"  # the closed form, on one tensor
    want = base[k].double() + 0.6 * (0.7 * (d1[k].double() - base[k]) + 0.4 * (d2[k].double() - base[k]))
    torch.testing.assert_close(got[k].double(), want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("n", [2, 3, 4])
@pytest.mark.parametrize("vote,normalize,lam", [("sum", True, 1.0), ("count", True, 1.0), ("sum", False, 0.7)])
def test_ties_matches_dense(tiny_init, four_runs, tmp_path, n, vote, normalize, lam):
    per = [{"weight": w, "density": d} for w, d in zip([1.0, 0.5, 0.8, 0.3], [0.5, 0.7, 0.3, 0.9])][:n]
    top = {"normalize": normalize, "consensus_method": vote, "lambda": lam}
    got = run("ties", tiny_init, four_runs[:n], tmp_path / "m", per, **top)
    assert_state_close(got, dense("ties", tiny_init, four_runs[:n], per, normalize=normalize, vote=vote, lam=lam))


def test_ties_kept_count_is_mergekits_k(tiny_init, tiny_runs, tmp_path):
    """Continuous data: the threshold rule keeps exactly k = max(1, ⌊density·n⌋) elements of each tensor."""
    got = run("ties", tiny_init, tiny_runs[:1], tmp_path / "m", [{"weight": 1.0, "density": 0.37}])
    base = load_state(tiny_init)
    for k, v in got.items():
        assert int((v != base[k]).sum()) == max(1, int(0.37 * v.numel())), k


def test_ties_with_agreeing_signs_is_the_weighted_mean(tiny_init, tmp_path):
    """Task vectors a_m·δ (a_m > 0): every sign agrees, so TIES at density 1 is Σ w_m a_m δ / Σ w_m."""
    a, w = [1.0, 0.5, 2.0], [0.2, 0.3, 0.5]
    base = load_state(tiny_init)
    delta = {k: 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(7)) for k, v in base.items()}
    models = []
    for i, ai in enumerate(a):
        folder = make_tiny_llama(tmp_path / f"m{i}", seed=0)
        save_file({k: base[k] + ai * delta[k] for k in base}, folder / "model.safetensors", metadata={"format": "pt"})
        models.append(folder)
    got = run("ties", tiny_init, models, tmp_path / "m", [{"weight": x} for x in w])
    mean = sum(wi * ai for wi, ai in zip(w, a)) / sum(w)
    assert_state_close(got, {k: base[k].double() + mean * delta[k].double() for k in base}, atol=1e-6)
    unnorm = run("ties", tiny_init, models, tmp_path / "u", [{"weight": x} for x in w], normalize=False)
    total = sum(wi * ai for wi, ai in zip(w, a))
    k = "model.embed_tokens.weight"
    torch.testing.assert_close(unnorm[k].double(), base[k].double() + total * delta[k].double(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", NAMES)
def test_density_one_and_one_model_is_task_arithmetic(tiny_init, tiny_runs, tmp_path, method):
    """Nothing dropped, one model: θ_base + w·δ, or θ_base + δ where normalize divides the weight away."""
    got = run(method, tiny_init, tiny_runs[:1], tmp_path / "m", [{"weight": 0.6}])
    scale = 1.0 if REGISTRY[method].param("normalize").default else 0.6
    base, run0 = load_state(tiny_init), load_state(tiny_runs[0])
    assert_state_close(got, {k: base[k].double() + scale * (run0[k].double() - base[k].double()) for k in base})


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize(
    "per",
    [
        [{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.7}],  # gamma 0.01: ⌊γn⌋ = 0 below 100 elements
        [{"weight": 1.0, "density": 0.6, "gamma": 0.05}, {"weight": 0.5, "density": 0.3, "gamma": 0.1}],
        [{"weight": 1.0, "density": 0.9, "gamma": 0.2}, {"weight": 0.5, "density": 0.95, "gamma": 0.5}],  # γ gives way
    ],
    ids=["default-gamma", "gamma", "density-wins"],
)
@pytest.mark.parametrize("normalize,rescale", [(False, False), (True, True)])
def test_breadcrumbs_matches_dense(tiny_init, tiny_runs, tmp_path, method, per, normalize, rescale):
    got = run(method, tiny_init, tiny_runs[:2], tmp_path / "m", per, normalize=normalize, rescale=rescale)
    assert_state_close(got, dense(method, tiny_init, tiny_runs[:2], per, normalize=normalize, rescale=rescale))


def test_breadcrumbs_small_tensors_keep_the_top(tiny_init, tiny_runs, tmp_path):
    """⌊γ·n⌋ = 0 (32-element norms at γ 0.01): no outlier dropped, the top ⌊density·n⌋ kept — not nothing."""
    got = run("breadcrumbs", tiny_init, tiny_runs[:1], tmp_path / "m", [{"weight": 1.0, "density": 0.5}])
    base, run0 = load_state(tiny_init), load_state(tiny_runs[0])
    k = "model.norm.weight"
    d = run0[k].double() - base[k].double()
    kept = got[k] != base[k]
    assert int(kept.sum()) == 16 and torch.equal(kept, top_k(d, 0.5))
    got = run("breadcrumbs", tiny_init, tiny_runs[:1], tmp_path / "g", [{"weight": 1.0, "density": 0.5, "gamma": 0.05}])
    for k, v in got.items():  # continuous data: exactly ⌊density·n⌋ kept, right below the ⌊γ·n⌋ largest
        d = (run0[k].double() - base[k].double()).flatten()
        n, order = d.numel(), d.abs().argsort(descending=True)
        kept = (v != base[k]).flatten()
        assert int(kept.sum()) == int(0.5 * n), k
        assert kept[order[int(0.05 * n) : int(0.05 * n) + int(0.5 * n)]].all(), k


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
@pytest.mark.parametrize("rescale", [True, False])
def test_dare_matches_dense(tiny_init, tiny_runs, tmp_path, method, rescale):
    per = [{"weight": 1.0, "density": 0.3}, {"weight": 0.5, "density": 0.6}, {"weight": 0.8, "density": 0.9}]
    got = run(method, tiny_init, tiny_runs, tmp_path / "m", per, seed=11, rescale=rescale)
    assert_state_close(got, dense(method, tiny_init, tiny_runs, per, rescale=rescale, seed=11))


@pytest.mark.parametrize("method", ["della", "della_linear"])
@pytest.mark.parametrize("n", [2, 4])
def test_della_matches_dense(tiny_init, four_runs, tmp_path, method, n):
    per = [
        {"weight": w, "density": d, "epsilon": e}
        for w, d, e in zip([1, 0.5, 0.8, 0.3], [0.3, 0.5, 0.6, 0.4], [0.1, 0.15, 0.3, 0.0])
    ][:n]
    got = run(method, tiny_init, four_runs[:n], tmp_path / "m", per, seed=5)
    assert_state_close(got, dense(method, tiny_init, four_runs[:n], per, seed=5))


# ---- statistics and reproducibility of the random drops ---------------------------------------------


@pytest.mark.parametrize("method", ["dare_ties", "della"])
def test_random_drops_are_reproducible_bytes(tiny_init, tiny_runs, tmp_path, method):
    per = [{"weight": 1.0, "density": 0.4}, {"weight": 0.5, "density": 0.6}]
    a = run(method, tiny_init, tiny_runs[:2], tmp_path / "a", per, seed=3)
    assert same_bytes(a, run(method, tiny_init, tiny_runs[:2], tmp_path / "b", per, seed=3))
    small = api.merge(
        method, tiny_runs[:2], tmp_path / "c", base=tiny_init, model_params=per, seed=3, chunk=7, progress=False
    )
    assert same_bytes(a, load_state(small))
    init_s = reshard(tiny_init, tmp_path / "init_s", 3)
    runs_s = [reshard(r, tmp_path / f"rs{i}", 2 + i) for i, r in enumerate(tiny_runs[:2])]
    sharded = api.merge(
        method, runs_s, tmp_path / "d", base=init_s, model_params=per, seed=3, max_shard_size="30KB", progress=False
    )
    assert len(list(sharded.glob("*.safetensors"))) > 1
    assert same_bytes(a, load_state(sharded))
    other = run(method, tiny_init, tiny_runs[:2], tmp_path / "e", per, seed=4)
    assert not same_bytes(a, other)


@pytest.fixture(scope="module")
def big_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A bare .safetensors base with one (300, 400) tensor, and a model 0.01·N(0, 1) away."""
    d = tmp_path_factory.mktemp("big")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 400, generator=g)
    save_file({"w": w}, d / "base.safetensors")
    save_file({"w": w + 0.01 * torch.randn(300, 400, generator=g)}, d / "model.safetensors")
    return d / "base.safetensors", d / "model.safetensors"


@pytest.mark.parametrize("method,density,epsilon", [("dare_linear", 0.3, None), ("della_linear", 0.4, 0.2)])
def test_kept_fraction_and_l1_rescale(big_pair, tmp_path, method, density, epsilon):
    base, model = big_pair
    prm = {"weight": 1.0, "density": density, **({"epsilon": epsilon} if epsilon is not None else {})}
    got = run(method, base, [model], tmp_path / "m", [prm], seed=9)["w"].double()
    b = load_file(base)["w"].double()
    d = load_file(model)["w"].double() - b
    s = got - b
    kept = s != 0
    n = kept.numel()
    assert abs(kept.double().mean().item() - density) < 5 * math.sqrt(density * (1 - density) / n)
    assert s.abs().sum().item() == pytest.approx(d.abs().sum().item(), rel=1e-4)  # the L1 rescale
    r = d.abs().argsort(1).argsort(1).double() / (d.shape[1] - 1)  # magnitude rank in the row, 0 … 1
    p = density - (epsilon or 0) + 2 * (epsilon or 0) * r  # keep probabilities
    scale = (s[kept] / d[kept]).mean().item()  # one factor per tensor: ‖δ‖₁ / ‖kept δ‖₁ ≈ ‖δ‖₁ / Σ p·|δ|
    assert scale == pytest.approx((d.abs().sum() / (p * d.abs()).sum()).item(), rel=0.03)  # 5σ
    if epsilon is None:
        assert scale == pytest.approx(1 / density, rel=0.03)  # DARE: the paper's 1/(1 − p_drop)
    else:  # DELLA: keep probability grows with the magnitude rank inside each row
        for lo, hi in [(0.0, 0.1), (0.45, 0.55), (0.9, 1.0)]:
            sel = (r >= lo) & (r <= hi)
            want = density - epsilon + epsilon * (lo + hi)
            assert abs(kept[sel].double().mean().item() - want) < 5 * math.sqrt(want * (1 - want) / int(sel.sum()))


def test_dare_rescale_keeps_the_expectation(tmp_path):
    """Over seeds the DARE task vector averages to δ: no bias, and the spread of the paper's estimator."""
    g = torch.Generator().manual_seed(1)
    b = torch.randn(2000, generator=g)
    base, model = tmp_path / "base.safetensors", tmp_path / "model.safetensors"
    save_file({"w": b}, base)
    save_file({"w": b + 0.01 * torch.randn(2000, generator=g)}, model)
    d = load_file(model)["w"].double() - b.double()
    density, k = 0.5, 40
    acc = torch.zeros(2000, dtype=torch.float64)
    for seed in range(k):
        got = run("dare_linear", base, [model], tmp_path / f"o{seed}", [{"weight": 1.0, "density": density}], seed=seed)
        acc += got["w"].double() - b.double()
    err = acc / k - d
    assert abs((err @ d).item() / (d @ d).item()) < 0.03  # unbiased
    assert (err.norm() / d.norm()).item() < 1.3 * math.sqrt((1 - density) / (density * k))


def test_della_rows_of_one_element(tmp_path):
    """A row of one element gets p = density (mergekit fails there: 0/0 in its rank normalisation)."""
    g = torch.Generator().manual_seed(2)
    base = {"col": torch.randn(4000, 1, generator=g), "one": torch.randn(1, generator=g)}
    b, m = tmp_path / "base.safetensors", tmp_path / "m.safetensors"
    save_file(base, b)
    save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}, m)
    got = run("della_linear", b, [m], tmp_path / "o", [{"weight": 1.0, "density": 0.5}], seed=1)
    frac = (got["col"] != base["col"]).double().mean().item()
    assert abs(frac - 0.5) < 5 * math.sqrt(0.25 / 4000)
    assert torch.isfinite(got["one"]).all()


# ---- defaults, dtypes, sharding, the streamed selection --------------------------------------------


def test_defaults_are_mergekits():
    want = {  # mergekit 0.1.5's registry: normalize, rescale
        "task_arithmetic": (False, None),
        "ties": (True, False),
        "dare_linear": (False, True),
        "dare_ties": (False, True),
        "breadcrumbs": (False, False),
        "breadcrumbs_ties": (False, False),
        "della": (True, True),
        "della_linear": (False, True),
    }
    for name, (normalize, rescale) in want.items():
        m = REGISTRY[name]
        names = {p.name for p in m.params}
        assert m.base == "required" and m.mergekit == name and m.random == (KIND[name][0] in ("random", "della"))
        assert m.param("weight").default is REQUIRED and m.param("weight").per_model
        assert m.param("normalize").default is normalize
        assert m.param("int8_mask").default is False
        if rescale is None:
            assert not names & {"density", "rescale", "gamma", "epsilon"}
        else:
            assert m.param("rescale").default is rescale and m.param("density").default == 1.0
            assert m.param("density").per_model
        assert ("gamma" in names) == (KIND[name][0] == "outliers")
        assert ("epsilon" in names) == (KIND[name][0] == "della")
        assert ("consensus_method" in names) == KIND[name][1]
    assert REGISTRY["breadcrumbs"].param("gamma").default == 0.01
    assert REGISTRY["della"].param("epsilon").default == 0.15
    assert REGISTRY["della"].rows and not REGISTRY["ties"].rows
    assert all(REGISTRY[n].param("lambda").default == 1.0 for n in NAMES)
    assert REGISTRY["ties"].param("consensus_method").default == "sum"


def test_defaults_equal_the_explicit_values(tiny_init, tiny_runs, tmp_path):
    per = [{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.5}]
    a = run("ties", tiny_init, tiny_runs[:2], tmp_path / "a", per)
    explicit = {"normalize": True, "rescale": False, "consensus_method": "sum", "int8_mask": True, "lambda": 1.0}
    b = run("ties", tiny_init, tiny_runs[:2], tmp_path / "b", per, **explicit)
    assert same_bytes(a, b)
    c = run("breadcrumbs", tiny_init, tiny_runs[:2], tmp_path / "c", per)
    per_gamma = [{**p, "gamma": 0.01} for p in per]
    d = run("breadcrumbs", tiny_init, tiny_runs[:2], tmp_path / "d", per_gamma, normalize=False, rescale=False)
    assert same_bytes(c, d)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_sharded_equals_unsharded(tiny_init, tiny_runs, tmp_path, method):
    per = [{"weight": 1.0, "density": 0.4, "gamma": 0.05}, {"weight": 0.5, "density": 0.6}]
    per = [{k: v for k, v in p.items() if k != "gamma" or method != "ties"} for p in per]
    init_s = reshard(tiny_init, tmp_path / "init_s", 3)
    runs_s = [reshard(r, tmp_path / f"rs{i}", 2 + i) for i, r in enumerate(tiny_runs[:2])]
    s = api.merge(method, runs_s, tmp_path / "s", base=init_s, model_params=per, max_shard_size="30KB", progress=False)
    assert same_bytes(load_state(s), run(method, tiny_init, tiny_runs[:2], tmp_path / "u", per))


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_streamed_selection_gives_the_same_bytes(tiny_init, tiny_runs, tmp_path, monkeypatch, method):
    """The radix selection (no tensor fits the budget, small chunks) against the in-memory ranking."""
    per = [{"weight": 1.0, "density": 0.3}, {"weight": 0.5, "density": 0.8}]
    a = run(method, tiny_init, tiny_runs[:2], tmp_path / "a", per, rescale=True)
    monkeypatch.setattr(sparsify, "BUDGET", 0)
    b = api.merge(
        method,
        tiny_runs[:2],
        tmp_path / "b",
        base=tiny_init,
        model_params=per,
        params={"rescale": True},
        chunk=100,
        progress=False,
    )
    assert same_bytes(a, load_state(b))


@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs", "della_linear"])
def test_bf16_inputs(tmp_path, method):
    init = make_tiny_llama(tmp_path / "init", seed=1, dtype=torch.bfloat16)
    runs = [perturb(init, tmp_path / f"r{i}", seed=10 + i) for i in range(2)]
    per = [{"weight": 1.0, "density": 0.5}, {"weight": 0.7, "density": 0.6}]
    got = run(method, init, runs, tmp_path / "m", per, seed=2)
    assert all(v.dtype == torch.bfloat16 for v in got.values())
    want = dense(method, init, runs, per, seed=2)  # from the bf16 values, in fp64
    for k in want:  # one rounding to bf16 at the end
        torch.testing.assert_close(got[k].double(), want[k], atol=1e-6, rtol=2**-7)
    got32 = load_state(
        api.merge(method, runs, tmp_path / "m32", base=init, model_params=per, seed=2, dtype="fp32", progress=False)
    )
    assert_state_close(got32, want, atol=1e-6)


def test_written_config_reproduces_a_random_merge(tiny_init, tiny_runs, tmp_path):
    per = [{"weight": 1.0, "density": 0.4}, {"weight": 0.5, "density": 0.6}]
    out = api.merge(
        "dare_ties", tiny_runs[:2], tmp_path / "a", base=tiny_init, model_params=per, seed=7, progress=False
    )
    again = api.merge_yaml(out / "merge_config.yml", tmp_path / "b", progress=False)
    assert same_bytes(load_state(out), load_state(again))
    assert json.loads((out / "warp_provenance.json").read_text())["params"]["seed"] == 7


# ---- the command line ---------------------------------------------------------------------------------

runner = CliRunner()


def warp(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_cli_merges_and_prints_the_path(tiny_init, tiny_runs, tmp_path):
    out = tmp_path / "m"
    args = ["--base", tiny_init, "--weight", "1,0.5", "--density", "0.5", "--lambda", "0.8", "-o", out, "-q"]
    r = warp("merge", "ties", *tiny_runs[:2], *args)
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(out.absolute())
    per = [{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.5}]
    assert same_bytes(load_state(out), run("ties", tiny_init, tiny_runs[:2], tmp_path / "api", per, **{"lambda": 0.8}))
    args = ["--init", tiny_init, "--weight", "1", "--density", "0.5", "--seed", "3", "-o", tmp_path / "d", "-q"]
    r = warp("merge", "della", *tiny_runs[:2], *args)
    assert r.exit_code == 0, r.output
    assert "θ_base" in warp("merge", "dare_ties", "--help").stdout


BAD = {
    # name: (method, extra args, words the one-line error must contain); models: two tiny runs
    "missing base": ("ties", ["--weight", "1"], ["base"], False),
    "weight missing": ("ties", ["--density", "0.5"], ["weight", "--weight"], True),
    "density zero": ("dare_ties", ["--weight", "1", "--density", "0"], ["--density", "(0, 1]"], True),
    "density above one": ("ties", ["--weight", "1", "--density", "1.5"], ["--density", "(0, 1]"], True),
    "negative gamma": ("breadcrumbs", ["--weight", "1", "--density", "0.5", "--gamma", "-0.1"], ["--gamma"], True),
    "negative epsilon": ("della", ["--weight", "1", "--density", "0.5", "--epsilon", "-0.1"], ["--epsilon"], True),
    "density minus epsilon": (
        "della",
        ["--weight", "1", "--density", "0.1", "--epsilon", "0.15"],
        ["--epsilon", "(0, 1)"],
        True,
    ),
    "density plus epsilon": (
        "della_linear",
        ["--weight", "1", "--density", "0.9", "--epsilon", "0.15"],
        ["--epsilon", "(0, 1)"],
        True,
    ),
    "weights sum to zero": ("ties", ["--weight", "1,-1", "--density", "0.5"], ["--weight", "--normalize"], True),
    "weights sum to zero, linear": (
        "task_arithmetic",
        ["--weight", "1,-1", "--normalize", "true"],
        ["--weight", "--normalize"],
        True,
    ),
    "bad consensus": (
        "ties",
        ["--weight", "1", "--consensus-method", "median"],
        ["--consensus-method", "sum, count"],
        True,
    ),
    "nan weight": ("dare_linear", ["--weight", "nan"], ["--weight"], True),
    "weights count": ("ties", ["--weight", "1,2,3"], ["--weight", "3 values"], True),
}


@pytest.mark.parametrize("case", list(BAD))
def test_cli_bad_input_exits_2_and_writes_nothing(case, tiny_init, tiny_runs, tmp_path):
    method, extra, needles, with_base = BAD[case]
    out = tmp_path / "out"
    r = warp("merge", method, *tiny_runs[:2], *(["--base", tiny_init] if with_base else []), *extra, "-o", out)
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.output, r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_catalogue_loads_without_torch():
    code = "import sys, mergekit_warp.cli; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


# ---- the selection of magnitude thresholds, against a sort --------------------------------------------


def _kth_by_sort(x: torch.Tensor, ks: list[int]) -> list[float]:
    s = x.sort(descending=True).values
    return [float("inf") if k <= 0 else float(s[min(k, x.numel()) - 1]) for k in ks]


@pytest.mark.parametrize("data", ["normal", "zeros_heavy", "few_values", "sorted", "one"])
@pytest.mark.parametrize("chunk", [1000, 1 << 20])
def test_kth_largest_equals_a_sort(data, chunk):
    from mergekit_warp.merge import select

    g = torch.Generator().manual_seed(3)
    n = 1 if data == "one" else 200_003
    x = torch.randn(n, generator=g).abs()
    if data == "zeros_heavy":  # most elements unchanged (an RL fine-tune in bf16): ties at 0
        x[torch.rand(n, generator=g) < 0.7] = 0
    if data == "few_values":
        x = torch.randint(0, 5, (n,), generator=g).float()
    if data == "sorted":  # the strided sample sees a monotone sequence
        x = x.sort().values
    ks = [0, 1, 2, n // 10, n // 2, n - 1, n, n + 5]
    got = select.kth_largest(lambda a, b: x[a:b].clone(), n, ks, chunk, 64 << 20)
    assert got == _kth_by_sort(x, ks)


def test_kth_largest_falls_back_to_radix_when_the_bracket_misses(monkeypatch):
    from mergekit_warp.merge import select

    x = torch.randn(50_000, generator=torch.Generator().manual_seed(4)).abs()
    monkeypatch.setattr(select, "_bracket", lambda sample, numel, k: (10.0, 11.0))  # holds nothing
    calls = []
    real = select._radix
    monkeypatch.setattr(select, "_radix", lambda *a: calls.append(a) or real(*a))
    ks = [7, 25_000]
    assert select.kth_largest(lambda a, b: x[a:b].clone(), x.numel(), ks, 4096, 1 << 30) == _kth_by_sort(x, ks)
    assert calls


def test_count_vote_keeps_small_agreeing_values_exact(tmp_path):
    """The elected side's sum is accumulated on its own, not as total minus the other side: a vote won
    by two tiny negative values against one large positive one keeps their exact mean."""
    from safetensors.torch import save_file

    def ckpt(name, values):
        (tmp_path / name).mkdir()
        save_file({"w": torch.tensor(values, dtype=torch.float32)}, tmp_path / name / "model.safetensors")
        return tmp_path / name

    base = ckpt("base", [0.0, 0.0])
    models = [ckpt("m1", [1.0, 1.0]), ckpt("m2", [-1e-8, -1e-6]), ckpt("m3", [-1e-8, -1e-6])]
    out = api.merge(
        "ties",
        models,
        tmp_path / "o",
        base=base,
        params={"weight": 1.0, "density": 1.0, "consensus_method": "count"},
        progress=False,
    )
    got = load_state(out)["w"]
    torch.testing.assert_close(got, torch.tensor([-1e-8, -1e-6]), rtol=1e-6, atol=0)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("method", ["dare_ties", "ties"])
def test_nan_in_a_dropped_element_is_still_reported(tiny_init, tiny_runs, tmp_path, seed, method):
    from safetensors.torch import load_file, save_file

    from mergekit_warp.errors import WarpError

    bad = tmp_path / "bad"
    shutil.copytree(tiny_runs[1], bad)
    sd = load_file(bad / "model.safetensors")
    name = next(k for k in sd if "mlp.up_proj" in k)
    sd[name].view(-1)[5] = float("nan")
    save_file(sd, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WarpError, match=f"tensor {name} in .*bad"):
        api.merge(
            method,
            [tiny_runs[0], bad],
            tmp_path / "o",
            base=tiny_init,
            params={"weight": 1.0, "density": 0.5},
            seed=seed,
            progress=False,
        )
    assert not (tmp_path / "o").exists()
