"""Checkpoint I/O: source resolution (folders, files, hub ids through a local HF cache), the lazy
reader's header checks and ranged reads, and the streaming shard writer."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import load_state, perturb

from mergekit_warp.errors import WarpError
from mergekit_warp.io.reader import CheckpointReader, read_header
from mergekit_warp.io.source import resolve_source
from mergekit_warp.io.writer import OutTensor, ShardWriter, parse_size, plan_shards
from mergekit_warp.merge import api

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(cache: Path, repo_id: str, src: Path, commit: str = COMMIT, extra: dict | None = None) -> Path:
    """Lay out `src` in the HF cache format (refs/main → snapshots/<commit>/files) under `cache`."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for f in src.iterdir():
        shutil.copy(f, snap / f.name)
    for name, data in (extra or {}).items():
        (snap / name).write_bytes(data)
    return snap


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    import huggingface_hub.constants as hf

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_ids_resolve_through_the_local_cache(tiny_init, tiny_runs, tmp_path, offline_cache):
    cache_repo(offline_cache, "warp-test/init", tiny_init)
    cache_repo(offline_cache, "warp-test/run0", tiny_runs[0])
    cache_repo(offline_cache, "warp-test/run1", tiny_runs[1], commit="f" * 40)
    src = resolve_source("warp-test/init")
    assert src.folder is not None and src.folder.name == COMMIT and src.files[0].name == "model.safetensors"
    out = api.slerp(["warp-test/run0", "warp-test/run1"], "warp-test/init", tmp_path / "m", progress=False)
    local = api.slerp(tiny_runs[:2], tiny_init, tmp_path / "l", progress=False)
    a, b = load_state(out), load_state(local)
    assert all(torch.equal(a[k], b[k]) for k in b)
    prov = json.loads((out / "warp_provenance.json").read_text())
    assert prov["params"]["init_as_given"] == "warp-test/init"
    assert COMMIT in prov["inputs"]["init"]["path"]
    assert (out / "tokenizer.json").exists()  # support files came from the snapshot


def test_hub_revision_and_missing_revision(tiny_init, offline_cache):
    cache_repo(offline_cache, "warp-test/init", tiny_init)
    assert resolve_source("warp-test/init", revision=COMMIT).revision == COMMIT
    with pytest.raises(WarpError, match=r"warp-test/init.*v9"):
        resolve_source("warp-test/init", revision="v9")


def test_hub_repo_with_only_pickle_weights(tiny_init, offline_cache):
    snap = cache_repo(offline_cache, "warp-test/old", tiny_init)
    (snap / "model.safetensors").unlink()
    (snap / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(WarpError, match=r"no safetensors weights.*pickle"):
        resolve_source("warp-test/old")


def test_sources(tiny_init, tmp_path):
    single = resolve_source(tiny_init / "model.safetensors")
    assert single.folder is None and single.files == (tiny_init / "model.safetensors",)
    # a sharded folder whose index went missing: the HF shard names still give the order
    shutil.copytree(tiny_init, tmp_path / "s", ignore=shutil.ignore_patterns("*.safetensors"))
    sd = load_file(tiny_init / "model.safetensors")
    keys = list(sd)
    for i in range(2):
        save_file({k: sd[k] for k in keys[i::2]}, tmp_path / "s" / f"model-0000{i + 1}-of-00002.safetensors")
    src = resolve_source(tmp_path / "s")
    assert [f.name for f in src.files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert set(CheckpointReader(src).names) == set(keys)
    (tmp_path / "s" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {keys[0]: "model-00003-of-00003.safetensors"}})
    )
    with pytest.raises(WarpError, match="model-00003-of-00003"):
        resolve_source(tmp_path / "s")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool])
def test_reader_ranges_match_the_tensor(tmp_path, dtype):
    t = (torch.randn(7, 11) * 5).to(dtype)
    save_file({"a": torch.zeros(3), "t": t, "s": torch.tensor(2.5)}, tmp_path / "x.safetensors")
    with CheckpointReader(resolve_source(tmp_path / "x.safetensors")) as r:
        assert r.infos["t"].shape == (7, 11) and r.infos["t"].dtype == dtype
        assert torch.equal(r.read("t").reshape(7, 11), t)
        assert torch.equal(r.read("t", 13, 40), t.flatten()[13:40])
        assert r.read("s").item() == 2.5 and r.infos["s"].shape == ()


def test_header_checks_name_the_file(tmp_path):
    save_file({"w": torch.randn(100)}, tmp_path / "ok.safetensors")
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "short.safetensors").write_bytes(data[:-10])
    (tmp_path / "tiny.safetensors").write_bytes(data[:5])
    (tmp_path / "huge.safetensors").write_bytes((10**9).to_bytes(8, "little") + data[8:])
    for name in ("short", "tiny", "huge"):
        with pytest.raises(WarpError, match=f"{name}.safetensors: truncated or corrupt"):
            read_header(tmp_path / f"{name}.safetensors")


def test_shard_plan_naming_and_roundtrip(tmp_path):
    tensors = {f"t{i}": torch.randn(10 * (i + 1)) for i in range(5)}
    layout = [OutTensor(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    assert [len(s) for s in plan_shards(layout, 250)] == [3, 1, 1]  # 40+80+120 | 160 | 200 bytes
    assert [len(s) for s in plan_shards(layout, 10)] == [1, 1, 1, 1, 1]  # oversize tensors: one each
    w = ShardWriter(tmp_path, layout, 250)
    for k, v in tensors.items():
        for start in range(0, v.numel(), 7):  # arbitrary chunking
            w.write(k, v[start : start + 7])
    w.close()
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == [
        f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)
    ]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in tensors.values())
    got = load_state(tmp_path)
    assert all(torch.equal(got[k], v) for k, v in tensors.items())
    (tmp_path / "again").mkdir()
    with pytest.raises(RuntimeError):
        ShardWriter(tmp_path / "again", layout, 250).write("t3", tensors["t3"])  # out of order


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MB") == 5 * 10**8
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5 gb") == 15 * 10**8
    assert parse_size(1234) == 1234
    for bad in ("lots", "-1GB", "0"):
        with pytest.raises(WarpError, match="max-shard-size"):
            parse_size(bad)


def test_mixed_dtypes_are_reported(tiny_init, tmp_path):
    half = tmp_path / "half"
    shutil.copytree(tiny_init, half)
    sd = load_file(half / "model.safetensors")
    save_file({k: v.bfloat16() for k, v in sd.items()}, half / "model.safetensors", metadata={"format": "pt"})
    other = perturb(tiny_init, tmp_path / "other", seed=3)
    out = api.slerp([half, other], tiny_init, tmp_path / "m", progress=False)
    notes = json.loads((out / "warp_provenance.json").read_text())["notes"]
    assert any("dtypes differ" in n and "BF16" in n for n in notes)
    assert all(v.dtype == torch.float32 for v in load_state(out).values())  # the init's dtype
