"""`warp rl`: options are generated 1:1 from `RLConfig`'s fields (name, type, default, description), so the
command cannot drift from the library; the body builds the config, calls `train`, prints the path."""

from __future__ import annotations

import typer

from mergekit_warp.cli.common import options_from, user_errors, with_parameters
from mergekit_warp.rl import launch
from mergekit_warp.rl.config import RLConfig, make_config


def register(app: typer.Typer) -> None:
    """Add `warp rl` to the top-level app."""

    def rl_cmd(**options) -> None:
        from mergekit_warp.rl.train import train  # imported here: `warp --help` should not load torch

        with launch.worker_process(), user_errors():
            spec = launch.take_spec(options)
            cfg = make_config(options)
            if cfg.rollout == "vllm":  # before loading anything, or launching processes that would each fail
                from mergekit_warp.lm.vllm_engine import require

                require()
            if launch.wanted(spec):  # --nproc N / --nnodes M: rerun this command under torchrun
                launch.check(spec, cfg.batch_size, cfg.device)
                raise typer.Exit(launch.relaunch(spec))
            out = train(cfg)
            if launch.is_rank_zero():
                print(out)

    with_parameters(
        rl_cmd, options_from(RLConfig, short={"out": ["-o", "--out"], "progress": [" /-q"]}) + launch.cli_parameters()
    )
    rl_cmd.__doc__ = (
        "REINFORCE on a KL-regularised reward with an EMA anchor (WARP's RL stage). "
        "Writes OUT/ (policy, anchor/, metrics.jsonl, checkpoints/) atomically; resumable state lives in OUT.partial/."
    )
    app.command("rl")(rl_cmd)
