"""`warp eval` and `warp eval sxs` never print or write garbage with exit 0: a NaN/inf weight, a LITI
overflow, a non-finite estimate, a bad judge answer and an unwritable -o are each one `error:` line, exit
status 2, and no output folder. A B with another tokenizer is sampled with its own, without common random
numbers, and the output says so."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import WORDS, perturb
from typer.testing import CliRunner

from mergekit_warp.cli import app
from mergekit_warp.errors import WarpError
from mergekit_warp.eval.score import Evaluator
from mergekit_warp.eval.settings import EvalSettings
from mergekit_warp.eval.sxs import check_margins, load_judge

runner = CliRunner()

JUDGES = """
def nan_judge(prompts, a, b):
    return [0.3] + [float("nan")] * (len(a) - 1)

def inf_judge(prompts, a, b):
    return [0.0, float("inf")] + [0.0] * (len(a) - 2)

def str_judge(prompts, a, b):
    return [0.1, 0.2, "A"] + [0.0] * (len(a) - 3)

def short_judge(prompts, a, b):
    return [0.1] * (len(a) - 1)

def scalar_judge(prompts, a, b):
    return 1.0

def bool_judge(prompts, a, b):
    return [True] * len(a)

def nan_reward(prompts, completions):
    return [float("nan")] * len(completions)

def huge_reward(prompts, completions):
    return [1e308 if i % 2 else -1e308 for i in range(len(completions))]

def words(prompts, completions):
    return [len(c.split()) / 6 for c in completions]

def pointwise_with_option(prompts, completions, scale=1.0):
    return [scale * len(c.split()) for c in completions]

def pairwise_with_option(prompts, a, b, scale=1.0):
    return [scale] * len(a)
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_init) -> dict[str, Path]:
    """Prompts, a judges/rewards file, a healthy run, a NaN checkpoint and a huge-but-finite one."""
    base = tmp_path_factory.mktemp("safety")
    prompts = base / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": " ".join(WORDS[i : i + 3])}) + "\n" for i in range(0, 12, 3)))
    judges = base / "judges.py"
    judges.write_text(JUDGES)
    run = perturb(tiny_init, base / "run", seed=5)
    nan = _poisoned(tiny_init, base / "nan", "model.layers.1.mlp.down_proj.weight", float("nan"))
    # Finite weights whose logits overflow fp32: loads fine, the forward pass gives inf/nan.
    huge = _poisoned(tiny_init, base / "huge", "lm_head.weight", 3e38, everywhere=True)
    return {"prompts": prompts, "judges": judges, "run": run, "nan": nan, "huge": huge, "base": base}


def _poisoned(src: Path, out: Path, tensor: str, value: float, everywhere: bool = False) -> Path:
    shutil.copytree(src, out)
    f = out / "model.safetensors"
    sd = load_file(f)
    if everywhere:
        sd[tensor] = torch.full_like(sd[tensor], value)
    else:
        sd[tensor][0, 0] = value
    save_file(sd, f, metadata={"format": "pt"})
    return out


def _error_line(r) -> str:
    """The one `error:` line of a failed command (stderr when the runner separates it)."""
    try:
        text = r.stderr
    except ValueError:
        text = r.output
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    assert r.exit_code == 2, r.output
    assert len(lines) == 1 and lines[0].startswith("error:"), text
    return lines[0]


def _score(files, ckpt: Path, init: Path, out: Path, *extra: str):
    return runner.invoke(
        app,
        [
            "eval",
            str(ckpt),
            "--init",
            str(init),
            "--prompts",
            str(files["prompts"]),
            "--reward",
            f"{files['judges']}:words",
            "--max-new-tokens",
            "3",
            "--samples-per-prompt",
            "1",
            "-o",
            str(out),
            "-q",
            *extra,
        ],
    )


def _sxs(files, a: Path, b: Path, judge: str):
    return runner.invoke(
        app,
        [
            "eval",
            "sxs",
            str(a),
            str(b),
            "--prompts",
            str(files["prompts"]),
            "--judge",
            judge,
            "--max-new-tokens",
            "3",
            "--samples-per-prompt",
            "1",
            "-q",
        ],
    )


def _nothing_written(out: Path) -> None:
    """No OUT folder, and nothing staged or locked beside it."""
    assert not out.exists()
    if out.parent.is_dir():
        assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


# -- warp eval: weights and estimates ---------------------------------------------------------------


def test_healthy_eval_still_works(files, tiny_init, tmp_path):
    out = tmp_path / "ok"
    r = _score(files, files["run"], tiny_init, out)
    assert r.exit_code == 0, r.output
    rows = json.loads((out / "scores.json").read_text())["scores"]
    assert all(torch.isfinite(torch.tensor([row["kl"], row["reward"]])).all() for row in rows)


def test_nan_checkpoint_is_an_error(files, tiny_init, tmp_path):
    out = tmp_path / "scores"
    line = _error_line(_score(files, files["nan"], tiny_init, out))
    assert "model.layers.1.mlp.down_proj.weight" in line and str(files["nan"]) in line and "NaN" in line
    _nothing_written(out)


def test_nan_init_is_an_error(files, tmp_path):
    """θ_sft itself corrupt (checked as it is loaded, by `load_model`), before any sampling."""
    out = tmp_path / "scores"
    line = _error_line(_score(files, files["run"], files["nan"], out))
    assert "model.layers.1.mlp.down_proj.weight" in line and str(files["nan"]) in line
    _nothing_written(out)


def test_sxs_nan_policy_is_an_error(files, tiny_init):
    for a, b in ((files["nan"], tiny_init), (tiny_init, files["nan"])):
        line = _error_line(_sxs(files, a, b, f"{files['judges']}:words"))
        assert "model.layers.1.mlp.down_proj.weight" in line and str(files["nan"]) in line


def test_nan_in_liti_endpoints(files, tiny_init):
    """LITI reads both endpoints: the corrupt one is named, whichever it is, even at η = 0."""
    ev = Evaluator(tiny_init, files["prompts"], f"{files['judges']}:words", EvalSettings(max_new_tokens=3))
    for target, merged, eta in ((tiny_init, files["nan"], 0.0), (files["nan"], tiny_init, 0.5)):
        with pytest.raises(WarpError, match=f"down_proj.weight of checkpoint {files['nan']}"):
            ev.load_liti(target, merged, eta)


def test_liti_overflow_names_eta(files, tiny_init):
    ev = Evaluator(tiny_init, files["prompts"], f"{files['judges']}:words", EvalSettings(max_new_tokens=3))
    ev.load_liti(tiny_init, files["run"], 1.5)  # ordinary extrapolation is fine
    with pytest.raises(WarpError, match=r"LITI interpolation η=1e\+39 .*overflows") as e:
        ev.load_liti(tiny_init, files["run"], 1e39)
    assert "use a smaller η" in str(e.value) and "fp32" not in str(e.value)  # evaluated in fp32: nothing wider


def test_non_finite_estimate_is_an_error(files, tiny_init, tmp_path):
    """Finite weights can overflow in the forward pass: the KL is nan, refused naming the checkpoint."""
    out = tmp_path / "scores"
    line = _error_line(_score(files, files["huge"], tiny_init, out))
    assert str(files["huge"]) in line and "not finite" in line and "KL" in line
    _nothing_written(out)


def test_overflowing_reward_estimate_is_an_error(files, tiny_init):
    """Each reward finite (so `validated` passes it), their spread overflows the standard error."""
    ev = Evaluator(tiny_init, files["prompts"], f"{files['judges']}:huge_reward", EvalSettings(max_new_tokens=3))
    ev.load_folder(files["run"])
    with pytest.raises(WarpError, match=f"checkpoint {files['run']}: the estimate is not finite .*reward se"):
        ev.score("run", str(files["run"]))


# -- warp eval: the output path ---------------------------------------------------------------------


def test_output_folder_missing_fails_before_loading(files, tiny_init, tmp_path, monkeypatch):
    from mergekit_warp.eval import score

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the output path was checked")

    monkeypatch.setattr(score, "_evaluate", boom)
    out = tmp_path / "no" / "such" / "out"
    line = _error_line(_score(files, files["run"], tiny_init, out))
    assert str(out.parent) in line and "does not exist" in line
    assert not (tmp_path / "no").exists()
    (tmp_path / "taken").mkdir()
    line = _error_line(_score(files, files["run"], tiny_init, tmp_path / "taken"))
    assert str(tmp_path / "taken") in line and "--force" in line


def test_output_is_a_file_or_not_writable(files, tiny_init, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    line = _error_line(_score(files, files["run"], tiny_init, afile, "--force"))
    assert str(afile) in line and "is a file" in line and afile.read_text() == "x"
    line = _error_line(_score(files, files["run"], tiny_init, afile / "out"))
    assert str(afile) in line
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            line = _error_line(_score(files, files["run"], tiny_init, ro / "out"))
            assert str(ro) in line and "permission denied" in line
        finally:
            ro.chmod(0o700)
        _nothing_written(ro / "out")


# -- warp eval sxs: judges --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fn, what",
    [
        ("nan_judge", "non-finite margin nan for pair 1"),
        ("inf_judge", "non-finite margin inf for pair 1"),
        ("str_judge", "for pair 2"),
        ("short_judge", "returned 3 margins for 4 pairs (first bad pair: 3)"),
        ("scalar_judge", "returned float"),
        ("bool_judge", "(bool) for pair 0"),
    ],
)
def test_bad_pairwise_judge(files, tiny_init, fn, what):
    spec = f"{files['judges']}:{fn}"
    line = _error_line(_sxs(files, tiny_init, files["run"], spec))
    assert spec in line and what in line


def test_pointwise_judge_nan_is_refused(files, tiny_init):
    spec = f"{files['judges']}:nan_reward"
    line = _error_line(_sxs(files, tiny_init, files["run"], spec))
    assert spec in line and "NaN/inf" in line


def test_pointwise_margin_overflow_is_refused():
    with pytest.raises(WarpError, match="non-finite margin inf for pair 0"):
        check_margins([1e308 - -1e308], "j", 1)
    with pytest.raises(WarpError, match="margin -inf for pair 1"):
        check_margins(torch.tensor([0.0, -float("inf")]), "j", 2)
    assert check_margins(torch.tensor([0.5, -1.0]), "j", 2) == [0.5, -1.0]


def test_judge_kind_follows_required_arguments(files):
    """A reward with an optional third parameter is pointwise; a judge with an optional fourth is pairwise."""
    point = load_judge(f"{files['judges']}:pointwise_with_option")
    assert point(["p", "p"], ["a b c", "a"], ["a", "a b"]) == [2.0, -1.0]
    pair = load_judge(f"{files['judges']}:pairwise_with_option")
    assert pair(["p"], ["a b c"], ["a"]) == [1.0]


# -- warp eval sxs: tokenizers ----------------------------------------------------------------------


def _with_tokenizer(src: Path, out: Path, tok) -> Path:
    shutil.copytree(src, out)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (out / f).unlink(missing_ok=True)
    tok.save_pretrained(out)
    return out


def _word_tokenizer(words: list[str], eos: str = "</s>"):
    """`tiny.make_tokenizer` with another word list and/or another eos token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<s>", "</s>", *words, ":", "user", "assistant", "system"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token=eos
    )


def test_sxs_another_vocabulary_is_sampled_without_crn(files, tiny_init):
    b = _with_tokenizer(files["run"], files["base"] / "other_vocab", _word_tokenizer(WORDS[:-1] + ["zebra"]))
    r = _sxs(files, tiny_init, b, f"{files['judges']}:words")
    assert r.exit_code == 0, r.output
    assert "common random numbers: no" in r.stdout and "different vocabularies" in r.stdout and "zebra" in r.stdout


def test_sxs_other_special_tokens_is_sampled_without_crn(files, tiny_init):
    b = _with_tokenizer(files["run"], files["base"] / "other_eos", _word_tokenizer(WORDS, eos="<s>"))  # same vocab
    r = _sxs(files, tiny_init, b, f"{files['judges']}:words")
    assert r.exit_code == 0, r.output
    assert "common random numbers: no" in r.stdout and "special tokens" in r.stdout and "eos_token" in r.stdout


def test_sxs_same_tokenizer_other_folder_is_fine(files, tiny_init):
    r = _sxs(files, tiny_init, files["run"], f"{files['judges']}:words")
    assert r.exit_code == 0, r.output
    assert "win/tie/loss" in r.stdout and "common random numbers: yes" in r.stdout
