"""`warp generate CKPT --prompt TEXT …`: sample replies of a checkpoint to look at them, with the sampler
and the prompt handling of `warp rl` (chat template, seeded draws, top-p / top-k / stop strings)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Optional

import typer
from pydantic import BaseModel, ConfigDict, Field, field_validator

from mergekit_warp.cli.common import options_from, user_errors, with_parameters
from mergekit_warp.errors import WarpError, build
from mergekit_warp.rl.config import RLConfig, check_stop

_RL = RLConfig.model_fields


class GenerateConfig(BaseModel):
    """The options of `warp generate`; the sampling ones mean (and default to) what they do in `warp rl`."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    prompt: Optional[list[str]] = Field(
        None, description="A prompt, as a user message (repeat for several); shown before those of --prompts."
    )
    prompts: Optional[Path] = Field(
        None, description="A prompts file as for `warp rl`: JSONL, Parquet or a datasets save_to_disk folder."
    )
    samples: int = Field(1, ge=1, description="Replies per prompt.")
    max_new_tokens: int = Field(_RL["max_new_tokens"].default, ge=1, description="Longest reply, in tokens.")
    temperature: float = Field(_RL["temperature"].default, gt=0, le=100, description="Sampling temperature.")
    top_p: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Nucleus sampling: draw only from the most probable tokens whose mass reaches P (1 = off).",
    )
    top_k: int = Field(0, ge=0, description="Draw only from the K most probable tokens (0 = off; 1 = greedy).")
    stop: Optional[list[str]] = Field(
        None, description="Stop string (repeat for several): a reply ends with the first one, which it keeps."
    )
    max_prompt_length: Optional[int] = Field(
        None, ge=1, description="Longer prompts keep only their LAST N tokens (left truncation). Default: no limit."
    )
    seed: int = Field(0, description="Sampling seed: the same command prints the same replies.")
    device: str = Field("cpu", description="Torch device: cpu, cuda, cuda:N or mps.")
    dtype: str = Field("fp32", description="Compute dtype: fp32, bf16 or fp16.")
    chat: bool = Field(
        True,
        description="Apply the tokenizer's chat template when it has one; --no-chat: the raw text, with the "
        "tokenizer's special tokens.",
    )
    batch_size: int = Field(
        16, ge=1, description="Replies sampled per forward batch (the replies do not depend on it)."
    )

    _stop = field_validator("stop", mode="before")(check_stop)


def replies(ckpt: str, cfg: GenerateConfig) -> list[tuple]:
    """(Prompt, [Reply, …]) for every prompt: `cfg.samples` seeded replies of checkpoint `ckpt`."""
    from mergekit_warp.lm.models import load_model, load_tokenizer, model_context
    from mergekit_warp.lm.prompts import check_lengths, make_prompt, read_prompts
    from mergekit_warp.lm.sampling import sample_replies
    from mergekit_warp.merge.adapters import apply, as_adapter

    if not cfg.prompt and cfg.prompts is None:
        raise WarpError("no prompt: give --prompt TEXT (repeatable) or --prompts FILE")
    adapted = as_adapter(ckpt)  # a LoRA adapter (or BASE+ADAPTER): its base, with the adapter added
    if adapted is not None:
        ckpt = str(adapted[0].path)
    tok = load_tokenizer(ckpt)
    prompts = [
        make_prompt([{"role": "user", "content": t}], tok, i, f"--prompt {i}", cfg.chat)
        for i, t in enumerate(cfg.prompt or (), start=1)
    ]
    if cfg.prompts is not None:
        prompts += read_prompts(cfg.prompts, tok, cfg.chat)
    special = None if cfg.chat else True  # raw text gets the tokenizer's special tokens
    context = model_context(ckpt)
    if context:
        where = Path(cfg.prompts or "--prompt")
        check_lengths(prompts, tok, context, cfg.max_new_tokens, where, cfg.max_prompt_length, special)
    model = load_model(ckpt, cfg.dtype, cfg.device)
    if adapted is not None:
        apply(model, adapted[1])
    out = sample_replies(
        model,
        tok,
        [p.text for p in prompts],
        samples=cfg.samples,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        stop=cfg.stop or (),
        max_prompt_length=cfg.max_prompt_length,
        special_tokens=special,
    )
    return list(zip(prompts, out))


def show(results: list[tuple], as_json: bool) -> str:
    """The readable layout (a header per prompt and per reply), or one JSON object per prompt."""
    if as_json:
        return "\n".join(
            json.dumps(
                {"prompt": p.plain, "input": p.text, "replies": [{"text": r.text, "tokens": r.tokens} for r in rs]},
                ensure_ascii=False,
            )
            for p, rs in results
        )
    blocks = []
    for i, (p, rs) in enumerate(results, start=1):
        lines = [f"=== prompt {i} ===", p.plain]
        for j, r in enumerate(rs, start=1):
            lines += ["", f"--- reply {j} of {len(rs)} ({r.tokens} tokens) ---", r.text]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def register(app: typer.Typer) -> None:
    """Add `warp generate` to the top-level app."""

    def generate_cmd(**options) -> None:
        ckpt, as_json = options.pop("ckpt"), options.pop("json")
        with user_errors():
            cfg = build(GenerateConfig, options)
            text = show(replies(ckpt, cfg), as_json)
        print(text)

    params = [
        inspect.Parameter(
            "ckpt",
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Argument(
                ...,
                help="The checkpoint: an HF folder, a hub id, smollm2-135m-instruct, a LoRA adapter folder (on the base "
                "it names) or BASE+ADAPTER.",
            ),
            annotation=str,
        ),
        *options_from(GenerateConfig),
        inspect.Parameter(
            "json",
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(
                False,
                "--json",
                help='One JSON object per prompt: {"prompt", "input", "replies": [{"text", "tokens"}]}.',
            ),
            annotation=bool,
        ),
    ]
    with_parameters(generate_cmd, params)
    generate_cmd.__doc__ = (
        "Sample replies of CKPT to prompts and print them (seeded: the same command prints the same replies). "
        "Greedy: --top-k 1."
    )
    app.command("generate")(generate_cmd)
