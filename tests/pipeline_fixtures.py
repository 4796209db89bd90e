"""Shared fixtures of the pipeline/eval tests: a tiny init, word-level prompts, a 2×2 pipeline config
and one uninterrupted reference run (session-scoped: built once, reused by every test module)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml
from tiny import WORDS, make_tiny_llama

TOY_REWARD = str(Path(__file__).with_name("pipeline_toy_reward.py"))
# Tiny but real: 3 RL steps of 4 prompts × 2 samples, 6 new tokens; state saved every step so a
# killed run resumes mid-run.
RL = {
    "steps": 3,
    "batch_size": 4,
    "samples_per_prompt": 2,
    "max_new_tokens": 6,
    "lr": 0.01,
    "warmup": 0,
    "state_every": 1,
    "beta": 0.1,
    "mu": 0.1,
}


def write_config(folder: Path, init: Path, name: str = "cfg.yaml", **overrides) -> Path:
    """A pipeline YAML in `folder` (prompts written beside it); `overrides` replace top-level keys."""
    folder.mkdir(parents=True, exist_ok=True)
    r = random.Random(0)
    for fname, n in (("train.jsonl", 12), ("heldout.jsonl", 8)):
        with open(folder / fname, "w") as f:
            for _ in range(n):
                f.write(json.dumps({"prompt": " ".join(r.choice(WORDS) for _ in range(4))}) + "\n")
    cfg = {
        "init": str(init),
        "prompts": {"train": "train.jsonl", "heldout": "heldout.jsonl"},
        "reward": f"{TOY_REWARD}:reward",
        "iterations": 2,
        "runs": 2,
        "seed": 7,
        "rl": dict(RL),
        "slerp": {"lam": 0.5, "granularity": "block"},
        "liti": {"eta": 0.3, "target": "init"},
        "eval": {"samples_per_prompt": 2, "etas": [0.0, 0.5, 1.0], "max_new_tokens": 6},
    }
    cfg.update(overrides)
    path = folder / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def pipe_init(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("pipe_init") / "sft", seed=3)


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, pipe_init) -> Path:
    """A complete, uninterrupted 2-iteration × 2-run pipeline with its Pareto evaluation, keeping every
    checkpoint (the tests read them)."""
    from mergekit_warp.pipeline.run import run_pipeline

    base = tmp_path_factory.mktemp("pipe_ref")
    cfg = write_config(base, pipe_init, keep=["policy", "merges"])
    run_pipeline(cfg, base / "run", progress=False)
    return base / "run"
