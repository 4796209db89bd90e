"""Sampling and sequence log-probs on a tiny random Llama: padding invariance, masks, seeding."""

import inspect

import pytest
import torch

from mergekit_warp.lm.models import load_model, load_tokenizer
from mergekit_warp.lm.sampling import generate, sequence_logprobs

PROMPTS = ["the cat is", "hello", "i love this movie very much and the film was"]


@pytest.fixture(scope="module")
def policy(tiny_init):
    return load_model(tiny_init), load_tokenizer(tiny_init)


def _alone(r, i):
    """Row i of a rollout without any padding."""
    keep = r.attention_mask[i].bool()
    return r.input_ids[i : i + 1, keep], r.completion_mask[i : i + 1, keep]


def test_padded_equals_unpadded_and_sampling_logprobs(policy):
    model, tok = policy
    r = generate(model, tok, PROMPTS, max_new_tokens=10, temperature=0.9, generator_seed=3)
    assert r.input_ids.shape == r.attention_mask.shape == r.completion_mask.shape
    assert (r.attention_mask[0] == 0).any()  # row 0 really is left-padded
    batch = sequence_logprobs(model, r.input_ids, r.attention_mask, r.completion_mask, temperature=0.9)
    for i in range(len(PROMPTS)):
        ids, cm = _alone(r, i)
        alone = sequence_logprobs(model, ids, torch.ones_like(ids), cm, temperature=0.9)
        torch.testing.assert_close(batch[i : i + 1], alone, rtol=1e-5, atol=1e-4)
        # independent computation: log_softmax of a plain full forward, summed by hand
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].float() / 0.9
        lp = torch.log_softmax(logits[:-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
        torch.testing.assert_close(alone, (lp * cm[0, 1:]).sum()[None], rtol=1e-5, atol=1e-4)
    # the log-probs recorded while sampling are those of the sampling distribution
    torch.testing.assert_close(r.logprobs, batch.detach(), rtol=1e-5, atol=1e-4)
    # temperature 1 is a different (documented) convention
    t1 = sequence_logprobs(model, r.input_ids, r.attention_mask, r.completion_mask)
    assert not torch.allclose(t1, batch)


def test_seeded_sampling_is_reproducible(policy):
    model, tok = policy
    a = generate(model, tok, PROMPTS, max_new_tokens=8, temperature=0.9, generator_seed=11)
    b = generate(model, tok, PROMPTS, max_new_tokens=8, temperature=0.9, generator_seed=11)
    c = generate(model, tok, PROMPTS, max_new_tokens=8, temperature=0.9, generator_seed=12)
    assert torch.equal(a.input_ids, b.input_ids) and a.completions == b.completions
    assert not torch.equal(a.input_ids, c.input_ids)
    from tiny import make_tokenizer

    right = make_tokenizer()  # a tokenizer that pads on the right by default: generate left-pads anyway
    assert right.padding_side == "right"
    d = generate(model, right, PROMPTS, max_new_tokens=8, temperature=0.9, generator_seed=11)
    assert torch.equal(a.input_ids, d.input_ids)


class EosAfter(torch.nn.Module):
    """Wraps a model so that row i emits EOS at its `after[i]`-th generated token (None: never). Its
    forward takes the wrapped model's keywords (the KV cache is `cache` or `past_key_values`, by
    transformers version), so the sampler talks to it as to the model."""

    def __init__(self, model, eos, after):
        super().__init__()
        self.m, self.eos, self.after, self.t = model, eos, after, 0
        self.generation_config = model.generation_config

        def forward(**kw):
            return self.steered(self.m(**kw))

        forward.__signature__ = inspect.signature(model.forward)
        self.forward = forward

    def steered(self, out):
        self.t += 1  # 1 = logits for the first generated token
        for i, a in enumerate(self.after):
            if a == self.t:
                out.logits[i, -1, :] = -1e4
                out.logits[i, -1, self.eos] = 1e4
            elif a is not None:
                out.logits[i, -1, self.eos] = -1e4
        return out


def test_completion_mask_stops_after_eos(policy):
    model, tok = policy
    wrapped = EosAfter(model, tok.eos_token_id, [2, None, 4])
    r = generate(wrapped, tok, PROMPTS, max_new_tokens=6, temperature=1.0, generator_seed=0)
    P = r.input_ids.shape[1] - 6
    torch.testing.assert_close(r.lengths, torch.tensor([2, 6, 4]))
    assert r.input_ids[0, P + 1] == tok.eos_token_id and r.completion_mask[0, P + 1] == 1
    assert (r.input_ids[0, P + 2 :] == tok.pad_token_id).all() and (r.completion_mask[0, P + 2 :] == 0).all()
    assert (r.attention_mask[:, P:] == r.completion_mask[:, P:]).all()
    assert (r.completion_mask[:, :P] == 0).all()
    # the completion text is the first sampled token alone (EOS dropped; it may itself be a special token)
    assert "</s>" not in r.completions[0] and r.completions[0] == tok.decode(
        r.input_ids[0, P : P + 1], skip_special_tokens=True
    )
    # tokens after EOS (pad) change nothing: the same rows scored alone, without them, agree
    batch = sequence_logprobs(model, r.input_ids, r.attention_mask, r.completion_mask)
    ids, cm = _alone(r, 0)
    torch.testing.assert_close(batch[:1], sequence_logprobs(model, ids, torch.ones_like(ids), cm), rtol=1e-5, atol=1e-4)


def _chat_model(tmp_path):
    """A tiny chat model and PROMPTS under a common system prompt (a prefix every row shares)."""
    from tiny import make_tiny_llama

    folder = make_tiny_llama(tmp_path / "chat", seed=1, chat_template=True)
    model, tok = load_model(folder), load_tokenizer(folder)
    prompts = [
        tok.apply_chat_template(
            [{"role": "system", "content": "you are a nice big dog"}, {"role": "user", "content": p}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for p in PROMPTS
    ]
    return model, tok, prompts


def test_shared_prefix_forward_equals_plain(tmp_path):
    """A system prompt common to all rows runs once; values and gradients match the plain forward."""
    from mergekit_warp.lm.sampling import shared_prefix

    model, tok, prompts = _chat_model(tmp_path)
    r = generate(model, tok, prompts, max_new_tokens=8, temperature=0.9, generator_seed=2)
    r0 = generate(model, tok, prompts, max_new_tokens=8, temperature=0.9, generator_seed=2, share_prefix=False)
    assert torch.equal(r.input_ids, r0.input_ids)
    torch.testing.assert_close(r.logprobs, r0.logprobs, rtol=1e-5, atol=1e-4)
    assert shared_prefix(r.input_ids, r.attention_mask, r.completion_mask) == 10  # "system : you ... user :"
    grads = []
    for share in (False, True):
        lp = sequence_logprobs(model, r.input_ids, r.attention_mask, r.completion_mask, 0.9, share_prefix=share)
        lp.sum().backward()
        grads.append((lp.detach(), [p.grad.clone() for p in model.parameters()]))
        model.zero_grad()
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-4)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_shared_prefix_is_ignored_under_activation_checkpointing(tmp_path):
    model, tok, prompts = _chat_model(tmp_path)
    r = generate(model, tok, prompts, max_new_tokens=6, temperature=1.0, generator_seed=2)
    plain = sequence_logprobs(model, r.input_ids, r.attention_mask, r.completion_mask).detach()
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    model.train()
    ckpt = sequence_logprobs(model, r.input_ids, r.attention_mask, r.completion_mask, share_prefix=True)
    torch.testing.assert_close(ckpt.detach(), plain, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------------------------------
# Top-k / top-p, stop strings, prompt truncation


def _support_dense(probs: torch.Tensor, top_k: int, top_p: float) -> list[set[int]]:
    """Per row, the ids a top-k-then-top-p sampler may draw, by plain Python over a sorted list."""
    rows = []
    for p in probs.tolist():
        order = sorted(range(len(p)), key=lambda i: -p[i])
        if 0 < top_k < len(p):
            kth = p[order[top_k - 1]]
            order = [i for i in order if p[i] >= kth]
        total, mass, keep = sum(p[i] for i in order), 0.0, []
        for i in order:
            if top_p < 1 and keep and mass >= top_p * total and p[i] < p[keep[-1]]:
                break
            keep.append(i)
            mass += p[i]
        rows.append(set(keep))
    return rows


@pytest.mark.parametrize("top_k, top_p", [(1, 1.0), (3, 1.0), (0, 0.5), (0, 1e-6), (4, 0.7), (0, 0.999), (20, 1.0)])
def test_top_k_top_p_restrict_the_support(top_k, top_p):
    from mergekit_warp.lm.sampling import filter_probs, sample_inverse_cdf

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 12, generator=g) * 2
    logits[4] = torch.tensor([3.0, 3.0, 1.0, 1.0, 1.0, 0.0, -1.0, -1.0, -2.0, -3.0, -4.0, -5.0])  # ties at the cuts
    probs = torch.softmax(logits / 0.9, -1)
    kept = filter_probs(probs, top_k, top_p)
    want = _support_dense(probs, top_k, top_p)
    assert [set((kept[i] > 0).nonzero().squeeze(-1).tolist()) for i in range(5)] == want
    if top_k == 1 or top_p < 1e-3:
        assert all(s == {int(probs[i].argmax())} for i, s in enumerate(want) if i != 4)
    # draws land in the support, in proportion to the renormalised probabilities
    n = 4000
    u = torch.rand(n, generator=g, dtype=torch.float64)
    for i in range(5):
        ids = sample_inverse_cdf(kept[i : i + 1].expand(n, -1), u)
        assert set(ids.tolist()) <= want[i]
        freq = torch.bincount(ids, minlength=12).double() / n
        torch.testing.assert_close(freq, (kept[i] / kept[i].sum()).double(), atol=0.04, rtol=0)


def _greedy(model, tok, prompt: str, n: int) -> list[int]:
    """Argmax decoding by plain full forwards of the prompt alone (no cache, no padding)."""
    from mergekit_warp.lm.sampling import add_special_tokens

    ids = tok(prompt, return_tensors="pt", add_special_tokens=add_special_tokens(tok))["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = model(input_ids=ids).logits[0, -1].argmax()
            out.append(int(nxt))
            if int(nxt) == tok.eos_token_id:
                break
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return out


@pytest.mark.parametrize("opts", [{"top_k": 1}, {"top_p": 1e-6}])
def test_top_k_1_and_tiny_top_p_are_greedy(policy, opts):
    model, tok = policy
    r = generate(model, tok, PROMPTS, max_new_tokens=8, temperature=1.3, generator_seed=5, **opts)
    P = int(r.completion_mask.any(0).nonzero()[0])  # first completion column
    for i, prompt in enumerate(PROMPTS):
        got = r.input_ids[i, P:][r.completion_mask[i, P:].bool()].tolist()
        assert got == _greedy(model, tok, prompt, 8)
    # the recorded log-probs stay those of π_τ over the full vocabulary (not of the restricted sampler)
    full = sequence_logprobs(model, r.input_ids, r.attention_mask, r.completion_mask, temperature=1.3)
    torch.testing.assert_close(r.logprobs, full, rtol=1e-5, atol=1e-4)
    assert (r.logprobs < -1e-3).all()


def test_default_options_are_bit_identical(policy):
    """The defaults (and options that restrict nothing) sample exactly what the plain sampler does."""
    model, tok = policy
    kw = dict(max_new_tokens=8, temperature=0.9, generator_seed=11)
    base = generate(model, tok, PROMPTS, **kw)
    V = model.config.vocab_size
    for opts in (
        dict(top_p=1.0, top_k=0, stop=(), max_prompt_length=None),
        dict(top_k=V),  # through the filter, which keeps every token
        dict(max_prompt_length=100),  # longer than every prompt
    ):
        r = generate(model, tok, PROMPTS, **kw, **opts)
        assert torch.equal(r.input_ids, base.input_ids) and torch.equal(r.completion_mask, base.completion_mask)
        assert torch.equal(r.logprobs, base.logprobs) and torch.equal(r.entropy, base.entropy)
        assert r.completions == base.completions
    # a real restriction changes the draws
    assert not torch.equal(generate(model, tok, PROMPTS, **kw, top_k=2).input_ids, base.input_ids)


def test_stop_strings_cut_completions_and_mask_the_rest(policy):
    model, tok = policy
    kw = dict(max_new_tokens=10, temperature=1.0, generator_seed=7)
    base = generate(model, tok, PROMPTS, **kw)
    P = base.input_ids.shape[1] - 10
    gen = base.input_ids[0, P:].tolist()
    # a word of row 0 (not its first, not inside the text before it) becomes the stop string
    j = next(
        j
        for j in range(1, 10)
        if base.completion_mask[0, P + j]
        and gen[j] >= 4
        and tok.decode([gen[j]]) not in tok.decode(gen[:j], skip_special_tokens=True)
    )
    word = tok.decode([gen[j]])
    r = generate(model, tok, PROMPTS, **kw, stop=[word, "no such words here"])
    assert r.lengths[0] == j + 1
    assert torch.equal(r.input_ids[0, : P + j + 1], base.input_ids[0, : P + j + 1])  # same draws up to the stop
    assert (r.input_ids[0, P + j + 1 :] == tok.pad_token_id).all() and (r.completion_mask[0, P + j + 1 :] == 0).all()
    assert (r.attention_mask[:, P:] == r.completion_mask[:, P:]).all()
    assert r.completions[0] == tok.decode(gen[: j + 1], skip_special_tokens=True) and r.completions[0].endswith(word)
    for i in range(1, len(PROMPTS)):  # rows without the stop string are untouched
        if word not in base.completions[i]:
            assert torch.equal(r.input_ids[i], base.input_ids[i]) and r.completions[i] == base.completions[i]
    # the masked tail counts nowhere: recorded log-probs = a forward over the kept tokens
    lp = sequence_logprobs(model, r.input_ids, r.attention_mask, r.completion_mask)
    torch.testing.assert_close(r.logprobs, lp, rtol=1e-5, atol=1e-4)


def test_heldout_samples_end_at_stop_strings(policy):
    """warp rl's held-out evaluation passes the run's stop strings: the reward sees, and the lengths count,
    the completions `generate` gives with them."""
    from mergekit_warp.lm.heldout import sample_and_score

    model, tok = policy
    kw = dict(max_new_tokens=10, temperature=1.0)
    base = generate(model, tok, PROMPTS, generator_seed=7, **kw)
    words = [w for c in base.completions for w in c.split()[1:]]
    stop = [max(set(words), key=words.count)]  # the commonest word that is not a completion's first
    want = generate(model, tok, PROMPTS, generator_seed=7, stop=stop, **kw)
    seen: list[str] = []

    def reward(prompts, completions):
        seen.extend(completions)
        return [0.0] * len(completions)

    got = sample_and_score(model, model, tok, PROMPTS, reward, seed=7, batch_size=len(PROMPTS), stop=stop, **kw)
    assert seen == want.completions and torch.equal(got.lengths, want.lengths.double())
    assert (got.lengths < base.lengths).any() and any(c.endswith(stop[0]) for c in seen)


def test_cut_at_stop_keeps_the_first_stop_string():
    from mergekit_warp.lm.sampling import cut_at_stop

    assert cut_at_stop("a b. c\nd", [".", "\n"]) == "a b."
    assert cut_at_stop("xyz END more END", ["END", "z E"]) == "xyz E"  # the one that ends first
    assert cut_at_stop("nothing", ["!"]) == "nothing"


def test_max_prompt_length_keeps_the_last_tokens(policy):
    from mergekit_warp.lm.sampling import add_special_tokens

    model, tok = policy
    long = PROMPTS[2]
    kw = dict(max_new_tokens=4, temperature=1.0, generator_seed=1)
    r = generate(model, tok, [long, "hello"], **kw, max_prompt_length=3)
    last3 = tok(long, add_special_tokens=add_special_tokens(tok))["input_ids"][-3:]
    assert r.input_ids.shape[1] <= 3 + 4 and r.input_ids[0, :3].tolist() == last3
    # the same draws as a prompt made of those 3 tokens alone
    alone = generate(model, tok, [tok.decode(last3)], **kw, special_tokens=False)
    assert alone.input_ids[0, :3].tolist() == last3
    assert r.completions[0] == alone.completions[0]
    torch.testing.assert_close(r.logprobs[:1], alone.logprobs, rtol=1e-5, atol=1e-4)


def test_sampling_options_are_validated():
    from mergekit_warp.errors import WarpError
    from mergekit_warp.rl.config import make_config

    base = dict(model="m", prompts="p.jsonl", reward="sentiment", out="o")
    for opts, match in (
        ({"top_p": 0}, "--top-p 0: Input should be greater than 0"),
        ({"top_p": 1.5}, "--top-p 1.5"),
        ({"top_p": float("nan")}, "--top-p nan: Input should be a finite number"),
        ({"top_k": -1}, "--top-k -1"),
        ({"stop": ["ok", ""]}, "--stop .*: a stop string must not be empty"),
        ({"max_prompt_length": 0}, "--max-prompt-length 0"),
    ):
        with pytest.raises(WarpError, match=match):
            make_config({**base, **opts})
    assert make_config({**base, "stop": "\n"}).stop == ["\n"]  # one string in a config file


def test_rl_cli_runs_a_step_with_top_k(tiny_init, tmp_path):
    import json

    from typer.testing import CliRunner

    from mergekit_warp.cli import app

    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    argv = ["rl", "--model", str(tiny_init), "--prompts", str(tmp_path / "p.jsonl"), "--reward", "sentiment"]
    argv += ["-o", str(tmp_path / "out"), "--steps", "1", "--batch-size", "2", "--max-new-tokens", "6"]
    argv += ["--top-k", "5", "--top-p", "0.9", "--stop", "good", "--max-prompt-length", "4", "--no-progress"]
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 0, (res.output, res.exception)
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["completion_len"] <= 6
    prov = (tmp_path / "out" / "warp_provenance.json").read_text()
    assert '"top_k": 5' in prov and '"stop": [' in prov


def test_resume_of_state_saved_before_the_sampling_options(tiny_init, tmp_path):
    """A work folder whose config.json predates top_p/top_k/stop/max_prompt_length resumes with their
    defaults, and is refused with other values."""
    import json

    from mergekit_warp.errors import WarpError
    from mergekit_warp.rl.config import ADDED_OPTIONS, RLConfig
    from mergekit_warp.rl.train import train

    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    (tmp_path / "rew.py").write_text(
        "calls = 0\ndef r(prompts, completions):\n    global calls\n    calls += 1\n"
        "    if calls == 2:\n        raise RuntimeError('gone')\n    return [0.0] * len(completions)\n"
    )
    kw = dict(model=str(tiny_init), prompts=tmp_path / "p.jsonl", reward=f"{tmp_path / 'rew.py'}:r")
    kw |= dict(out=tmp_path / "out", steps=2, batch_size=2, max_new_tokens=4, state_every=1, progress=False)
    with pytest.raises(WarpError, match="resumable state of step 1"):
        train(RLConfig(**kw))
    saved = tmp_path / "out.partial" / "config.json"
    old = {k: v for k, v in json.loads(saved.read_text()).items() if k not in ADDED_OPTIONS}
    saved.write_text(json.dumps(old))
    with pytest.raises(WarpError, match="options --top-k differ"):
        train(RLConfig(**kw, resume=True, top_k=3))
    assert train(RLConfig(**kw, resume=True)) == tmp_path / "out"
