"""Rewards: `f(prompts, completions) -> list[float]`, loaded from a spec and validated on every call.

Specs: "sentiment" (VADER compound of the completion, in [-1, 1]); "module:function" or
"path/to/file.py:function" (any Python callable with that signature); otherwise an HF
sequence-classification folder or hub id with ONE label, scored with its own tokenizer on
prompt + completion text. `length_penalty` subtracts that much per completion token.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from collections.abc import Callable
from pathlib import Path

from mergekit_warp.errors import WarpError

RewardFn = Callable[[list[str], list[str]], list[float]]


def sentiment() -> RewardFn:
    """VADER compound sentiment of each completion (deterministic, pure Python, ~0.2 ms a call)."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    sia = SentimentIntensityAnalyzer()

    def reward(prompts: list[str], completions: list[str]) -> list[float]:
        return [sia.polarity_scores(c)["compound"] for c in completions]

    return reward


BUILTIN: dict[str, Callable[[], RewardFn]] = {"sentiment": sentiment}


def _callable(spec: str) -> RewardFn:
    target, name = spec.rsplit(":", 1)
    if target.endswith(".py") or Path(target).is_file():
        path = Path(target)
        if not path.is_file():
            raise WarpError(f"reward {spec}: file {path} does not exist")
        mod_name = f"warp_reward_{abs(hash(str(path.resolve())))}"
        loader = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(loader)
        sys.modules[mod_name] = module  # lets pickling / dataclasses inside the file resolve the module
        try:
            loader.loader.exec_module(module)
        except (Exception, SystemExit) as e:  # the user's file: report, don't crash with a traceback into our code
            raise WarpError(f"reward {spec}: importing {path} failed ({type(e).__name__}: {e})") from None
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise WarpError(f"reward {spec}: cannot import module {target} ({e})") from None
        except (Exception, SystemExit) as e:
            raise WarpError(f"reward {spec}: importing module {target} failed ({type(e).__name__}: {e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise WarpError(f"reward {spec}: {target} has no callable {name}")
    return fn


def reward_model(src: str, device: str = "cpu", batch: int = 16, prepare=None) -> RewardFn:
    """An HF sequence-classification model with one label; its logit is the reward. `prepare(model)`,
    when given, returns the model to use (data-parallel runs shard it with FSDP there)."""
    import torch

    from mergekit_warp.devices import resolve_device
    from mergekit_warp.lm.models import load_model, load_tokenizer

    dev = resolve_device(device)
    # with `prepare` (FSDP sharding) the model is read into CPU memory and placed by it
    model = load_model(src, "fp32", "cpu" if prepare else device, head="reward")
    tok = load_tokenizer(src, padding_side=None)
    if model.config.num_labels != 1:
        raise WarpError(
            f"reward model {src} has {model.config.num_labels} labels; a reward model must output one logit"
        )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    if prepare is not None:
        model = prepare(model.requires_grad_(False))
        dev = next(model.parameters()).device

    @torch.no_grad()
    def reward(prompts: list[str], completions: list[str]) -> list[float]:
        scores: list[float] = []
        texts = [p + c for p, c in zip(prompts, completions)]
        for i in range(0, len(texts), batch):
            enc = tok(texts[i : i + batch], return_tensors="pt", padding=True, truncation=True).to(dev)
            scores += model(**enc).logits[:, 0].float().tolist()
        return scores

    return reward


def validated(fn: RewardFn, name: str, length_penalty: float = 0.0, tokenizer=None) -> RewardFn:
    """Wrap a reward: any exception, a wrong length or a non-finite value becomes a WarpError naming it.

    The length penalty counts tokens of `tokenizer` when given (training passes the policy's), else words.
    """

    def length(text: str) -> int:
        if tokenizer is None:
            return len(text.split())
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    def reward(prompts: list[str], completions: list[str]) -> list[float]:
        try:
            out = fn(list(prompts), list(completions))
        except SystemExit as e:  # the user's code: an exit there must not end warp silently
            raise WarpError(
                f"reward {name} called sys.exit({e.code}); a reward must return one float per completion"
            ) from None
        except Exception as e:
            raise WarpError(f"reward {name} raised {type(e).__name__}: {e}") from None
        try:
            items = list(out.tolist() if hasattr(out, "tolist") else out)
        except TypeError:
            raise WarpError(f"reward {name} returned {type(out).__name__}; it must return a list of floats") from None
        for i, v in enumerate(items):
            try:
                float(v)
            except (TypeError, ValueError):
                raise WarpError(
                    f"reward {name} returned {v!r:.40} ({type(v).__name__}) for completion {i}; it must return "
                    "one float per completion"
                ) from None
        values = [float(v) for v in items]
        if len(values) != len(completions):
            raise WarpError(f"reward {name} returned {len(values)} values for {len(completions)} completions")
        bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
        if bad:
            raise WarpError(f"reward {name} returned NaN/inf for completion {bad[0]}: {completions[bad[0]]!r:.80}")
        if length_penalty:
            values = [v - length_penalty * length(c) for v, c in zip(values, completions)]
        return values

    reward.spec = name  # type: ignore[attr-defined]
    return reward


def load_reward(spec: str, device: str = "cpu", length_penalty: float = 0.0, tokenizer=None, prepare=None) -> RewardFn:
    """The reward named by `spec` (see the module docstring), validated, with the length penalty applied.
    `prepare`: applied to a reward MODEL after loading (see `reward_model`)."""
    spec = str(spec)
    if spec in BUILTIN:
        fn = BUILTIN[spec]()
    elif ":" in spec and not Path(spec).is_dir():
        fn = _callable(spec)
    elif Path(spec).is_file() and spec.endswith(".py"):
        raise WarpError(f"reward {spec}: name the function in the file: {spec}:FUNCTION")
    else:
        _exists(spec)
        fn = reward_model(spec, device, prepare=prepare)
    return validated(fn, spec, length_penalty, tokenizer)


def _exists(spec: str) -> None:
    """A reward model spec that names nothing: say so at once, with the builtin name it resembles."""
    import difflib

    if Path(spec).exists() or "/" in spec:
        return  # a folder, or a hub id (resolved, offline-aware, by the model loader)
    close = difflib.get_close_matches(spec, list(BUILTIN), n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    raise WarpError(
        f"reward {spec}: not a builtin reward ({', '.join(BUILTIN)}), not module:function or "
        f"file.py:function, and no such reward model folder; {hint}check the spelling"
    )


def check_reward(spec: str) -> None:
    """Check a reward spec without loading a reward model's weights: a builtin name, an importable
    `module:function` / `file.py:function` (imported, so it runs that file), or a reward model folder
    whose headers are valid."""
    spec = str(spec)
    if spec in BUILTIN:
        return
    if ":" in spec and not Path(spec).is_dir():
        _callable(spec)
    elif Path(spec).is_file() and spec.endswith(".py"):
        raise WarpError(f"reward {spec}: name the function in the file: {spec}:FUNCTION")
    else:
        from mergekit_warp.lm.models import model_folder

        _exists(spec)
        model_folder(spec, "reward model")


def reward_inputs(spec: str) -> list[Path]:
    """The file or folder a reward spec reads (`file.py:fn` → the file, a reward model → its folder)."""
    spec = str(spec)
    if spec in BUILTIN:
        return []
    if ":" in spec and not Path(spec).is_dir():
        target = spec.rsplit(":", 1)[0]
        return [Path(target)] if Path(target).is_file() else []
    return [Path(spec)] if Path(spec).exists() else []


def describe_reward(spec: str) -> dict[str, str]:
    """The reward's identity for provenance: its spec and, for a file or folder, the resolved path."""
    spec = str(spec)
    out = {"spec": spec}
    if spec in BUILTIN:
        out["kind"] = "builtin"
        if spec == "sentiment":
            from importlib.metadata import version

            out["vaderSentiment"] = version("vaderSentiment")
    elif ":" in spec and not Path(spec).is_dir():
        target = spec.rsplit(":", 1)[0]
        out["kind"] = "callable"
        if Path(target).is_file():
            out["file"] = str(Path(target).resolve())
    else:
        out["kind"] = "reward_model"
    return out
