"""Sampling completions and scoring them: the two model-facing functions of the RL loop.

Log-probability convention (recorded in the output's provenance): the training loop computes every
log-prob — the REINFORCE term log π(y|x) and both sides of the KL log π − log π_anchor — under the
SAMPLING temperature τ, i.e. log_softmax(logits / τ). That is the distribution the completions are
actually drawn from, so the gradient is an unbiased policy gradient of the KL-regularised objective of
the sampling policy (TRL's RLOO does the same). `sequence_logprobs` defaults to τ = 1 (the model's own
distribution); pass `temperature=cfg.temperature` to match training.

Top-p / top-k only restrict which tokens can be DRAWN (HF's TopK then TopP warpers, ties at the cut kept):
the recorded log-probs and entropies, like those the loss and the KL use, stay those of π_τ over the full
vocabulary (as TRL does). A completion ends at EOS, at `max_new_tokens`, or at the token that completes the
first stop string: that token is kept (sampled, scored and unmasked, like EOS) and the text is cut right
after the stop string, which stays in it. `max_prompt_length` keeps the LAST that many tokens of a prompt
(left truncation, as TRL does, so the generation prompt of a chat template survives).

Layout: prompts are LEFT-padded, completions follow and are RIGHT-padded after their EOS, so in a
(b, P+T) batch the completion of every row starts at column P. Position ids are always derived from the
attention mask, so a padded row scores exactly like the same row alone.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class Rollout:
    input_ids: torch.Tensor
    """(b, P+T) prompt (left-padded) + completion (right-padded after EOS)."""
    attention_mask: torch.Tensor
    """(b, P+T) 1 on real tokens: the prompt and the completion up to and including EOS."""
    completion_mask: torch.Tensor
    """(b, P+T) 1 on generated tokens up to and including EOS (or the token that completes a stop string)."""
    prompts: list[str]
    completions: list[str]
    """Decoded completions without special tokens, each cut right after its first stop string."""
    logprobs: torch.Tensor
    """(b,) fp32 Σ log π_τ(y_t | ...) over the completion, recorded while sampling (no grad)."""
    entropy: torch.Tensor
    """(b,) fp32 Σ over the completion of the per-token entropy of π_τ."""

    @property
    def lengths(self) -> torch.Tensor:
        """(b,) completion lengths in tokens."""
        return self.completion_mask.sum(-1)


MIN_SHARED = 4  # below this many common tokens the second forward costs more than it saves


def add_special_tokens(tokenizer) -> bool:
    """Chat-templated prompts already carry their special tokens; plain prompts get the tokenizer's."""
    return not getattr(tokenizer, "chat_template", None)


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(b, L) position ids that skip left padding: a padded row gets the positions it has alone."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def eos_ids(model, tokenizer) -> torch.Tensor:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen = getattr(model, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None) if gen is not None else None
    ids |= set(extra if isinstance(extra, (list, tuple)) else [extra] if extra is not None else [])
    return torch.tensor(sorted(ids), dtype=torch.long)


def _cache_kw(model) -> str:
    # transformers ≥ 5.2x names the KV cache `cache` (older releases: `past_key_values`).
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def shared_prefix(input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor | None) -> int:
    """Length S of the token prefix that every row's prompt starts with (e.g. a chat template's system
    prompt), capped so each row keeps ≥ 1 prompt token after it. Rows are left-padded."""
    b, L = input_ids.shape
    lead = (attention_mask.long().cumsum(-1) == 0).sum(-1)  # (b,) left pads
    ends = (
        torch.full_like(lead, L)
        if completion_mask is None
        else torch.where(completion_mask.any(-1), completion_mask.long().argmax(-1), L)
    )  # (b,) first completion column
    cap = int((ends - lead).min()) - 1
    if b < 2 or cap < 1:
        return 0
    cols = (lead[:, None] + torch.arange(cap, device=lead.device)[None]).clamp(max=L - 1)  # (b, cap)
    aligned = input_ids.gather(1, cols)  # (b, cap) each row's prompt tokens from its first real one
    same = (aligned == aligned[:1]).all(0).long()  # (cap,)
    return int(same.cumprod(0).sum())


def forward_shared(model, input_ids, attention_mask, prefix_len: int, **kw):
    """One forward of a left-padded batch that runs the common prefix ONCE (batch 1) and the rest of
    every row on a copy of its KV cache: same result as the plain forward, ~S·(b−1) fewer token
    computations (the gradient flows into the prefix through the cache).

    Returns (output, mask): the output covers input columns offset = S + min(left pads) .. L−1 and
    `mask` (b, S + L − offset) is the attention mask of the KV cache it leaves (for further decoding).
    """
    S, lead = prefix_len, (attention_mask.long().cumsum(-1) == 0).sum(-1)
    offset = S + int(lead.min())
    row = int(lead.argmin())
    pos = positions(attention_mask)
    ck = _cache_kw(model)
    pre = model(
        input_ids=input_ids[row : row + 1, lead[row] : lead[row] + S],
        position_ids=pos[row : row + 1, lead[row] : lead[row] + S],
        use_cache=True,
        logits_to_keep=1,
    )
    cache = getattr(pre, ck)
    cache.batch_repeat_interleave(input_ids.shape[0])
    cols = torch.arange(offset, input_ids.shape[1], device=input_ids.device)
    rest_mask = attention_mask[:, offset:] * (cols[None] >= (lead + S)[:, None]).to(attention_mask.dtype)
    full_mask = torch.cat([torch.ones_like(attention_mask[:, :S]), rest_mask], dim=1)  # (b, S + L − offset)
    out = model(
        input_ids=input_ids[:, offset:],
        attention_mask=full_mask,
        position_ids=pos[:, offset:],
        use_cache=True,
        **{ck: cache},
        **kw,
    )
    return out, full_mask


def row_uniforms(seed: int, first_row: int, rows: int, steps: int) -> torch.Tensor:
    """(rows, steps) float64 uniforms in [0, 1); row i depends only on (seed, first_row + i)."""
    out = torch.empty(rows, steps, dtype=torch.float64)
    for i in range(rows):
        s = int(np.random.SeedSequence([seed & 0xFFFFFFFFFFFFFFFF, first_row + i]).generate_state(1, np.uint64)[0])
        out[i] = torch.rand(steps, dtype=torch.float64, generator=torch.Generator().manual_seed(s >> 1))
    return out


def sample_inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(b,) token ids from (b, V) probabilities: the first id whose cumulative probability exceeds u (b,).
    Ids of probability 0 are never drawn."""
    cdf = probs.double().cumsum(-1)  # (b, V)
    target = u.to(cdf.device)[:, None] * cdf[:, -1:]  # scaled by the total: rounding never picks a 0-prob id
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)  # (b,)
    return idx.clamp(max=probs.shape[-1] - 1)


def filter_probs(probs: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """(b, V) `probs` with the tokens outside the top-k, then the nucleus, set to 0 (not renormalised:
    `sample_inverse_cdf` scales by the total). top_k: the k most probable tokens (0 = all); top_p: the
    fewest most probable tokens whose mass reaches top_p of what top-k kept (1 = all). Tokens tied with
    the last one kept are kept too, so the result does not depend on how a sort orders ties."""
    if 0 < top_k < probs.shape[-1]:
        kth = probs.topk(top_k, dim=-1).values[:, -1:]  # (b, 1)
        probs = torch.where(probs >= kth, probs, 0.0)
    if top_p < 1.0:
        desc = probs.double().sort(dim=-1, descending=True).values  # (b, V)
        before = desc.cumsum(-1) - desc  # (b, V) mass of the tokens ranked above
        n = (before < top_p * desc.sum(-1, keepdim=True)).sum(-1, keepdim=True).clamp(min=1)  # (b, 1) nucleus size
        cut = desc.gather(-1, n - 1).to(probs.dtype)  # (b, 1) probability of its last token
        probs = torch.where(probs >= cut, probs, 0.0)
    return probs


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to and including the stop string that ends first in it (unchanged without one)."""
    ends = [i + len(s) for s in stop if (i := text.find(s)) >= 0]
    return text[: min(ends)] if ends else text


def _stop_hits(tokenizer, tokens: list[torch.Tensor], rows: torch.Tensor, stop: Sequence[str]) -> list[int]:
    """The `rows` whose completion so far (every token of which is real) holds a stop string."""
    idx = rows.nonzero().squeeze(-1).tolist()
    if not idx:
        return []
    texts = tokenizer.batch_decode(torch.stack(tokens, dim=1)[idx].tolist(), skip_special_tokens=True)
    return [i for i, t in zip(idx, texts) if any(s in t for s in stop)]


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int,
    temperature: float,
    generator_seed: int | None = None,
    share_prefix: bool = True,
    row_offset: int = 0,
    all_done: Callable[[bool], bool] | None = None,
    top_p: float = 1.0,
    top_k: int = 0,
    stop: Sequence[str] = (),
    max_prompt_length: int | None = None,
    special_tokens: bool | None = None,
) -> Rollout:
    """Sample one completion per prompt at `temperature` (ancestral sampling, KV cache), drawn from the
    top-k / top-p restriction of π_τ when those are set; `stop`, `max_prompt_length`: see the module
    docstring. `special_tokens`: whether the tokenizer adds its special tokens (default: only to
    prompts without a chat template, see `add_special_tokens`).

    A hand-written loop rather than `model.generate`: no global RNG, so runs and resumes are
    reproducible, and it records log π_τ and the entropy of each sampled token on the fly, saving a
    forward pass per step. Row i draws its tokens by inverse CDF from its own uniforms, seeded by
    (generator_seed, row_offset + i): a completion does not depend on which other prompts share the
    batch, so a data-parallel run (each rank a slice, `row_offset` = its first global row) samples
    exactly what one process sampling the whole batch would. With `share_prefix`, a prompt prefix
    common to all rows is prefilled once (see `forward_shared`; data-parallel callers turn it off, as
    their forwards must line up across ranks). `all_done(done_here)`: whether every rank's rows have
    ended (sharded models must keep stepping together); default: this batch alone decides.
    """
    dev = next(model.parameters()).device
    seed = generator_seed if generator_seed is not None else int(torch.randint(2**62, (1,)))
    enc = tokenizer(
        prompts,
        return_tensors="pt",
        padding=True,
        padding_side="left",  # whatever the tokenizer's default
        add_special_tokens=add_special_tokens(tokenizer) if special_tokens is None else special_tokens,
    )
    ids, mask = enc["input_ids"].to(dev), enc["attention_mask"].to(dev)  # (b, P)
    if max_prompt_length is not None:  # left-padded: the last columns hold every row's last tokens
        ids, mask = ids[:, -max_prompt_length:], mask[:, -max_prompt_length:]
    b = ids.shape[0]
    eos = eos_ids(model, tokenizer).to(dev)
    pad = tokenizer.pad_token_id
    u = row_uniforms(seed, row_offset, b, max_new_tokens)  # (b, T) on the CPU: device-independent draws

    cache_kw = _cache_kw(model)
    pos = positions(mask)
    S = shared_prefix(ids, mask, None) if share_prefix else 0
    if S >= MIN_SHARED:  # prefill the common prefix once (the chat template's system prompt, say)
        out, attn = forward_shared(model, ids, mask, S, logits_to_keep=1)
    else:
        out, attn = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1), mask
    cache, last_pos = getattr(out, cache_kw), pos[:, -1:]
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    tokens, live = [], []
    logprob = torch.zeros(b, device=dev)
    entropy = torch.zeros(b, device=dev)
    for _ in range(max_new_tokens):
        logp = F.log_softmax(out.logits[:, -1].float() / temperature, dim=-1)  # (b, V)
        probs = logp.exp()
        draw = filter_probs(probs, top_k, top_p) if top_k or top_p < 1.0 else probs  # (b, V)
        tok = sample_inverse_cdf(draw, u[:, len(tokens)])  # (b,)
        active = ~done
        logprob += torch.where(active, logp.gather(-1, tok[:, None]).squeeze(-1), 0.0)
        entropy += torch.where(active, -(probs * logp).sum(-1), 0.0)
        tok = torch.where(active, tok, pad)
        tokens.append(tok)
        live.append(active)
        done = done | torch.isin(tok, eos)
        if stop:
            done[_stop_hits(tokenizer, tokens, active & ~done, stop)] = True
        if (all_done or bool)(bool(done.all())):
            break
        # Finished rows keep being fed (pad, masked later): a fixed batch keeps the cache simple.
        attn = torch.cat([attn, torch.ones(b, 1, dtype=attn.dtype, device=dev)], dim=1)
        last_pos = last_pos + 1
        out = model(
            input_ids=tok[:, None], attention_mask=attn, position_ids=last_pos, use_cache=True, **{cache_kw: cache}
        )
        cache = getattr(out, cache_kw)

    gen = torch.stack(tokens, dim=1)  # (b, T)
    gen_mask = torch.stack(live, dim=1).to(mask.dtype)  # (b, T)
    texts = [tokenizer.decode(row[m.bool()], skip_special_tokens=True) for row, m in zip(gen.cpu(), gen_mask.cpu())]
    if stop:
        texts = [cut_at_stop(t, stop) for t in texts]
    return Rollout(
        input_ids=torch.cat([ids, gen], dim=1),
        attention_mask=torch.cat([mask, gen_mask], dim=1),
        completion_mask=torch.cat([torch.zeros_like(mask), gen_mask], dim=1),
        prompts=list(prompts),
        completions=texts,
        logprobs=logprob,
        entropy=entropy,
    )


@dataclass(frozen=True)
class Reply:
    text: str
    tokens: int
    """Completion length in tokens (EOS or the stop string's last token included)."""


def sample_replies(model, tokenizer, prompts: list[str], *, samples: int, batch_size: int, seed: int, **options):
    """`samples` completions of every prompt, as a list (per prompt) of `Reply`s. Completion j of prompt
    i is row i·samples + j of one seeded stream (see `generate`, which gets `options`), so the replies
    do not depend on `batch_size`."""
    rows = [p for p in prompts for _ in range(samples)]
    out: list[Reply] = []
    for start in range(0, len(rows), batch_size):
        r = generate(
            model, tokenizer, rows[start : start + batch_size], generator_seed=seed, row_offset=start, **options
        )
        out += [Reply(t, int(n)) for t, n in zip(r.completions, r.lengths.tolist())]
    return [out[i : i + samples] for i in range(0, len(out), samples)]


def sequence_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
    share_prefix: bool = False,
) -> torch.Tensor:
    """(b,) Σ over completion tokens of log softmax(logits / temperature) at the observed token.

    Differentiable when grad is enabled (the REINFORCE term); padding contributes nothing. Only the
    columns from the first completion token on go through the LM head (it dominates for big vocabularies).
    `share_prefix` runs a prompt prefix common to all rows once (`forward_shared`; ignored while activation
    checkpointing is active, as it disables the KV cache) — same values up to float rounding.
    """
    cols = completion_mask.any(0).nonzero()
    if len(cols) == 0:
        return torch.zeros(input_ids.shape[0], device=input_ids.device)
    start = max(int(cols[0]), 1)  # the first token of a sequence has no prediction
    keep = input_ids.shape[1] - start + 1  # logits at columns start-1 .. L-1
    # Activation checkpointing drops the KV cache inside each layer while grad is on: share nothing then.
    flag = (
        "is_activation_checkpointing"
        if hasattr(type(model), "is_activation_checkpointing")
        else "is_gradient_checkpointing"
    )
    checkpointing = model.training and torch.is_grad_enabled() and bool(getattr(model, flag, False))
    S = shared_prefix(input_ids, attention_mask, completion_mask) if share_prefix and not checkpointing else 0
    if S >= MIN_SHARED:
        out, _ = forward_shared(model, input_ids, attention_mask, S, logits_to_keep=keep)
    else:
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions(attention_mask),
            use_cache=False,
            logits_to_keep=keep,
        )
    logits = out.logits[:, -keep:-1].float() / temperature  # (b, L-start, V) predicting columns start .. L-1
    target = input_ids[:, start:]  # (b, L-start)
    lp = F.log_softmax(logits, dim=-1).gather(-1, target[..., None]).squeeze(-1)  # (b, L-start)
    return (lp * completion_mask[:, start:].to(lp.dtype)).sum(-1)
