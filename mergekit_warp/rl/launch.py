"""`warp rl --nproc N [--nnodes M --rdzv-endpoint HOST:PORT]`: re-run this same command under PyTorch's
launcher (torch.distributed.run, i.e. `torchrun`), one process per device.

    warp rl ... --nproc 8
        == python -m torch.distributed.run --standalone --nproc-per-node 8 -m mergekit_warp rl ...

The launch options are removed from the workers' command line; everything else is passed unchanged.
torchrun is run in this process (it is a Python function), so a failed job maps to one exit status:
2 when the workers stopped on a user error (they printed it), 1 otherwise (a crash, a killed rank —
torchrun then stops the surviving ranks; rank 0's last checkpoint is intact because checkpoints are
published atomically). Already inside torchrun (RANK/WORLD_SIZE set), nothing is relaunched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import shlex
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mergekit_warp.errors import WarpError

# Option name → takes a value. Stripped from the argv the workers get.
LAUNCH_OPTIONS = ("--nproc", "--nnodes", "--node-rank", "--rdzv-endpoint", "--rdzv-id")


@dataclass(frozen=True)
class LaunchSpec:
    """How many processes, on how many machines."""

    nproc: int = 1
    """Processes (devices) per node."""
    nnodes: str = "1"
    """Number of nodes, or MIN:MAX for an elastic job (torchrun's --nnodes)."""
    node_rank: int | None = None
    """This node's rank (optional with the c10d rendezvous; torchrun assigns one)."""
    rdzv_endpoint: str | None = None
    """HOST:PORT of the rendezvous (any one node; the same on every node). Needed when nnodes > 1."""
    rdzv_id: str = "warp-rl"
    """Job id shared by the nodes of one run (e.g. $SLURM_JOB_ID)."""

    def max_nodes(self) -> int:
        try:
            return int(self.nnodes.split(":")[-1])
        except ValueError:
            raise WarpError(f"--nnodes {self.nnodes}: give a number or MIN:MAX") from None


def under_torchrun() -> bool:
    """True inside a worker started by torchrun (or any launcher that set the torch.distributed env)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def wanted(spec: LaunchSpec) -> bool:
    """Should this invocation start torchrun (instead of training in this process)?"""
    return not under_torchrun() and (spec.nproc != 1 or spec.max_nodes() != 1)


def check(spec: LaunchSpec, batch_size: int | None = None, device: str = "cpu") -> None:
    """Refuse a launch that cannot work, before any process starts (user errors → exit 2)."""
    if spec.nproc < 1:
        raise WarpError(f"--nproc {spec.nproc}: give the number of processes per node (≥ 1)")
    nodes = spec.max_nodes()
    if nodes > 1 and not spec.rdzv_endpoint:
        raise WarpError(f"--nnodes {spec.nnodes} needs --rdzv-endpoint HOST:PORT (the same on every node)")
    if batch_size is not None and ":" not in spec.nnodes and batch_size % (spec.nproc * nodes):
        raise WarpError(
            f"--batch-size {batch_size} is not divisible by the {spec.nproc * nodes} processes "
            f"(--nproc {spec.nproc} × --nnodes {spec.nnodes})"
        )
    kind = device.split(":")[0]
    if kind not in ("cpu", "cuda"):
        raise WarpError(f"--device {device}: distributed runs support cpu (gloo) and cuda (nccl) only")
    if device.startswith("cuda:"):
        raise WarpError(
            f"--device {device} with --nproc: pass --device cuda (rank r uses cuda:r; pick GPUs "
            "with CUDA_VISIBLE_DEVICES)"
        )
    if kind == "cuda":
        import torch

        if torch.cuda.device_count() < spec.nproc:
            raise WarpError(f"--nproc {spec.nproc} but this node sees {torch.cuda.device_count()} GPU(s)")


def torchrun_options(spec: LaunchSpec) -> list[str]:
    """torchrun's own options for `spec` (before the `-m mergekit_warp rl ...` part)."""
    opts = ["--nproc-per-node", str(spec.nproc), "--max-restarts", "0"]
    if spec.max_nodes() == 1:
        # A private rendezvous on a free port: several jobs can share a machine (pipeline device groups).
        return ["--standalone", *opts]
    opts = [
        "--nnodes",
        spec.nnodes,
        *opts,
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        str(spec.rdzv_endpoint),
        "--rdzv-id",
        spec.rdzv_id,
    ]
    if spec.node_rank is not None:
        opts += ["--node-rank", str(spec.node_rank)]
    return opts


def torchrun_argv(spec: LaunchSpec, rl_args: list[str]) -> list[str]:
    """The full command that runs `warp rl RL_ARGS` under torchrun (for subprocesses and logs)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *torchrun_options(spec),
        "-m",
        "mergekit_warp",
        "rl",
        *strip_launch_options(rl_args),
    ]


def strip_launch_options(argv: list[str]) -> list[str]:
    """`argv` without the launch options (`--nproc 8` and `--nproc=8` forms)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in LAUNCH_OPTIONS:
            skip = True
        elif a.split("=", 1)[0] in LAUNCH_OPTIONS and "=" in a:
            continue
        else:
            out.append(a)
    return out


def rl_argv_from_sys() -> list[str]:
    """The arguments after `rl` on this process's command line (`warp rl ...` or `python -m mergekit_warp rl ...`)."""
    if len(sys.argv) < 2 or sys.argv[1] != "rl":
        raise WarpError("--nproc needs to be given on the command line: warp rl ... --nproc N")
    return sys.argv[2:]


def relaunch(spec: LaunchSpec, rl_args: list[str] | None = None) -> int:
    """Run `warp rl` under torchrun in this process; return the exit status for the whole job."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    rl_args = rl_argv_from_sys() if rl_args is None else rl_args
    # torchrun would set 1 thread per worker (and warn); CPU workers may share the node's cores instead.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // spec.nproc)))
    argv = torchrun_argv(spec, rl_args)
    print("launching: " + shlex.join(["torchrun", *argv[3:]]), file=sys.stderr, flush=True)
    try:
        run(parse_args(argv[3:]))
    except SignalException as e:  # Ctrl-C / SIGTERM to this launcher: torchrun has stopped the workers
        print(
            f"interrupted ({e.sigval.name}): workers stopped; nothing was published at the output path; "
            "rerun with --resume to continue from the last saved state",
            file=sys.stderr,
        )
        return 130
    except ChildFailedError as e:
        codes = {f.local_rank: f.exitcode for f in e.failures.values()}
        # A user error stops every rank with 2; torchrun may have SIGTERMed (-15) the slower ones first.
        if 2 in codes.values() and all(c in (2, -15) for c in codes.values()):
            return 2  # the workers already printed the one-line error
        desc = ", ".join(
            f"local rank {r}: " + (f"killed by signal {-c}" if c < 0 else f"exit {c}") for r, c in sorted(codes.items())
        )
        print(
            f"error: distributed run failed ({desc}); the other ranks were stopped; nothing was published "
            "at the output path; the last checkpoint (if any) is intact — rerun with --resume",
            file=sys.stderr,
        )
        return 1
    return 0


# --- the `warp rl` command's launch options -----------------------------------------------------------

_HELP = {
    "nproc": "Processes on this node (one per GPU, or CPU processes with gloo); > 1 relaunches under torchrun.",
    "nnodes": "Nodes in the job (or MIN:MAX); run the same command on every node.",
    "node_rank": "This node's rank, 0..nnodes-1 (optional: the c10d rendezvous assigns one).",
    "rdzv_endpoint": "HOST:PORT every node can reach (e.g. the first node) for torchrun's rendezvous.",
    "rdzv_id": "Job id shared by the nodes (e.g. $SLURM_JOB_ID).",
}


def cli_parameters() -> list[inspect.Parameter]:
    """Typer options --nproc, --nnodes, --node-rank, --rdzv-endpoint, --rdzv-id for `warp rl`."""
    import typer

    hints = {"nproc": int, "nnodes": str, "node_rank": Optional[int], "rdzv_endpoint": Optional[str], "rdzv_id": str}
    return [
        inspect.Parameter(
            f.name,
            inspect.Parameter.KEYWORD_ONLY,
            annotation=hints[f.name],
            default=typer.Option(
                f.default,
                "--" + f.name.replace("_", "-"),
                help=_HELP[f.name],
                rich_help_panel="Multi-GPU / multi-node (torchrun)",
            ),
        )
        for f in dataclasses.fields(LaunchSpec)
    ]


def take_spec(options: dict) -> LaunchSpec:
    """Remove the launch options from the command's `options` and return them as a LaunchSpec."""
    return LaunchSpec(**{f.name: options.pop(f.name) for f in dataclasses.fields(LaunchSpec)})


def is_rank_zero() -> bool:
    """True outside torchrun and on global rank 0 (the one that prints the result path)."""
    return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def worker_process() -> Iterator[None]:
    """Wrap a command body that may run as a torchrun worker. Outside torchrun: nothing. Inside: on the
    way out, leave the process group and end the process at once with the command's exit status
    (os._exit after flushing). Letting the interpreter unwind instead races the C++ destructors of
    gloo/NCCL threads and can abort ("terminate called without an active exception", SIGABRT),
    which torchrun would report as a crash of a run that had finished, or hide a user error's 2."""
    if not under_torchrun():
        yield
        return
    import traceback

    code = 1
    try:
        yield
        code = 0
    except SystemExit as e:  # sys.exit(n)
        code = e.code if isinstance(e.code, int) else 1
    except Exception as e:
        exit_code = getattr(e, "exit_code", None)  # typer.Exit / click's Exit
        if isinstance(exit_code, int):
            code = exit_code
        else:
            traceback.print_exc()
    finally:
        from mergekit_warp.rl.dist import teardown

        with contextlib.suppress(Exception):
            teardown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


# Set by `train_on_group` for the `warp rl` it starts: that process calls `die_with_parent` first thing.
DIE_WITH_PARENT = "WARP_DIE_WITH_PARENT"


def die_with_parent() -> None:
    """End this process when its parent dies, SIGKILL included (a worker must not outlive the pipeline
    that started it and publish into a run nobody records): Linux's parent-death signal, else a thread
    that watches the parent id."""
    import signal

    parent = os.getppid()
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, signal.SIGTERM) == 0:  # PR_SET_PDEATHSIG
            if os.getppid() != parent:  # the parent died before the signal was armed
                os.kill(os.getpid(), signal.SIGTERM)
            return
    except (OSError, AttributeError):
        pass
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="warp-parent-watch", daemon=True).start()


# --- RL runs on a device group (the pipeline's `devices: [[cuda:0, cuda:1], ...]`) --------------------


def group_device(devices: list[str] | tuple[str, ...]) -> tuple[str, dict[str, str]]:
    """The --device of a run on `devices` (one process each) and the environment that pins them.

    [cpu, cpu] → "cpu" (2 gloo processes); [cuda:2, cuda:3] → "cuda" with CUDA_VISIBLE_DEVICES=2,3
    (rank r then uses the r-th listed GPU)."""
    devices = [str(d) for d in devices]
    if not devices:
        raise WarpError("devices: a device group is empty; list at least one device")
    if all(d == "cpu" for d in devices):
        return "cpu", {}
    idx = [d.partition(":")[2] for d in devices]
    if not all(d.startswith("cuda:") and i.isdigit() for d, i in zip(devices, idx)):
        raise WarpError(
            f"devices: group {devices} mixes kinds or names a device without an index; "
            "use [cpu, cpu, ...] or [cuda:0, cuda:1, ...]"
        )
    if len(set(idx)) != len(idx):
        raise WarpError(f"devices: group {devices} lists a GPU twice")
    return "cuda", {"CUDA_VISIBLE_DEVICES": ",".join(idx)}


def rl_cli_args(cfg) -> list[str]:
    """The `warp rl` command-line arguments that rebuild RLConfig `cfg` (inverse of cli/rl.py)."""
    from mergekit_warp.rl.config import flag

    args = []
    for name in type(cfg).model_fields:
        v = getattr(cfg, name)
        if v is None:
            continue
        if isinstance(v, bool):
            args.append(flag(name) if v else "--no-" + name.replace("_", "-"))
        elif isinstance(v, (list, tuple)):  # a repeatable option: the flag once per value
            args += [a for item in v for a in (flag(name), str(item))]
        else:
            args += [flag(name), str(v)]
    return args


def train_on_group(cfg, devices: list[str] | tuple[str, ...], log: Path | None = None) -> Path:
    """Run `warp rl` for RLConfig `cfg` on a device group: one process per device under torchrun (a
    private rendezvous, so several groups can run at once on one machine); 1 device → no torchrun.
    Worker output goes to `log` (appended) or to this process's stderr. Returns cfg.out; a failed run
    raises WarpError (the workers' own message when they stopped on a user error)."""
    import subprocess

    device, env = group_device(devices)
    run_cfg = cfg.model_copy(update={"device": device if len(devices) > 1 else str(devices[0])})
    if log:
        run_cfg = run_cfg.model_copy(update={"progress": False})  # no live view in a log file
    if len(devices) == 1:
        from mergekit_warp.rl.train import train

        return train(run_cfg)
    spec = LaunchSpec(nproc=len(devices))
    check(spec, run_cfg.batch_size, device)
    env = {**os.environ, **env}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC_RUN_ID"):  # a fresh job, not ours
        env.pop(k, None)
    # `warp rl --nproc N`: torchrun with a private rendezvous, and one exit status for the job.
    argv = [sys.executable, "-m", "mergekit_warp", "rl", *rl_cli_args(run_cfg), "--nproc", str(spec.nproc)]
    with open(log, "a") if log else contextlib.nullcontext() as sink:
        res = subprocess.run(
            argv,
            env={**env, DIE_WITH_PARENT: "1"},
            stdout=sink or subprocess.DEVNULL,
            stderr=subprocess.STDOUT if sink else None,
        )
    if res.returncode != 0:
        why = "stopped on a user error" if res.returncode == 2 else f"failed (exit {res.returncode})"
        where = f"; its output is in {log}" if log else " (its output is above)"
        raise WarpError(f"RL run {cfg.out} on devices {list(devices)} {why}{where}")
    return Path(cfg.out)
