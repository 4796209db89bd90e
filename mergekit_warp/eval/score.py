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

import csv
import io
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from mergekit_warp.errors import WarpError
from mergekit_warp.eval.settings import EvalSettings
from mergekit_warp.io.atomic import write_atomic
from mergekit_warp.io.reader import CheckpointReader
from mergekit_warp.io.source import resolve_source
from mergekit_warp.lm.heldout import mean_se, sample_and_score


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


class Evaluator:
    """Scores checkpoints that share θ_sft's architecture against θ_sft, on held-out `prompts` with
    `reward` (any `warp rl --reward` spec)."""

    def __init__(
        self, sft: str | Path, prompts: Path, reward: str, settings: EvalSettings | None = None, device: str = "cpu"
    ):
        from mergekit_warp.lm.models import load_model, load_tokenizer
        from mergekit_warp.lm.prompts import load_prompts
        from mergekit_warp.lm.rewards import load_reward

        self.s = s = (settings or EvalSettings()).resolved()
        self.tok = load_tokenizer(sft)
        texts = load_prompts(prompts, self.tok)[: s.max_prompts]
        # [p0, p0, p1, p1, ...]: k samples per prompt, in a fixed order.
        self.prompts = [p for p in texts for _ in range(s.samples_per_prompt)]
        # The length penalty counts the policy's tokens, as in training.
        self.reward_fn = load_reward(reward, device=device, length_penalty=s.length_penalty, tokenizer=self.tok)
        self.sft = load_model(sft, device=device)
        self.policy = load_model(sft, device=device)
        self._params = self.policy.state_dict()

    # -- weights ----------------------------------------------------------------------------------

    def load_folder(self, folder: Path) -> None:
        """Put the weights of HF folder `folder` into the policy model."""
        self.load_liti(folder, folder, 1.0)

    @torch.no_grad()
    def load_liti(self, target: Path, merged: Path, eta: float) -> None:
        """Policy ← (1 − η)·θ_target + η·θ_merged, tensor by tensor (fp32 math, cast on copy), read
        through the merge engine's validated reader."""
        same = Path(target).resolve() == Path(merged).resolve()
        with CheckpointReader(resolve_source(target)) as rt, CheckpointReader(resolve_source(merged)) as rm:
            if set(rt.infos) != set(rm.infos):
                diff = sorted(set(rt.infos) ^ set(rm.infos))[:3]
                raise WarpError(
                    f"{target} and {merged} hold different tensors (e.g. {diff}); they must share an architecture"
                )
            loaded = set()
            for name, info in rt.infos.items():
                a = rt.read(name).view(info.shape)
                b = a if same else rm.read(name).view(rm.infos[name].shape)
                self._copy_one(name, a, b, eta, merged, target)
                loaded.add(self._params[name].data_ptr())
        missing = [k for k, v in self._params.items() if v.data_ptr() not in loaded and v.is_floating_point()]
        if missing:  # a tied head shares storage with the embedding and is covered by it
            raise WarpError(f"{merged} lacks tensors of the model (e.g. {missing[:3]}); checkpoints must match --init")

    def _copy_one(
        self, name: str, a: torch.Tensor, b: torch.Tensor, eta: float, merged: Path, target: Path | None = None
    ) -> None:
        from mergekit_warp.merge import math as mmath

        if name not in self._params:
            raise WarpError(f"tensor {name} of {merged} is not in the evaluated model; checkpoints must match --init")
        dst = self._params[name]
        if a.shape != dst.shape or b.shape != dst.shape:
            raise WarpError(f"tensor {name}: shape {tuple(b.shape)} in {merged}, {tuple(dst.shape)} in --init")
        # A NaN/inf weight would be sampled from and scored as garbage (reward 0, KL nan): refuse it here,
        # naming the folder that holds it.
        for t, folder in [(a, target if target is not None else merged)] + ([] if a is b else [(b, merged)]):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise WarpError(
                    f"tensor {name} of checkpoint {folder} holds NaN/inf values; "
                    "the checkpoint is corrupt: re-create it (or drop it from the evaluation)"
                )
        # a plain load, or a non-float buffer (never interpolated; taken from the target)
        v = a if a is b or not a.is_floating_point() else mmath.liti(a.float(), b.float(), eta)
        v = v.to(dst.dtype)  # `a` itself for a plain load in the same dtype: checked above
        if v is not a and v.is_floating_point() and not bool(torch.isfinite(v).all()):  # finite inputs: an overflow
            if a is b:
                raise WarpError(
                    f"tensor {name} of checkpoint {merged} overflows {dst.dtype} (inf) when loaded; "
                    "evaluate in a wider dtype (fp32)"
                )
            raise WarpError(
                f"tensor {name}: the LITI interpolation η={eta:g} of {target} and {merged} overflows "
                f"{dst.dtype} (inf); use a smaller η (or evaluate in fp32)"
            )
        dst.copy_(v)

    # -- scoring ----------------------------------------------------------------------------------

    def score(self, name: str, path: str = "") -> Score:
        """Sample from the current policy weights; reward and KL to θ_sft per completion."""
        s = self.s
        got = sample_and_score(
            self.policy,
            self.sft,
            self.tok,
            self.prompts,
            self.reward_fn,
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            seed=s.seed,
            batch_size=s.batch_size,
        )
        r, r_se = mean_se(got.rewards)
        k, k_se = mean_se(got.kls)
        # Finite weights can still overflow in the forward pass (huge weights, fp16): never report nan/inf.
        bad = [
            f"{what} {v}"
            for what, v in (("reward", r), ("reward se", r_se), ("KL", k), ("KL se", k_se))
            if not math.isfinite(v)
        ]
        if bad:
            raise WarpError(
                f"checkpoint {path or name}: the estimate is not finite ({', '.join(bad)}); its "
                "weights overflow in the forward pass (or the reward overflows): check the checkpoint"
            )
        return Score(
            name=name,
            reward=r,
            reward_se=r_se,
            kl=k,
            kl_se=k_se,
            length=got.lengths.mean().item(),
            n=len(self.prompts),
            path=path,
        )


def check_output(stem: Path, inputs: list = ()) -> None:
    """Refuse, before any work, an output STEM whose STEM.csv / STEM.json cannot be written, or would
    overwrite (or lie inside) one of the `inputs`."""
    from mergekit_warp.io.publish import check_disjoint

    stem = Path(stem)
    if stem.name in ("", ".", ".."):
        raise WarpError(f"-o {stem}: give a file stem (OUT writes OUT.csv and OUT.json), not a folder")
    folder = stem.parent
    if folder.exists() and not folder.is_dir():
        raise WarpError(f"-o {stem}: {folder} is a file, not a folder; choose another -o")
    if not folder.is_dir():
        raise WarpError(f"-o {stem}: output folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise WarpError(f"-o {stem}: output folder {folder} is not writable; choose another -o or fix its permissions")
    for p in output_paths(stem):
        check_disjoint(p, inputs)
        if p.is_dir():
            raise WarpError(f"-o {stem}: {p} is a folder; choose another -o (or remove {p})")
        if p.exists() and not os.access(p, os.W_OK):
            raise WarpError(f"-o {stem}: {p} exists and is not writable; choose another -o or remove it")


def output_paths(stem: Path) -> tuple[Path, Path]:
    """STEM.csv and STEM.json."""
    stem = Path(stem)
    return stem.with_name(stem.name + ".csv"), stem.with_name(stem.name + ".json")


def evaluate(
    checkpoints: list[str | Path],
    init: str | Path,
    prompts: Path,
    reward: str,
    settings: EvalSettings | None = None,
    device: str = "cpu",
) -> list[Score]:
    """Score each checkpoint (HF folder, hub id or builtin name) against θ_sft = `init`."""
    from mergekit_warp.lm.models import model_folder

    local = [model_folder(c, "checkpoint") for c in [init, *checkpoints]]
    ev = Evaluator(local[0], prompts, reward, settings, device)
    out = []
    for c, p in zip(checkpoints, local[1:]):
        ev.load_folder(p)
        out.append(ev.score(str(c), str(c)))  # the path as given: several checkpoints may share a name
    return out


def write_scores(scores: list[Score], stem: Path) -> tuple[Path, Path]:
    """Write `STEM.csv` and `STEM.json`; return both paths."""
    csv_path, json_path = output_paths(stem)
    table = io.StringIO()
    w = csv.DictWriter(table, fieldnames=[fl.name for fl in fields(Score)])
    w.writeheader()
    w.writerows(asdict(s) for s in scores)
    write_atomic(csv_path, table.getvalue())
    write_atomic(json_path, json.dumps([asdict(s) for s in scores], indent=2) + "\n")
    return csv_path, json_path


def scores_table(scores: list[Score], title: str = "warp eval"):
    """A rich table of scores."""
    from rich.table import Table

    t = Table(title=title)
    for col in ("checkpoint", "reward", "± se", "KL(π‖π_sft)", "± se", "length", "n"):
        t.add_column(col, justify="left" if col == "checkpoint" else "right")
    for s in scores:
        t.add_row(
            s.name,
            f"{s.reward:.4f}",
            f"{s.reward_se:.4f}",
            f"{s.kl:.3f}",
            f"{s.kl_se:.3f}",
            f"{s.length:.1f}",
            str(s.n),
        )
    return t
