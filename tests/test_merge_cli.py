"""`warp merge …`, `warp liti`, `warp inspect` through the real CLI: the happy paths print only the
result path on stdout; every bad input exits 2 with one line naming the problem and writes nothing."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import load_state
from typer.testing import CliRunner

from mergekit_warp.cli import app

runner = CliRunner()


def warp(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def assert_refused(result, out: Path, *needles: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    err = result.stderr.strip().splitlines()[-1]  # above it, at most the progress bar's last frame
    print(err)  # shown with -s: the messages a user sees
    assert err.startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for n in needles:
        assert n in err, (n, err)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]


def test_slerp_prints_only_the_path(tiny_init, tiny_runs, tmp_path):
    out = tmp_path / "m"
    r = warp("merge", "slerp", tiny_runs[0], tiny_runs[1], "--init", tiny_init, "-o", out, "--lambda", "0.5")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(out.absolute())
    assert (out / "model.safetensors").exists()
    # the same command again: refused, and the finished output is untouched
    before = load_state(out)
    r = warp("merge", "slerp", tiny_runs[0], tiny_runs[1], "--init", tiny_init, "-o", out)
    assert r.exit_code == 2 and "--force" in r.stderr
    assert all(torch.equal(before[k], v) for k, v in load_state(out).items())
    r = warp("merge", "slerp", tiny_runs[0], tiny_runs[1], "--init", tiny_init, "-o", out, "--force", "--lambda", "0")
    assert r.exit_code == 0
    want = load_state(tiny_runs[0])
    assert all(torch.allclose(v, want[k], atol=1e-6) for k, v in load_state(out).items())


def test_other_commands(tiny_init, tiny_runs, tmp_path):
    r = warp("merge", "lerp", *tiny_runs[:2], "--weights", "0.25,0.75", "-o", tmp_path / "l", "-q")
    assert r.exit_code == 0 and r.stdout.strip() == str((tmp_path / "l").absolute())
    r = warp("merge", "ema", tiny_init, *tiny_runs, "--mu", "1", "-o", tmp_path / "e", "-q")
    assert r.exit_code == 0
    assert all(torch.equal(v, load_state(tiny_runs[-1])[k]) for k, v in load_state(tmp_path / "e").items())
    r = warp("liti", tmp_path / "l", "--init", tiny_init, "--eta", "0.3", "-o", tmp_path / "t", "-q")
    assert r.exit_code == 0 and (tmp_path / "t" / "warp_provenance.json").exists()
    r = warp("inspect", *tiny_runs[:2], "--init", tiny_init, "--json")
    assert r.exit_code == 0
    rows = json.loads(r.stdout)
    assert {row["group"] for row in rows} >= {"model.layers.0", "model.layers.1", "lm_head.weight"}
    r = warp("inspect", *tiny_runs[:2], "--init", tiny_init)
    assert r.exit_code == 0 and "model.layers.1" in r.stdout and "Ω12" in r.stdout


@pytest.fixture(scope="module")
def broken(tiny_init, tmp_path_factory) -> dict[str, Path]:
    """One broken checkpoint per failure mode, each derived from the tiny init."""
    base = tmp_path_factory.mktemp("broken")

    def variant(name: str, edit) -> Path:
        dst = base / name
        shutil.copytree(tiny_init, dst)
        sd = load_file(dst / "model.safetensors")
        edit(sd)
        save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
        return dst

    out = {
        "renamed": variant("renamed", lambda sd: sd.__setitem__("model.extra.weight", sd.pop("model.norm.weight"))),
        "reshaped": variant("reshaped", lambda sd: sd.__setitem__("model.norm.weight", torch.ones(33))),
        "nan": variant(
            "nan", lambda sd: sd["model.layers.1.mlp.down_proj.weight"].view(-1).__setitem__(3, float("nan"))
        ),
        "inf": variant("inf", lambda sd: sd["lm_head.weight"].view(-1).__setitem__(0, float("inf"))),
    }
    trunc = base / "truncated"
    shutil.copytree(tiny_init, trunc)
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    corrupt = base / "corrupt"
    shutil.copytree(tiny_init, corrupt)
    (corrupt / "model.safetensors").write_bytes(data[:8] + b"\x00garbage" * 10 + data[88:])
    pickled = base / "pickled"
    pickled.mkdir()
    shutil.copy(tiny_init / "config.json", pickled / "config.json")
    torch.save(load_file(tiny_init / "model.safetensors"), pickled / "pytorch_model.bin")
    empty = base / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("hello")
    out.update(
        truncated=trunc,
        corrupt=corrupt,
        pickled=pickled,
        empty=empty,
        pickle_file=pickled / "pytorch_model.bin",
        text_file=empty / "notes.txt",
    )
    return out


CASES = {
    # name: (args builder, words the one-line error must contain)
    "missing path": (lambda i, r, b: ["merge", "slerp", r[0], i / "nope", "--init", i], ["nope", "no such"]),
    "not a checkpoint": (
        lambda i, r, b: ["merge", "slerp", r[0], b["empty"], "--init", i],
        ["empty", "not a checkpoint"],
    ),
    "not a checkpoint file": (lambda i, r, b: ["merge", "slerp", r[0], b["text_file"], "--init", i], ["notes.txt"]),
    "truncated": (
        lambda i, r, b: ["merge", "slerp", r[0], b["truncated"], "--init", i],
        ["truncated", "model.safetensors"],
    ),
    "corrupt": (
        lambda i, r, b: ["merge", "slerp", r[0], b["corrupt"], "--init", i],
        ["corrupt", "corrupt/model.safetensors"],
    ),
    "names differ": (
        lambda i, r, b: ["merge", "slerp", r[0], b["renamed"], "--init", i],
        ["model.norm.weight", "model.extra.weight"],
    ),
    "shape mismatch": (
        lambda i, r, b: ["merge", "slerp", r[0], b["reshaped"], "--init", i],
        ["model.norm.weight", "[33]", "[32]"],
    ),
    "one model": (lambda i, r, b: ["merge", "slerp", r[0], "--init", i], ["at least two"]),
    "weights count": (
        lambda i, r, b: ["merge", "lerp", r[0], r[1], "--weights", "0.2,0.3,0.5"],
        ["--weights", "3 values"],
    ),
    "negative weight": (lambda i, r, b: ["merge", "lerp", r[0], r[1], "--weights", "-0.5,1.5"], ["--weights"]),
    "negative lambda": (lambda i, r, b: ["merge", "slerp", r[0], r[1], "--init", i, "--lambda", "-0.1"], ["--lambda"]),
    "nan lambda": (lambda i, r, b: ["merge", "slerp", r[0], r[1], "--init", i, "--lambda", "nan"], ["--lambda", "nan"]),
    "bad lambda list": (lambda i, r, b: ["merge", "slerp", r[0], r[1], "--init", i, "--lambda", "0.2,x"], ["--lambda"]),
    "negative mu": (lambda i, r, b: ["merge", "ema", r[0], r[1], "--mu", "-0.01"], ["--mu"]),
    "nan eta": (lambda i, r, b: ["liti", r[0], "--init", i, "--eta", "nan"], ["--eta"]),
    "negative eta": (lambda i, r, b: ["liti", r[0], "--init", i, "--eta", "-1"], ["--eta"]),
    "nan in tensor": (
        lambda i, r, b: ["merge", "slerp", r[0], b["nan"], "--init", i],
        ["model.layers.1.mlp.down_proj.weight", "nan/model.safetensors", "NaN"],
    ),
    "inf in tensor": (lambda i, r, b: ["liti", b["inf"], "--init", i], ["lm_head.weight", "inf/model.safetensors"]),
    "pickle folder": (
        lambda i, r, b: ["merge", "slerp", r[0], b["pickled"], "--init", i],
        ["pytorch_model.bin", "safetensors"],
    ),
    "pickle file": (lambda i, r, b: ["merge", "lerp", r[0], b["pickle_file"]], ["pytorch_model.bin", "pickle"]),
    "hub id not cached": (
        lambda i, r, b: ["merge", "slerp", r[0], "warp-test/absent", "--init", i],
        ["warp-test/absent", "cache"],
    ),
    "bad granularity": (
        lambda i, r, b: ["merge", "slerp", r[0], r[1], "--init", i, "--granularity", "row"],
        ["--granularity"],
    ),
    "bad dtype": (lambda i, r, b: ["merge", "slerp", r[0], r[1], "--init", i, "--dtype", "int8"], ["--dtype"]),
    "no cuda": (lambda i, r, b: ["merge", "slerp", r[0], r[1], "--init", i, "--device", "cuda"], ["--device cuda"]),
    "bad shard size": (
        lambda i, r, b: ["merge", "slerp", r[0], r[1], "--init", i, "--max-shard-size", "lots"],
        ["--max-shard-size"],
    ),
    "bad memory budget": (
        lambda i, r, b: ["merge", "ties", r[0], r[1], "--base", i, "--weight", "1", "--memory-budget", "-1GB"],
        ["--memory-budget", "negative"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_and_writes_nothing(case, tiny_init, tiny_runs, broken, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    if case == "no cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    build, needles = CASES[case]
    out = tmp_path / "out"
    assert_refused(warp(*build(tiny_init, tiny_runs, broken), "-o", out), out, *needles)


def test_output_is_an_input(tiny_init, tiny_runs, tmp_path):
    before = load_state(tiny_runs[1])
    r = warp("merge", "slerp", tiny_runs[0], tiny_runs[1], "--init", tiny_init, "-o", tiny_runs[1], "--force")
    assert r.exit_code == 2 and "is the input" in r.stderr
    assert all(torch.equal(before[k], v) for k, v in load_state(tiny_runs[1]).items())


def test_output_exists(tiny_init, tiny_runs, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = warp("merge", "slerp", tiny_runs[0], tiny_runs[1], "--init", tiny_init, "-o", out)
    assert r.exit_code == 2 and "already exists" in r.stderr and "\n" not in r.stderr.strip()
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_inspect_zero_task_vector_gives_strict_json(tiny_init, tiny_runs):
    """A model equal to the init has no angle: null in the JSON, not NaN (which is not JSON)."""
    r = warp("inspect", tiny_init, tiny_runs[0], "--init", tiny_init, "--json")
    assert r.exit_code == 0, r.output

    def refuse(token):
        raise AssertionError(f"non-JSON constant {token}")

    rows = json.loads(r.stdout, parse_constant=refuse)
    assert all(row["task_norms"][0] == 0.0 and row["task_cos"][0][1] is None for row in rows)
    assert all(row["omega_deg"][1][1] is not None for row in rows)


def test_help_version_and_bare_command():
    """`-h` is `--help` everywhere, `--version` prints it, and `warp` alone shows the help without an empty
    error line."""
    import subprocess
    import sys

    from mergekit_warp import __version__

    def run(*args):
        return subprocess.run([sys.executable, "-m", "mergekit_warp", *args], capture_output=True, text=True)

    v = run("--version")
    assert v.returncode == 0 and v.stdout.strip() == f"warp {__version__}"
    h = run("merge", "slerp", "-h")
    assert h.returncode == 0 and "--granularity" in h.stdout
    bare = run()
    assert "Commands" in bare.stdout + bare.stderr and "error" not in bare.stderr


def test_printed_output_path_is_normalised(tiny_init, tiny_runs, tmp_path):
    (tmp_path / "sub").mkdir()
    r = warp("merge", "slerp", tiny_runs[0], tiny_runs[1], "--init", tiny_init, "-o", tmp_path / "sub/../m", "-q")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == str(tmp_path.absolute() / "m")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "sub" / "link").symlink_to(tmp_path / "elsewhere")  # link/.. is elsewhere's parent: tmp_path
    r = warp("liti", tmp_path / "m", "--init", tiny_init, "-o", tmp_path / "sub/link/../l", "-q")
    assert r.exit_code == 0 and (tmp_path / "l").is_dir()
    assert r.stdout.strip() == str(tmp_path.absolute() / "sub/link/../l")  # not folded: that is sub/l
