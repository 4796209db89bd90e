"""The options of held-out evaluation, shared by `warp eval`, `warp eval sxs` and the pipeline's `eval:`
block (one set of names and defaults; no heavy imports, so the CLI can build its options from it)."""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field


class EvalSettings(BaseModel):
    """How held-out completions are sampled and scored: one set of options and defaults for
    `warp eval`, `warp eval sxs` and the pipeline's `eval:` block."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    samples_per_prompt: int = Field(2, ge=1, description="Completions sampled per held-out prompt and checkpoint.")
    max_prompts: Optional[int] = Field(None, ge=1, description="Use only the first N held-out prompts.")
    max_new_tokens: Optional[int] = Field(
        None, ge=1, description="Longest completion in tokens (default: the RL runs' setting; warp rl's default is 64)."
    )
    temperature: Optional[float] = Field(
        None, gt=0, le=100, description="Sampling temperature, also used by the KL (default: the RL runs'; 0.9)."
    )
    length_penalty: Optional[float] = Field(
        None, ge=0, le=1e3, description="Subtracted from the reward per completion token (default: the RL runs'; 0)."
    )
    batch_size: int = Field(32, ge=1, description="Completions generated per forward batch.")
    seed: int = Field(1234, description="Sampling seed, the same for every checkpoint (common random numbers).")

    def resolved(self, rl: dict[str, Any] | None = None) -> EvalSettings:
        """Unset options taken from RL options `rl` (a pipeline's `rl:` section), else from `warp rl`'s
        defaults, so held-out samples look like the training samples."""
        from mergekit_warp.rl.config import RLConfig

        fill = {
            k: (rl or {}).get(k, RLConfig.model_fields[k].default)
            for k in ("max_new_tokens", "temperature", "length_penalty")
            if getattr(self, k) is None
        }
        return self.model_copy(update=fill)
