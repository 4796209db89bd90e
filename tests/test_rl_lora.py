"""`warp rl --lora-r`: the adapter trains on the frozen base, its anchor is an EMA of the factors or
(exactly) of the dense deltas, the outputs are peft adapters that WARP's merges take."""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_rl_train import cfg, files, metrics, one_thread  # noqa: F401  (fixtures)
from tiny import load_state, make_tiny_llama
from typer.testing import CliRunner

from mergekit_warp.cli import app
from mergekit_warp.errors import WarpError
from mergekit_warp.io.adapter import read_adapter
from mergekit_warp.rl.train import train

# The tiny model's output moves mostly through its head: the adapter targets it and two other layers.
TARGETS = ["lm_head", "o_proj", "down_proj"]


def lcfg(init, files, out, **kw):
    return cfg(init, files, out, **{"lora_r": 4, "lora_targets": TARGETS, "lr": 3e-2, **kw})


def deltas(folder) -> dict[str, torch.Tensor]:
    """Dense s·B·A per base tensor of an adapter folder (warp folds s into B)."""
    return {n: f.dense() for n, f in read_adapter(folder).modules.items()}


def ema_by_hand(steps: list[dict[str, torch.Tensor]], mu: float) -> dict[str, torch.Tensor]:
    out = {k: torch.zeros_like(v) for k, v in steps[0].items()}
    for d in steps:
        out = {k: (1 - mu) * out[k] + mu * d[k] for k in out}
    return out


@pytest.fixture(scope="module")
def exact(tiny_init, files, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "exact"
    return train(lcfg(tiny_init, files, out, steps=4, mu=0.3, lora_anchor="exact", save_every=1, merge_adapter=True))


def test_learns_toy_reward_with_an_adapter(tiny_init, files, tmp_path):
    out = train(lcfg(tiny_init, files, tmp_path / "o", steps=25, beta=0.01, seed=1))
    m = metrics(out)
    assert sum(x["reward"] for x in m[-5:]) / 5 > sum(x["reward"] for x in m[:5]) / 5 + 0.3
    ad = read_adapter(out)
    assert sorted(ad.modules) == sorted(
        [f"model.layers.{i}.{p}.weight" for i in range(2) for p in ("self_attn.o_proj", "mlp.down_proj")]
        + ["lm_head.weight"]
    )
    assert ad.ranks == {4} and (out / "tokenizer.json").is_file() and not (out / "config.json").exists()
    prov = json.loads((out / "warp_provenance.json").read_text())
    assert prov["params"]["lora_r"] == 4 and set(prov["params"]["base_sample"]) <= set(ad.modules)


def test_outputs_load_in_peft_and_merged_equals_base_plus_delta(exact, tiny_init):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, merged, d = load_state(tiny_init), load_state(exact / "merged"), deltas(exact)
    assert set(merged) == set(base) and max(v.abs().max() for v in d.values()) > 1e-3  # it trained
    for k, v in base.items():
        torch.testing.assert_close(merged[k], v + d.get(k, 0), rtol=0, atol=1e-6)
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_init), exact).merge_and_unload()
    for k, v in peft.state_dict().items():
        torch.testing.assert_close(v, merged[k], rtol=0, atol=1e-6)
    ids = torch.tensor([[2, 5, 6, 7]])
    model = AutoModelForCausalLM.from_pretrained(exact / "merged")
    torch.testing.assert_close(model(input_ids=ids).logits, peft(input_ids=ids).logits, rtol=0, atol=1e-5)


def test_exact_anchor_is_the_dense_ema(exact, tiny_init):
    """anchor/ (a full model: the exact EMA has full rank) = base + EMA of the policy's deltas over the
    4 steps, by hand from the per-step checkpoints."""
    steps = [deltas(exact / "checkpoints" / f"step_{t}") for t in range(1, 5)]
    assert torch.equal(steps[-1]["lm_head.weight"], deltas(exact)["lm_head.weight"])
    want, base, anchor = ema_by_hand(steps, 0.3), load_state(tiny_init), load_state(exact / "anchor")
    for k, v in base.items():
        torch.testing.assert_close(anchor[k] - v, want.get(k, torch.zeros_like(v)), rtol=0, atol=1e-6)
    m = metrics(exact)
    assert all(x["kl_anchor"] != x["kl_init"] for x in m[1:])  # the anchor is neither the init nor the policy


def test_factors_anchor_is_the_ema_of_the_factors(tiny_init, files, tmp_path):
    out = train(lcfg(tiny_init, files, tmp_path / "o", steps=3, mu=0.4, save_every=1))
    steps = [read_adapter(out / "checkpoints" / f"step_{t}").modules for t in range(1, 4)]
    init = {n: (torch.zeros_like(f.B), f.A) for n, f in steps[0].items()}  # B starts at 0, A does not move in step 1
    anchor = read_adapter(out / "anchor").modules
    for n, (b, a) in init.items():
        for t in steps:
            b, a = 0.6 * b + 0.4 * t[n].B, 0.6 * a + 0.4 * t[n].A
        torch.testing.assert_close(anchor[n].B, b, rtol=0, atol=1e-6)
        torch.testing.assert_close(anchor[n].A, a, rtol=0, atol=1e-6)
    # …which is not the EMA of the products (the approximation the exact anchor avoids)
    n = "lm_head.weight"
    dense = ema_by_hand([{n: t[n].dense()} for t in steps], 0.4)[n]
    assert (anchor[n].dense() - dense).norm() > 1e-3 * dense.norm()


@pytest.mark.parametrize("kind", ["factors", "exact"])
def test_mu_one_anchor_is_the_policy(kind, tiny_init, files, tmp_path):
    out = train(lcfg(tiny_init, files, tmp_path / "o", steps=2, mu=1.0, lora_anchor=kind))
    pol = deltas(out)
    if kind == "factors":
        ad, anc = read_adapter(out).modules, read_adapter(out / "anchor").modules
        assert all(torch.equal(ad[n].A, anc[n].A) and torch.equal(ad[n].B, anc[n].B) for n in ad)
    else:
        base, anchor = load_state(tiny_init), load_state(out / "anchor")
        for n, d in pol.items():
            torch.testing.assert_close(anchor[n] - base[n], d, rtol=0, atol=1e-6)
    assert max(v.abs().max() for v in pol.values()) > 1e-3


def test_anchor_init_and_bf16_base(tiny_init, files, tmp_path):
    """--anchor init: no EMA, no anchor/; a bf16 base stays bf16 and frozen, the adapter trains in fp32."""
    out = train(lcfg(tiny_init, files, tmp_path / "o", steps=2, anchor="init", dtype="bf16", grad_checkpointing=True))
    assert not (out / "anchor").exists()
    assert all(m["kl_anchor"] == pytest.approx(m["kl_init"]) for m in metrics(out))
    raw = load_file(out / "adapter_model.safetensors")
    assert {v.dtype for v in raw.values()} == {torch.float32}
    assert max(v.abs().max() for k, v in raw.items() if "lora_B" in k) > 0


def test_resume_after_a_kill_is_bit_identical(tiny_init, files, tmp_path, monkeypatch):
    kw = dict(steps=5, state_every=2, save_every=2, seed=4, lora_anchor="exact")
    full = train(lcfg(tiny_init, files, tmp_path / "full", **kw))
    out = tmp_path / "cut"
    monkeypatch.setenv("WARP_TEST_FAIL_AT", "4")  # the reward dies in step 4: the state of step 2 is kept
    with pytest.raises(WarpError, match="resumable state of step 2"):
        train(lcfg(tiny_init, files, out, **kw))
    with pytest.raises(WarpError, match="--lora-anchor differ"):
        train(lcfg(tiny_init, files, out, resume=True, **{**kw, "lora_anchor": "factors"}))
    monkeypatch.delenv("WARP_TEST_FAIL_AT")
    train(lcfg(tiny_init, files, out, resume=True, **kw))
    for sub in ("", "checkpoints/step_2", "checkpoints/step_4"):
        a, b = load_file(full / sub / "adapter_model.safetensors"), load_file(out / sub / "adapter_model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), sub
    a, b = load_state(full / "anchor"), load_state(out / "anchor")
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda ms: [{k: v for k, v in m.items() if "time" not in k and "per_s" not in k} for m in ms]  # noqa: E731
    assert strip(metrics(full)) == strip(metrics(out))


def test_runs_merge_as_adapters_and_refuse_another_base(exact, tiny_init, files, tmp_path):
    other = train(lcfg(tiny_init, files, tmp_path / "other", steps=2, seed=9))
    res = CliRunner().invoke(
        app, ["merge", "slerp", str(exact), str(other), "--init", str(tiny_init), "-o", str(tmp_path / "m"), "-q"]
    )
    assert res.exit_code == 0, res.output
    assert read_adapter(tmp_path / "m").ranks == {8}  # the exact SLERP: rank 4 + 4
    stranger = make_tiny_llama(tmp_path / "stranger", seed=5)
    res = CliRunner().invoke(
        app, ["merge", "slerp", str(exact), str(other), "--init", str(stranger), "-o", str(tmp_path / "n"), "-q"]
    )
    assert res.exit_code == 2 and "made on another base" in res.output
    assert not (tmp_path / "n").exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--lora-r", "0"], "--lora-r"),
        (["--lora-r", "4", "--lora-targets", "q_proj,nope"], "--lora-targets nope: no linear layer"),
        (["--lora-alpha", "8"], "--lora-alpha needs --lora-r"),
        (["--merge-adapter"], "--merge-adapter needs --lora-r"),
        (["--lora-r", "4", "--lora-targets", "all-linear,q_proj"], "all-linear cannot be combined"),
        (["--lora-r", "4", "--lora-anchor", "exact", "--anchor", "init"], "--lora-anchor is the EMA anchor's form"),
    ],
)
def test_bad_lora_options_exit_2(options, message, tiny_init, files, tmp_path):
    args = ["rl", "--model", str(tiny_init), "--prompts", str(files / "p.jsonl"), "--reward", "sentiment"]
    res = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "o"), "--steps", "1", "-q", *options])
    assert res.exit_code == 2 and message in res.output, res.output
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_tied_head_is_refused(files, tmp_path):
    tied = make_tiny_llama(tmp_path / "tied", seed=0, tie=True)
    with pytest.raises(WarpError, match="shares its weights with the input embedding"):
        train(lcfg(tied, files, tmp_path / "o", steps=1))
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


@pytest.mark.slow
def test_ddp_two_processes_give_the_one_process_adapter(tiny_init, files, tmp_path):
    from mergekit_warp.rl import launch

    kw = dict(steps=3, micro_batch=4, save_every=2, lora_anchor="exact")
    one = train(lcfg(tiny_init, files, tmp_path / "one", **kw))
    two = launch.train_on_group(lcfg(tiny_init, files, tmp_path / "two", **kw), ["cpu", "cpu"], log=tmp_path / "log")
    for sub in ("", "checkpoints/step_2"):
        a, b = load_file(one / sub / "adapter_model.safetensors"), load_file(two / sub / "adapter_model.safetensors")
        assert set(a) == set(b)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=f"{sub} {k}")
    a, b = load_state(one / "anchor"), load_state(two / "anchor")
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-5) for k in a)
    assert max(v.abs().max() for v in deltas(one).values()) > 1e-3
    for x, y in zip(metrics(one), metrics(two)):
        assert y["reward"] == pytest.approx(x["reward"], abs=1e-6) and y["kl_init"] == pytest.approx(
            x["kl_init"], rel=1e-4
        )
    assert json.loads((two / "warp_provenance.json").read_text())["params"]["world_size"] == 2


def test_resume_refuses_a_changed_base(tmp_path, files, monkeypatch):
    base = make_tiny_llama(tmp_path / "base", seed=0)
    monkeypatch.setenv("WARP_TEST_FAIL_AT", "3")
    with pytest.raises(WarpError, match="resumable state of step 2"):
        train(lcfg(base, files, tmp_path / "o", steps=4, state_every=1))
    monkeypatch.delenv("WARP_TEST_FAIL_AT")
    make_tiny_llama(tmp_path / "other", seed=1)
    (tmp_path / "base" / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    with pytest.raises(WarpError, match="has other weights than when the interrupted run"):
        train(lcfg(base, files, tmp_path / "o", steps=4, state_every=1, resume=True))
    assert (tmp_path / "o.partial" / "state").is_dir()  # still resumable once the base is restored


def test_generate_reads_an_adapter_and_the_card_says_peft(exact, tiny_init):
    """`warp generate RUN` (on the base the adapter names) and BASE+RUN give merged/'s replies."""
    args = ["generate", "--prompt", "the cat is", "--samples", "2", "--json", "--max-new-tokens", "5"]
    want = CliRunner().invoke(app, [*args[:1], str(exact / "merged"), *args[1:]])
    assert want.exit_code == 0, want.output
    for spec in (str(exact), f"{tiny_init}+{exact}"):
        got = CliRunner().invoke(app, [*args[:1], spec, *args[1:]])
        assert got.exit_code == 0 and got.stdout == want.stdout, got.output
    card = (exact / "README.md").read_text()
    assert "library_name: peft" in card and f"base_model: {tiny_init}" in card
    assert "library_name: transformers" in (exact / "merged" / "README.md").read_text()
