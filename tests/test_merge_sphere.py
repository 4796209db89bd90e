"""linear, nuslerp, multislerp, karcher and model_stock on tiny local Llamas: each against an independent
dense implementation written here from the method's definition (whole state dicts, fp64), closed forms,
defaults, sharding, chunking, bf16 inputs, and bad input through the CLI."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny import load_state, make_tiny_llama, perturb
from typer.testing import CliRunner

from mergekit_warp.cli import app
from mergekit_warp.merge import api

ATOL = 2e-6


@pytest.fixture(scope="module")
def runs4(tmp_path_factory, tiny_init, tiny_runs) -> list[Path]:
    """Four 'RL runs' of the tiny init (the session's three and one more)."""
    return [*tiny_runs, perturb(tiny_init, tmp_path_factory.mktemp("run4") / "run3", seed=103)]


def fp64(path: Path) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in load_state(path).items()}


def assert_state_close(got: dict, want: dict, atol: float = ATOL, rtol: float = 1e-5) -> None:
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k].double(), want[k].double(), atol=atol, rtol=rtol, msg=k)


def write_model(like: Path, dst: Path, state: dict[str, torch.Tensor]) -> Path:
    """An HF folder with the config/tokenizer of `like` and the weights `state` (fp32)."""
    shutil.copytree(like, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    save_file(
        {k: v.float().contiguous() for k, v in state.items()}, dst / "model.safetensors", metadata={"format": "pt"}
    )
    return dst


# ---- dense references, from the definitions (fp64, whole tensors) ------------------------------------------


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of the rows of a and b (..., n): sin((1−t)Ω)/sin Ω·a + sin(tΩ)/sin Ω·b."""
    cos = ((a * b).sum(-1, keepdim=True) / (a.norm(dim=-1, keepdim=True) * b.norm(dim=-1, keepdim=True))).clamp(-1, 1)
    omega = torch.acos(cos)
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)


def as_vectors(x: torch.Tensor, how: str) -> torch.Tensor:
    """(B, n): the tensor flattened, its rows (last dimension) or its slices along dimension 0."""
    if how == "tensor" or x.dim() < 2:
        return x.reshape(1, -1)
    return x.reshape(-1, x.shape[-1]) if how == "row" else x.reshape(x.shape[0], -1).T


def from_vectors(y: torch.Tensor, how: str, shape: torch.Size) -> torch.Tensor:
    return (y.T if how == "column" and len(shape) > 1 else y).reshape(shape)


def dense_multislerp(vs: list[torch.Tensor], w: list[float], eps: float = 1e-8, normalize: bool = True) -> torch.Tensor:
    """Project the unit vectors to the tangent space at their normalised weighted mean, average there, map
    back with the exponential map, scale to the weighted mean norm."""
    w = [x / sum(w) for x in w] if normalize else w
    norms = [v.norm() for v in vs]
    units = [v / (n + eps) for v, n in zip(vs, norms)]
    mean = sum(wi * u for wi, u in zip(w, units))
    mean = mean / mean.norm()
    tangent = sum(wi * (u - (u @ mean) * mean) for wi, u in zip(w, units))
    tn = tangent.norm() + eps
    r = torch.cos(tn) * mean + torch.sin(tn) / tn * tangent
    return sum(wi * n for wi, n in zip(w, norms)) * r


def log_map(mu: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The tangent vector at mu (unit) pointing to u (unit), of length the angle between them."""
    cos = float((mu @ u).clamp(-1, 1))
    phi = math.acos(cos)
    return torch.zeros_like(mu) if phi < 1e-12 else phi / math.sin(phi) * (u - cos * mu)


def dense_karcher(vs: list[torch.Tensor], w: list[float], max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """Riemannian gradient descent for argmin_μ Σ w_m·d(μ, u_m)² on the sphere (step 1: μ ← Exp_μ(Σ w·Log_μ u)),
    from the normalised extrinsic mean; scaled by the weighted mean norm."""
    w = [x / sum(w) for x in w]
    units = [v / v.norm() for v in vs]
    mu = sum(wi * u for wi, u in zip(w, units))
    mu = mu / mu.norm()
    for _ in range(max_iter):
        step = sum(wi * log_map(mu, u) for wi, u in zip(w, units))
        s = step.norm()
        if s < tol:
            break
        mu = torch.cos(s) * mu + torch.sin(s) * step / s
        mu = mu / mu.norm()
    return sum(wi * v.norm() for wi, v in zip(w, vs)) * mu


def dense_model_stock(ds: list[torch.Tensor]) -> torch.Tensor:
    """Per row of ds (B, n): t = N·cos/(1 + (N−1)·cos), cos the mean pairwise cosine; t·mean(δ)."""
    n = len(ds)
    cos = [
        (ds[a] * ds[b]).sum(-1) / (ds[a].norm(dim=-1) * ds[b].norm(dim=-1)) for a in range(n) for b in range(a + 1, n)
    ]
    c = torch.stack(cos).mean(0)[:, None]
    return n * c / (1 + (n - 1) * c) * sum(ds) / n


def dense(method: str, base: Path | None, models: list[Path], top: dict, per: list[dict] | None) -> dict:
    """The merge by its definition, tensor by tensor, on whole fp64 state dicts."""
    b = fp64(base) if base is not None else None
    ms = [fp64(m) for m in models]
    w = [p.get("weight", 1.0) for p in per] if per else [1.0] * len(models)
    out = {}
    for k in ms[0]:
        shape = ms[0][k].shape
        vs = [m[k] - b[k] for m in ms] if b is not None else [m[k] for m in ms]
        if method == "linear":
            y = sum(wi * v for wi, v in zip(w, vs)) / (sum(w) if top.get("normalize", True) else 1.0)
        elif method == "nuslerp":
            how = "tensor" if top.get("nuslerp_flatten", True) else ("column" if top.get("nuslerp_row_wise") else "row")
            a, c = (as_vectors(v, how) for v in vs)
            y = from_vectors(slerp(a, c, w[1] / (w[0] + w[1])), how, shape)
        elif method == "multislerp":
            y = dense_multislerp([v.flatten() for v in vs], w, normalize=top.get("normalize_weights", True))
        elif method == "karcher":
            y = dense_karcher([v.flatten() for v in vs], w, top.get("max_iter", 10), top.get("tol", 1e-5))
        else:
            how = "row" if top.get("filter_wise") else "tensor"
            y = from_vectors(dense_model_stock([as_vectors(v, how) for v in vs]), how, shape)
        out[k] = y.reshape(shape) + (b[k] if b is not None else 0)
    return out


# ---- each method against its dense definition -----------------------------------------------------------


def weights(*w: float) -> list[dict]:
    return [{"weight": x} for x in w]


CASES = {
    # name: (method, number of models, with base, top-level parameters, per-model parameters)
    "linear": ("linear", 3, False, {}, weights(1.0, 2.0, 0.5)),
    "linear plain sum": ("linear", 2, False, {"normalize": False}, weights(0.7, 0.6)),
    "nuslerp base": ("nuslerp", 2, True, {}, weights(1.0, 3.0)),
    "nuslerp weights": ("nuslerp", 2, False, {}, weights(2.0, 1.0)),
    "nuslerp rows": ("nuslerp", 2, True, {"nuslerp_flatten": False}, weights(1.0, 2.0)),
    "nuslerp columns": ("nuslerp", 2, True, {"nuslerp_flatten": False, "nuslerp_row_wise": True}, weights(1.0, 2.0)),
    "nuslerp weights rows": ("nuslerp", 2, False, {"nuslerp_flatten": False}, weights(1.0, 2.0)),
    "multislerp base": ("multislerp", 3, True, {}, weights(1.0, 2.0, 3.0)),
    "multislerp weights": ("multislerp", 3, False, {}, weights(0.5, 1.0, 1.0)),
    "multislerp unnormalised": ("multislerp", 3, True, {"normalize_weights": False}, weights(0.2, 0.3, 0.4)),
    "karcher": ("karcher", 3, False, {}, None),
    "karcher weighted": ("karcher", 3, False, {"max_iter": 50, "tol": 1e-9}, weights(1.0, 2.0, 5.0)),
    "model_stock": ("model_stock", 3, True, {}, None),
    "model_stock filter_wise": ("model_stock", 3, True, {"filter_wise": True}, None),
}


def run_case(name: str, init: Path, runs: list[Path], out: Path, **kw):
    method, n, with_base, top, per = CASES[name]
    base = init if with_base else None
    got = api.merge(method, runs[:n], out, base=base, params=top, model_params=per, progress=False, **kw)
    return got, (method, base, runs[:n], top, per)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_dense_definition(name, tiny_init, tiny_runs, tmp_path):
    out, args = run_case(name, tiny_init, tiny_runs, tmp_path / "m")
    assert_state_close(load_state(out), dense(*args))


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("method", ["linear", "multislerp", "karcher", "model_stock"])
def test_n_models(method, n, tiny_init, runs4, tmp_path):
    base = tiny_init if method in ("multislerp", "model_stock") else None
    per = weights(*[1.0 + i for i in range(n)]) if method != "model_stock" else None
    out = api.merge(method, runs4[:n], tmp_path / "m", base=base, model_params=per, progress=False)
    assert_state_close(load_state(out), dense(method, base, runs4[:n], {}, per))


def test_linear_filter_weights_per_tensor(tiny_runs, tmp_path):
    per = [{"weight": [{"filter": "mlp", "value": 3.0}, {"value": 1.0}]}, {"weight": 1.0}]
    out = api.merge("linear", tiny_runs[:2], tmp_path / "m", model_params=per, progress=False)
    a, b = fp64(tiny_runs[0]), fp64(tiny_runs[1])
    want = {k: ((3.0 if "mlp" in k else 1.0) * a[k] + b[k]) / (4.0 if "mlp" in k else 2.0) for k in a}
    assert_state_close(load_state(out), want)


def test_nuslerp_vectors_of_any_rank(tmp_path):
    """Rows and dim-0 slices of 1-, 2- and 3-D tensors, in chunks that split a tensor across slices."""
    g = torch.Generator().manual_seed(0)
    shapes = {"cube": (3, 4, 5), "vector": (7,), "matrix": (6, 8)}
    files = []
    for i in range(3):
        state = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
        save_file(state, tmp_path / f"{i}.safetensors")
        files.append(tmp_path / f"{i}.safetensors")
    b, x, y = ({k: v.double() for k, v in load_state_file(f).items()} for f in files)
    for top, how in [
        ({"nuslerp_flatten": False}, "row"),
        ({"nuslerp_flatten": False, "nuslerp_row_wise": True}, "column"),
    ]:
        for chunk in (16, 1 << 20):
            out = tmp_path / f"{how}{chunk}"
            api.merge(
                "nuslerp",
                files[1:],
                out,
                base=files[0],
                params=top,
                model_params=weights(1.0, 2.0),
                chunk=chunk,
                progress=False,
            )
            got = load_state_file(out / "model.safetensors")
            for k, s in shapes.items():
                d1, d2 = as_vectors(x[k] - b[k], how), as_vectors(y[k] - b[k], how)
                want = b[k] + from_vectors(slerp(d1, d2, 2 / 3), how, torch.Size(s))
                torch.testing.assert_close(got[k].double(), want, atol=ATOL, rtol=1e-5, msg=f"{how} {chunk} {k}")


def load_state_file(f: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(f)


# ---- closed forms -------------------------------------------------------------------------------------------


def test_linear_normalises(tiny_runs, tmp_path):
    a = api.merge("linear", tiny_runs[:2], tmp_path / "a", model_params=weights(1, 3), progress=False)
    b = api.merge("linear", tiny_runs[:2], tmp_path / "b", model_params=weights(0.25, 0.75), progress=False)
    c = api.merge(
        "linear",
        tiny_runs[:2],
        tmp_path / "c",
        params={"normalize": False},
        model_params=weights(0.25, 0.75),
        progress=False,
    )
    sa, sb, sc = load_state(a), load_state(b), load_state(c)
    assert all(torch.equal(sa[k], sb[k]) and torch.equal(sa[k], sc[k]) for k in sa)
    x, y = fp64(tiny_runs[0]), fp64(tiny_runs[1])
    assert_state_close(sa, {k: 0.25 * x[k] + 0.75 * y[k] for k in x})


def midpoint(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The SLERP midpoint direction of a and b, scaled to their mean norm."""
    na, nb = a.norm(), b.norm()
    mid = a / na + b / nb
    return (na + nb) / 2 * mid / mid.norm()


@pytest.mark.parametrize("method", ["karcher", "multislerp"])
def test_two_points_give_the_slerp_midpoint_at_the_mean_norm(method, tiny_runs, tmp_path):
    per = weights(1.0, 1.0) if method == "multislerp" else None
    out = load_state(api.merge(method, tiny_runs[:2], tmp_path / "m", model_params=per, progress=False))
    a, b = fp64(tiny_runs[0]), fp64(tiny_runs[1])
    for k in a:
        want = midpoint(a[k].flatten(), b[k].flatten())
        torch.testing.assert_close(out[k].double().flatten(), want, atol=ATOL, rtol=1e-5, msg=k)
        # the SLERP midpoint itself (the same direction), and the mean of the norms
        direction = slerp(a[k].flatten() / a[k].norm(), b[k].flatten() / b[k].norm(), 0.5)
        torch.testing.assert_close(want / want.norm(), direction, atol=1e-12, rtol=0)
        assert abs(out[k].double().norm() - (a[k].norm() + b[k].norm()) / 2) < 1e-5 * a[k].norm()


def test_karcher_output_is_a_critical_point(tiny_runs, tmp_path):
    """Converged, the weighted mean of the log maps at the output's direction vanishes (the definition)."""
    w = [1.0, 2.0, 3.0]
    out = api.merge(
        "karcher",
        tiny_runs,
        tmp_path / "m",
        params={"max_iter": 100, "tol": 1e-10},
        model_params=weights(*w),
        progress=False,
    )
    got, ms = fp64(out), [fp64(r) for r in tiny_runs]
    for k in got:
        mu = got[k].flatten() / got[k].norm()
        grad = sum(wi / 6 * log_map(mu, m[k].flatten() / m[k].norm()) for wi, m in zip(w, ms))
        assert grad.norm() < 1e-6, k


@pytest.mark.parametrize("with_base", [True, False])
def test_nuslerp_equal_weights_is_slerp_half(with_base, tiny_init, tiny_runs, tmp_path):
    base = tiny_init if with_base else None
    out = api.merge("nuslerp", tiny_runs[:2], tmp_path / "n", base=base, model_params=weights(1, 1), progress=False)
    if with_base:  # WARP's SLERP of task vectors, one angle per tensor, λ = 1/2
        ref = api.slerp(tiny_runs[:2], tiny_init, tmp_path / "s", lam=0.5, granularity="tensor", progress=False)
        assert_state_close(load_state(out), load_state(ref))
    else:
        a, b = fp64(tiny_runs[0]), fp64(tiny_runs[1])
        assert_state_close(
            load_state(out), {k: slerp(a[k].flatten(), b[k].flatten(), 0.5).reshape(a[k].shape) for k in a}
        )


@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize("w,which", [((1, 0), 0), ((0, 1), 1)])
def test_nuslerp_ends_give_the_models(w, which, with_base, tiny_init, tiny_runs, tmp_path):
    base = tiny_init if with_base else None
    for top in ({}, {"nuslerp_flatten": False}):
        out = tmp_path / f"m{len(top)}"
        api.merge("nuslerp", tiny_runs[:2], out, base=base, params=top, model_params=weights(*w), progress=False)
        assert_state_close(load_state(out), load_state(tiny_runs[which]), atol=1e-6)


def orthogonal_pair(a: torch.Tensor, b: torch.Tensor, cos: float) -> torch.Tensor:
    """Per row of a (B, n): a vector of the same norm at cosine `cos` to it, in the plane of a and b."""
    ua = a / a.norm(dim=-1, keepdim=True)
    p = b - (b * ua).sum(-1, keepdim=True) * ua
    p = p / p.norm(dim=-1, keepdim=True)
    return a.norm(dim=-1, keepdim=True) * (cos * ua + math.sqrt(1 - cos * cos) * p)


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("cos", [0.0, 0.5])
def test_model_stock_known_angle(cos, filter_wise, tiny_init, tiny_runs, tmp_path):
    """Two task vectors at a known cosine (per row, equal norms: per tensor too): t = 2cos/(1 + cos)."""
    base, r = fp64(tiny_init), fp64(tiny_runs[0])
    second = {}
    for k in base:
        d1 = as_vectors(r[k] - base[k], "row")
        other = as_vectors(
            torch.randn(base[k].shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64), "row"
        )
        second[k] = base[k] + from_vectors(orthogonal_pair(d1, other, cos), "row", base[k].shape)
    m2 = write_model(tiny_init, tmp_path / "second", second)
    out = api.merge(
        "model_stock",
        [tiny_runs[0], m2],
        tmp_path / "m",
        base=tiny_init,
        params={"filter_wise": filter_wise},
        progress=False,
    )
    t = 2 * cos / (1 + cos)
    s2 = fp64(m2)
    want = {k: base[k] + t * ((r[k] - base[k]) + (s2[k] - base[k])) / 2 for k in base}
    assert_state_close(load_state(out), want, atol=1e-6)


# ---- defaults, sharding, chunking, dtypes ---------------------------------------------------------------------

DEFAULTS = {
    "linear": ({"normalize": True}, weights(1.0, 2.0), False),
    "nuslerp": ({"nuslerp_flatten": True, "nuslerp_row_wise": False}, weights(1.0, 2.0), True),
    "multislerp": ({"normalize_weights": True, "eps": 1e-8}, weights(1.0, 2.0), True),
    "karcher": ({"max_iter": 10, "tol": 1e-5}, None, False),
    "model_stock": ({"filter_wise": False}, None, True),
}


@pytest.mark.parametrize("method", list(DEFAULTS))
def test_documented_defaults(method, tiny_init, tiny_runs, tmp_path):
    explicit, per, with_base = DEFAULTS[method]
    base = tiny_init if with_base else None
    a = api.merge(method, tiny_runs[:2], tmp_path / "a", base=base, model_params=per, progress=False)
    b = api.merge(method, tiny_runs[:2], tmp_path / "b", base=base, params=explicit, model_params=per, progress=False)
    sa, sb = load_state(a), load_state(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    recorded = json.loads((a / "warp_provenance.json").read_text())["params"]
    assert {k: recorded[k] for k in explicit} == explicit
    if method == "karcher":  # uniform weights by default
        c = api.merge(method, tiny_runs[:2], tmp_path / "c", model_params=weights(3.0, 3.0), progress=False)
        sc = load_state(c)
        assert all(torch.equal(sa[k], sc[k]) for k in sa)


def shard_as(src: Path, layout: Path, dst: Path) -> Path:
    """`src`'s weights in the shard files of the sharded folder `layout`."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    index = json.loads((layout / "model.safetensors.index.json").read_text())
    sd = load_state(src)
    for f in set(index["weight_map"].values()):
        part = {k: sd[k] for k, v in index["weight_map"].items() if v == f}
        save_file(part, dst / f, metadata={"format": "pt"})
    shutil.copy(layout / "model.safetensors.index.json", dst)
    return dst


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, tiny_init, tiny_runs) -> tuple[Path, list[Path]]:
    """The session's init and runs, sharded at 20KB (the same values)."""
    d = tmp_path_factory.mktemp("sharded")
    init = make_tiny_llama(d / "init", seed=0, max_shard_size="20KB")
    assert len(list(init.glob("*.safetensors"))) > 2
    s, u = load_state(init), load_state(tiny_init)
    assert set(s) == set(u) and all(torch.equal(s[k], u[k]) for k in u)
    return init, [shard_as(r, init, d / f"run{i}") for i, r in enumerate(tiny_runs)]


@pytest.mark.parametrize("name", list(CASES))
def test_sharded_inputs_equal_unsharded(name, tiny_init, tiny_runs, sharded, tmp_path):
    init_s, runs_s = sharded
    u, _ = run_case(name, tiny_init, tiny_runs, tmp_path / "u")
    s, _ = run_case(name, init_s, runs_s, tmp_path / "s", max_shard_size="20KB")
    assert len(list(s.glob("*.safetensors"))) > 1
    su, ss = load_state(u), load_state(s)
    assert set(su) == set(ss) and all(torch.equal(su[k], ss[k]) for k in su)


@pytest.mark.parametrize("name", list(CASES))
def test_small_chunks_stream_the_same_result(name, tiny_init, tiny_runs, tmp_path):
    """Tensors larger than a chunk take their angles from a streamed pre-pass, not from one read."""
    whole, args = run_case(name, tiny_init, tiny_runs, tmp_path / "w")
    small, _ = run_case(name, tiny_init, tiny_runs, tmp_path / "c", chunk=64)
    assert_state_close(load_state(small), load_state(whole), atol=1e-6)
    assert_state_close(load_state(small), dense(*args))


@pytest.fixture(scope="module")
def bf16(tmp_path_factory) -> tuple[Path, list[Path]]:
    d = tmp_path_factory.mktemp("bf16")
    init = make_tiny_llama(d / "init", seed=1, dtype=torch.bfloat16)
    return init, [perturb(init, d / f"r{i}", seed=10 + i) for i in range(3)]


@pytest.mark.parametrize("name", list(CASES))
def test_bf16_inputs_give_bf16_computed_in_fp32(name, bf16, tmp_path):
    init, runs = bf16
    out, args = run_case(name, init, runs, tmp_path / "m")
    got = load_state(out)
    assert all(v.dtype == torch.bfloat16 for v in got.values())
    want = dense(*args)  # from the bf16 values, in fp64
    for k in want:  # one rounding to bf16 at the end: within one bf16 ulp
        torch.testing.assert_close(got[k].double(), want[k], atol=1e-6, rtol=2**-7, msg=k)


@pytest.mark.parametrize("name", ["nuslerp columns", "karcher", "model_stock filter_wise", "multislerp base"])
def test_written_mergekit_config_reproduces_the_merge(name, tiny_init, tiny_runs, tmp_path):
    out, _ = run_case(name, tiny_init, tiny_runs, tmp_path / "m")
    again = api.merge_yaml(out / "merge_config.yml", tmp_path / "again", progress=False)
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


# ---- bad input through the CLI ------------------------------------------------------------------------------

runner = CliRunner()

BAD = {
    # name: (arguments after `warp merge`, words the one-line error must contain)
    "weight missing": (lambda i, r: ["linear", r[0], r[1]], ["--weight", "required"]),
    "nuslerp weight missing": (lambda i, r: ["nuslerp", r[0], r[1], "--base", i], ["--weight", "required"]),
    "model_stock one model": (lambda i, r: ["model_stock", r[0], "--base", i], ["model_stock", "two models"]),
    "model_stock no base": (lambda i, r: ["model_stock", r[0], r[1]], ["model_stock", "base"]),
    "linear weights sum to zero": (
        lambda i, r: ["linear", r[0], r[1], "--weight", "1,-1"],
        ["--weight", "sum to zero"],
    ),
    "multislerp weights sum to zero": (
        lambda i, r: ["multislerp", r[0], r[1], "--weight", "0.5,-0.5"],
        ["--weight", "sum to zero"],
    ),
    "nuslerp three models": (lambda i, r: ["nuslerp", *r, "--weight", "1"], ["nuslerp", "exactly two"]),
    "karcher negative max_iter": (lambda i, r: ["karcher", r[0], r[1], "--max-iter", "-1"], ["--max-iter", ">= 0"]),
    "karcher zero tol": (lambda i, r: ["karcher", r[0], r[1], "--tol", "0"], ["--tol", "> 0"]),
    "karcher negative weight": (lambda i, r: ["karcher", r[0], r[1], "--weight", "1,-1"], ["--weight", ">= 0"]),
    "karcher fractional max_iter": (lambda i, r: ["karcher", r[0], r[1], "--max-iter", "2.5"], ["--max-iter"]),
    "multislerp zero eps": (lambda i, r: ["multislerp", r[0], r[1], "--weight", "1", "--eps", "0"], ["--eps"]),
    "nuslerp bad flag": (
        lambda i, r: ["nuslerp", r[0], r[1], "--weight", "1", "--nuslerp-flatten", "maybe"],
        ["--nuslerp-flatten"],
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_and_writes_nothing(case, tiny_init, tiny_runs, tmp_path):
    build, needles = BAD[case]
    out = tmp_path / "out"
    result = runner.invoke(app, ["merge", *(str(a) for a in build(tiny_init, tiny_runs)), "-o", str(out)])
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    err = lines[-1]
    assert err.startswith("error: ") and sum(x.startswith("error: ") for x in lines) == 1, result.stderr
    assert "Traceback" not in result.output
    for n in needles:
        assert n in err, (n, err)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]


def test_cli_happy_path(tiny_init, tiny_runs, tmp_path):
    out = tmp_path / "m"
    r = runner.invoke(
        app,
        ["merge", "nuslerp", str(tiny_runs[0]), str(tiny_runs[1]), "--base", str(tiny_init), "--weight", "1,3"]
        + ["--nuslerp-flatten", "false", "-o", str(out), "-q"],
    )
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(out.absolute())
    top = {"nuslerp_flatten": False}
    assert_state_close(load_state(out), dense("nuslerp", tiny_init, tiny_runs[:2], top, weights(1.0, 3.0)))


@pytest.mark.parametrize(
    "args",
    [
        ["nuslerp", "--weight", "1", "--nuslerp-flatten", "false"],
        ["multislerp", "--weight", "1"],
        ["karcher"],
        ["model_stock", "--filter-wise", "true"],
        ["linear", "--weight", "1"],
    ],
)
def test_nan_input_is_named(args, tiny_init, tiny_runs, tmp_path):
    """A NaN in one input tensor: exit 2, the error names the tensor and the file, nothing published."""
    state = load_state(tiny_runs[1])
    state["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
    broken = write_model(tiny_runs[1], tmp_path / "nan", state)
    out = tmp_path / "out"
    base = ["--base", str(tiny_init)] if args[0] in ("model_stock", "nuslerp", "multislerp") else []
    r = runner.invoke(app, ["merge", args[0], str(tiny_runs[0]), str(broken), *base, *args[1:], "-o", str(out), "-q"])
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith("error: ") and "model.layers.1.mlp.down_proj.weight" in err and "nan/model.safetensors" in err
    assert not out.exists()
