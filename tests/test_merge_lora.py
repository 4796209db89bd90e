"""LoRA adapters merged as adapters: the factor math against dense matrices, and SLERP / LERP / LITI of
peft adapters against the same merges of the full models peft's merge_and_unload makes of them."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import load_state, make_tiny_llama
from typer.testing import CliRunner

from mergekit_warp.cli import app
from mergekit_warp.merge import api, lora

runner = CliRunner()


def _factors(out: int, inp: int, r: int, seed: int) -> lora.Factors:
    g = torch.Generator().manual_seed(seed)
    return lora.Factors(torch.randn(out, r, generator=g), torch.randn(r, inp, generator=g))


def test_dot_combine_truncate_against_dense():
    x, y = _factors(12, 9, 3, 0), _factors(12, 9, 5, 1)
    dx, dy = x.B.double() @ x.A.double(), y.B.double() @ y.A.double()
    assert lora.dot(x, y) == pytest.approx(float((dx * dy).sum()), rel=1e-12)
    c = lora.combine([0.7, -1.3], [x, y])
    assert c.rank == 8
    torch.testing.assert_close(c.dense().double(), 0.7 * dx - 1.3 * dy, rtol=1e-5, atol=1e-5)
    full, err = lora.truncate(c, 8)  # the full rank: exact
    assert err < 1e-7
    torch.testing.assert_close(full.dense(), c.dense(), rtol=1e-5, atol=1e-4)
    cut, err = lora.truncate(c, 2)  # Eckart–Young: the best rank-2 matrix, its error from the singular values
    s = torch.linalg.svdvals(c.dense().double())
    assert err == pytest.approx(float(s[2:].norm() / s.norm()), rel=1e-6)
    u, sv, vh = torch.linalg.svd(c.dense().double())
    torch.testing.assert_close(cut.dense().double(), (u[:, :2] * sv[:2]) @ vh[:2], rtol=1e-5, atol=1e-4)


@pytest.fixture(scope="module")
def lora_setup(tmp_path_factory):
    """A tiny base, two adapters on it (ranks 4 and 2, different targets) and their full models."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("lora")
    base = make_tiny_llama(root / "base", seed=3)
    out = {"base": base}
    for name, r, targets, seed in (("a", 4, "all-linear", 1), ("b", 2, ["q_proj", "v_proj", "up_proj"], 2)):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(base)
        pm = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False))
        pm.save_pretrained(root / name)
        pm.merge_and_unload().save_pretrained(root / f"{name}_full")
        out[name], out[f"{name}_full"] = root / name, root / f"{name}_full"
    return out


@pytest.mark.parametrize("granularity", ["block", "tensor", "model"])
def test_slerp_of_adapters_equals_slerp_of_their_full_models(tmp_path, lora_setup, granularity):
    s = lora_setup
    lam = dict(granularity=granularity, lam=[0.2, 0.7], lam_nonblock=0.9, progress=False)  # λ over depth
    adapter = api.slerp([s["a"], s["b"]], s["base"], tmp_path / "ad", **lam)
    dense = api.slerp([s["a"], s["b"]], s["base"], tmp_path / "dense", densify=True, **lam)
    ref = api.slerp([s["a_full"], s["b_full"]], s["base"], tmp_path / "ref", **lam)
    got, want, base = load_state(dense), load_state(ref), load_state(s["base"])
    # relative to the merged task vector (the full-model merge carries fp32 rounding of θ + δ − θ)
    diff = sum(float((got[k].double() - want[k].double()).square().sum()) for k in want)
    delta = sum(float((want[k].double() - base[k].double()).square().sum()) for k in want)
    assert (diff / delta) ** 0.5 < 1e-6
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and {cfg["r"], *cfg["rank_pattern"].values()} == {4 + 2, 4}  # 4 where b is absent
    # the adapter loads in peft on its base, and merge_and_unload gives the densified weights
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(s["base"]), adapter).merge_and_unload()
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(v, got[k], rtol=1e-5, atol=1e-6, msg=k)


def test_lerp_liti_and_rank(tmp_path, lora_setup):
    s = lora_setup
    base = load_state(s["base"])
    lerp = load_state(
        api.lerp([s["a"], s["b"]], tmp_path / "l", weights=[0.3, 0.9], init=s["base"], densify=True, progress=False)
    )
    a, b = load_state(s["a_full"]), load_state(s["b_full"])
    for k in base:
        torch.testing.assert_close(
            lerp[k], base[k] + 0.3 * (a[k] - base[k]) + 0.9 * (b[k] - base[k]), rtol=1e-5, atol=1e-6
        )
    liti = load_state(api.liti(s["a"], s["base"], tmp_path / "t", eta=1.5, densify=True, progress=False))
    for k in base:  # η > 1 extrapolates: θ_base + 1.5·δ
        torch.testing.assert_close(liti[k], base[k] + 1.5 * (a[k] - base[k]), rtol=1e-5, atol=1e-6)
    # --rank at the full rank is exact; below it, the printed error is the task vector's relative error
    full = load_state(api.slerp([s["a"], s["b"]], s["base"], tmp_path / "f", densify=True, progress=False))
    same = load_state(api.slerp([s["a"], s["b"]], s["base"], tmp_path / "r6", densify=True, rank=6, progress=False))
    for k in base:
        torch.testing.assert_close(same[k], full[k], rtol=1e-5, atol=1e-6)
    api.slerp([s["a"], s["b"]], s["base"], tmp_path / "r1", densify=True, rank=1, progress=False)
    cut = load_state(tmp_path / "r1")
    num = sum(float((cut[k] - full[k]).double().square().sum()) for k in base)
    den = sum(float((full[k] - base[k]).double().square().sum()) for k in base)
    note = json.loads((tmp_path / "r1" / "warp_provenance.json").read_text())["notes"][0]
    assert f"{(num / den) ** 0.5:.3g}" in note


def test_cli_and_bad_input(tmp_path, lora_setup):
    s = lora_setup
    r = runner.invoke(
        app, ["merge", "slerp", str(s["a"]), str(s["b"]), "--init", str(s["base"]), "-o", str(tmp_path / "o")]
    )
    assert r.exit_code == 0, r.output
    assert (tmp_path / "o" / "adapter_model.safetensors").is_file()
    card = (tmp_path / "o" / "README.md").read_text()
    assert "library_name: peft" in card and f"base_model: {s['base']}" in card
    r = runner.invoke(app, ["merge", "slerp", str(s["a_full"]), str(s["b_full"]), "-o", str(tmp_path / "full")])
    assert r.exit_code == 0, r.output  # mergekit's SLERP of full weights (no --init) takes no adapter options

    def error(*args: str) -> str:
        r = runner.invoke(app, list(args))
        assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.output
        return r.stderr

    # another base: a tiny model without the adapters' second block
    other = make_tiny_llama(tmp_path / "other", seed=5, layers=1)
    assert "another base" in error(
        "merge", "slerp", str(s["a"]), str(s["b"]), "--init", str(other), "-o", str(tmp_path / "x")
    )
    # a base of the same shapes that is not the one the adapters were made on: warp's provenance, or the
    # folder peft's adapter_config.json names, says so
    same_shapes = make_tiny_llama(tmp_path / "same", seed=9)
    for adapter in (tmp_path / "o", s["a"]):
        msg = error("liti", str(adapter), "--init", str(same_shapes), "-o", str(tmp_path / "y"))
        assert "another base" in msg
    # --rank with full checkpoints among the inputs; --rank 0; --rank on full checkpoints
    ab, init, z = [str(s["a"]), str(s["b"])], ["--init", str(s["base"])], ["-o", str(tmp_path / "z")]
    assert "full checkpoint" in error("merge", "slerp", str(s["a"]), str(s["b_full"]), *init, "--rank", "2", *z)
    assert ">= 0" in error("merge", "lerp", *ab, *init, "--weights", "0.5,-1", *z)
    assert "--rank 0" in error("merge", "slerp", *ab, *init, "--rank", "0", *z)
    assert "LoRA" in error("merge", "slerp", str(s["a_full"]), str(s["b_full"]), *init, "--rank", "2", *z)
    # variants that are not s·B·A: named
    cfg = json.loads((s["a"] / "adapter_config.json").read_text())
    dora = tmp_path / "dora"
    dora.mkdir()
    (dora / "adapter_model.safetensors").write_bytes((s["a"] / "adapter_model.safetensors").read_bytes())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    assert "use_dora" in error(
        "merge", "slerp", str(dora), str(s["b"]), "--init", str(s["base"]), "-o", str(tmp_path / "z")
    )
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": None}))
    assert "lora_alpha" in error(
        "merge", "slerp", str(dora), str(s["b"]), "--init", str(s["base"]), "-o", str(tmp_path / "z")
    )
    assert not (tmp_path / "z").exists() and not (tmp_path / "x").exists()


def test_adapters_among_full_checkpoints_and_base_plus_adapter(tmp_path, lora_setup):
    """An adapter among full checkpoints is applied to --init on the fly, `BASE+ADAPTER` to that base:
    the merges equal those of the full models peft's merge_and_unload made."""
    s = lora_setup
    a, b, base = str(s["a"]), str(s["b"]), str(s["base"])

    def same(x, y):
        sx, sy = load_state(x), load_state(y)
        assert set(sx) == set(sy)
        for k in sx:
            torch.testing.assert_close(sx[k], sy[k], rtol=1e-5, atol=1e-6, msg=k)

    want = api.slerp([s["a_full"], s["b_full"]], base, tmp_path / "want", progress=False)
    same(api.slerp([a, s["b_full"]], base, tmp_path / "mixed", progress=False), want)
    for method, params in (("ties", {"density": 0.5, "weight": 1.0}), ("task_arithmetic", {"weight": 0.7})):
        full = api.merge(method, [s["a_full"], s["b_full"]], tmp_path / f"{method}_full", base=base, params=params)
        got = api.merge(method, [a, b], tmp_path / method, base=base, params=params, progress=False)
        same(got, full)
    # BASE+ADAPTER without --init: a model soup of an adapter on its base and a full model
    soup = api.merge("linear", [f"{base}+{a}", s["b_full"]], tmp_path / "soup", params={"weight": 1.0}, progress=False)
    same(
        soup,
        api.merge("linear", [s["a_full"], s["b_full"]], tmp_path / "soup_full", params={"weight": 1.0}, progress=False),
    )
    prov = json.loads((soup / "warp_provenance.json").read_text())
    assert prov["inputs"]["models"][0]["path"] == a  # the adapter is the recorded input, its base guarded
    r = runner.invoke(app, ["merge", "linear", f"{base}+{a}", b, "--weight", "1", "-o", str(tmp_path / "cli"), "-q"])
    assert r.exit_code == 0, r.output  # b alone: applied to the base its adapter_config.json names
    other = make_tiny_llama(tmp_path / "other", seed=9)
    r = runner.invoke(app, ["merge", "linear", f"{other}+{a}", b, "--weight", "1", "-o", str(tmp_path / "bad"), "-q"])
    assert r.exit_code == 2 and "another base" in r.output and not (tmp_path / "bad").exists()


def test_base_plus_adapter_in_paths_with_plus_and_in_mergekit_yaml(tmp_path, lora_setup):
    """A '+' inside a folder name still splits where it should; a merge of BASE+ADAPTER records the base
    and writes a merge_config.yml that `warp merge yaml` redoes bit for bit."""
    import shutil

    from mergekit_warp.merge.adapters import split_spec

    s = lora_setup
    odd = tmp_path / "a+b"
    shutil.copytree(s["base"], odd / "base+x")
    shutil.copytree(s["a"], odd / "adapter+y")
    assert split_spec(f"{odd}/base+x+{odd}/adapter+y") == (f"{odd}/base+x", f"{odd}/adapter+y")
    assert split_spec(f"{odd}/base+x") is None  # an existing path is never split
    out = api.merge("linear", [f"{odd}/base+x+{odd}/adapter+y", s["b_full"]], tmp_path / "m", params={"weight": 1.0})
    prov = json.loads((out / "warp_provenance.json").read_text())
    assert prov["inputs"]["adapter_bases"][0]["path"] == f"{odd}/base+x"
    r = runner.invoke(app, ["merge", "yaml", str(out / "merge_config.yml"), "-o", str(tmp_path / "again"), "-q"])
    assert r.exit_code == 0, r.output
    a, b = load_state(out), load_state(tmp_path / "again")
    assert all(torch.equal(a[k], b[k]) for k in a)
