"""The merge entry points on tiny local Llamas, each checked against an independent dense computation
on whole state dicts (load everything, compute in fp64, compare)."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny import load_state, make_tiny_llama, perturb

from mergekit_warp.merge import api

ATOL = 2e-6


def dense_coeffs(d1: torch.Tensor, d2: torch.Tensor, lam: float) -> tuple[float, float]:
    """Independent SLERP weights from two flattened task vectors (fp64)."""
    a, b = d1.double(), d2.double()
    omega = math.acos(float((a @ b) / (a.norm() * b.norm())))
    return math.sin((1 - lam) * omega) / math.sin(omega), math.sin(lam * omega) / math.sin(omega)


def dense_slerp(init: Path, models: list[Path], lam_of, group_of) -> dict[str, torch.Tensor]:
    """SLERP of two (or, iteratively, more) task vectors with one angle per group, on full state dicts."""
    base = {k: v.double() for k, v in load_state(init).items()}
    deltas = [{k: v.double() - base[k] for k, v in load_state(m).items()} for m in models]
    groups: dict[str, list[str]] = {}
    for k in base:
        groups.setdefault(group_of(k), []).append(k)
    out = {}
    for names in groups.values():
        flat = [torch.cat([d[k].flatten() for k in names]) for d in deltas]
        if len(models) == 2:
            for k in names:
                w1, w2 = dense_coeffs(flat[0], flat[1], lam_of(k))
                out[k] = base[k] + w1 * deltas[0][k] + w2 * deltas[1][k]
        else:  # s_2 = SLERP(δ1, δ2, 1/2), s_k = SLERP(s_{k−1}, δ_k, 1/k), on the flattened group
            s = flat[0]
            for i in range(1, len(models)):
                w1, w2 = dense_coeffs(s, flat[i], 1 / (i + 1))
                s = w1 * s + w2 * flat[i]
            pos = 0
            for k in names:
                n = base[k].numel()
                out[k] = base[k] + s[pos : pos + n].reshape(base[k].shape)
                pos += n
    return out


def block_of(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:3]) if len(parts) > 3 and parts[1] == "layers" else name


def assert_state_close(got: dict, want: dict, atol: float = ATOL) -> None:
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k].double(), want[k].double(), atol=atol, rtol=1e-5, msg=k)


@pytest.mark.parametrize("lam,which", [(0.0, 0), (1.0, 1)])
def test_slerp_ends_give_the_models(tiny_init, tiny_runs, tmp_path, lam, which):
    out = api.slerp(tiny_runs[:2], tiny_init, tmp_path / "m", lam=lam, progress=False)
    assert_state_close(load_state(out), load_state(tiny_runs[which]), atol=1e-6)


@pytest.mark.parametrize("granularity", ["block", "tensor", "model"])
def test_slerp_granularity_matches_dense(tiny_init, tiny_runs, tmp_path, granularity):
    group_of = {"block": block_of, "tensor": lambda k: k, "model": lambda k: "model"}[granularity]
    out = api.slerp(tiny_runs[:2], tiny_init, tmp_path / "m", lam=0.3, granularity=granularity, progress=False)
    assert_state_close(load_state(out), dense_slerp(tiny_init, tiny_runs[:2], lambda k: 0.3, group_of))


def test_block_angle_differs_from_per_tensor(tiny_init, tiny_runs, tmp_path):
    """Guard against the block mode silently computing per-tensor angles."""
    a = load_state(api.slerp(tiny_runs[:2], tiny_init, tmp_path / "b", granularity="block", progress=False))
    b = load_state(api.slerp(tiny_runs[:2], tiny_init, tmp_path / "t", granularity="tensor", progress=False))
    k = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(a[k], b[k], atol=1e-7)


def test_three_models_iterative_rule_matches_dense(tiny_init, tiny_runs, tmp_path):
    out = api.slerp(tiny_runs, tiny_init, tmp_path / "m", progress=False)
    assert_state_close(load_state(out), dense_slerp(tiny_init, tiny_runs, None, block_of))
    assert "iterative" in " ".join(json.loads((out / "warp_provenance.json").read_text())["notes"])


def test_per_layer_schedule(tiny_init, tiny_runs, tmp_path):
    lam = {"0": 0.2, "1": 0.8}
    out = api.slerp(tiny_runs[:2], tiny_init, tmp_path / "m", lam=[0.2, 0.8], lam_nonblock=0.5, progress=False)
    want = dense_slerp(
        tiny_init, tiny_runs[:2], lambda k: lam.get(k.split(".")[2], 0.5) if ".layers." in k else 0.5, block_of
    )
    assert_state_close(load_state(out), want)


def test_chunking_does_not_change_the_result(tiny_init, tiny_runs, tmp_path):
    whole = load_state(api.slerp(tiny_runs[:2], tiny_init, tmp_path / "a", lam=0.4, progress=False))
    tiny_chunks = load_state(api.slerp(tiny_runs[:2], tiny_init, tmp_path / "b", lam=0.4, progress=False, chunk=7))
    assert_state_close(tiny_chunks, whole, atol=1e-6)


def reshard(src: Path, dst: Path, n: int) -> Path:
    """Copy HF folder `src` to `dst` with its weights split into `n` shards + an index (same values)."""
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    sd = load_state(src)
    keys = list(sd)
    files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for i, f in enumerate(files):
        part = keys[i::n]
        save_file({k: sd[k] for k in part}, dst / f, metadata={"format": "pt"})
        weight_map.update({k: f for k in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def test_sharded_inputs_and_outputs_equal_unsharded(tiny_init, tiny_runs, tmp_path):
    init_s = reshard(tiny_init, tmp_path / "init_s", 3)
    runs_s = [reshard(r, tmp_path / f"rs{i}", 2 + i) for i, r in enumerate(tiny_runs[:2])]
    runs_u, init_u = tiny_runs[:2], tiny_init
    out_s = api.slerp(runs_s, init_s, tmp_path / "os", max_shard_size="30KB", progress=False)
    out_u = api.slerp(runs_u, init_u, tmp_path / "ou", progress=False)
    shards = sorted(p.name for p in out_s.glob("*.safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert [p.name for p in out_u.glob("*.safetensors")] == ["model.safetensors"]
    s, u = load_state(out_s), load_state(out_u)
    assert set(s) == set(u) and all(torch.equal(s[k], u[k]) for k in u)


def test_bf16_inputs_keep_bf16_and_dtype_option(tmp_path):
    init = make_tiny_llama(tmp_path / "init", seed=1, dtype=torch.bfloat16)
    runs = [perturb(init, tmp_path / f"r{i}", seed=10 + i) for i in range(2)]
    out = api.slerp(runs, init, tmp_path / "m", progress=False)
    got = load_state(out)
    assert all(v.dtype == torch.bfloat16 for v in got.values())
    want = dense_slerp(init, runs, lambda k: 0.5, block_of)  # from the bf16 values, in fp64
    for k in want:  # one rounding to bf16 at the end: within one bf16 ulp
        torch.testing.assert_close(got[k].double(), want[k], atol=1e-6, rtol=2**-7)
    out32 = api.slerp(runs, init, tmp_path / "m32", dtype="fp32", progress=False)
    assert all(v.dtype == torch.float32 for v in load_state(out32).values())
    assert_state_close(load_state(out32), want, atol=1e-6)
    cfg = json.loads((out32 / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "float32"


@pytest.mark.parametrize("tie", [False, True])
def test_merged_llama_loads_and_runs(tmp_path, tie):
    from transformers import AutoModelForCausalLM

    init = make_tiny_llama(tmp_path / "init", seed=2, tie=tie)
    runs = [perturb(init, tmp_path / f"r{i}", seed=20 + i) for i in range(2)]
    assert ("lm_head.weight" in load_state(init)) is not tie
    out = api.slerp(runs, init, tmp_path / "m", progress=False)
    got = load_state(out)
    assert set(got) == set(load_state(init))  # the init's key set: no lm_head when tied
    want = dense_slerp(init, runs, lambda k: 0.5, block_of)
    assert_state_close(got, want)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    sd = model.state_dict()
    torch.testing.assert_close(sd["model.embed_tokens.weight"], want["model.embed_tokens.weight"].float())
    head = want["model.embed_tokens.weight" if tie else "lm_head.weight"].float()
    torch.testing.assert_close(sd["lm_head.weight"], head)
    logits = model(torch.tensor([[2, 5, 9, 14]])).logits
    assert logits.shape == (1, 4, model.config.vocab_size) and torch.isfinite(logits).all()


def test_liti_ends_and_extrapolation(tiny_init, tiny_runs, tmp_path):
    merged = tiny_runs[0]
    for eta, which in [(0.0, tiny_init), (1.0, merged)]:
        out = api.liti(merged, tiny_init, tmp_path / f"l{eta}", eta=eta, progress=False)
        assert_state_close(load_state(out), load_state(which), atol=1e-6)
    a, b = load_state(tiny_init), load_state(merged)
    out = api.liti(merged, tiny_init, tmp_path / "l15", eta=1.5, progress=False)
    assert_state_close(load_state(out), {k: -0.5 * a[k].double() + 1.5 * b[k].double() for k in a})
    assert any("extrapolation" in n for n in json.loads((out / "warp_provenance.json").read_text())["notes"])
    out = api.liti(merged, tiny_init, tmp_path / "ls", eta=[0.0, 1.0], eta_nonblock=0.0, progress=False)
    got = load_state(out)
    torch.testing.assert_close(got["model.layers.0.mlp.up_proj.weight"], a["model.layers.0.mlp.up_proj.weight"])
    torch.testing.assert_close(got["model.layers.1.mlp.up_proj.weight"], b["model.layers.1.mlp.up_proj.weight"])
    torch.testing.assert_close(got["lm_head.weight"], a["lm_head.weight"])


def test_ema(tiny_init, tiny_runs, tmp_path):
    seq = [tiny_init, *tiny_runs]
    out = api.ema(seq, tmp_path / "e1", mu=1.0, progress=False)
    assert_state_close(load_state(out), load_state(tiny_runs[-1]), atol=0)
    out = api.ema(seq, tmp_path / "e", mu=0.3, progress=False, chunk=5)
    states = [load_state(p) for p in seq]
    want = {}
    for k in states[0]:
        acc = states[0][k].double()
        for s in states[1:]:
            acc = 0.7 * acc + 0.3 * s[k].double()
        want[k] = acc
    assert_state_close(load_state(out), want)


def test_lerp_soup_and_task_vectors(tiny_init, tiny_runs, tmp_path):
    states = [load_state(p) for p in tiny_runs]
    base = load_state(tiny_init)
    out = api.lerp(tiny_runs, tmp_path / "soup", progress=False)
    assert_state_close(load_state(out), {k: sum(s[k].double() for s in states) / 3 for k in base})
    out = api.lerp(tiny_runs[:2], tmp_path / "tv", weights=[0.5, 1.0], init=tiny_init, progress=False)
    want = {
        k: base[k].double() + 0.5 * (states[0][k].double() - base[k]) + (states[1][k].double() - base[k]) for k in base
    }
    assert_state_close(load_state(out), want)


def test_single_file_inputs_and_int_buffers_from_init(tmp_path):
    """Bare .safetensors files work; non-float tensors come from the init, never interpolated."""
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(6, 5, generator=g)
    files = []
    for i in range(3):
        sd = {
            "layers.0.w": w0 + (0 if i == 0 else 0.1 * torch.randn(6, 5, generator=g)),
            "buf.position_ids": torch.arange(7) + i,
            "flag": torch.tensor([True, i == 0]),
        }
        files.append(tmp_path / f"c{i}.safetensors")
        save_file(sd, files[-1])
    out = api.slerp(files[1:], files[0], tmp_path / "m", progress=False)
    got = load_state(out)
    assert torch.equal(got["buf.position_ids"], torch.arange(7)) and got["buf.position_ids"].dtype == torch.int64
    assert torch.equal(got["flag"], torch.tensor([True, True]))
    prov = json.loads((out / "warp_provenance.json").read_text())
    assert any("bare .safetensors" in n for n in prov["notes"])


def test_inspect_matches_dense(tiny_init, tiny_runs):
    rows = api.inspect(tiny_runs[:2], tiny_init)
    base = load_state(tiny_init)
    states = [load_state(p) for p in tiny_runs[:2]]
    by_group = {r["group"]: r for r in rows}
    assert set(by_group) == {block_of(k) for k in base} | {"(whole model)"}
    assert rows[-1]["group"] == "(whole model)" and rows[-1]["tensors"] == len(base)
    everything = [torch.cat([(s[k].double() - base[k].double()).flatten() for k in base]) for s in states]
    whole = float(everything[0] @ everything[1] / (everything[0].norm() * everything[1].norm()))
    assert rows[-1]["task_cos"][0][1] == pytest.approx(whole, abs=1e-6)
    layers = [r["layer"] for r in rows if r["layer"] is not None]
    assert layers == sorted(layers) and "embed" in rows[0]["group"]  # embeddings, blocks in order, the rest
    r = by_group["model.layers.1"]
    names = [k for k in base if k.startswith("model.layers.1.")]
    d = [torch.cat([(s[k].double() - base[k].double()).flatten() for k in names]) for s in states]
    w = [torch.cat([s[k].double().flatten() for k in names]) for s in [base, *states]]
    assert r["layer"] == 1 and r["tensors"] == len(names)
    assert r["task_norms"] == pytest.approx([float(x.norm()) for x in d], rel=1e-6)
    cos = float(d[0] @ d[1] / (d[0].norm() * d[1].norm()))
    assert r["task_cos"][0][1] == pytest.approx(cos, abs=1e-6)
    assert r["omega_deg"][0][1] == pytest.approx(math.degrees(math.acos(cos)), abs=1e-4)
    assert r["weight_cos"][1][2] == pytest.approx(float(w[1] @ w[2] / (w[1].norm() * w[2].norm())), abs=1e-6)


def test_provenance_records_everything(tiny_init, tiny_runs, tmp_path):
    out = api.slerp(tiny_runs[:2], tiny_init, tmp_path / "m", lam=0.4, progress=False)
    prov = json.loads((out / "warp_provenance.json").read_text())
    assert prov["method"] == "slerp" and prov["params"]["lambda"] == 0.4 and prov["params"]["granularity"] == "block"
    assert prov["inputs"]["init"]["path"] == str(tiny_init.resolve())
    assert [m["path"] for m in prov["inputs"]["models"]] == [str(p.resolve()) for p in tiny_runs[:2]]
    assert all(m["hash"].startswith("sha256:") for m in prov["inputs"]["models"])
    assert {"config.json", "tokenizer.json", "README.md"} <= {p.name for p in out.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind


def test_interrupt_mid_write_leaves_nothing(tiny_init, tiny_runs, tmp_path, monkeypatch):
    from mergekit_warp.io import writer

    calls = {"n": 0}
    real = writer.ShardWriter.write

    def flaky(self, name, chunk):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(self, name, chunk)

    monkeypatch.setattr(writer.ShardWriter, "write", flaky)
    with pytest.raises(KeyboardInterrupt):
        api.slerp(tiny_runs[:2], tiny_init, tmp_path / "m", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_overflow_is_reported(tiny_init, tiny_runs, tmp_path):
    from mergekit_warp.errors import WarpError

    with pytest.raises(WarpError, match="overflowed"):
        api.liti(tiny_runs[0], tiny_init, tmp_path / "m", eta=1e7, dtype="fp16", progress=False)
    assert not (tmp_path / "m").exists()


# ---- one read pass: units held in memory, or streamed twice when over the budget -----------------------

HELD_CASES = [
    ("slerp", {"lambda": 0.3}, None),
    ("ties", {"density": 0.4, "weight": 1.0}, None),
    ("dare_ties", {"density": 0.6, "rescale": True, "weight": 1.0}, None),
    ("breadcrumbs_ties", {"density": 0.5, "gamma": 0.1, "weight": 1.0}, None),
    ("model_stock", {}, None),
    ("multislerp", {}, [{"weight": 1.0}, {"weight": 2.0}]),
    ("nuslerp", {"nuslerp_row_wise": True}, [{"weight": 1.0}, {"weight": 2.0}]),
    ("linear", {}, [{"weight": 1.0}, {"weight": 2.0}]),
]


@pytest.mark.parametrize(("method", "params", "per"), HELD_CASES, ids=[c[0] for c in HELD_CASES])
def test_held_and_streamed_units_give_the_same_bytes(tiny_init, tiny_runs, tmp_path, method, params, per):
    """Every unit held in memory (the default budget) against every unit streamed in small chunks with
    the statistics pass read from disk (a 1-byte budget)."""
    base = None if method == "linear" else tiny_init
    runs = {
        name: load_state(
            api.merge(
                method,
                tiny_runs[:2],
                tmp_path / name,
                base=base,
                params=params,
                model_params=per,
                progress=False,
                chunk=64,
                memory_budget=budget,
            )
        )
        for name, budget in (("held", "2GB"), ("streamed", 0))
    }
    assert runs["held"].keys() == runs["streamed"].keys()
    for k, v in runs["held"].items():
        assert torch.equal(v, runs["streamed"][k]), k


def _bytes_read(monkeypatch) -> dict[str, int]:
    """Count the bytes `pread` returns per file name (the reader's only way to the data)."""
    import os

    from mergekit_warp.io import reader

    counts: dict[str, int] = {}
    real = os.preadv
    names: dict[int, str] = {}
    real_open = os.open

    def opened(path, flags, *a):
        fd = real_open(path, flags, *a)
        names[fd] = str(path)
        return fd

    def preadv(fd, buffers, offset):
        n = real(fd, buffers, offset)
        counts[names.get(fd, "?")] = counts.get(names.get(fd, "?"), 0) + n
        return n

    monkeypatch.setattr(reader.os, "preadv", preadv)
    monkeypatch.setattr(reader.os, "open", opened)
    return counts


@pytest.mark.parametrize("budget", ["2GB", "0"])
def test_slerp_reads_every_input_byte_once_when_blocks_fit(tiny_init, tiny_runs, tmp_path, monkeypatch, budget):
    from mergekit_warp.io.reader import CheckpointReader
    from mergekit_warp.io.source import resolve_source

    counts = _bytes_read(monkeypatch)
    api.slerp(tiny_runs[:2], tiny_init, tmp_path / "m", progress=False, memory_budget=budget, chunk=64)
    data = sum(CheckpointReader(resolve_source(p)).total_bytes for p in [tiny_init, *tiny_runs[:2]])
    read = sum(n for f, n in counts.items() if f.endswith(".safetensors"))
    if budget == "0":  # the angle pass and the write pass each read the blocks
        assert read > 1.5 * data
    else:
        assert read == data


def test_memory_budget_must_be_a_size(tiny_init, tiny_runs, tmp_path):
    from mergekit_warp.errors import WarpError

    with pytest.raises(WarpError, match="--memory-budget"):
        api.slerp(tiny_runs[:2], tiny_init, tmp_path / "m", progress=False, memory_budget="lots")
    assert not (tmp_path / "m").exists()


def test_no_method_writes_into_the_inputs_it_holds(tiny_init, tiny_runs, tmp_path, monkeypatch):
    """Held tensors are served as views (fp32 here: `.float()` would not copy): each must still equal
    the file when it is released, for every method."""
    from mergekit_warp.io.reader import CheckpointReader
    from mergekit_warp.merge.methods import REGISTRY

    checked = []
    real = CheckpointReader.release

    def release(self, name):
        held = self.held.get(name)
        if held is not None:
            self.held.pop(name)
            assert torch.equal(held, self.read(name)), f"{name} of {self.source.spec} was modified"
            checked.append(name)
        real(self, name)

    monkeypatch.setattr(CheckpointReader, "release", release)
    params = {"weight": 1.0, "density": 0.5, "epsilon": 0.1, "t": 0.3}
    for name, m in REGISTRY.items():
        keys = {p.name for p in m.params}
        top = {k: v for k, v in params.items() if k in keys}
        base = tiny_init if m.base == "required" else None
        models = tiny_runs[:1] if name == "liti" else tiny_runs[:2]
        if name == "liti":
            base = tiny_init
        api.merge(name, models, tmp_path / name, base=base, params=top, progress=False, chunk=64)
    assert len(checked) > 100
