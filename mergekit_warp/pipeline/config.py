"""The pipeline's YAML config: typed, frozen, unknown keys are errors.

```yaml
init: smollm2-135m-instruct        # HF folder, hub id, or a builtin model name (mergekit_warp/io/builtin.py)
prompts: {train: prompts/train.jsonl, heldout: prompts/heldout.jsonl}
reward: sentiment                  # any `warp rl --reward` spec
iterations: 2                      # I
runs: 2                            # M, RL runs per iteration
seed: 0                            # run m of iteration i uses seeds[m-1] + 1000·(i-1)
rl: {steps: 16, lr: 2.0e-5, ...}   # any RLConfig field except model/prompts/reward/out/device/seed/resume/force
                                   # (LoRA: lora: {r: 16, alpha: 32, targets: all-linear, anchor: factors})
per_run: [{}, {length_penalty: 0.0005}]   # optional RLConfig overrides, one mapping per run
slerp: {lam: 0.5, granularity: block}
liti: {eta: 0.3, target: init}     # target: init (Algorithm 1) or sft
devices: [cpu]                     # several → the M runs of an iteration run in parallel;
                                   # a group [[cuda:0, cuda:1], [cuda:2, cuda:3]] → each run data-parallel on its group
eval: {etas: [0, 0.1, 0.3, 0.5, 0.8, 1.0]}
```
Relative paths are taken relative to the config file's folder.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mergekit_warp.errors import WarpError
from mergekit_warp.eval.settings import EvalSettings

# RLConfig fields the pipeline sets itself, per run; a config that sets them is refused.
PIPELINE_OWNED = ("model", "prompts", "reward", "out", "device", "seed", "resume", "force", "progress")
DEFAULT_ETAS = (0.0, 0.1, 0.3, 0.5, 0.8, 1.0)


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Prompts(_Frozen):
    train: Path
    """JSONL of RL training prompts (`{"prompt": ...}` or `{"messages": [...]}` lines)."""
    heldout: Path | None = None
    """JSONL of held-out prompts for the Pareto evaluation (default: the training prompts)."""


class Slerp(_Frozen):
    lam: float | None = None
    """λ of the two-model SLERP; None → 0.5. For M > 2 the paper's iterative rule (λ = 1/k) applies."""
    granularity: Literal["block", "tensor", "model"] = "block"
    """One angle per transformer block (the paper), per tensor, or for the whole model."""

    @field_validator("lam")
    @classmethod
    def _lam_range(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 <= v <= 1.0:
            raise ValueError("must be in [0, 1]")
        return v


class Liti(_Frozen):
    eta: float = 0.3
    """η of θ ← (1−η)·θ_target + η·θ_slerp, giving the next iteration's init."""
    target: Literal["init", "sft"] = "init"
    """`init`: the iteration's own init (Algorithm 1); `sft`: always θ_sft."""
    final_eta: float | None = None
    """η used for `final/` after the last iteration (default: `eta`)."""
    allow_extrapolation: bool = False
    """Permit η outside [0, 1] (ExPO-style extrapolation)."""

    @model_validator(mode="after")
    def _eta_range(self) -> Liti:
        for name in ("eta", "final_eta"):
            v = getattr(self, name)
            if v is not None and not self.allow_extrapolation and not 0.0 <= v <= 1.0:
                raise ValueError(f"{name}={v} is outside [0, 1]; set liti.allow_extrapolation: true to extrapolate")
        return self


class Eval(EvalSettings):
    """The Pareto evaluation: how held-out completions are sampled and scored (`warp eval`'s options;
    unset sampling options follow the `rl:` section), and which LITI sweep is drawn."""

    enabled: bool = True
    """Run the Pareto evaluation at the end of the pipeline."""
    etas: tuple[float, ...] = DEFAULT_ETAS
    """LITI sweep of each iteration's SLERP merge toward `target` (values > 1 extrapolate)."""
    target: Literal["sft", "init"] = "sft"
    """Sweep toward θ_sft (the paper's fronts) or toward the iteration's init."""

    @field_validator("etas")
    @classmethod
    def _etas_ok(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v:
            raise ValueError("needs at least one value")
        if any(e < 0 for e in v):
            raise ValueError("η values must be ≥ 0")
        return tuple(sorted(set(v)))


class PipelineConfig(_Frozen):
    init: str
    """θ_sft: HF folder, hub id, or builtin asset name (`smollm2-135m-instruct`)."""
    prompts: Prompts
    reward: str
    """Reward spec as for `warp rl --reward`: `sentiment`, `module:function`, `file.py:function`, RM folder."""
    iterations: int = Field(ge=1)
    """I: WARP iterations."""
    runs: int = Field(ge=1)
    """M: independent RL runs per iteration."""
    seed: int = 0
    """Base seed; run m uses `seeds[m-1]` (default seed + m − 1), plus 1000·(i−1) at iteration i."""
    seeds: tuple[int, ...] | None = None
    rl: dict[str, Any] = Field(default_factory=dict)
    """Options passed to every RL run (names of `mergekit_warp.rl.config.RLConfig`)."""
    per_run: tuple[dict[str, Any], ...] | None = None
    """Optional RL overrides per run (length M)."""
    slerp: Slerp = Slerp()
    liti: Liti = Liti()
    devices: tuple[str | tuple[str, ...], ...] = ("cpu",)
    """Run m uses devices[(m−1) mod len]; more than one entry → runs of an iteration in parallel. An entry
    may be a group ([cuda:0, cuda:1], or [cpu, cpu] for gloo): that run is data-parallel on it under
    torchrun, one process per device (`warp rl --nproc N`)."""
    eval: Eval = Eval()
    report_to: tuple[str, ...] | None = None
    """Experiment trackers (tensorboard, wandb, trackio, mlflow): one tracker run per RL run, grouped by
    the run folder, and one for the Pareto summary with its files."""

    keep: tuple[Literal["policy", "anchor", "checkpoints", "merges"], ...] = ()
    """What stays once no later step reads it. By default a finished run holds final/, the evaluations
    and every step's metrics and provenance: each iteration's RL policies, SLERP and the previous LITI
    lose their weights as soon as the iteration is evaluated. `policy`: keep the RL runs' policies;
    `anchor`: write each run's final EMA anchor (anchor/, in the run's folder); `checkpoints`: keep the
    runs' `save_every` checkpoints; `merges`: keep each iteration's SLERP and LITI."""
    push_to_hub: str | None = None
    """A hub model repo: when the run is done, its final/ is uploaded there (as `warp push`), the card
    carrying the Pareto summary."""

    @field_validator("push_to_hub")
    @classmethod
    def _repo(cls, v: str | None) -> str | None:
        from mergekit_warp.io.hub import check_repo_id

        try:
            return None if v is None else check_repo_id(v)
        except WarpError as e:
            raise ValueError(str(e)) from None

    @field_validator("keep", mode="before")
    @classmethod
    def _keep(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v  # `keep: policy` as `keep: [policy]`

    @field_validator("report_to", mode="before")
    @classmethod
    def _trackers(cls, v: Any) -> Any:
        from mergekit_warp import trackers

        try:
            return tuple(trackers.names([v] if isinstance(v, str) else v)) or None
        except WarpError as e:
            raise ValueError(str(e).split(": ", 1)[-1]) from None

    @field_validator("rl", mode="before")
    @classmethod
    def _rl_lora(cls, v: Any) -> Any:
        return flatten_lora(v)

    @field_validator("per_run", mode="before")
    @classmethod
    def _per_run_lora(cls, v: Any) -> Any:
        return [flatten_lora(d) for d in v] if isinstance(v, (list, tuple)) else v

    @model_validator(mode="after")
    def _lengths(self) -> PipelineConfig:
        if self.seeds is not None and len(self.seeds) != self.runs:
            raise ValueError(f"seeds: has {len(self.seeds)} values but runs is {self.runs}")
        if self.per_run is not None and len(self.per_run) != self.runs:
            raise ValueError(f"per_run: has {len(self.per_run)} entries but runs is {self.runs}")
        if not self.devices:
            raise ValueError("devices: list at least one device, e.g. [cpu]")
        return self

    def run_seed(self, iteration: int, run: int) -> int:
        """Seed of run `run` (1-based) of iteration `iteration` (1-based)."""
        base = self.seeds[run - 1] if self.seeds is not None else self.seed + run - 1
        return base + 1000 * (iteration - 1)

    def rl_options(self, run: int) -> dict[str, Any]:
        """The RL options of run `run` (1-based): the shared section, then its per-run overrides."""
        return {**self.rl, **(self.per_run[run - 1] if self.per_run else {})}

    @property
    def lora(self) -> bool:
        """The RL runs train LoRA adapters (then SLERP merges adapters and LITI writes full models)."""
        return any(self.rl_options(m).get("lora_r") is not None for m in range(1, self.runs + 1))

    def group(self, run: int) -> tuple[str, ...]:
        """The device(s) of run `run` (1-based): one, or a group for a data-parallel run."""
        d = self.devices[(run - 1) % len(self.devices)]
        return (d,) if isinstance(d, str) else tuple(d)

    def device(self, run: int) -> str:
        """The run's `warp rl --device`: its device, or for a group "cpu"/"cuda" (rank r on the r-th GPU)."""
        from mergekit_warp.rl.launch import group_device

        g = self.group(run)
        return g[0] if len(g) == 1 else group_device(g)[0]

    @property
    def eval_device(self) -> str:
        """Where the Pareto evaluation runs: the first listed device."""
        return self.group(1)[0]

    @property
    def parallel(self) -> bool:
        return len(self.devices) > 1

    def digest(self) -> str:
        """Hash of the resolved config; a resumed run must have the same one."""
        blob = json.dumps(
            self.model_dump(mode="json", exclude={"report_to", "push_to_hub", "keep"}), sort_keys=True
        ).encode()
        return "sha256:" + hashlib.sha256(blob).hexdigest()


LORA_KEYS = {"r": "lora_r", "alpha": "lora_alpha", "targets": "lora_targets", "anchor": "lora_anchor"}


def flatten_lora(section: Any) -> Any:
    """An RL section's `lora: {r, alpha, targets, anchor}` as the RL options lora_r, lora_alpha, …"""
    if not isinstance(section, dict) or "lora" not in section:
        return section
    sub, rest = section["lora"], {k: v for k, v in section.items() if k != "lora"}
    if not isinstance(sub, dict):
        raise ValueError("lora: must be a mapping such as {r: 16, alpha: 32, targets: all-linear, anchor: factors}")
    for key in sub:
        if key not in LORA_KEYS:
            raise ValueError(f"lora.{key}: unknown key; use {', '.join(LORA_KEYS)}")
        if LORA_KEYS[key] in rest:
            raise ValueError(f"lora.{key} and {LORA_KEYS[key]} both given; keep one")
    return {**rest, **{LORA_KEYS[k]: v for k, v in sub.items()}}


# ----------------------------------------------------------------------------------------------------
# Loading


def load_config(path: Path, *, check_devices: bool = True) -> PipelineConfig:
    """Read, validate and resolve a pipeline YAML; every problem is one WarpError line naming the key."""
    path = Path(path)
    if not path.is_file():
        raise WarpError(f"config {path} does not exist; pass a pipeline YAML such as examples/demo.yaml")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" line {where.line + 1}" if where is not None else ""
        raise WarpError(f"config {path}{line}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise WarpError(f"config {path}: expected a mapping of keys (init, prompts, reward, ...) at the top")
    try:
        cfg = PipelineConfig.model_validate(raw)
    except ValidationError as e:
        raise WarpError(f"config {path}: {_first_error(e)}") from None
    _check_rl_keys(path, cfg)
    cfg = _resolve_paths(path.parent.absolute(), cfg)
    for role, p in (("prompts.train", cfg.prompts.train), ("prompts.heldout", cfg.prompts.heldout)):
        if p is not None and not p.is_file():
            raise WarpError(f"config {path}: {role} file {p} does not exist; fix the path (relative to the config)")
    if check_devices:
        from mergekit_warp.devices import resolve_device
        from mergekit_warp.rl.launch import group_device

        for entry in cfg.devices:
            group = (entry,) if isinstance(entry, str) else entry
            for d in group:
                resolve_device(d, f"config {path}: devices")
            if len(group) > 1:
                try:
                    group_device(group)
                except WarpError as e:
                    raise WarpError(f"config {path}: {e}") from None
    return cfg


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    key = ".".join(str(x) for x in err["loc"]) or "(top level)"
    if err["type"] == "missing":
        return f"missing required key '{key}'"
    if err["type"] == "extra_forbidden":
        return f"unknown key '{key}'; check the spelling (see examples/demo.yaml)"
    msg = err["msg"].removeprefix("Value error, ")
    return f"key '{key}': {msg}"


def _check_rl_keys(path: Path, cfg: PipelineConfig) -> None:
    """RL options must be RLConfig fields the pipeline does not set itself."""
    from mergekit_warp.rl.config import RLConfig

    fields = set(RLConfig.model_fields)
    sections = [("rl", cfg.rl)] + [(f"per_run.{i}", d) for i, d in enumerate(cfg.per_run or ())]
    for where, opts in sections:
        for key in opts:
            if key in PIPELINE_OWNED:
                hint = "use top-level 'seed'/'seeds'" if key == "seed" else "the pipeline sets it"
                raise WarpError(f"config {path}: key '{where}.{key}' is not allowed here ({hint})")
            if key not in fields:
                raise WarpError(
                    f"config {path}: unknown key '{where}.{key}'; valid RL options: {', '.join(sorted(fields - set(PIPELINE_OWNED)))}"
                )


def _resolve_paths(base: Path, cfg: PipelineConfig) -> PipelineConfig:
    from mergekit_warp.io.publish import tidy_path

    def rel(p: Path | None) -> Path | None:
        return None if p is None else (p if p.is_absolute() else tidy_path(base / p))

    prompts = cfg.prompts.model_copy(update={"train": rel(cfg.prompts.train), "heldout": rel(cfg.prompts.heldout)})
    return cfg.model_copy(
        update={"prompts": prompts, "init": _rel_spec(base, cfg.init), "reward": _rel_spec(base, cfg.reward)}
    )


def _rel_spec(base: Path, spec: str) -> str:
    """Make a model/reward spec that names a local path (`x/`, `f.py:fn`) absolute; leave names alone."""
    if ".py:" in spec:
        head, sep, tail = spec.rpartition(":")
    else:
        head, sep, tail = spec, "", ""
    p = Path(head).expanduser()
    if not p.is_absolute() and (base / p).exists():
        from mergekit_warp.io.publish import tidy_path

        return str(tidy_path(base / p)) + sep + tail
    return spec
