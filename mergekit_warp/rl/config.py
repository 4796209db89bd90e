"""Every option of `warp rl`, with the WARP paper's defaults (../shared/WARP.md §Defaults).

The CLI builds its options from this dataclass (names, types, defaults and the one-line docstrings
below), so the command and the library cannot drift apart.
"""

import ast
import dataclasses
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mergekit_warp.errors import WarpError

ANCHORS = ("ema", "init")
BASELINES = ("rloo", "mean", "none")
DTYPES = ("fp32", "bf16", "fp16")
PARALLEL = ("ddp", "fsdp")


@dataclass(frozen=True)
class RLConfig:
    model: str
    """The SFT/init policy: an HF folder or hub id."""
    prompts: Path
    """Training prompts, JSONL: one {"prompt": ...} or {"messages": [...]} per line."""
    reward: str
    """'sentiment' (VADER), 'module:function', 'file.py:function', or an HF 1-label reward model."""
    out: Path
    """Output folder (published atomically at the end; state lives in OUT.partial/ meanwhile)."""
    beta: float = 0.1
    """KL coefficient β in r − β·(log π − log π_anchor)."""
    mu: float = 0.01
    """EMA rate μ of the anchor: θ_ema ← (1−μ)·θ_ema + μ·θ after every optimiser step."""
    anchor: str = "ema"
    """'ema' (WARP) or 'init' (frozen init, the classic RLHF baseline)."""
    temperature: float = 0.9
    """Sampling temperature; log-probs for the loss and the KL use the same temperature."""
    batch_size: int = 128
    """Prompts per optimiser step."""
    samples_per_prompt: int = 2
    """Completions sampled per prompt (k); RLOO needs k ≥ 2."""
    baseline: str = "rloo"
    """REINFORCE baseline: 'rloo' (leave-one-out over the k samples), 'mean' (batch mean), 'none'."""
    lr: float = 1e-6
    """Adam learning rate (after warm-up)."""
    warmup: int = 100
    """Linear learning-rate warm-up, in optimiser steps."""
    steps: int = 9000
    """Optimiser steps T."""
    max_new_tokens: int = 64
    """Longest completion, in tokens."""
    micro_batch: Optional[int] = None
    """Completions per forward/backward chunk (gradient accumulation); must divide batch_size·k."""
    grad_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, ~30% more time)."""
    dtype: str = "fp32"
    """Policy compute dtype: fp32, bf16 or fp16; the anchor and Adam's master weights stay fp32."""
    device: str = "cpu"
    """Torch device: cpu, cuda, cuda:N or mps. Under torchrun / --nproc: cpu (gloo) or cuda (rank r on cuda:r)."""
    threads: int = 0
    """Torch CPU threads for this run (0 = torch's default); 1 is fastest on a busy shared machine."""
    parallel: str = "ddp"
    """Under torchrun / --nproc: 'ddp' (a replica per rank, gradients all-reduced) or 'fsdp' (FSDP2: policy, anchor and init sharded)."""
    seed: int = 0
    """Seed of prompt order and sampling (the M runs of WARP differ by it)."""
    save_every: int = 0
    """Write OUT/checkpoints/step_K/ every K steps (for `warp merge ema`); 0 = none."""
    state_every: int = 50
    """Write resumable state (policy, anchor, optimiser, step) every K steps; 0 = only at save_every."""
    kl_stop: Optional[float] = None
    """Stop early once the batch-mean KL to the init reaches this value (the paper stops at 200)."""
    kl_to_init: bool = True
    """Estimate KL to the init every step (one extra forward with --anchor ema; needed by --kl-stop)."""
    length_penalty: float = 0.0
    """Subtract this times the completion length in tokens from the reward (paper App. E: 0.0005)."""
    clip_grad: float = 1.0
    """Clip the gradient's global L2 norm to this; 0 = no clipping."""
    eval_prompts: Optional[Path] = None
    """Held-out prompts (JSONL) for a periodic reward / KL-to-init estimate."""
    eval_every: int = 0
    """Evaluate on eval_prompts every K steps (and at the end); 0 = only at the end."""
    resume: bool = False
    """Continue from OUT.partial/ (or return OUT if the run already finished)."""
    force: bool = False
    """Replace an existing OUT (and discard an existing OUT.partial/)."""
    progress: bool = True
    """Show the live view on stderr."""

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise WarpError(msg)

        need(self.anchor in ANCHORS, f"--anchor {self.anchor!r}: use one of {', '.join(ANCHORS)}")
        need(self.baseline in BASELINES, f"--baseline {self.baseline!r}: use one of {', '.join(BASELINES)}")
        need(self.dtype in DTYPES, f"--dtype {self.dtype!r}: use one of {', '.join(DTYPES)}")
        need(self.parallel in PARALLEL, f"--parallel {self.parallel!r}: use one of {', '.join(PARALLEL)}")
        need(self.beta >= 0, f"--beta {self.beta}: must be ≥ 0")
        need(0 <= self.mu <= 1, f"--mu {self.mu}: the EMA rate must lie in [0, 1]")
        need(self.temperature > 0, f"--temperature {self.temperature}: must be > 0")
        need(self.batch_size >= 1, f"--batch-size {self.batch_size}: must be ≥ 1")
        need(self.samples_per_prompt >= 1, f"--samples-per-prompt {self.samples_per_prompt}: must be ≥ 1")
        need(
            self.baseline != "rloo" or self.samples_per_prompt >= 2,
            "--baseline rloo needs --samples-per-prompt ≥ 2 (or use --baseline mean)",
        )
        need(self.lr > 0, f"--lr {self.lr}: must be > 0")
        need(self.warmup >= 0, f"--warmup {self.warmup}: must be ≥ 0")
        need(self.steps >= 1, f"--steps {self.steps}: must be ≥ 1")
        need(self.max_new_tokens >= 1, f"--max-new-tokens {self.max_new_tokens}: must be ≥ 1")
        n = self.batch_size * self.samples_per_prompt
        need(
            self.micro_batch is None or (self.micro_batch >= 1 and n % self.micro_batch == 0),
            f"--micro-batch {self.micro_batch} does not divide the {n} completions per step "
            f"(batch size {self.batch_size} × {self.samples_per_prompt} samples); pick a divisor",
        )
        need(self.save_every >= 0 and self.state_every >= 0, "--save-every/--state-every must be ≥ 0")
        need(
            self.kl_stop is None or self.kl_to_init,
            "--kl-stop needs the KL to the init: drop --no-kl-to-init",
        )
        need(self.length_penalty >= 0, f"--length-penalty {self.length_penalty}: must be ≥ 0")
        need(self.clip_grad >= 0, f"--clip-grad {self.clip_grad}: must be ≥ 0 (0 = off)")
        need(self.threads >= 0, f"--threads {self.threads}: must be ≥ 0 (0 = torch's default)")
        need(self.eval_every >= 0, f"--eval-every {self.eval_every}: must be ≥ 0")
        need(
            self.eval_every == 0 or self.eval_prompts is not None,
            "--eval-every needs --eval-prompts FILE",
        )

    @property
    def completions_per_step(self) -> int:
        return self.batch_size * self.samples_per_prompt

    @property
    def chunk(self) -> int:
        """Completions per micro-batch."""
        return self.micro_batch or self.completions_per_step


# Fields that may change between an interrupted run and its `--resume` without changing the result.
RESUMABLE_CHANGES = frozenset(
    {"resume", "force", "progress", "steps", "kl_stop", "save_every", "state_every", "device", "eval_every", "threads",
     "parallel"}
)


def field_docs(cls: type = RLConfig) -> dict[str, str]:
    """The docstring under each dataclass field (used as CLI help)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant):
            docs[a.target.id] = str(b.value.value)
    return docs


def config_dict(cfg: RLConfig) -> dict:
    """JSON-ready dict of every option (paths as strings)."""
    return {f.name: (str(v) if isinstance(v := getattr(cfg, f.name), Path) else v) for f in dataclasses.fields(cfg)}
