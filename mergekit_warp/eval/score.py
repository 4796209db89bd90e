"""Mean reward and KL(π‖π_sft) of checkpoints on held-out prompts, with standard errors.

KL estimate (WARP §4): for completions y sampled from π, the sum over the completion's tokens of
log π(y_t|·) − log π_sft(y_t|·), averaged over samples. Both log-probs use the sampling temperature
(as `warp rl` does for its KL), so this is an unbiased estimate of the KL between the two tempered
sampling distributions; it is ≥ 0 only in expectation, single samples may be negative.

Every checkpoint is sampled with the same prompts and the same generator seeds (common random
numbers), so differences between checkpoints are not swamped by sampling noise. One policy model is
kept in memory and its weights are overwritten per checkpoint, straight from the safetensors files or
as a LITI interpolation built tensor by tensor (nothing is written to disk).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from mergekit_warp.errors import WarpError


@dataclass(frozen=True)
class Score:
    """One checkpoint's estimates over n sampled completions."""

    name: str
    reward: float
    reward_se: float
    kl: float
    kl_se: float
    length: float
    """Mean completion length in tokens."""
    n: int
    path: str = ""


@dataclass(frozen=True)
class EvalSettings:
    prompts: Path
    """Held-out prompts (JSONL, as for `warp rl`)."""
    reward: str
    """Reward spec, as for `warp rl --reward`."""
    max_new_tokens: int = 64
    temperature: float = 0.9
    samples_per_prompt: int = 2
    max_prompts: int | None = None
    length_penalty: float = 0.0
    batch_size: int = 32
    seed: int = 1234
    device: str = "cpu"
    dtype: str = "fp32"


def mean_se(xs: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std / √n; 0 for n = 1)."""
    xs = xs.double()
    n = xs.numel()
    se = xs.std(unbiased=True).item() / math.sqrt(n) if n > 1 else 0.0
    return xs.mean().item(), se


class Evaluator:
    """Scores checkpoints that share θ_sft's architecture against θ_sft."""

    def __init__(self, sft: Path, settings: EvalSettings):
        from mergekit_warp.rl.data import load_prompts
        from mergekit_warp.rl.models import load_model, load_tokenizer
        from mergekit_warp.rl.rewards import load_reward

        self.s = settings
        self.tok = load_tokenizer(sft)
        prompts = load_prompts(settings.prompts, self.tok)
        if settings.max_prompts:
            prompts = prompts[: settings.max_prompts]
        # [p0, p0, p1, p1, ...]: k samples per prompt, in a fixed order.
        self.prompts = [p for p in prompts for _ in range(settings.samples_per_prompt)]
        # The length penalty counts the policy's tokens, as in training.
        self.reward_fn = load_reward(settings.reward, device=settings.device, length_penalty=settings.length_penalty, tokenizer=self.tok)
        self.sft = load_model(sft, dtype=settings.dtype, device=settings.device).eval()
        self.policy = load_model(sft, dtype=settings.dtype, device=settings.device).eval()
        self._params = self.policy.state_dict()

    # -- weights ----------------------------------------------------------------------------------

    def load_folder(self, folder: Path) -> None:
        """Put the weights of HF folder `folder` into the policy model."""
        self.load_liti(folder, folder, 1.0)

    @torch.no_grad()
    def load_liti(self, target: Path, merged: Path, eta: float) -> None:
        """Policy ← (1 − η)·θ_target + η·θ_merged, tensor by tensor (fp32 math, cast on copy)."""
        from safetensors import safe_open

        t_files, m_files = tensor_files(target), tensor_files(merged)
        if set(t_files) != set(m_files):
            diff = sorted(set(t_files) ^ set(m_files))[:3]
            raise WarpError(f"{target} and {merged} hold different tensors (e.g. {diff}); they must share an architecture")
        loaded = set()
        with contextlib.ExitStack() as stack:
            handles = {f: stack.enter_context(safe_open(f, "pt")) for f in {*t_files.values(), *m_files.values()}}
            same = Path(target).resolve() == Path(merged).resolve()
            for name in t_files:
                a = handles[t_files[name]].get_tensor(name)
                b = a if same else handles[m_files[name]].get_tensor(name)
                self._copy_one(name, a, b, eta, merged)
                loaded.add(self._params[name].data_ptr())
        missing = [k for k, v in self._params.items() if v.data_ptr() not in loaded and v.is_floating_point()]
        if missing:  # a tied head shares storage with the embedding and is covered by it
            raise WarpError(f"{merged} lacks tensors of the model (e.g. {missing[:3]}); checkpoints must match --init")

    def _copy_one(self, name: str, a: torch.Tensor, b: torch.Tensor, eta: float, merged: Path) -> None:
        from mergekit_warp.merge import math as mmath

        if name not in self._params:
            raise WarpError(f"tensor {name} of {merged} is not in the evaluated model; checkpoints must match --init")
        dst = self._params[name]
        if a.shape != dst.shape or b.shape != dst.shape:
            raise WarpError(f"tensor {name}: shape {tuple(b.shape)} in {merged}, {tuple(dst.shape)} in --init")
        if a is b or not a.is_floating_point():
            v = a  # plain load, or a non-float buffer (never interpolated; taken from the target)
        else:
            v = mmath.liti(a.float(), b.float(), eta)
        dst.copy_(v.to(dst.dtype))

    # -- scoring ----------------------------------------------------------------------------------

    @torch.no_grad()
    def score(self, name: str, path: str = "") -> Score:
        """Sample from the current policy weights; reward and KL to θ_sft per completion."""
        from mergekit_warp.rl.rollout import generate, sequence_logprobs

        rewards, kls, lengths = [], [], []
        bs = self.s.batch_size
        for c, start in enumerate(range(0, len(self.prompts), bs)):
            batch = self.prompts[start : start + bs]
            ro = generate(self.policy, self.tok, batch, max_new_tokens=self.s.max_new_tokens,
                          temperature=self.s.temperature, generator_seed=self.s.seed + c)
            args = (ro.input_ids, ro.attention_mask, ro.completion_mask)
            lp = sequence_logprobs(self.policy, *args, temperature=self.s.temperature)  # (b,)
            lp_sft = sequence_logprobs(self.sft, *args, temperature=self.s.temperature)  # (b,)
            kls.append((lp - lp_sft).double().cpu())
            rewards.append(torch.tensor(self.reward_fn(ro.prompts, ro.completions), dtype=torch.float64))
            lengths.append(ro.completion_mask.sum(1).double().cpu())
        r, r_se = mean_se(torch.cat(rewards))
        k, k_se = mean_se(torch.cat(kls))
        return Score(name=name, reward=r, reward_se=r_se, kl=k, kl_se=k_se,
                     length=torch.cat(lengths).mean().item(), n=len(self.prompts), path=path)


def tensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name → the safetensors file holding it (single file or sharded with an index), read from
    the validated headers (`io.reader`), as the merge engine reads them."""
    from mergekit_warp.io.reader import read_header
    from mergekit_warp.io.source import resolve_source

    return {name: f for f in resolve_source(Path(folder)).files for name in read_header(f)}


def evaluate(checkpoints: list[Path], init: Path, settings: EvalSettings) -> list[Score]:
    """Score each checkpoint (HF folder, hub id or builtin asset name) against θ_sft = `init`."""
    from mergekit_warp.assets import resolve_model

    local = [resolve_model(c) for c in [init, *checkpoints]]
    for c, p in zip([init, *checkpoints], local):
        if not p.is_dir():
            raise WarpError(f"checkpoint {c} is not a folder; pass HF checkpoint folders")
    ev = Evaluator(local[0], settings)
    out = []
    for c, p in zip(checkpoints, local[1:]):
        ev.load_folder(p)
        out.append(ev.score(str(c), str(c)))  # the path as given: several checkpoints may share a name
    return out


def write_scores(scores: list[Score], stem: Path) -> tuple[Path, Path]:
    """Write `STEM.csv` and `STEM.json`; return both paths."""
    stem = Path(stem)
    csv_path, json_path = stem.with_name(stem.name + ".csv"), stem.with_name(stem.name + ".json")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[fl.name for fl in fields(Score)])
        w.writeheader()
        w.writerows(asdict(s) for s in scores)
    json_path.write_text(json.dumps([asdict(s) for s in scores], indent=2) + "\n")
    return csv_path, json_path


def scores_table(scores: list[Score], title: str = "warp eval"):
    """A rich table of scores."""
    from rich.table import Table

    t = Table(title=title)
    for col in ("checkpoint", "reward", "± se", "KL(π‖π_sft)", "± se", "length", "n"):
        t.add_column(col, justify="left" if col == "checkpoint" else "right")
    for s in scores:
        t.add_row(s.name, f"{s.reward:.4f}", f"{s.reward_se:.4f}", f"{s.kl:.3f}", f"{s.kl_se:.3f}", f"{s.length:.1f}", str(s.n))
    return t
