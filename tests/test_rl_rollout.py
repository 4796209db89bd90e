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
