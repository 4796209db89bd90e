"""`warp rl --rollout vllm`: a vLLM engine in the trainer's process samples, the policy's weights are
pushed into it after every step. Runs where vLLM is installed (marked `vllm`); the error without it runs
everywhere. vLLM's CPU attention needs heads of 32 or more: the tiny model here has width 64, 2 heads."""

import json
import os

import pytest
import torch
from test_rl_train import TOY, WORDS, one_thread  # noqa: F401  (fixture)
from test_rl_train import cfg as rl_cfg
from tiny import load_state, make_tiny_llama
from typer.testing import CliRunner

from mergekit_warp.cli import app
from mergekit_warp.rl.config import RLConfig


def need_vllm() -> None:
    """Skip without vLLM, except where scripts/vllm_cpu.sh runs the tests: a broken install fails there."""
    if os.environ.get("WARP_REQUIRE_VLLM"):
        import vllm  # noqa: F401
    else:
        pytest.importorskip("vllm")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("vllm")
    (d / "toy.py").write_text(TOY)
    (d / "p.jsonl").write_text("".join(json.dumps({"prompt": w}) + "\n" for w in WORDS))
    make_tiny_llama(d / "m", seed=0, head_dim=32)
    return d


def cfg(files, out, **kw) -> RLConfig:
    """test_rl_train's toy run, on the width-64 model, sampled by vLLM."""
    return rl_cfg(files / "m", files, out, **{"steps": 3, "rollout": "vllm", **kw})


def test_without_vllm_one_line_and_nothing_written(files, tmp_path):
    try:
        import vllm  # noqa: F401

        pytest.skip("vLLM is installed here")
    except ImportError:
        pass
    args = ["rl", "--model", str(files / "m"), "--prompts", str(files / "p.jsonl"), "--reward", "sentiment"]
    for more in ([], ["--nproc", "2", "--batch-size", "4"]):  # several processes: refused before launching them
        res = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "o"), "--rollout", "vllm", "-q", *more])
        assert res.exit_code == 2 and "needs vLLM" in res.output and "pip install" in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1, res.output
        assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


@pytest.mark.vllm
@pytest.mark.parametrize("compiled", ["off", "on"])
def test_engine_greedy_equals_the_builtin_sampler_before_and_after_a_push(files, tmp_path, compiled):
    """Eager and compiled (torch.compile: the push must reach the tensors the compiled graph reads)."""
    need_vllm()
    from mergekit_warp.lm.models import load_model, load_tokenizer
    from mergekit_warp.lm.sampling import generate, sequence_logprobs
    from mergekit_warp.lm.vllm_engine import Engine

    tok = load_tokenizer(files / "m")
    prompts = ["the cat is", "i love this movie", "hello", "what a day"]
    engine = Engine(
        files / "m", dtype=torch.float32, device="cpu", seed=0, max_len=128, gpu_memory_utilization=0.3, sleep=False,
        compiled=compiled,
    )  # fmt: skip
    other = make_tiny_llama(tmp_path / "other", seed=7, head_dim=32)
    same = dict(max_new_tokens=8, top_p=1.0, max_prompt_length=None, device="cpu")
    for folder, push in ((files / "m", False), (other, True)):
        model = load_model(folder)
        if push:
            secs = engine.push(dict(model.state_dict()))
            assert secs >= 0
        want = generate(model, tok, prompts, max_new_tokens=8, temperature=1.0, top_k=1, generator_seed=0)
        got = engine.sample(tok, prompts, seeds=[0] * 4, temperature=1.0, top_k=1, **same)
        assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.completion_mask, want.completion_mask)
        assert got.completions == want.completions
        # sampled (no top-k): vLLM's log-probs of its own draws are the model's at the temperature
        drawn = engine.sample(tok, prompts, seeds=[1, 2, 3, 4], temperature=0.9, top_k=0, **same)
        lp = sequence_logprobs(model, drawn.input_ids, drawn.attention_mask, drawn.completion_mask, 0.9)
        torch.testing.assert_close(drawn.logprobs, lp, rtol=0, atol=1e-3)


@pytest.mark.vllm
def test_stop_strings_end_completions_as_the_builtin_sampler_does(files, tmp_path):
    """Greedy with stop strings: the same tokens (the one completing the stop string kept and unmasked), the
    same texts cut after the string; a run with --stop and --rollout vllm trains."""
    need_vllm()
    from mergekit_warp.lm.models import load_model, load_tokenizer
    from mergekit_warp.lm.sampling import generate
    from mergekit_warp.lm.vllm_engine import Engine
    from mergekit_warp.rl.train import train

    tok, model = load_tokenizer(files / "m"), load_model(files / "m")
    prompts = ["the cat is", "i love this movie", "hello", "what a day"]
    free = generate(model, tok, prompts, max_new_tokens=8, temperature=1.0, top_k=1, generator_seed=0)
    words = max(free.completions, key=len).split()
    stop = [words[2], " ".join(words[:2]) + "x"]  # the second one never matches
    want = generate(model, tok, prompts, max_new_tokens=8, temperature=1.0, top_k=1, generator_seed=0, stop=stop)
    assert want.completion_mask.sum() < free.completion_mask.sum()  # the stop strings cut something
    engine = Engine(
        files / "m", dtype=torch.float32, device="cpu", seed=0, max_len=128, gpu_memory_utilization=0.3, sleep=False
    )
    got = engine.sample(
        tok, prompts, seeds=[0] * 4, max_new_tokens=8, temperature=1.0, top_p=1.0, top_k=1,
        max_prompt_length=None, device="cpu", stop=stop,
    )  # fmt: skip
    engine.close()
    assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.completion_mask, want.completion_mask)
    assert got.completions == want.completions
    out = train(cfg(files, tmp_path / "o", steps=2, stop=stop))
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2


@pytest.mark.vllm
def test_a_push_does_not_leave_stale_prefix_cache(tmp_path):
    """Prompts longer than a KV block (128 tokens on CPU) are prefix-cached: after a push they must be
    recomputed with the new weights, not served from the cache of the old ones."""
    need_vllm()
    from mergekit_warp.lm.models import load_model, load_tokenizer
    from mergekit_warp.lm.sampling import sequence_logprobs
    from mergekit_warp.lm.vllm_engine import Engine

    folders = []
    for name, seed in (("a", 0), ("b", 7)):
        folder = make_tiny_llama(tmp_path / name, seed=seed, head_dim=32)
        conf = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**conf, "max_position_embeddings": 1024}))
        folders.append(folder)
    tok = load_tokenizer(folders[0])
    long = " ".join(WORDS * 16)  # ~290 tokens
    engine = Engine(
        folders[0], dtype=torch.float32, device="cpu", seed=0, max_len=512, gpu_memory_utilization=0.3, sleep=False
    )
    same = dict(seeds=[1, 2], max_new_tokens=6, temperature=1.0, top_p=1.0, top_k=0, max_prompt_length=None)
    engine.sample(tok, [long, long], device="cpu", **same)  # fills the prefix cache with the first weights
    model = load_model(folders[1])
    engine.push(dict(model.state_dict()))
    r = engine.sample(tok, [long, long], device="cpu", **same)
    lp = sequence_logprobs(model, r.input_ids, r.attention_mask, r.completion_mask, 1.0)
    assert float(((r.logprobs - lp.detach()).abs() / r.lengths).max()) < 1e-4
    engine.close()


@pytest.mark.vllm
def test_rl_with_vllm_learns_and_its_log_probs_match_the_trainer(files, tmp_path):
    need_vllm()
    from mergekit_warp.rl.train import train

    out = train(cfg(files, tmp_path / "o", steps=12, beta=0.01, seed=1))
    m = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(x["reward"] for x in m[-3:]) / 3 > sum(x["reward"] for x in m[:3]) / 3
    assert all(x["vllm_logprob_gap"] < 1e-3 for x in m)  # fp32 engine: on-policy up to rounding
    assert all(x["vllm_push_time"] >= 0 and x["entropy"] is None for x in m)
    assert set(load_state(out)) == set(load_state(files / "m"))


@pytest.mark.vllm
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_each_with_an_engine_give_the_one_process_run(files, tmp_path, parallel):
    """Under torchrun each rank's engine samples its share, row j of a step with seed (seed, step, j):
    the same completions as one process, so the same rewards and (up to rounding) the same policy. Under
    FSDP each rank gathers the whole model for its engine."""
    need_vllm()
    from mergekit_warp.rl import launch
    from mergekit_warp.rl.train import train

    kw = dict(steps=3, beta=0.01, seed=1)
    one = train(cfg(files, tmp_path / "one", **kw))
    two_cfg = cfg(files, tmp_path / "two", parallel=parallel, **kw)
    two = launch.train_on_group(two_cfg, ["cpu", "cpu"], log=tmp_path / "log")
    m1, m2 = ([json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()] for r in (one, two))
    assert [x["reward"] for x in m2] == pytest.approx([x["reward"] for x in m1], abs=1e-6)
    assert all(x["vllm_logprob_gap"] < 1e-3 for x in m2)
    a, b = load_state(one), load_state(two)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-4


@pytest.mark.vllm
def test_a_configuration_vllm_cannot_run_is_one_line(tmp_path, files):
    need_vllm()
    from mergekit_warp.errors import WarpError
    from mergekit_warp.rl.train import train

    narrow = make_tiny_llama(tmp_path / "narrow", seed=0)  # heads of 8: vLLM's CPU attention refuses them
    with pytest.raises(WarpError, match="vLLM"):
        train(cfg(files, tmp_path / "o", model=str(narrow), steps=1))
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


@pytest.mark.vllm
def test_a_kv_cache_setting_that_cannot_fit_is_one_line(tmp_path, files, monkeypatch):
    """Too small for one request (the longest prompt + --max-new-tokens), or more than the machine has free:
    one line naming the setting and what to change, exit 2, nothing written. The option wins over vLLM's
    own VLLM_CPU_KVCACHE_SPACE (which alone would have room)."""
    need_vllm()
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    args = ["rl", "--model", str(files / "m"), "--prompts", str(files / "p.jsonl"), "--reward", "sentiment"]
    args += ["--rollout", "vllm", "--max-new-tokens", "64", "-q", "-o", str(tmp_path / "o")]
    for gb, says in (("0.0001", "cannot hold one request of"), ("100000", "does not fit in this machine's free")):
        res = CliRunner().invoke(app, [*args, "--vllm-kv-cache-gb", gb])
        assert res.exit_code == 2, res.output
        line = res.output.strip().splitlines()[-1]
        assert says in line and f"--vllm-kv-cache-gb {float(gb):g}" in line, res.output
        assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


@pytest.mark.vllm
def test_a_lora_run_pushes_the_merged_weights_and_runs_repeat(files, tmp_path):
    """The engine samples the base with the adapter added (the gap stays at rounding), and the same
    command gives the same run."""
    need_vllm()
    from mergekit_warp.rl.train import train

    kw = dict(steps=4, lora_r=4, lora_targets=["lm_head", "o_proj", "down_proj"], lr=3e-2, beta=0.01)
    runs = [train(cfg(files, tmp_path / f"o{i}", **kw)) for i in (1, 2)]
    m1, m2 = ([json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()] for r in runs)
    assert all(x["vllm_logprob_gap"] < 1e-3 for x in m1) and m1[-1]["kl_init"] > 1e-3  # it moved
    assert [x["reward"] for x in m1] == [x["reward"] for x in m2]
    assert [x["loss"] for x in m1] == [x["loss"] for x in m2]


@pytest.mark.vllm
def test_pipeline_with_vllm_rollouts(files, tmp_path):
    """`rl: {rollout: vllm}`: each RL run of the pipeline samples with its own engine (closed at its end)."""
    need_vllm()
    from pipeline_fixtures import RL, write_config

    from mergekit_warp.pipeline.run import run_pipeline

    cfg = write_config(tmp_path, files / "m", rl={**RL, "rollout": "vllm"}, iterations=1)
    res = run_pipeline(cfg, tmp_path / "run", progress=False)
    assert (res.final / "model.safetensors").is_file() and res.summary
    for m in (1, 2):
        lines = (tmp_path / "run" / "iter_1" / f"run_{m}" / "metrics.jsonl").read_text().splitlines()
        assert all(json.loads(x)["vllm_logprob_gap"] < 1e-3 for x in lines)
