"""Every option of `warp rl`, with the WARP paper's defaults (β 0.1, μ 0.01, temperature 0.9, batch 128,
Adam lr 1e-6 with 100 warm-up steps, 9k steps, KL stop at 200).

A typed, frozen pydantic model: unknown keys, wrong types, non-finite numbers and values out of range
are errors (one line, naming the option). The `warp rl` command and the pipeline's `rl:` section are
both built from these fields (name, type, default, description), so they cannot drift apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mergekit_warp.errors import WarpError, build


def check_stop(v: Any) -> Any:
    """Stop strings: one string means a list of it (`stop: "\\n"` in a config file); none may be empty."""
    v = [v] if isinstance(v, str) else v
    if isinstance(v, (list, tuple)) and any(s == "" for s in v):
        raise ValueError("a stop string must not be empty")
    return v


class RLConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    model: str = Field(description="The SFT/init policy: an HF folder, a hub id or the builtin smollm2-135m-instruct.")
    prompts: Path = Field(
        description='Training prompts: JSONL with one {"prompt": ...} or {"messages": [...]} per line, or a '
        "Parquet file / `datasets` save_to_disk folder with a prompt or messages column (needs pyarrow)."
    )
    reward: str = Field(
        description="'sentiment' (VADER), 'module:function' or 'file.py:function' (runs that Python "
        "code: use only code you trust), or an HF 1-label reward model folder."
    )
    out: Path = Field(
        description="Output folder (published atomically at the end; state lives in OUT.partial/ meanwhile)."
    )
    beta: float = Field(0.1, ge=0, le=1e6, description="KL coefficient β in r − β·(log π − log π_anchor).")
    mu: float = Field(
        0.01, ge=0, le=1, description="EMA rate μ of the anchor: θ_ema ← (1−μ)·θ_ema + μ·θ after every optimiser step."
    )
    anchor: Literal["ema", "init"] = Field(
        "ema", description="'ema' (WARP) or 'init' (frozen init, the classic RLHF baseline)."
    )
    temperature: float = Field(
        0.9,
        gt=0,
        le=100,
        description="Sampling temperature; log-probs for the loss and the KL use the same temperature.",
    )
    batch_size: int = Field(128, ge=1, description="Prompts per optimiser step.")
    samples_per_prompt: int = Field(2, ge=1, description="Completions sampled per prompt (k); RLOO needs k ≥ 2.")
    baseline: Literal["rloo", "mean", "none"] = Field(
        "rloo",
        description="REINFORCE baseline: 'rloo' (leave-one-out over the k samples), 'mean' (batch mean), 'none'.",
    )
    lr: float = Field(1e-6, gt=0, le=1, description="Adam learning rate (after warm-up).")
    warmup: int = Field(100, ge=0, description="Linear learning-rate warm-up, in optimiser steps.")
    steps: int = Field(9000, ge=1, description="Optimiser steps T.")
    max_new_tokens: int = Field(64, ge=1, description="Longest completion, in tokens.")
    top_p: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Nucleus sampling: draw only from the most probable tokens whose mass reaches P (1 = off; "
        "after --top-k). The log-probs of the loss and the KL stay those of the policy at the temperature over "
        "the full vocabulary (as in TRL).",
    )
    top_k: int = Field(
        0,
        ge=0,
        description="Draw only from the K most probable tokens (0 = off). The log-probs of the loss and the KL "
        "stay those of the policy at the temperature over the full vocabulary (as in TRL).",
    )
    stop: Optional[list[str]] = Field(
        None,
        description="Stop string (repeat for several): a completion ends with the token that completes the first "
        "one; that token is kept and scored like EOS, the text the reward sees ends with the stop string (in the "
        "held-out evaluation too).",
    )
    max_prompt_length: Optional[int] = Field(
        None,
        ge=1,
        description="Longer prompts keep only their LAST N tokens (left truncation, as in TRL: a chat "
        "template's generation prompt survives); the reward still sees the whole prompt. Default: no limit.",
    )
    micro_batch: Optional[int] = Field(
        None,
        ge=1,
        description="Completions per forward/backward chunk (gradient accumulation); must divide "
        "batch size × samples per prompt.",
    )
    grad_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass (less memory, ~30% more time)."
    )
    dtype: str = Field(
        "fp32", description="Policy compute dtype: fp32, bf16 or fp16; the anchor and Adam's master weights stay fp32."
    )
    device: str = Field(
        "cpu",
        description="Torch device: cpu, cuda, cuda:N or mps. Under torchrun / --nproc: cpu (gloo) "
        "or cuda (rank r on cuda:r).",
    )
    threads: int = Field(
        0,
        ge=0,
        description="Torch CPU threads for this run (0 = torch's default); 1 is fastest on a busy shared machine.",
    )
    parallel: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="Under torchrun / --nproc: 'ddp' (a replica per rank, gradients all-reduced) or 'fsdp' "
        "(FSDP2: policy, anchor and init sharded).",
    )
    seed: int = Field(0, description="Seed of prompt order and sampling (the M runs of WARP differ by it).")
    save_every: int = Field(
        0, ge=0, description="Write OUT/checkpoints/step_K/ every K steps (for `warp merge ema`); 0 = none."
    )
    state_every: int = Field(
        50,
        ge=0,
        description="Write resumable state (policy, anchor, optimiser, step) every K steps; 0 = only at save_every.",
    )
    kl_stop: Optional[float] = Field(
        None, description="Stop early once the batch-mean KL to the init reaches this value (the paper stops at 200)."
    )
    kl_to_init: bool = Field(
        True,
        description="Estimate KL to the init every step (one extra forward with --anchor ema; needed by --kl-stop).",
    )
    length_penalty: float = Field(
        0.0,
        ge=0,
        le=1e3,
        description="Subtract this times the completion length in tokens from the reward (paper App. E: 0.0005).",
    )
    clip_grad: float = Field(1.0, ge=0, description="Clip the gradient's global L2 norm to this; 0 = no clipping.")
    eval_prompts: Optional[Path] = Field(
        None, description="Held-out prompts (as --prompts) for a periodic reward / KL-to-init estimate."
    )
    eval_every: int = Field(
        0, ge=0, description="Evaluate on the held-out prompts every K steps (and at the end); 0 = only at the end."
    )
    resume: bool = Field(False, description="Continue from OUT.partial/ (or return OUT if the run already finished).")
    force: bool = Field(False, description="Replace an existing OUT (and discard an existing OUT.partial/).")
    progress: bool = Field(True, description="Show the live view on stderr.")
    save_anchor: bool = Field(
        True,
        description="Write the final EMA anchor to OUT/anchor/ (in the policy's dtype); --no-save-anchor saves "
        "the disk (WARP's merges use the policies only).",
    )
    report_to: Optional[list[str]] = Field(
        None,
        description="Also send every metric to these experiment trackers: tensorboard, wandb, trackio, mlflow "
        "(repeat the option or give a comma list; each needs its extra, e.g. pip install 'mergekit-warp[wandb]').",
    )
    run_name: Optional[str] = Field(None, description="Name of the tracker run (default: OUT's folder name).")
    run_group: Optional[str] = Field(None, description="Group of the tracker run (a pipeline groups its runs).")
    lora_r: Optional[int] = Field(
        None,
        ge=1,
        description="Train a LoRA adapter of this rank instead of the whole model: the base stays frozen in "
        "--dtype, the adapter trains in fp32 and Adam holds only its state; the init is the base without the "
        "adapter and the anchor a second adapter state on the same base. OUT/ is then a peft adapter folder.",
    )
    lora_alpha: Optional[float] = Field(
        None, gt=0, le=1e6, description="LoRA scale numerator: the adapter adds (α/r)·B·A (default 2·r)."
    )
    lora_targets: Optional[list[str]] = Field(
        None,
        description="Layers the adapter trains: all-linear (default: every linear layer but the output head) or "
        "layer names, repeated or as a comma list (q_proj,v_proj).",
    )
    lora_anchor: Optional[Literal["factors", "exact"]] = Field(
        None,
        description="The EMA anchor of a LoRA run: 'factors' (default: EMAs of A and B, adapter-sized; the EMA of "
        "the factors is not the EMA of their product: measured on SmolLM2-135M, r 16, μ 0.01, 80 steps, its delta "
        "was 13% off the exact one and KL(exact‖factors) 0.008 nats per completion, against 0.43 from the anchor "
        "to the policy; see the README) or 'exact' (an fp32 EMA of the dense deltas s·B·A: one fp32 copy of the "
        "targeted layers).",
    )
    rollout: Literal["builtin", "vllm"] = Field(
        "builtin",
        description="Generation engine: 'builtin' (warp's sampler: exact, seeded per row, bit-identical resume) or "
        "'vllm' (a vLLM engine in this process, one per rank under torchrun, the policy's weights pushed into it "
        "after every step; the loss and the KLs still use the trainer's own log-probs; needs pip install "
        "'mergekit-warp[vllm]').",
    )
    vllm_gpu_memory_utilization: float = Field(
        0.3,
        gt=0,
        le=1,
        description="With --rollout vllm on a GPU: the fraction of GPU memory vLLM may take (weights + KV cache); "
        "the trainer needs the rest. --vllm-kv-cache-gb, when given, sets the KV cache's size instead.",
    )
    vllm_sleep: bool = Field(
        False,
        description="With --rollout vllm on a GPU: put vLLM to sleep (weights and KV cache released) during the "
        "loss and optimiser step, woken before the weights are pushed into it. No effect on CPU.",
    )
    vllm_kv_cache_gb: Optional[float] = Field(
        None,
        gt=0,
        le=1e6,
        description="With --rollout vllm: GiB of memory for vLLM's KV cache (default: 1 on CPU, or vLLM's "
        "VLLM_CPU_KVCACHE_SPACE when set; on a GPU, what --vllm-gpu-memory-utilization leaves after the engine's "
        "weights). It must hold one request: the run's longest prompt plus --max-new-tokens.",
    )
    vllm_compile: Literal["auto", "on", "off"] = Field(
        "auto",
        description="With --rollout vllm: 'on' compiles the engine's model (torch.compile, and CUDA graphs on a "
        "GPU), 'off' runs it eagerly, 'auto' compiles on GPUs only. On CPU compiling took ~2 minutes at start-up "
        "and then sampled 1.3-1.4x faster (SmolLM2-135M, 2 cores): worth it for long runs with long completions.",
    )
    vllm_gap_warning: float = Field(
        0.05,
        ge=0,
        description="With --rollout vllm: say so when vLLM's log-probs of the sampled tokens differ from the "
        "trainer's by more than this per token on average (the off-policy error of the engine).",
    )
    merge_adapter: bool = Field(
        False, description="With --lora-r: also write the policy merged into its base as a full model in OUT/merged/."
    )

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        from mergekit_warp.dtypes import short_name  # (torch: not needed to build the CLI)

        try:
            return short_name(v)
        except WarpError as e:
            raise ValueError(str(e).split(": ", 1)[-1]) from None

    _stop = field_validator("stop", mode="before")(check_stop)

    @field_validator("report_to")
    @classmethod
    def _trackers(cls, v: Optional[list[str]]) -> Optional[list[str]]:
        from mergekit_warp import trackers

        try:
            return trackers.names(v) or None
        except WarpError as e:
            raise ValueError(str(e).split(": ", 1)[-1]) from None

    @field_validator("lora_targets", mode="before")
    @classmethod
    def _lora_targets(cls, v: Any) -> Optional[list[str]]:
        from mergekit_warp.rl.lora import parse_targets

        return parse_targets(v)

    @model_validator(mode="after")
    def _consistent(self) -> RLConfig:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        need(
            self.baseline != "rloo" or self.samples_per_prompt >= 2,
            "--baseline rloo needs --samples-per-prompt ≥ 2 (or use --baseline mean)",
        )
        n = self.batch_size * self.samples_per_prompt
        need(
            self.micro_batch is None or n % self.micro_batch == 0,
            f"--micro-batch {self.micro_batch} does not divide the {n} completions per step "
            f"(batch size {self.batch_size} × {self.samples_per_prompt} samples); pick a divisor",
        )
        need(self.kl_stop is None or self.kl_to_init, "--kl-stop needs the KL to the init: drop --no-kl-to-init")
        need(self.eval_every == 0 or self.eval_prompts is not None, "--eval-every needs --eval-prompts FILE")
        lora_options = ("lora_alpha", "lora_targets", "lora_anchor", "merge_adapter")
        given = [flag(o) for o in lora_options if getattr(self, o) not in (None, False)]
        need(self.lora_r is not None or not given, f"{', '.join(given)} needs --lora-r (the adapter's rank)")
        need(
            self.lora_r is None or self.parallel != "fsdp",
            "--lora-r does not run under --parallel fsdp yet; use --parallel ddp (the default)",
        )
        need(
            self.lora_anchor is None or self.anchor == "ema",
            "--lora-anchor is the EMA anchor's form: it needs --anchor ema",
        )
        return self

    @property
    def completions_per_step(self) -> int:
        return self.batch_size * self.samples_per_prompt

    @property
    def lora(self) -> bool:
        return self.lora_r is not None

    @property
    def chunk(self) -> int:
        """Completions per micro-batch."""
        return self.micro_batch or self.completions_per_step

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every option (paths as strings)."""
        return self.model_dump(mode="json")


# Options added after the first release, with the value a run saved without them had.
ADDED_OPTIONS = {
    "top_p": 1.0,
    "top_k": 0,
    "stop": None,
    "max_prompt_length": None,
    "save_anchor": True,
    "report_to": None,
    "run_name": None,
    "run_group": None,
    "lora_r": None,
    "lora_alpha": None,
    "lora_targets": None,
    "lora_anchor": None,
    "merge_adapter": False,
    "rollout": "builtin",
    "vllm_gpu_memory_utilization": 0.3,
    "vllm_sleep": False,
    "vllm_gap_warning": 0.05,
    "vllm_kv_cache_gb": None,
    "vllm_compile": "auto",
}

# Fields that may change between an interrupted run and its `--resume` without changing the result.
RESUMABLE_CHANGES = frozenset(
    {
        "resume",
        "force",
        "progress",
        "steps",
        "kl_stop",
        "save_every",
        "state_every",
        "device",
        "eval_every",
        "threads",
        "parallel",
        "save_anchor",
        "report_to",
        "run_name",
        "run_group",
        "merge_adapter",
        "vllm_gpu_memory_utilization",
        "vllm_sleep",
        "vllm_gap_warning",
        "vllm_kv_cache_gb",
        "vllm_compile",
    }
)


def flag(name: str) -> str:
    """The command-line option of field `name`: `batch_size` → `--batch-size`."""
    return "--" + name.replace("_", "-")


def make_config(options: dict[str, Any], where: str = "") -> RLConfig:
    """An RLConfig from `options`; the first problem becomes a one-line WarpError naming the option
    (as a `--flag`, or as `WHERE.key` when `where` names a config section)."""
    return build(RLConfig, options, where)
