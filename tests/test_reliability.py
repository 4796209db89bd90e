"""Reliability of the `warp` CLI: the house promise under bad input, kills, races and failing disks.

The promise (README): bad input gets ONE line on stderr starting with `error: ` that names the
file/option/tensor and says what to do, exit status 2, nothing written at the output path (no OUT, no
hidden `.OUT.*` siblings, and for `warp rl` no OUT.partial/), and the inputs are never modified.

In-process runs use `CliRunner` over `mergekit_warp.cli.app`; where the real entry point (`main()`),
signals, stdin or separate processes matter, the CLI runs as `python -m mergekit_warp` or through
tests/reliability_wrap.py, which injects a SIGKILL or a pause at a chosen moment. Everything is CPU
only, offline, on the tiny Llama of tests/tiny.py.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from pipeline_fixtures import write_config
from safetensors.torch import load_file, save_file
from tiny import WORDS, load_state
from typer.testing import CliRunner

from mergekit_warp.cli import app

TESTS = Path(__file__).parent
WRAP = TESTS / "reliability_wrap.py"
NAN_TENSOR = "model.layers.1.self_attn.v_proj.weight"
MISSING_TENSOR = "model.layers.0.mlp.up_proj.weight"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

REWARDS = '''
import math, os, sys
calls = 0

def good(prompts, completions):
    """Fraction of "good" words; raises on call $WARP_REL_FAIL_AT (an interrupted run)."""
    global calls
    calls += 1
    if str(calls) == os.environ.get("WARP_REL_FAIL_AT"):
        raise RuntimeError("reward server went away")
    return [c.split().count("good") / max(len(c.split()), 1) for c in completions]

def huge(prompts, completions):
    return [3e38] * len(completions)

def huge_at_3(prompts, completions):
    global calls
    calls += 1
    return [3e38 if calls >= 3 else 0.5] * len(completions)

def exits(prompts, completions):
    sys.exit(3)

def boom(prompts, completions):
    raise ValueError("no reward today")

def short(prompts, completions):
    return [0.0]

def nan(prompts, completions):
    return [math.nan] * len(completions)
'''
PROMPTS = ["the cat is", "i love this movie", "hello", "what a day", "tell me about the dog", "it was"]
# One RL run in about a quarter of a second in-process: 2 steps of 4 prompts × 2 samples, 8 new tokens.
RL_FAST = shlex.split("--steps 2 --batch-size 4 --max-new-tokens 8 --warmup 0 --lr 1e-2 --no-progress --threads 1")
# A one-run, one-iteration pipeline without evaluation: well under a second in-process.
SMALL_RL = dict(steps=1, batch_size=2, samples_per_prompt=2, max_new_tokens=4, warmup=0, state_every=0, threads=1)


# ---------------------------------------------------------------------------------------------------
# Helpers


def warp(*args, env: dict | None = None):
    """`warp ARGS…` in this process."""
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def cli(*args, cwd: Path, wrap: str | None = None, input: str | None = None, timeout: float = 180):
    """`python -m mergekit_warp ARGS…` (or through reliability_wrap.py MODE) as a real process;
    stdin is /dev/null unless `input` is given (then a pipe holding it)."""
    cmd = [sys.executable, str(WRAP), wrap] if wrap else [sys.executable, "-m", "mergekit_warp"]
    kwargs = {"input": input} if input is not None else {"stdin": subprocess.DEVNULL}
    return subprocess.run(
        [*cmd, *map(str, args)],
        cwd=cwd,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def subprocess_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WARP_REL_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    return env


def one_error_line(stderr: str, *needles: str) -> str:
    """stderr is exactly one line, `error: …`, holding every needle (case-insensitive); return it."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr}"
    line = lines[0]
    assert line.startswith("error: "), line
    print(line)  # shown with -s: the messages a user sees
    missing = [n for n in needles if n.lower() not in line.lower()]
    assert not missing, f"{missing} not in: {line}"
    return line


def refused(res, *needles: str) -> str:
    """An in-process run that exited 2 with one `error:` line holding every needle, no traceback."""
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert "Traceback" not in res.output
    return one_error_line(res.stderr, *needles)


def leftovers(out: Path) -> list[str]:
    """Hidden siblings `.OUT.*` of `out` (lock, tmp, new, old)."""
    out = Path(out)
    if not out.parent.is_dir():
        return []
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def partial(out: Path) -> Path:
    return Path(out).with_name(Path(out).name + ".partial")


def assert_nothing_written(out: Path, rl: bool = False) -> None:
    """No OUT and no `.OUT.*`; with `rl` also no OUT.partial/ and no `.OUT.partial.*`."""
    assert not os.path.lexists(out), f"{out} was written"
    assert leftovers(out) == [], leftovers(out)
    if rl:
        assert not os.path.lexists(partial(out)), f"{partial(out)} was left behind"
        assert leftovers(partial(out)) == [], leftovers(partial(out))


def snapshot(*roots: Path) -> dict:
    """Every entry under `roots`: file bytes and mtime, folder mtime (an entry created and removed again
    changes it), link targets. Equal snapshots = the inputs were not touched."""
    state = {}
    for root in map(Path, roots):
        if not os.path.lexists(root):
            state[str(root)] = None
            continue
        if root.is_symlink() or root.is_file():
            entries = [root]
        else:
            entries = [root]
            for dirpath, dirnames, filenames in os.walk(root):
                entries += [Path(dirpath) / n for n in (*dirnames, *filenames)]
        for p in entries:
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                state[str(p)] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                state[str(p)] = ("dir", st.st_mtime_ns)
            else:
                state[str(p)] = ("file", p.read_bytes(), st.st_mtime_ns)
    return state


def same_tensors(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def rl_args(files: Path, model: Path, out: Path, *extra) -> list:
    """`warp rl` on `model` with the toy prompts and reward; later options in `extra` win (click)."""
    return [
        "rl",
        "--model",
        model,
        "--prompts",
        files / "p.jsonl",
        "--reward",
        f"{files / 'rewards.py'}:good",
        "-o",
        out,
        *RL_FAST,
        *extra,
    ]


def reward(files: Path, name: str) -> str:
    return f"{files / 'rewards.py'}:{name}"


def small_cfg(folder: Path, init: Path, **overrides) -> Path:
    """A 1-iteration × 1-run pipeline YAML (1 RL step, no evaluation) in `folder`."""
    kw = dict(iterations=1, runs=1, rl=dict(SMALL_RL), eval={"enabled": False})
    kw.update(overrides)
    return write_config(folder, init, **kw)


def copy_model(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*skip) if skip else None)
    return dst


# ---------------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread (tiny models on a shared machine), no bytecode caches beside reward files."""
    n, dont_write = torch.get_num_threads(), sys.dont_write_bytecode
    torch.set_num_threads(1)
    sys.dont_write_bytecode = True
    yield
    torch.set_num_threads(n)
    sys.dont_write_bytecode = dont_write


@pytest.fixture(autouse=True)
def no_fail_env(monkeypatch):
    monkeypatch.delenv("WARP_REL_FAIL_AT", raising=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Toy prompts (p.jsonl) and rewards (rewards.py)."""
    d = tmp_path_factory.mktemp("relfiles")
    (d / "rewards.py").write_text(REWARDS)
    (d / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return d


@pytest.fixture
def models(tmp_path, tiny_init, tiny_runs) -> Path:
    """models/{init,ft1,ft2}: this test's own copies of the tiny init and two fine-tunes."""
    root = tmp_path / "models"
    for name, src in (("init", tiny_init), ("ft1", tiny_runs[0]), ("ft2", tiny_runs[1])):
        copy_model(src, root / name)
    return root


@pytest.fixture
def finished_run(tmp_path, tiny_init) -> tuple[Path, Path, Path]:
    """A finished 1×1 pipeline run (no evaluation) from this test's own copy of the init:
    (sft, config, run folder)."""
    sft = copy_model(tiny_init, tmp_path / "sft")
    cfg, run = small_cfg(tmp_path / "cfg", sft), tmp_path / "run"
    res = warp("pipeline", "run", cfg, "-o", run, "-q")
    assert res.exit_code == 0, res.output
    return sft, cfg, run


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory, tiny_init) -> Path:
    """The tiny init with one NaN in NAN_TENSOR."""
    folder = copy_model(tiny_init, tmp_path_factory.mktemp("nan") / "nan")
    sd = load_file(folder / "model.safetensors")
    sd[NAN_TENSOR][0, 0] = float("nan")
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def pickle_model(tmp_path_factory, tiny_init) -> Path:
    """config.json + tokenizer files + pytorch_model.bin (a pickle), no safetensors."""
    folder = copy_model(tiny_init, tmp_path_factory.mktemp("pickle") / "pkl", skip=("*.safetensors",))
    torch.save(load_state(tiny_init), folder / "pytorch_model.bin")
    return folder


@pytest.fixture(scope="module")
def custom_code_model(tmp_path_factory, tiny_init) -> tuple[Path, Path]:
    """A model folder that asks for its own Python code (auto_map); importing modeling.py writes MARKER."""
    base = tmp_path_factory.mktemp("remote")
    folder, marker = copy_model(tiny_init, base / "custom"), base / "MARKER"
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(
        model_type="warp_custom_xyz",
        architectures=["MyModel"],
        auto_map={"AutoConfig": "modeling.MyConfig", "AutoModelForCausalLM": "modeling.MyModel"},
    )
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "modeling.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('remote code ran')\n"
        "from transformers import PretrainedConfig, PreTrainedModel\n"
        "class MyConfig(PretrainedConfig):\n    model_type = 'warp_custom_xyz'\n"
        "class MyModel(PreTrainedModel):\n    config_class = MyConfig\n"
    )
    return folder, marker


# ---------------------------------------------------------------------------------------------------
# Data loss: an output that overlaps an input is refused before anything is written


MERGE_OVERLAP = {
    "OUT is an ancestor of the inputs": ("models", "contains the input"),
    "OUT is an input": ("models/ft1", "is the input"),
    "OUT inside an input": ("models/ft1/sub", "inside the input"),
    "OUT inside an input through a symlink": ("links/ft1/sub", "inside the input"),
}


@pytest.mark.parametrize("case", list(MERGE_OVERLAP))
def test_merge_refuses_output_overlapping_an_input(case, models, tmp_path):
    """`warp merge slerp … --force -o OUT` with OUT overlapping an input: refused, inputs untouched
    (not even a lock file is made inside an input)."""
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "ft1").symlink_to(models / "ft1")
    rel, phrase = MERGE_OVERLAP[case]
    out = tmp_path / rel
    before = snapshot(models, tmp_path / "links")
    res = warp("merge", "slerp", models / "ft1", models / "ft2", "--init", models / "init", "-o", out, "--force", "-q")
    refused(res, phrase, "-o")
    assert snapshot(models, tmp_path / "links") == before
    assert leftovers(out) == []


@pytest.fixture
def pol(tmp_path, tiny_init, files) -> Path:
    """pol/{policy/, prompts.jsonl, r.py}: an RL run's inputs in one folder."""
    root = tmp_path / "pol"
    copy_model(tiny_init, root / "policy")
    shutil.copy(files / "p.jsonl", root / "prompts.jsonl")
    shutil.copy(files / "rewards.py", root / "r.py")
    return root


RL_OVERLAP = {
    "OUT is an ancestor of the inputs": ("pol", "contains the input"),
    "OUT inside the model": ("pol/policy/x", "inside the input"),
    "OUT.partial is the model": ("runs/a", "is the input"),
}


@pytest.mark.parametrize("case", list(RL_OVERLAP))
def test_rl_refuses_output_overlapping_an_input(case, pol, tmp_path, tiny_init):
    """`warp rl … --force -o OUT` with OUT (or its OUT.partial work folder) overlapping an input:
    refused, inputs untouched (no lock or work folder made inside them)."""
    rel, phrase = RL_OVERLAP[case]
    model = pol / "policy"
    if case == "OUT.partial is the model":
        model = copy_model(tiny_init, tmp_path / "runs" / "a.partial")
    out = tmp_path / rel
    before = snapshot(pol, tmp_path / "runs")
    res = warp(
        "rl",
        "--model",
        model,
        "--prompts",
        pol / "prompts.jsonl",
        "--reward",
        f"{pol / 'r.py'}:good",
        "-o",
        out,
        *RL_FAST,
        "--force",
    )
    refused(res, phrase)
    assert snapshot(pol, tmp_path / "runs") == before
    assert leftovers(out) == [] and leftovers(partial(out)) == []
    if case != "OUT is an ancestor of the inputs":
        assert not os.path.lexists(out)
    if case != "OUT.partial is the model":
        assert not os.path.lexists(partial(out))


@pytest.fixture
def pipe_layout(tmp_path, tiny_init) -> tuple[Path, Path]:
    """work/{models/sft, data/{train,heldout}.jsonl, cfg/cfg.yaml}: the config names the prompts by
    absolute path in data/ and the init in models/."""
    work = tmp_path / "work"
    sft = copy_model(tiny_init, work / "models" / "sft")
    cfg = small_cfg(work / "cfg", sft)
    (work / "data").mkdir()
    for f in ("train.jsonl", "heldout.jsonl"):
        shutil.move(work / "cfg" / f, work / "data" / f)
    text = cfg.read_text().replace("train: train.jsonl", f"train: {work / 'data' / 'train.jsonl'}")
    cfg.write_text(text.replace("heldout: heldout.jsonl", f"heldout: {work / 'data' / 'heldout.jsonl'}"))
    return work, cfg


PIPE_OVERLAP = {
    "run folder holds the init": ("work/models", "contains the input"),
    "run folder holds the prompts": ("work/data", "contains the input"),
    "run folder inside the init": ("work/models/sft/run", "inside the input"),
    "run folder holds everything": ("work", "contains the input"),
}


@pytest.mark.parametrize("case", list(PIPE_OVERLAP))
def test_pipeline_refuses_run_folder_holding_inputs(case, pipe_layout, tmp_path):
    """`warp pipeline run cfg -o DIR` where DIR contains (or lies in) the init or the prompts: refused,
    no run folder content, inputs untouched."""
    work, cfg = pipe_layout
    rel, phrase = PIPE_OVERLAP[case]
    out = tmp_path / rel
    before = snapshot(work)
    res = warp("pipeline", "run", cfg, "-o", out, "-q")
    refused(res, phrase)
    assert snapshot(work) == before
    assert leftovers(out) == []


# ---------------------------------------------------------------------------------------------------
# Data loss: a killed --force replacement and stale temp folders are repaired by the next command


@pytest.mark.parametrize("moment, ends_with", [("old", "new content"), ("new", "old content")])
def test_killed_force_replacement_is_completed_by_next_command(moment, ends_with, tiny_runs, tmp_path):
    """`warp merge lerp … --force` SIGKILLed inside the replacement — right after OUT was renamed to
    .OUT.old-* (`old`: OUT missing) or right after .OUT.new-* was made (`new`: OUT still old) — then
    the next command on OUT repairs it (new content after the commit point, old before it, no
    .OUT.* left) and only then says OUT already exists."""
    a, b, out = tiny_runs[0], tiny_runs[1], tmp_path / "out"
    assert warp("merge", "lerp", a, b, "-o", out, "-q").exit_code == 0
    old = load_state(out)
    assert warp("merge", "lerp", a, b, "--weights", "0.2,0.8", "-o", tmp_path / "ref", "-q").exit_code == 0
    new = load_state(tmp_path / "ref")
    assert not same_tensors(old, new)

    p = cli(
        "merge",
        "lerp",
        a,
        b,
        "--weights",
        "0.2,0.8",
        "-o",
        out,
        "--force",
        "-q",
        cwd=tmp_path,
        wrap=f"kill-after-rename={moment}",
    )
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr)
    left = leftovers(out)
    assert any(n.startswith(".out.new-") for n in left), left
    if moment == "old":
        assert not out.exists() and any(n.startswith(".out.old-") for n in left), left
    else:
        assert same_tensors(load_state(out), old)

    res = warp("merge", "lerp", a, b, "-o", out, "-q")
    refused(res, "already exists", "--force")
    assert same_tensors(load_state(out), new if ends_with == "new content" else old)
    assert leftovers(out) == []


def test_moved_aside_output_is_restored(tiny_runs, tmp_path):
    """A hand-made .OUT.old-1-1 with OUT missing and no .OUT.new-*: the next command restores it."""
    a, b, out = tiny_runs[0], tiny_runs[1], tmp_path / "out"
    assert warp("merge", "lerp", a, b, "-o", out, "-q").exit_code == 0
    old = load_state(out)
    out.rename(tmp_path / ".out.old-1-1")
    res = warp("merge", "lerp", a, b, "--weights", "0.9,0.1", "-o", out, "-q")
    refused(res, "already exists")
    assert same_tensors(load_state(out), old)
    assert leftovers(out) == []


def test_stale_tmp_folder_is_removed_by_next_merge(tiny_runs, tmp_path):
    """A hand-made .OUT.tmp-123-456/ with junk: removed by the next `warp merge … -o OUT`."""
    out, stale = tmp_path / "out", tmp_path / ".out.tmp-123-456"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"junk" * 100)
    res = warp("merge", "lerp", tiny_runs[0], tiny_runs[1], "-o", out, "-q")
    assert res.exit_code == 0, res.output
    assert (out / "model.safetensors").is_file()
    assert leftovers(out) == []


def test_sigterm_during_merge_leaves_no_temp_folder(tiny_runs, tmp_path):
    """SIGTERM to a merge that is writing its temp folder: a clean unwind (like Ctrl-C), non-zero
    exit, no OUT and no .OUT.tmp-* left."""
    out, marker = tmp_path / "out", tmp_path / "paused"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(WRAP),
            f"pause-in-merge={marker}",
            "merge",
            "lerp",
            str(tiny_runs[0]),
            str(tiny_runs[1]),
            "-o",
            str(out),
            "-q",
        ],
        cwd=tmp_path,
        env=subprocess_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert marker.exists(), proc.communicate(timeout=5)
        assert any(n.startswith(".out.tmp-") for n in leftovers(out)), leftovers(out)  # mid-write
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode not in (0, -signal.SIGTERM), (proc.returncode, stderr)
    assert "Traceback" not in stderr, stderr
    assert_nothing_written(out)


# ---------------------------------------------------------------------------------------------------
# Garbage with exit 0: non-finite options, overflowing losses, NaN weights


GARBAGE = [
    ("--lr", "inf"),
    ("--beta", "inf"),
    ("--length-penalty", "inf"),
    ("--lr", "1e308"),
    ("--beta", "1e308"),
    ("--temperature", "nan"),
    ("--mu", "2"),
]


@pytest.mark.parametrize("option, value", GARBAGE)
def test_rl_refuses_non_finite_or_out_of_range_option(option, value, files, tiny_init, tmp_path):
    """`warp rl --lr inf` and the like: exit 2, one line naming the option, no OUT, no OUT.partial."""
    out = tmp_path / "out"
    refused(warp(*rl_args(files, tiny_init, out, option, value)), option)
    assert_nothing_written(out, rl=True)


def test_rl_loss_overflow_is_refused_at_step_1(files, tiny_init, tmp_path):
    """A reward of 3e38 (finite, but the loss overflows): exit 2 naming step 1 and NaN/Inf, nothing left."""
    out = tmp_path / "out"
    refused(warp(*rl_args(files, tiny_init, out, "--reward", reward(files, "huge"))), "step 1", "NaN/Inf")
    assert_nothing_written(out, rl=True)


def test_rl_overflow_at_step_3_keeps_state_of_step_2(files, tiny_init, tmp_path):
    """A reward that turns huge at its 3rd call, --state-every 1: the error names step 3, OUT.partial
    keeps the state of step 2, no OUT."""
    out = tmp_path / "out"
    res = warp(
        *rl_args(files, tiny_init, out, "--reward", reward(files, "huge_at_3"), "--steps", "5", "--state-every", "1")
    )
    refused(res, "step 3", "NaN/Inf")
    progress = json.loads((partial(out) / "state" / "progress.json").read_text())
    assert progress["step"] == 2
    assert not out.exists() and leftovers(out) == []


NAN_CASES = {
    "rl --model": lambda f, nan, init, out: rl_args(f, nan, out),
    "eval --init": lambda f, nan, init, out: [
        "eval",
        init,
        "--init",
        nan,
        "--prompts",
        f / "p.jsonl",
        "--reward",
        reward(f, "good"),
        "-o",
        out,
        "--max-new-tokens",
        "4",
    ],
    "merge": lambda f, nan, init, out: ["merge", "lerp", nan, init, "-o", out, "-q"],
}


@pytest.mark.parametrize("case", list(NAN_CASES))
def test_nan_weight_is_refused_naming_the_tensor(case, files, nan_model, tiny_init, tmp_path):
    """A checkpoint with one NaN weight, as `warp rl --model`, `warp eval --init` or a merge input:
    exit 2 naming the tensor, nothing written, the checkpoint untouched."""
    out = tmp_path / "out"
    before = snapshot(nan_model)
    refused(warp(*NAN_CASES[case](files, nan_model, tiny_init, out)), NAN_TENSOR)
    assert snapshot(nan_model) == before
    assert_nothing_written(out, rl=True)
    assert not list(tmp_path.glob("out.*"))  # warp eval writes OUT.csv / OUT.json


# ---------------------------------------------------------------------------------------------------
# Security: no checkpoint code runs, no pickle is loaded


@pytest.mark.parametrize("stdin", ["/dev/null", "a pipe answering y"])
@pytest.mark.parametrize("command", ["rl --model", "eval --init"])
def test_checkpoint_code_never_runs(command, stdin, custom_code_model, files, tiny_init, tmp_path):
    """A model folder whose config asks for its own modeling.py (auto_map): exit 2, one line, the code
    never imported, and no "[y/N]" trust question (even with a "y" waiting on stdin)."""
    folder, marker = custom_code_model
    out = tmp_path / "out"
    if command == "rl --model":
        args = rl_args(files, folder, out)
    else:
        args = [
            "eval",
            tiny_init,
            "--init",
            folder,
            "--prompts",
            files / "p.jsonl",
            "--reward",
            reward(files, "good"),
            "-o",
            out,
        ]
    p = cli(*args, cwd=tmp_path, input="y\n" if stdin != "/dev/null" else None)
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    one_error_line(p.stderr, str(folder))
    assert not marker.exists(), "modeling.py of the checkpoint was imported"
    assert "[y/N]" not in p.stdout + p.stderr and "Traceback" not in p.stderr
    assert_nothing_written(out, rl=True)


PICKLE_CASES = {
    "rl --model": lambda f, pkl, init, tmp: rl_args(f, pkl, tmp / "out"),
    "rl --reward": lambda f, pkl, init, tmp: rl_args(f, init, tmp / "out", "--reward", pkl),
    "eval --init": lambda f, pkl, init, tmp: [
        "eval",
        init,
        "--init",
        pkl,
        "--prompts",
        f / "p.jsonl",
        "--reward",
        reward(f, "good"),
        "-o",
        tmp / "out",
    ],
    "eval sxs": lambda f, pkl, init, tmp: [
        "eval",
        "sxs",
        pkl,
        init,
        "--prompts",
        f / "p.jsonl",
        "--judge",
        reward(f, "good"),
    ],
    "pipeline init": lambda f, pkl, init, tmp: [
        "pipeline",
        "run",
        small_cfg(tmp / "cfg", pkl),
        "-o",
        tmp / "out",
        "-q",
    ],
}


@pytest.mark.parametrize("case", list(PICKLE_CASES))
def test_pickle_checkpoint_is_refused(case, files, pickle_model, tiny_init, tmp_path):
    """A folder holding only pytorch_model.bin: `warp rl --model/--reward`, `warp eval --init`,
    `warp eval sxs`, a pipeline init: exit 2, one line mentioning "pickle", never unpickled."""
    before = snapshot(pickle_model)
    res = warp(*PICKLE_CASES[case](files, pickle_model, tiny_init, tmp_path))
    refused(res, "pickle")
    assert "UnpicklingError" not in res.output
    assert snapshot(pickle_model) == before
    assert_nothing_written(tmp_path / "out", rl=True)


def test_rl_state_holds_no_pickles(files, tiny_init, tmp_path, monkeypatch):
    """An interrupted run's OUT.partial/ holds safetensors and JSON only: no .pt/.pkl/.bin, no pickle."""
    out = tmp_path / "out"
    monkeypatch.setenv("WARP_REL_FAIL_AT", "3")
    refused(warp(*rl_args(files, tiny_init, out, "--steps", "4", "--state-every", "1")), "reward server went away")
    found = [p for p in partial(out).rglob("*") if p.is_file()]
    assert (partial(out) / "state" / "policy.safetensors") in found
    for p in found:
        assert p.suffix in (".safetensors", ".json", ".jsonl"), p
        head = p.read_bytes()[:4]
        assert not head.startswith(b"PK\x03\x04") and head[:1] != b"\x80", f"{p} looks like a pickle"


# ---------------------------------------------------------------------------------------------------
# Concurrency and processes


def test_locked_output_is_refused_then_works(files, tiny_init, tiny_runs, tmp_path):
    """While another process holds OUT's claim, `warp merge` and `warp rl` on OUT exit 2 ("being
    written by"); once released, the same commands succeed."""
    from mergekit_warp.io.atomic import claim

    commands = {
        "merge": ["merge", "lerp", tiny_runs[0], tiny_runs[1], "-o", tmp_path / "m", "-q"],
        "rl": rl_args(files, tiny_init, tmp_path / "r"),
    }
    for name, args in commands.items():
        out = tmp_path / ("m" if name == "merge" else "r")
        with claim(out):
            refused(warp(*args), "being written by", str(out))
            assert not out.exists() and not partial(out).exists()
        res = warp(*args)
        assert res.exit_code == 0, (name, res.output)
        assert out.is_dir() and leftovers(out) == []


def test_locked_pipeline_run_folder_is_refused_then_resumes(finished_run):
    """`warp pipeline run cfg -o RUN --resume` while RUN's claim is held: exit 2 ("being written by");
    released: the same command succeeds."""
    from mergekit_warp.io.atomic import claim

    _, cfg, run = finished_run
    before = snapshot(run)
    with claim(run):
        refused(warp("pipeline", "run", cfg, "-o", run, "--resume", "-q"), "being written by")
    assert snapshot(run) == before
    res = warp("pipeline", "run", cfg, "-o", run, "--resume", "-q")
    assert res.exit_code == 0, res.output
    assert res.stdout.strip().splitlines()[-1] == str(run / "final")


def test_two_concurrent_merges_to_one_output(tiny_runs, tmp_path):
    """Two `warp merge lerp` processes to the same new OUT: one exits 0, the other 2 ("being written
    by", or "already exists" if the first had finished); never both 0."""
    out = tmp_path / "out"
    argv = [
        sys.executable,
        "-m",
        "mergekit_warp",
        "merge",
        "lerp",
        str(tiny_runs[0]),
        str(tiny_runs[1]),
        "-o",
        str(out),
        "-q",
    ]
    procs = [
        subprocess.Popen(
            argv,
            cwd=tmp_path,
            env=subprocess_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [(p, *p.communicate(timeout=180)) for p in procs]
    codes = sorted(p.returncode for p, _, _ in results)
    assert codes == [0, 2], [(p.returncode, err) for p, _, err in results]
    loser = next(err for p, _, err in results if p.returncode == 2)
    line = one_error_line(loser)
    assert "being written by" in line or "already exists" in line, line
    assert (out / "model.safetensors").is_file() and leftovers(out) == []


@pytest.mark.slow
def test_pipeline_workers_die_with_their_parent(tiny_init, tmp_path):
    """A pipeline with `devices: [cpu, cpu]` (parallel RL workers) SIGKILLed mid-run: within 15 s
    every process it had started is gone."""
    psutil = pytest.importorskip("psutil")
    rl = {**SMALL_RL, "steps": 100000}
    cfg = small_cfg(tmp_path / "cfg", tiny_init, runs=2, devices=["cpu", "cpu"], rl=rl)
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mergekit_warp", "pipeline", "run", str(cfg), "-o", str(run), "-q"],
        cwd=tmp_path,
        env=subprocess_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    children: list = []
    try:
        parent = psutil.Process(proc.pid)
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            workers = [c for c in parent.children(recursive=True) if "spawn_main" in " ".join(_cmdline(c))]
            stepping = all((run / "iter_1" / f"run_{m}.partial" / "metrics.jsonl").is_file() for m in (1, 2))
            if len(workers) >= 2 and stepping:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the pipeline ended before its workers were seen"
        assert time.time() < deadline, "the RL workers did not start stepping in time"
        children = parent.children(recursive=True)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        deadline = time.time() + 15
        alive = children
        while alive and time.time() < deadline:
            alive = [c for c in alive if _alive(psutil, c)]
            time.sleep(0.2)
        assert not alive, [(c.pid, _cmdline(c)) for c in alive]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for c in children:
            if _alive(psutil, c):
                c.kill()


def _cmdline(p) -> list[str]:
    try:
        return p.cmdline()
    except Exception:
        return []


def _alive(psutil, p) -> bool:
    """Running and not a zombie (orphans may wait a while for PID 1 to reap them)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def test_resume_removes_stale_partial_of_finished_run(files, tiny_init, tmp_path):
    """Killed between publishing OUT and removing OUT.partial: `warp rl … --resume` exits 0, prints OUT,
    removes OUT.partial and leaves OUT as it was."""
    out = tmp_path / "out"
    assert warp(*rl_args(files, tiny_init, out)).exit_code == 0
    before = snapshot(out)
    (partial(out) / "state").mkdir(parents=True)
    (partial(out) / "config.json").write_text(json.dumps({"out": str(out)}))
    (partial(out) / "state" / "progress.json").write_text('{"step": 1}')
    res = warp(*rl_args(files, tiny_init, out, "--resume"))
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == str(out.absolute())
    assert not partial(out).exists() and leftovers(partial(out)) == []
    assert snapshot(out) == before and leftovers(out) == []


# ---------------------------------------------------------------------------------------------------
# Clear messages instead of tracebacks: disks


def _enospc(path):
    return OSError(errno.ENOSPC, "No space left on device", str(path))


def test_merge_disk_full_is_one_line(monkeypatch, tiny_runs, tmp_path):
    """ENOSPC from the shard writer: exit 2, "no space left", no OUT, no .OUT.*."""
    from mergekit_warp.io import writer

    def full(self, name, chunk):
        raise _enospc(self.folder / self.files[0])

    monkeypatch.setattr(writer.ShardWriter, "write", full)
    out = tmp_path / "out"
    refused(warp("merge", "lerp", tiny_runs[0], tiny_runs[1], "-o", out, "-q"), "no space left")
    assert_nothing_written(out)


def test_rl_disk_full_while_saving_state_is_one_line(monkeypatch, files, tiny_init, tmp_path):
    """ENOSPC from safetensors while `warp rl --state-every 1` saves its state: exit 2, "no space left",
    no OUT, no .OUT.*, no OUT.partial."""
    from mergekit_warp.rl import state

    def full(tensors, filename, *args, **kwargs):
        raise _enospc(filename)

    monkeypatch.setattr(state, "save_file", full)
    out = tmp_path / "out"
    refused(warp(*rl_args(files, tiny_init, out, "--state-every", "1")), "no space left")
    assert_nothing_written(out, rl=True)


@pytest.mark.parametrize("command", ["merge", "rl"])
def test_read_only_output_folder_is_one_line(command, monkeypatch, files, tiny_init, tiny_runs, tmp_path):
    """EROFS when the lock file beside OUT is created: exit 2, "read-only", nothing written."""
    from mergekit_warp.io import atomic

    real_open = os.open

    def ro_open(path, flags, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(atomic.os, "open", ro_open)
    out = tmp_path / "out"
    args = (
        ["merge", "lerp", tiny_runs[0], tiny_runs[1], "-o", out, "-q"]
        if command == "merge"
        else rl_args(files, tiny_init, out)
    )
    refused(warp(*args), "read-only")
    assert_nothing_written(out, rl=True)


@pytest.fixture
def tmpfs(tmp_path):
    """mount(options) → a fresh tmpfs folder (root on Linux only; skipped where mounting is not
    allowed); unmounted in teardown."""
    if sys.platform != "linux" or os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("needs root on Linux to mount a tmpfs")
    mounted = []

    def mount(options: str) -> Path:
        where = tmp_path / f"tmpfs{len(mounted)}"
        where.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"mount -t tmpfs failed: {r.stderr.decode(errors='replace').strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", str(where)], capture_output=True)


def test_merge_onto_a_full_tmpfs(tmpfs, tiny_runs):
    """A real 64 KiB tmpfs as the output's folder: exit 2, "no space left", nothing left on it."""
    disk = tmpfs("size=64k")
    out = disk / "out"
    refused(warp("merge", "lerp", tiny_runs[0], tiny_runs[1], "-o", out, "-q"), "no space left")
    assert_nothing_written(out)
    assert list(disk.iterdir()) == []


def test_rl_onto_a_full_tmpfs(tmpfs, files, tiny_init):
    """`warp rl --state-every 1` with OUT on a real 64 KiB tmpfs: exit 2, "no space left", no OUT, no
    OUT.partial, nothing left on it."""
    disk = tmpfs("size=64k")
    out = disk / "out"
    refused(warp(*rl_args(files, tiny_init, out, "--state-every", "1")), "no space left")
    assert_nothing_written(out, rl=True)
    assert list(disk.iterdir()) == []


def test_merge_onto_a_read_only_tmpfs(tmpfs, tiny_runs):
    """A real read-only tmpfs as the output's folder: exit 2, "read-only"."""
    out = tmpfs("ro,size=64k") / "out"
    refused(warp("merge", "lerp", tiny_runs[0], tiny_runs[1], "-o", out, "-q"), "read-only")
    assert_nothing_written(out)


# ---------------------------------------------------------------------------------------------------
# Clear messages instead of tracebacks: damaged inputs


def test_latin1_prompts_file_is_named_with_its_line(files, tiny_init, tmp_path):
    """Latin-1 bytes in the prompts file: exit 2 naming FILE:1 and UTF-8; the file is untouched."""
    prompts, out = tmp_path / "latin.jsonl", tmp_path / "out"
    prompts.write_bytes(b'{"prompt": "caf\xe9"}\n')
    before = snapshot(prompts)
    refused(warp(*rl_args(files, tiny_init, out, "--prompts", prompts)), "latin.jsonl:1", "UTF-8")
    assert snapshot(prompts) == before
    assert_nothing_written(out, rl=True)


def test_truncated_safetensors_is_named(files, tiny_init, tmp_path):
    """`warp rl --model` on a folder whose model.safetensors was cut in half: exit 2 naming the file."""
    model, out = copy_model(tiny_init, tmp_path / "cut"), tmp_path / "out"
    f = model / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    before = snapshot(model)
    refused(warp(*rl_args(files, model, out)), str(f))
    assert snapshot(model) == before
    assert_nothing_written(out, rl=True)


DAMAGE = [
    (f, how)
    for f in ("state/progress.json", "state/policy.safetensors", "config.json")
    for how in ("truncated", "emptied")
]


@pytest.mark.parametrize("name, how", DAMAGE)
def test_resume_from_damaged_state_says_damaged_then_force_restarts(name, how, files, tiny_init, tmp_path, monkeypatch):
    """`warp rl --resume` over an interrupted run whose OUT.partial/NAME was truncated or emptied:
    exit 2 with "damaged" and "--force", no OUT; then `--force` starts over and succeeds."""
    out = tmp_path / "out"
    extra = ("--steps", "4", "--state-every", "1")
    monkeypatch.setenv("WARP_REL_FAIL_AT", "3")
    refused(warp(*rl_args(files, tiny_init, out, *extra)), "resumable state of step 2")
    monkeypatch.delenv("WARP_REL_FAIL_AT")
    f = partial(out) / name
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2] if how == "truncated" else b"")
    refused(warp(*rl_args(files, tiny_init, out, *extra, "--resume")), "damaged", "--force")
    assert not out.exists() and leftovers(out) == []
    res = warp(*rl_args(files, tiny_init, out, *extra, "--force"))
    assert res.exit_code == 0, res.output
    assert (out / "model.safetensors").is_file() and not partial(out).exists()
    assert [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


@pytest.fixture
def damaged_run(finished_run) -> tuple[Path, Path]:
    """A finished small pipeline run whose run.json was cut in half; returns (config, run folder)."""
    _, cfg, run = finished_run
    manifest = run / "run.json"
    manifest.write_bytes(manifest.read_bytes()[: manifest.stat().st_size // 2])
    return cfg, run


@pytest.mark.parametrize("command", ["status", "run --resume"])
def test_truncated_run_json_is_named(command, damaged_run):
    """A truncated run.json: `warp pipeline status RUN` and `… run cfg -o RUN --resume` exit 2 with one
    line naming run.json; the run folder is untouched."""
    cfg, run = damaged_run
    before = snapshot(run)
    args = ["pipeline", "status", run] if command == "status" else ["pipeline", "run", cfg, "-o", run, "--resume", "-q"]
    refused(warp(*args), "run.json")
    assert snapshot(run) == before and leftovers(run) == []


def test_pipeline_run_folder_that_is_a_file(tiny_init, tmp_path):
    """`warp pipeline run cfg -o FILE` with FILE an existing regular file: exit 2, FILE untouched."""
    cfg, f = small_cfg(tmp_path / "cfg", tiny_init), tmp_path / "notes.txt"
    f.write_text("my notes\n")
    before = snapshot(f)
    refused(warp("pipeline", "run", cfg, "-o", f, "-q"), str(f))
    assert snapshot(f) == before and leftovers(f) == []


def test_reward_calling_sys_exit_is_a_user_error(files, tiny_init, tmp_path):
    """A reward that calls sys.exit(3): exit 2 (not 3), one line naming the reward and sys.exit, no
    OUT.partial left."""
    out = tmp_path / "out"
    refused(warp(*rl_args(files, tiny_init, out, "--reward", reward(files, "exits"))), "rewards.py:exits", "sys.exit")
    assert_nothing_written(out, rl=True)


def test_checkpoint_missing_a_tensor_is_exactly_one_line(files, tiny_init, tmp_path):
    """`warp rl --model` on a checkpoint that lacks one tensor (real process): exit 2, and stderr is
    exactly one line naming the tensor (no multi-line load report from transformers)."""
    model, out = copy_model(tiny_init, tmp_path / "holey"), tmp_path / "out"
    sd = load_file(model / "model.safetensors")
    del sd[MISSING_TENSOR]
    save_file(sd, model / "model.safetensors", metadata={"format": "pt"})
    p = cli(*rl_args(files, model, out), cwd=tmp_path)
    assert p.returncode == 2, (p.returncode, p.stderr)
    one_error_line(p.stderr, MISSING_TENSOR)
    assert_nothing_written(out, rl=True)


@pytest.mark.parametrize("case", ["rl --batch-size abc", "merge slerpp"])
def test_usage_errors_from_the_real_entry_point_are_one_line(case, files, tiny_init, tmp_path):
    """`python -m mergekit_warp rl --batch-size abc …` and `… merge slerpp`: exit 2, one `error:` line
    naming the option/command, no rich box drawing."""
    if case.startswith("rl"):
        args, needle = [*rl_args(files, tiny_init, tmp_path / "out"), "--batch-size", "abc"], "--batch-size"
    else:
        args, needle = ["merge", "slerpp"], "slerpp"
    p = cli(*args, cwd=tmp_path)
    assert p.returncode == 2, (p.returncode, p.stderr)
    one_error_line(p.stderr, needle)
    assert not any(ch in p.stderr for ch in "╭╰│─"), p.stderr
    assert_nothing_written(tmp_path / "out", rl=True)


def _malformed_train(cfg_dir: Path, tmp: Path, init: Path) -> dict:
    (cfg_dir / "train.jsonl").write_text('{"prompt": "the cat"}\n{"prompt": \n')
    return {}


def _too_long_train(cfg_dir: Path, tmp: Path, init: Path) -> dict:
    (cfg_dir / "train.jsonl").write_text(json.dumps({"prompt": " ".join(WORDS[:5] * 25)}) + "\n")  # 125 tokens
    return {}


def _missing_reward(cfg_dir: Path, tmp: Path, init: Path) -> dict:
    return {"reward": "missing.py:fn"}


def _init_without_tokenizer(cfg_dir: Path, tmp: Path, init: Path) -> dict:
    return {"init": str(copy_model(init, tmp / "bare_init", skip=TOKENIZER_FILES))}


def _missing_eval_prompts(cfg_dir: Path, tmp: Path, init: Path) -> dict:
    return {"rl": {**SMALL_RL, "eval_prompts": "missing.jsonl"}}


# case → (what the line must name, how the config is broken: writes files, returns config overrides)
PREFLIGHT = {
    "malformed train JSONL": ("train.jsonl:2", _malformed_train),
    "train prompt longer than the context": ("exceeds the model context", _too_long_train),
    "reward file missing": ("missing.py", _missing_reward),
    "init without tokenizer files": ("tokenizer", _init_without_tokenizer),
    "eval_prompts missing": ("missing.jsonl", _missing_eval_prompts),
}


@pytest.mark.parametrize("case", list(PREFLIGHT))
def test_pipeline_preflight_errors_create_no_run_folder(case, tiny_init, tmp_path):
    """Bad pipeline input found before any work: exit 2, one line; the -o run folder does not exist,
    so the corrected run with the same -o starts without --resume."""
    needle, breaks = PREFLIGHT[case]
    cfg_dir, run = tmp_path / "cfg", tmp_path / "runs" / "r1"
    small_cfg(cfg_dir, tiny_init)
    overrides = breaks(cfg_dir, tmp_path, tiny_init)
    if overrides:
        small_cfg(cfg_dir, overrides.pop("init", tiny_init), **overrides)
    res = warp("pipeline", "run", cfg_dir / "cfg.yaml", "-o", run, "-q")
    refused(res, needle)
    assert_nothing_written(run)
    fixed = small_cfg(cfg_dir, tiny_init)
    res = warp("pipeline", "run", fixed, "-o", run, "-q")
    assert res.exit_code == 0, res.output
    assert (run / "final" / "model.safetensors").is_file()


REFUSED_REWARDS = {"boom": "no reward today", "short": "returned 1 values", "nan": "NaN/inf"}


@pytest.mark.parametrize("name", list(REFUSED_REWARDS))
def test_rl_refusals_leave_no_partial(name, files, tiny_init, tmp_path):
    """A reward that raises on its first call, returns the wrong count, or NaN: exit 2, and neither OUT
    nor OUT.partial exists."""
    out = tmp_path / "out"
    refused(warp(*rl_args(files, tiny_init, out, "--reward", reward(files, name))), REFUSED_REWARDS[name])
    assert_nothing_written(out, rl=True)


# ---------------------------------------------------------------------------------------------------
# Beyond the list: found while writing the tests above


@pytest.mark.parametrize("command", ["merge", "rl"])
def test_real_disk_full_message_says_where(command, tmpfs, files, tiny_init, tiny_runs):
    """On a real full disk the one line names the output (or the file being written), not just
    "no space left"."""
    disk = tmpfs("size=64k")
    out = disk / "out"
    args = (
        ["merge", "lerp", tiny_runs[0], tiny_runs[1], "-o", out, "-q"]
        if command == "merge"
        else rl_args(files, tiny_init, out, "--state-every", "1")
    )
    refused(warp(*args), "no space left", str(disk))


@pytest.mark.parametrize("case", ["-o CKPT/config", "-o PROMPTS_STEM"])
def test_eval_scores_never_overwrite_an_input(case, files, tiny_init, tmp_path):
    """`warp eval CKPT … -o CKPT/config`, an output folder inside an input, is refused; `-o held` beside
    the prompts file held.json is a folder of its own and writes nothing over the prompts. Inputs untouched."""
    ckpt, prompts = copy_model(tiny_init, tmp_path / "ckpt"), tmp_path / "held.json"
    shutil.copy(files / "p.jsonl", prompts)
    stem = ckpt / "config" if case == "-o CKPT/config" else tmp_path / "held"
    before = snapshot(ckpt, prompts)
    res = warp(
        "eval",
        ckpt,
        "--init",
        tiny_init,
        "--prompts",
        prompts,
        "--reward",
        reward(files, "good"),
        "-o",
        stem,
        "--max-new-tokens",
        "4",
    )
    assert snapshot(ckpt, prompts) == before, "an input was overwritten"
    if case == "-o CKPT/config":
        refused(res, "input")
    else:
        assert res.exit_code == 0 and (stem / "scores.json").is_file(), res.output


PARETO_OVER_INPUT = ["the run folder", "an RL run", "final/", "the SFT init"]


@pytest.mark.parametrize("case", PARETO_OVER_INPUT)
def test_pareto_force_never_replaces_an_input(case, finished_run):
    """`warp eval pareto RUN -o X --force` with X the run folder, one of its RL runs, final/ or the SFT
    init it reads: refused, nothing replaced."""
    sft, _, run = finished_run
    targets = {"the run folder": run, "an RL run": run / "iter_1" / "run_1", "final/": run / "final"}
    out = targets.get(case, sft)
    before = snapshot(sft, run)
    res = warp("eval", "pareto", run, "-o", out, "--force")
    assert snapshot(sft, run) == before, f"{out} was replaced"
    refused(res, "input")


@pytest.mark.parametrize("etas", ["nan", "0,inf"])
def test_pareto_refuses_non_finite_etas_before_work(etas, finished_run, tmp_path):
    """`warp eval pareto RUN --etas nan`: exit 2, one line naming --etas, before any evaluation."""
    _, _, run = finished_run
    out = tmp_path / "pareto"
    refused(warp("eval", "pareto", run, "--etas", etas, "-o", out), "--etas")
    assert_nothing_written(out)


@pytest.mark.parametrize("option, value", [("--temperature", "nan"), ("--batch-size", "0")])
@pytest.mark.parametrize("command", ["eval", "eval sxs"])
def test_eval_refuses_bad_sampling_option(command, option, value, files, tiny_init, tmp_path):
    """`warp eval … --temperature nan` / `--batch-size 0` (and the same for `warp eval sxs`): exit 2,
    one line naming the option, nothing written."""
    out = tmp_path / "scores"
    if command == "eval":
        args = [
            "eval",
            tiny_init,
            "--init",
            tiny_init,
            "--prompts",
            files / "p.jsonl",
            "--reward",
            reward(files, "good"),
            "-o",
            out,
        ]
    else:
        args = ["eval", "sxs", tiny_init, tiny_init, "--prompts", files / "p.jsonl", "--judge", reward(files, "good")]
    refused(warp(*args, option, value), option)
    assert not list(tmp_path.glob("scores*"))
