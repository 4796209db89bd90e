"""Experiment trackers (`--report-to`) read back from their offline stores, and `warp push` against a
local stand-in of the hub client (a fake `HfApi` that applies each commit to a folder: no network)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mergekit_warp import trackers
from mergekit_warp.cli import app
from mergekit_warp.errors import WarpError
from mergekit_warp.io import hub
from mergekit_warp.merge import api
from mergekit_warp.rl.config import RLConfig
from mergekit_warp.rl.train import train

runner = CliRunner()
REWARD = "def good(prompts, completions):\n    return [c.count('a') / 8 for c in completions]\n"


@pytest.fixture(autouse=True)
def offline_stores(tmp_path, monkeypatch):
    """Every tracker writes under tmp_path, offline."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3: the local file store, no database
    monkeypatch.setenv("TENSORBOARD_LOGDIR", str(tmp_path / "tb"))
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rl_run(tiny_init, tmp_path, report_to) -> tuple[Path, list[dict]]:
    (tmp_path / "r.py").write_text(REWARD)
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": w}) + "\n" for w in ["hi", "a cat", "the day"]))
    out = train(
        RLConfig(
            model=str(tiny_init),
            prompts=tmp_path / "p.jsonl",
            reward=f"{tmp_path / 'r.py'}:good",
            out=tmp_path / "run",
            steps=3,
            batch_size=2,
            samples_per_prompt=2,
            max_new_tokens=4,
            warmup=0,
            progress=False,
            report_to=report_to,
            run_name="toy",
            run_group="grp",
        )
    )
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return out, lines


def expected(lines: list[dict]) -> dict[str, dict[int, float]]:
    """metric name → {step: value}, as the trackers should hold them."""
    want: dict[str, dict[int, float]] = {}
    for ln in lines:
        for k, v in trackers.scalars(ln).items():
            want.setdefault(k, {})[ln["step"]] = v
    return want


def test_tensorboard_holds_every_metric_at_its_step(tiny_init, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, lines = rl_run(tiny_init, tmp_path, ["tensorboard"])
    acc = EventAccumulator(str(tmp_path / "tb" / "grp" / "toy"))
    acc.Reload()
    want = expected(lines)
    assert set(acc.Tags()["scalars"]) == set(want)
    for k, by_step in want.items():
        got = {e.step: e.value for e in acc.Scalars(k)}
        assert got == pytest.approx(by_step, rel=1e-6), k


def test_mlflow_holds_every_metric_and_the_config(tiny_init, tmp_path):
    from mlflow.tracking import MlflowClient

    _, lines = rl_run(tiny_init, tmp_path, ["mlflow"])
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("warp").experiment_id])
    assert run.info.run_name == "toy" and run.data.tags["group"] == "grp"
    assert run.data.params["steps"] == "3" and run.data.params["samples_per_prompt"] == "2"
    for k, by_step in expected(lines).items():
        got = {m.step: m.value for m in client.get_metric_history(run.info.run_id, k)}
        assert got == pytest.approx(by_step, rel=1e-6), k


def test_wandb_offline_run_gets_every_metric_and_the_config(tiny_init, tmp_path, monkeypatch):
    """wandb 0.31 keeps an offline run in a binary log its Python package no longer reads: check what the
    real wandb run object was handed (spied), and that the offline run was written."""
    import wandb

    logged, real_init = [], wandb.init

    def init(*a, **k):
        run = real_init(*a, **k)
        real_log = run.log
        run.log = lambda values, step=None: logged.append((step, dict(values))) or real_log(values, step=step)
        logged.append(("config", dict(run.config)))
        return run

    monkeypatch.setattr(wandb, "init", init)
    _, lines = rl_run(tiny_init, tmp_path, ["wandb"])
    assert logged[0][1]["steps"] == 3 and logged[0][1]["reward"].endswith("r.py:good")
    assert [(step, v) for step, v in logged[1:]] == [(ln["step"], trackers.scalars(ln)) for ln in lines]
    (folder,) = (tmp_path / "wandb").glob("offline-run-*")
    assert next(folder.glob("run-*.wandb")).stat().st_size > 1000


def test_trackio_holds_every_metric(tiny_init, tmp_path):
    from trackio.sqlite_storage import SQLiteStorage

    _, lines = rl_run(tiny_init, tmp_path, ["trackio"])
    logs = SQLiteStorage.get_logs(project="warp", run="toy")
    want = expected(lines)
    for k, by_step in want.items():
        got = {row["step"]: row[k] for row in logs if k in row}
        assert got == pytest.approx(by_step, rel=1e-6), k


def test_several_trackers_and_comma_lists():
    assert trackers.names(["tensorboard,wandb", "none", "wandb"]) == ["tensorboard", "wandb"]
    with pytest.raises(WarpError, match="unknown tracker 'neptune'"):
        trackers.names(["neptune"])


def test_missing_library_is_one_line_before_any_work(tiny_init, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a))
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "hi"}) + "\n")
    r = runner.invoke(
        app,
        ["rl", "--model", str(tiny_init), "--prompts", str(tmp_path / "p.jsonl"), "--reward", "sentiment"]
        + ["-o", str(tmp_path / "out"), "--report-to", "wandb"],
    )
    assert r.exit_code == 2
    assert "pip install 'mergekit-warp[wandb]'" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


# ---- warp push, against a stand-in of the hub client --------------------------------------------------


class FakeHub:
    """`HfApi`'s calls that `push` makes, applied to folders under `root` (repo/branch)."""

    def __init__(self, root: Path):
        self.root, self.repos, self.commits = root, {}, []

    def create_repo(self, repo_id, private=False, exist_ok=False):
        if repo_id in self.repos and not exist_ok:
            raise ValueError("exists")
        self.repos.setdefault(repo_id, {"private": private})
        return f"https://hub.invalid/{repo_id}"

    def create_branch(self, repo_id, branch, exist_ok=False):
        self.repos[repo_id].setdefault("branches", set()).add(branch)

    def create_commit(self, repo_id, operations, commit_message, revision=None):
        dst = self.root / repo_id / (revision or "main")
        for op in operations:
            target = dst / op.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            src = op.path_or_fileobj
            if isinstance(src, bytes):
                target.write_bytes(src)
            else:
                shutil.copyfile(src, target)
        self.commits.append((repo_id, revision, commit_message))

        class Info:
            commit_url = f"https://hub.invalid/{repo_id}/commit/{len(self.commits)}"

        return Info()


def serve(monkeypatch, fake: FakeHub) -> FakeHub:
    """`huggingface_hub.HfApi()` returns `fake` (still a class, as `HfApi | None` annotations in
    transformers need)."""
    import huggingface_hub

    class Api:
        def __new__(cls, *a, **k):
            return fake

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    return fake


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    return serve(monkeypatch, FakeHub(tmp_path / "hub"))


def test_push_uploads_the_folder_with_a_card_and_leaves_it_unchanged(tiny_init, tiny_runs, tmp_path, fake_hub):
    out = api.merge(
        "ties", tiny_runs[:2], tmp_path / "m", base=tiny_init, params={"weight": 1.0, "density": 0.5}, progress=False
    )
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    r = runner.invoke(app, ["push", str(out), "me/merged", "--private", "--revision", "v1"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == "https://hub.invalid/me/merged/commit/1"
    pushed = tmp_path / "hub" / "me" / "merged" / "v1"
    assert {p.name for p in pushed.iterdir()} == set(before)
    for name, data in before.items():
        if name != "README.md":
            assert (pushed / name).read_bytes() == data
    card = (pushed / "README.md").read_text()
    assert "ties" in card and "density" in card and "Reproduce with mergekit" in card and "merge_method: ties" in card
    assert fake_hub.repos["me/merged"] == {"private": True, "branches": {"v1"}}
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # the input is untouched


def test_push_to_hub_option_on_a_merge(tiny_init, tiny_runs, tmp_path, fake_hub):
    r = runner.invoke(
        app,
        ["merge", "slerp", str(tiny_runs[0]), str(tiny_runs[1]), "--init", str(tiny_init)]
        + ["-o", str(tmp_path / "s"), "-q", "--push-to-hub", "me/s"],
    )
    assert r.exit_code == 0, r.output
    assert r.stdout.split() == [str(tmp_path / "s"), "https://hub.invalid/me/s/commit/1"]
    assert (tmp_path / "hub" / "me" / "s" / "main" / "model.safetensors").is_file()


@pytest.mark.parametrize("case", ["missing", "not warp", "partial", "no weights"])
def test_push_refuses_what_is_not_a_finished_output(tiny_init, tmp_path, fake_hub, case):
    folder = tmp_path / ("x.partial" if case == "partial" else "x")
    if case != "missing":
        shutil.copytree(tiny_init, folder)
    if case == "no weights":
        (folder / "warp_provenance.json").write_text(json.dumps({"tool": "mergekit-warp", "method": "m"}))
        for f in folder.glob("*.safetensors"):
            f.unlink()
    r = runner.invoke(app, ["push", str(folder), "me/x"])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and str(folder) in r.stderr
    assert not fake_hub.commits


def test_push_failure_is_one_line(tiny_init, tiny_runs, tmp_path, monkeypatch):
    class NoLogin(FakeHub):
        def create_repo(self, *a, **k):
            raise OSError("Token is required (`token=True`), but no token found.")

    serve(monkeypatch, NoLogin(tmp_path))
    out = api.lerp(tiny_runs[:2], tmp_path / "l", progress=False)
    with pytest.raises(WarpError, match=r"no token found.*login"):
        hub.push(out, "me/l")


def test_pipeline_reports_each_run_and_the_pareto_summary_then_pushes(tmp_path, fake_hub):
    """report_to: one tracker run per RL run, grouped by the run folder, one for the Pareto summary with its
    files; push_to_hub: final/ uploaded with the summary in its card; keep: [anchor] keeps the runs'
    anchors. None of these keys changes the config's hash (a resume may add or drop them)."""
    from pipeline_fixtures import RL, write_config
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tiny import make_tiny_llama

    from mergekit_warp.pipeline.config import load_config
    from mergekit_warp.pipeline.run import run_pipeline

    init = make_tiny_llama(tmp_path / "sft", seed=3)
    extra = {"report_to": ["tensorboard"], "push_to_hub": "me/warp", "keep": ["anchor"]}
    cfg = write_config(tmp_path, init, iterations=1, rl={**RL, "steps": 2}, **extra)
    plain = write_config(tmp_path, init, name="plain.yaml", iterations=1, rl={**RL, "steps": 2})
    assert load_config(cfg).digest() == load_config(plain).digest()
    run_pipeline(cfg, tmp_path / "pipe", progress=False)
    for m in (1, 2):
        acc = EventAccumulator(str(tmp_path / "tb" / "pipe" / "iter_1" / f"run_{m}"))
        acc.Reload()
        steps = [json.loads(ln)["step"] for ln in (tmp_path / "pipe/iter_1" / f"run_{m}" / "metrics.jsonl").open()]
        assert [e.step for e in acc.Scalars("reward")] == steps == [1, 2]
    acc = EventAccumulator(str(tmp_path / "tb" / "pipe" / "pareto"))
    acc.Reload()
    assert acc.Tags()["scalars"] and "pareto" in acc.Tags()["images"]
    assert all((tmp_path / "pipe/iter_1" / f"run_{m}" / "anchor" / "model.safetensors").is_file() for m in (1, 2))
    card = (tmp_path / "hub" / "me" / "warp" / "main" / "README.md").read_text()
    assert "Pareto summary" in card and (tmp_path / "pipe" / "eval" / "summary.txt").read_text().strip() in card


def test_tensorboard_default_folder_is_not_under_runs(tiny_init, tmp_path, monkeypatch):
    """Left to its default, tensorboard writes under ./tensorboard/, never inside warp's own runs/ outputs."""
    monkeypatch.delenv("TENSORBOARD_LOGDIR")
    out, _ = rl_run(tiny_init, tmp_path, ["tensorboard"])
    assert list((tmp_path / "tensorboard" / "grp" / "toy").glob("events.out.tfevents.*"))
    assert not list(out.rglob("events.out.tfevents.*"))


def test_a_tracker_that_cannot_start_stops_before_any_work(tiny_init, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")  # mlflow 3 refuses the file store without it
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "hi"}) + "\n")
    r = runner.invoke(
        app,
        ["rl", "--model", str(tiny_init), "--prompts", str(tmp_path / "p.jsonl"), "--reward", "sentiment"]
        + ["-o", str(tmp_path / "out"), "--report-to", "tensorboard,mlflow", "-q"],
    )
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "--report-to mlflow: could not start" in r.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_unknown_tracker_is_named():
    r = runner.invoke(app, ["rl", "--model", "m", "--prompts", "p", "--reward", "r", "-o", "o", "--report-to", "foo"])
    assert r.exit_code == 2 and "'foo'" in r.stderr and "['foo']" not in r.stderr


def test_push_without_network_is_one_line(tiny_init, tiny_runs, tmp_path, monkeypatch):
    class ConnectError(Exception):  # what httpx raises without a network: not an OSError
        pass

    class Offline(FakeHub):
        def create_repo(self, *a, **k):
            raise ConnectError("[Errno -2] Name or service not known")

    serve(monkeypatch, Offline(tmp_path))
    out = api.lerp(tiny_runs[:2], tmp_path / "l", progress=False)
    r = runner.invoke(app, ["push", str(out), "me/l"])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and "Name or service" in r.stderr


def test_bad_repo_id_is_refused_before_the_merge(tiny_init, tiny_runs, tmp_path, fake_hub):
    r = runner.invoke(
        app,
        ["merge", "lerp", str(tiny_runs[0]), str(tiny_runs[1]), "-o", str(tmp_path / "m"), "--push-to-hub", "bad//id"],
    )
    assert r.exit_code == 2 and "bad//id" in r.stderr and not (tmp_path / "m").exists()
