"""Mean reward and KL(π‖π_sft) of checkpoints on held-out prompts, with standard errors.

KL estimate (WARP §4): for completions y sampled from π, the sum over the completion's tokens of
log π(y_t|·) − log π_sft(y_t|·), averaged over samples. Both log-probs use the sampling temperature
(as `warp rl` does for its KL), so this is an unbiased estimate of the KL between the two tempered
sampling distributions; it is ≥ 0 only in expectation, single samples may be negative.

Every checkpoint is sampled with the same prompts and the same generator seeds (common random
numbers), so differences between checkpoints are not swamped by sampling noise. One policy model is
kept in memory and its weights are overwritten per checkpoint, straight from the safetensors files or
as a LITI interpolation built tensor by tensor (nothing is written to disk).

`warp eval score` prints a table; with `-o OUT` it publishes OUT/ atomically: scores.csv, scores.json
(the recipe — θ_sft, prompts, reward, sampling settings, device — and every input with its hash, so a
result can be reproduced or compared) and samples.jsonl (one line per checkpoint and completion: with
common random numbers, per-completion differences between checkpoints are paired).
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar

import torch

from mergekit_warp import __version__
from mergekit_warp.errors import WarpError
from mergekit_warp.eval.settings import EvalSettings, Recipe
from mergekit_warp.io.atomic import claim
from mergekit_warp.io.publish import check_disjoint, check_output_path, describe_inputs, publishing
from mergekit_warp.lm.heldout import Samples, mean_se, sample_and_score
from mergekit_warp.progress import Log, Steps


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
    eta: float | None = None
    """`warp eval score --etas`: the LITI η toward θ_sft this policy was built with (None: the checkpoint)."""


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
        through the merge engine's validated reader (either may be a LoRA adapter or BASE+ADAPTER)."""
        same = Path(target).resolve() == Path(merged).resolve()
        from mergekit_warp.merge.adapters import open_reader  # an adapter folder: on the base it records

        with open_reader(target) as rt, open_reader(merged) as rm:
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
            if a is b:  # (the evaluation runs in fp32: there is no wider dtype to offer)
                raise WarpError(
                    f"tensor {name} of checkpoint {merged} overflows {dst.dtype} (inf) when loaded; "
                    "its values are beyond the evaluation's range: the checkpoint cannot be evaluated"
                )
            raise WarpError(
                f"tensor {name}: the LITI interpolation η={eta:g} of {target} and {merged} overflows "
                f"{dst.dtype} (inf); use a smaller η"
            )
        dst.copy_(v)

    # -- scoring ----------------------------------------------------------------------------------

    @property
    def batches(self) -> int:
        """Generation batches per checkpoint."""
        return math.ceil(len(self.prompts) / self.s.batch_size)

    def sample(self, on_batch: Callable[[int], None] | None = None) -> Samples:
        """Reward, KL term and length of one completion per entry of `self.prompts`, sampled from the
        current policy weights. Batch c is seeded `seed + c`, as one `sample_and_score` call over all
        prompts would; `on_batch(c + 1)` follows each batch (for a progress display)."""
        s, parts = self.s, []
        for c, start in enumerate(range(0, len(self.prompts), s.batch_size)):
            parts.append(
                sample_and_score(
                    self.policy,
                    self.sft,
                    self.tok,
                    self.prompts[start : start + s.batch_size],
                    self.reward_fn,
                    max_new_tokens=s.max_new_tokens,
                    temperature=s.temperature,
                    seed=s.seed + c,
                    batch_size=s.batch_size,
                )
            )
            if on_batch is not None:
                on_batch(c + 1)
        return Samples(*(torch.cat([getattr(x, f.name) for x in parts]) for f in fields(Samples)))

    def score(self, name: str, path: str = "", on_batch: Callable[[int], None] | None = None) -> Score:
        """Sample from the current policy weights; reward and KL to θ_sft per completion."""
        return summarize(self.sample(on_batch), name, path)


def summarize(got: Samples, name: str, path: str = "") -> Score:
    """Means and standard errors of per-completion samples; a WarpError naming the checkpoint when an
    estimate is not finite."""
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
        n=len(got.rewards),
        path=path,
    )


# ----------------------------------------------------------------------------------------------------
# Outputs


T = TypeVar("T")


def compute_and_publish(
    out: Path | None, inputs: list, force: bool, compute: Callable[[], T], write: Callable[[T, Path], None]
) -> tuple[T, Path | None]:
    """`compute()`, then with an output folder `out` `write(result, folder)` into a staged folder that
    becomes `out` when complete. `out` is checked before `compute` runs (not an input, not inside or
    around one; an existing one only with `force`; its parent must exist) and locked until it is
    published; on any failure nothing is left at `out`. Without `out`: `compute()` alone."""
    if out is None:
        return compute(), None
    out = check_disjoint(Path(out), inputs)  # before the lock file is made beside it
    with claim(out):
        check_output_path(out, inputs, force)
        result = compute()
        with publishing(out, inputs, force) as tmp:
            write(result, tmp)
    return result, out


def provenance(roles: dict[str, Path | str | list]) -> dict[str, Any]:
    """Tool, version, command line, time, and each input with its resolved path and header hash."""
    return {
        "tool": "mergekit-warp",
        "version": __version__,
        "command": sys.argv,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "inputs": describe_inputs(roles),
    }


# ----------------------------------------------------------------------------------------------------
# warp eval score


@dataclass(frozen=True)
class Evaluation:
    recipe: Recipe
    scores: list[Score]
    samples: list[dict[str, Any]]
    """One row per checkpoint and completion: prompt, sample, reward, KL term, length."""
    folders: list[Path]
    """The local folders of init and checkpoints (resolved hub ids / builtin names)."""
    out: Path | None = None


def score_checkpoints(
    checkpoints: list[str | Path],
    recipe: Recipe,
    out: Path | None = None,
    *,
    etas: tuple[float, ...] = (),
    force: bool = False,
    progress: bool = True,
) -> Evaluation:
    """Score each checkpoint against θ_sft = `recipe.init`, and after each its LITI interpolations
    (1 − η)·θ_sft + η·θ for η in `etas` (built in memory, named `CKPT@η`); with `out`, publish
    OUT/scores.csv, OUT/scores.json (recipe, inputs with hashes, scores) and OUT/samples.jsonl (per
    completion)."""
    from mergekit_warp.lm.rewards import reward_inputs

    inputs = [*checkpoints, recipe.init, recipe.prompts, *reward_inputs(recipe.reward)]
    ev, out = compute_and_publish(
        out, inputs, force, lambda: _evaluate(checkpoints, recipe, progress, etas), _write_evaluation
    )
    return Evaluation(ev.recipe, ev.scores, ev.samples, ev.folders, out)


def _evaluate(
    checkpoints: list[str | Path], recipe: Recipe, progress: bool, etas: tuple[float, ...] = ()
) -> Evaluation:
    from mergekit_warp.io.adapter import is_adapter
    from mergekit_warp.lm.models import model_folder
    from mergekit_warp.merge.adapters import split_spec

    # adapters (a peft folder, or BASE+ADAPTER) are read as given: on their base, by load_folder
    local = [model_folder(recipe.init, "checkpoint")] + [
        Path(c) if is_adapter(c) or split_spec(c) else model_folder(c, "checkpoint") for c in checkpoints
    ]
    s = recipe.settings
    log = Log(progress, "warp eval")
    ev = Evaluator(local[0], recipe.prompts, recipe.reward, s, recipe.device)  # a bad input fails here, unlogged
    log(f"loaded θ_sft {recipe.init} and the reward {recipe.reward} on {recipe.device}")
    k = s.samples_per_prompt
    policies = [(c, p, eta) for c, p in zip(checkpoints, local[1:]) for eta in (None, *etas)]
    steps = Steps("warp eval", progress, len(policies) * ev.batches)
    scores, rows = [], []
    try:
        for i, (c, p, eta) in enumerate(policies):
            if eta is None:
                ev.load_folder(p)
            else:
                ev.load_liti(local[0], p, eta)
            name = str(c) if eta is None else f"{c}@{eta:.15g}"  # the path as given: checkpoints may share a name
            done = i * ev.batches
            got = ev.sample(lambda b, n=name, done=done: steps.update(done + b, f"{n}: batch {b}/{ev.batches}"))
            sc = replace(summarize(got, name, str(c)), eta=eta)
            steps.note(f"{name}: reward {sc.reward:+.4f} ± {sc.reward_se:.4f}   KL {sc.kl:.3f} ± {sc.kl_se:.3f}")
            scores.append(sc)
            rows += [
                {
                    "checkpoint": name,
                    "prompt_index": j // k,
                    "sample": j % k,
                    "prompt": ev.prompts[j],
                    "reward": got.rewards[j].item(),
                    "kl": got.kls[j].item(),
                    "length": int(got.lengths[j].item()),
                }
                for j in range(len(ev.prompts))
            ]
    finally:
        steps.close()
    return Evaluation(recipe, scores, rows, local)


def _write_evaluation(ev: Evaluation, folder: Path) -> None:
    table = io.StringIO()
    w = csv.DictWriter(table, fieldnames=[fl.name for fl in fields(Score)])
    w.writeheader()
    w.writerows(asdict(s) for s in ev.scores)
    (folder / "scores.csv").write_text(table.getvalue())
    record = {
        **provenance({"init": ev.folders[0], "checkpoints": ev.folders[1:], "prompts": ev.recipe.prompts}),
        "settings": ev.recipe.record(),
        "scores": [asdict(s) for s in ev.scores],
    }
    (folder / "scores.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    with open(folder / "samples.jsonl", "w") as f:
        for row in ev.samples:
            f.write(json.dumps(row) + "\n")


def scores_table(scores: list[Score], title: str = "warp eval", caption: str | None = None):
    """A rich table of scores (`caption`: the settings, under it)."""
    from rich.table import Table

    t = Table(title=title, caption=caption)
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
