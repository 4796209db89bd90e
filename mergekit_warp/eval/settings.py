"""The options of held-out evaluation, shared by `warp eval`, `warp eval sxs` and the pipeline's `eval:`
block (one set of names and defaults; no heavy imports, so the CLI can build its options from it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field

from mergekit_warp.errors import WarpError, build


class EvalSettings(BaseModel):
    """How held-out completions are sampled and scored: one set of options and defaults for
    `warp eval`, `warp eval sxs` and the pipeline's `eval:` block. Sampling options left unset follow
    the RL runs (`resolved`); the descriptions carry no defaults, the CLI states them."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    samples_per_prompt: int = Field(2, ge=1, description="Completions sampled per prompt and policy.")
    max_prompts: Optional[int] = Field(None, ge=1, description="Use only the first N prompts of the file.")
    max_new_tokens: Optional[int] = Field(None, ge=1, description="Longest completion in tokens.")
    temperature: Optional[float] = Field(None, gt=0, le=100, description="Sampling temperature, also used by the KL.")
    length_penalty: Optional[float] = Field(
        None, ge=0, le=1e3, description="Subtracted from the reward per completion token."
    )
    batch_size: int = Field(
        32,
        ge=1,
        description="Completions generated together: memory against speed. Batch c is seeded seed + c, so the samples depend on it too.",
    )
    seed: int = Field(1234, description="Sampling seed, the same for every policy compared (common random numbers).")

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

    def record(self) -> dict[str, Any]:
        """The settings as plain values (for a result's JSON)."""
        return {k: getattr(self, k) for k in type(self).model_fields if k in EvalSettings.model_fields}


# ----------------------------------------------------------------------------------------------------
# What an estimate depends on besides the checkpoint


@dataclass(frozen=True)
class Recipe:
    """θ_sft, prompts, reward, sampling settings (resolved) and device: two estimates are comparable
    when their recipes are equal."""

    init: str
    prompts: Path
    reward: str
    settings: EvalSettings
    device: str = "cpu"
    like: str | None = None
    """The pipeline run folder the recipe was taken from (`--like`), if any."""

    def describe(self) -> str:
        """One line: the sampling settings, the device and where they came from."""
        s = self.settings
        first = f" of the first {s.max_prompts} prompts" if s.max_prompts else ""
        return (
            f"{s.samples_per_prompt} samples per prompt{first}, ≤ {s.max_new_tokens} new tokens, temperature "
            f"{s.temperature:g}, length penalty {s.length_penalty:g}, seed {s.seed}, batch {s.batch_size}, "
            f"on {self.device}" + (f"; as in run {self.like}" if self.like else "")
        )

    def record(self) -> dict[str, Any]:
        return {
            "init": str(self.init),
            "prompts": str(self.prompts),
            "reward": self.reward,
            **self.settings.record(),
            "device": self.device,
            "like": self.like,
        }


def make_recipe(
    *,
    like: Path | None = None,
    init: str | Path | None = None,
    prompts: Path | None = None,
    reward: str | None = None,
    device: str | None = None,
    options: dict[str, Any] | None = None,
) -> Recipe:
    """The recipe of an evaluation. With `like` (a `warp pipeline run` folder), everything not given
    here is the run's, exactly as its Pareto evaluation uses it (held-out prompts, else the training
    ones; the `eval:` settings, unset ones from the `rl:` section; the first device). Without it,
    `init`, `prompts` and `reward` are required and unset settings take `warp rl`'s defaults.
    `options`: EvalSettings fields given explicitly (None values are ignored)."""
    given = {k: v for k, v in (options or {}).items() if v is not None}
    base: dict[str, Any] = {}
    rl: dict[str, Any] | None = None
    if like is not None:
        cfg = _run_config(Path(like))
        base = {k: getattr(cfg.eval, k) for k in EvalSettings.model_fields}
        rl = cfg.rl
        init = init if init is not None else cfg.init
        prompts = prompts if prompts is not None else (cfg.prompts.heldout or cfg.prompts.train)
        reward = reward if reward is not None else cfg.reward
        device = device if device is not None else cfg.eval_device
    for flag, v in (("--init", init), ("--prompts", prompts), ("--reward", reward)):
        if v is None:
            raise WarpError(f"{flag} is required (or --like RUN_DIR to take it from a pipeline run folder)")
    if not Path(prompts).exists():
        raise WarpError(f"--prompts {prompts}: not found; give a file of prompts (JSONL)")
    settings = build(EvalSettings, {**base, **given}).resolved(rl)
    return Recipe(str(init), Path(prompts), str(reward), settings, device or "cpu", None if like is None else str(like))


def _run_config(run_dir: Path):
    """The recorded config of pipeline run folder `run_dir`."""
    from pydantic import ValidationError

    from mergekit_warp.pipeline.config import PipelineConfig
    from mergekit_warp.pipeline.layout import MANIFEST
    from mergekit_warp.pipeline.manifest import Manifest

    if not (run_dir / MANIFEST).is_file():
        raise WarpError(
            f"--like {run_dir}: not a pipeline run folder (no {MANIFEST}); pass the -o folder of `warp pipeline run`"
        )
    try:
        return PipelineConfig.model_validate(Manifest.load(run_dir).config)
    except ValidationError as e:
        raise WarpError(
            f"--like {run_dir}: the config recorded in {MANIFEST} is not valid for this version "
            f"({e.errors()[0]['msg']}); pass the options explicitly instead"
        ) from None
