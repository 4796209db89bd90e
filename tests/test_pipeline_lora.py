"""All of WARP on LoRA adapters: `rl: {lora: …}` trains adapters, SLERP merges them exactly, LITI
writes the next init as a full model and keeps the policy as one stacked adapter of θ_sft."""

from __future__ import annotations

import json

import pytest
import torch
from pipeline_fixtures import RL, pipe_init, write_config  # noqa: F401  (fixture)
from tiny import load_state

from mergekit_warp.errors import WarpError
from mergekit_warp.io.adapter import is_adapter, read_adapter
from mergekit_warp.pipeline.config import load_config
from mergekit_warp.pipeline.run import run_pipeline

LORA = {"r": 2, "targets": ["lm_head", "o_proj", "down_proj"], "anchor": "exact"}


@pytest.mark.slow
@pytest.mark.parametrize(("target", "keep"), [("init", ["policy", "merges"]), ("sft", [])])
def test_two_by_two_on_adapters(target, keep, pipe_init, tmp_path):
    """keep: [] deletes the adapters and merges once evaluated, as for full models."""
    cfg = write_config(
        tmp_path, pipe_init, rl={**RL, "lr": 0.03, "lora": LORA}, liti={"eta": 0.5, "target": target}, keep=keep
    )
    res = run_pipeline(cfg, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    for i in (1, 2):
        assert all(is_adapter(run / f"iter_{i}" / f"run_{m}") for m in (1, 2))
        if keep:
            assert read_adapter(run / f"iter_{i}" / "slerp").ranks == {4}  # the exact SLERP of two rank-2 adapters
        else:
            assert not (run / f"iter_{i}" / "slerp" / "adapter_model.safetensors").exists()
    final, sft = load_state(res.final), load_state(pipe_init)
    assert set(final) == set(sft) and not is_adapter(res.final)
    # final/adapter/ is θ_final − θ_sft, one adapter of rank 2 iterations × 2 runs × 2
    stack = read_adapter(res.final / "adapter")
    assert stack.ranks == {8}
    moved = 0.0
    for k, v in sft.items():
        d = stack.modules[k].dense() if k in stack.modules else torch.zeros_like(v)
        torch.testing.assert_close(final[k] - v, d, rtol=0, atol=1e-5)
        moved = max(moved, float(d.abs().max()))
    assert moved > 1e-3
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pipe_init), res.final / "adapter")
    ids = torch.tensor([[2, 5, 6, 7]])
    want = AutoModelForCausalLM.from_pretrained(res.final)(input_ids=ids).logits
    torch.testing.assert_close(peft(input_ids=ids).logits, want, rtol=0, atol=1e-4)
    # the Pareto evaluation scored the adapters (on their base) and the LITI sweep
    import csv

    rows = list(csv.DictReader((run / "eval" / "pareto.csv").read_text().splitlines()))
    assert {"rl", "liti"} <= {r["kind"] for r in rows}, rows[0]
    # a resumed finished run redoes nothing
    before = (run / "run.json").read_text()
    run_pipeline(cfg, tmp_path / "run", resume=True, progress=False)
    assert json.loads((run / "run.json").read_text())["steps"] == json.loads(before)["steps"]


def test_lora_section_is_checked(pipe_init, tmp_path):
    cfg = load_config(write_config(tmp_path, pipe_init, rl={**RL, "lora": {"r": 4, "alpha": 8}}))
    assert cfg.lora and cfg.rl["lora_r"] == 4 and cfg.rl["lora_alpha"] == 8
    for bad, msg in (({"rank": 4}, "lora.rank: unknown key"), (7, "must be a mapping")):
        with pytest.raises(WarpError, match=msg):
            load_config(write_config(tmp_path, pipe_init, rl={**RL, "lora": bad}))


def test_lora_targets_are_checked_before_the_run_folder_exists(pipe_init, tmp_path):
    cfg = write_config(tmp_path, pipe_init, rl={**RL, "lora": {"r": 2, "targets": "nothing"}})
    with pytest.raises(WarpError, match="--lora-targets nothing: no linear layer"):
        run_pipeline(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
