"""mergekit's YAML on warp's engine: what it accepts and refuses, gradients and filters against a dense
computation, the merge_config.yml written beside merges (it reproduces them bit for bit), and WARM (a
weight-averaged reward model that `warp rl --reward` accepts)."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from tiny import load_state, make_tokenizer, tiny_config
from typer.testing import CliRunner

from mergekit_warp.cli import app
from mergekit_warp.errors import WarpError
from mergekit_warp.merge import api, config_yaml
from mergekit_warp.merge.methods.base import depth, evaluate

runner = CliRunner()


def write(folder: Path, doc: dict, name: str = "merge.yml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def dense_slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Two-model SLERP of full tensors (fp64), LERP when nearly colinear (mergekit's threshold)."""
    x, y = a.double().flatten(), b.double().flatten()
    cos = float(x @ y / (x.norm() * y.norm()))
    if abs(cos) > 0.9995:
        out = (1 - t) * x + t * y
    else:
        om = math.acos(cos)
        out = (math.sin((1 - t) * om) * x + math.sin(t * om) * y) / math.sin(om)
    return out.reshape(a.shape)


def test_settings_follow_mergekit():
    # gradients: linear over depth (block i of n at i/(n−1)); tensors outside the blocks at 0
    assert evaluate([0.0, 1.0], "x", 0.25) == pytest.approx(0.25)
    assert evaluate([0.0, 1.0, 0.0], "x", 0.5) == pytest.approx(1.0)
    assert depth("model.layers.3.mlp.up_proj.weight", 4) == 1.0 and depth("model.layers.0.x", 4) == 0.0
    assert depth("lm_head.weight", 4) == 0.0 and depth("model.embed_tokens.weight", 4) == 0.0
    # filters: the first whose filter is in the tensor name; an entry without filter matches everything
    f = [{"filter": "self_attn", "value": 0.3}, {"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.9}]
    assert evaluate(f, "model.layers.0.self_attn.q_proj.weight", 0.0) == 0.3
    assert evaluate(f, "model.layers.1.mlp.up_proj.weight", 1.0) == 1.0
    assert evaluate(f, "model.norm.weight", 0.0) == 0.9
    assert evaluate([{"filter": "mlp", "value": 1.0}], "model.norm.weight", 0.0) is None


def test_yaml_slerp_with_gradient_and_filter_matches_dense(tiny_init, tiny_runs, tmp_path):
    a, b = tiny_runs[:2]
    t = [{"filter": "self_attn", "value": 0.2}, {"value": [0.0, 1.0]}]
    cfg = write(
        tmp_path,
        {
            "merge_method": "slerp",
            "base_model": str(a),
            "models": [{"model": str(a)}, {"model": str(b)}],
            "parameters": {"t": t},
        },
    )
    out = api.merge_yaml(cfg, tmp_path / "out", progress=False)
    got, sa, sb = load_state(out), load_state(a), load_state(b)
    for k in got:
        tk = evaluate(t, k, depth(k, 2))
        torch.testing.assert_close(got[k].double(), dense_slerp(sa[k], sb[k], tk), atol=2e-6, rtol=1e-5, msg=k)
    assert got["model.layers.0.self_attn.q_proj.weight"].ne(sa["model.layers.0.self_attn.q_proj.weight"]).any()


def test_written_config_reproduces_the_merge_bit_for_bit(tiny_runs, tmp_path):
    out = api.merge("slerp", [str(tiny_runs[0]), str(tiny_runs[1])], tmp_path / "m", params={"t": 0.3}, progress=False)
    doc = yaml.safe_load((out / config_yaml.FILE).read_text())
    assert doc["merge_method"] == "slerp" and doc["base_model"] == str(tiny_runs[0].resolve())
    assert json.loads((out / "warp_provenance.json").read_text())["params"]["mergekit_config"] == config_yaml.FILE
    again = api.merge_yaml(out / config_yaml.FILE, tmp_path / "again", progress=False)
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_output_holding_the_config_is_refused(tiny_runs, tmp_path):
    """The YAML is an input like the models: an -o that contains it (replaced with --force) would delete it."""
    folder = tmp_path / "mine"
    folder.mkdir()
    cfg = folder / "c.yml"
    models = [{"model": str(p), "parameters": {"weight": 1}} for p in tiny_runs[:2]]
    cfg.write_text(yaml.safe_dump({"merge_method": "linear", "models": models}))
    for force in (False, True):
        with pytest.raises(WarpError, match=r"contains the input .*c\.yml"):
            api.merge_yaml(cfg, folder, force=force, progress=False)
    assert sorted(p.name for p in folder.iterdir()) == ["c.yml"]


def test_warp_slerp_writes_no_mergekit_config(tiny_init, tiny_runs, tmp_path):
    """WARP's block-wise SLERP of task vectors has no mergekit equivalent: no merge_config.yml."""
    out = api.slerp(tiny_runs[:2], tiny_init, tmp_path / "w", progress=False)
    assert not (out / config_yaml.FILE).exists()


def _refused(result, out: Path, *needles: str) -> None:
    err = result.stderr.strip()
    assert result.exit_code == 2, result.output
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for n in needles:
        assert n in err, (n, err)
    assert not out.exists() and not list(out.parent.glob(f".{out.name}.*"))


@pytest.mark.parametrize(
    "case",
    [
        "unknown method",
        "unknown key",
        "two slices",
        "partial slice",
        "union tokenizer",
        "modules",
        "lora",
        "no models",
        "bad t",
        "unknown parameter",
        "bad dtype",
    ],
)
def test_unsupported_or_bad_config_is_one_line(case, tiny_runs, tmp_path):
    a, b = (str(p) for p in tiny_runs[:2])
    models = [{"model": a}, {"model": b}]
    doc = {"merge_method": "slerp", "base_model": a, "models": models, "parameters": {"t": 0.5}}
    full = {"sources": [{"model": a, "layer_range": [0, 2]}, {"model": b, "layer_range": [0, 2]}]}
    doc, needles = {
        "unknown method": ({**doc, "merge_method": "frankenmerge"}, ["frankenmerge", "not supported"]),
        "unknown key": ({**doc, "colour": "blue"}, ["colour", "unknown key"]),
        "two slices": ({**{k: v for k, v in doc.items() if k != "models"}, "slices": [full, full]}, ["one full slice"]),
        "partial slice": (
            {
                **{k: v for k, v in doc.items() if k != "models"},
                "slices": [{"sources": [{"model": a, "layer_range": [1, 2]}, {"model": b, "layer_range": [1, 2]}]}],
            },
            ["one full slice"],
        ),
        "union tokenizer": ({**doc, "tokenizer_source": "union"}, ["tokenizer_source", "union"]),
        "modules": ({**doc, "modules": {}}, ["multi-module"]),
        "lora": (
            {**doc, "models": [{"model": a + "+some/adapter"}, {"model": b}]},
            ["BASE+ADAPTER", "check the paths"],
        ),
        "no models": ({k: v for k, v in doc.items() if k != "models"}, ["models"]),
        "bad t": ({**doc, "parameters": {"t": 1.5}}, ["--t", "[0, 1]"]),
        "unknown parameter": ({**doc, "parameters": {"t": 0.5, "tt": 1}}, ["unknown parameter tt"]),
        "bad dtype": ({**doc, "out_dtype": "int8"}, ["int8"]),
    }[case]
    cfg = write(tmp_path, doc)
    out = tmp_path / "out"
    _refused(runner.invoke(app, ["merge", "yaml", str(cfg), "-o", str(out)]), out, *needles)


def test_slices_of_one_full_slice_equal_models(tiny_runs, tmp_path):
    a, b = (str(p) for p in tiny_runs[:2])
    full = {"sources": [{"model": a, "layer_range": [0, 2]}, {"model": b, "layer_range": [0, 2]}]}
    one = api.merge_yaml(
        write(tmp_path, {"merge_method": "slerp", "base_model": a, "slices": [full], "parameters": {"t": 0.4}}),
        tmp_path / "s",
        progress=False,
    )
    two = api.merge("slerp", [a, b], tmp_path / "m", params={"t": 0.4}, progress=False)
    assert (one / "model.safetensors").read_bytes() == (two / "model.safetensors").read_bytes()


# --- WARM: weight-averaged reward models ----------------------------------------------------------------


def _reward_model(folder: Path, seed: int) -> Path:
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(seed)
    tok = make_tokenizer()
    cfg = tiny_config(len(tok))
    cfg.num_labels = 1
    LlamaForSequenceClassification(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_warm_average_of_reward_models_is_a_reward_model(tmp_path):
    """`warp merge lerp RM1 RM2 RM3 -o WARM`: every tensor (the `score` head included) is the mean, the
    result loads as a 1-label classifier, and `warp rl --reward WARM` trains against it."""
    rms = [_reward_model(tmp_path / f"rm{i}", seed=i) for i in range(3)]
    r = runner.invoke(app, ["merge", "lerp", *map(str, rms), "-o", str(tmp_path / "warm"), "-q"])
    assert r.exit_code == 0, r.output
    warm, states = load_state(tmp_path / "warm"), [load_state(p) for p in rms]
    assert "score.weight" in warm
    for k in warm:
        torch.testing.assert_close(warm[k], sum(s[k] for s in states) / 3, atol=1e-6, rtol=1e-5, msg=k)
    from transformers import AutoModelForSequenceClassification

    assert AutoModelForSequenceClassification.from_pretrained(tmp_path / "warm").config.num_labels == 1

    from tiny import make_tiny_llama

    policy = make_tiny_llama(tmp_path / "policy", seed=5)
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": w}) + "\n" for w in ("the cat", "a good day")))
    r = runner.invoke(
        app,
        [
            "rl",
            "--model",
            str(policy),
            "--prompts",
            str(tmp_path / "p.jsonl"),
            "--reward",
            str(tmp_path / "warm"),
            "-o",
            str(tmp_path / "rl"),
            "--steps",
            "1",
            "--batch-size",
            "2",
            "--max-new-tokens",
            "4",
            "--lr",
            "1e-3",
            "--warmup",
            "0",
            "--no-progress",
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1


MERGEKIT = os.environ.get("MERGEKIT_YAML") or shutil.which("mergekit-yaml")


@pytest.mark.skipif(
    MERGEKIT is None, reason="mergekit-yaml not found (set MERGEKIT_YAML); a comparison, not a dependency"
)
def test_same_output_as_mergekit(tiny_runs, tmp_path):
    import subprocess

    exe = MERGEKIT
    a, b = (str(p) for p in tiny_runs[:2])
    cfg = write(
        tmp_path,
        {
            "merge_method": "slerp",
            "base_model": a,
            "models": [{"model": a}, {"model": b}],
            "parameters": {"t": [{"filter": "mlp", "value": 0.7}, {"value": [0.0, 1.0]}]},
            "dtype": "float32",
        },
    )
    subprocess.run([exe, str(cfg), str(tmp_path / "mk")], check=True, capture_output=True)
    ours, theirs = load_state(api.merge_yaml(cfg, tmp_path / "ours", progress=False)), load_state(tmp_path / "mk")
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], atol=1e-6, rtol=1e-6, msg=k)
