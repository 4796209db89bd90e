"""`warp rl`: options are generated 1:1 from `RLConfig` (name, type, default, docstring as help), so the
command cannot drift from the library; the body builds the config, calls `train`, prints the path."""

from __future__ import annotations

import dataclasses
import inspect
import typing

import typer

from mergekit_warp.cli.common import user_errors
from mergekit_warp.rl import launch
from mergekit_warp.rl.config import RLConfig, field_docs

_SHORT = {"out": ["-o", "--out"]}
_REQUIRED = ("model", "prompts", "reward", "out")


def _parameters() -> list[inspect.Parameter]:
    hints, docs = typing.get_type_hints(RLConfig), field_docs(RLConfig)
    params = []
    for f in dataclasses.fields(RLConfig):
        flag = "--" + f.name.replace("_", "-")
        decls = _SHORT.get(f.name, [flag])
        if hints[f.name] is bool:
            decls = [f"{flag}/--no-{f.name.replace('_', '-')}"]
        default = ... if f.name in _REQUIRED else f.default
        option = typer.Option(default, *decls, help=docs.get(f.name, ""), show_default=f.name not in _REQUIRED)
        kind = inspect.Parameter.KEYWORD_ONLY
        params.append(inspect.Parameter(f.name, kind, default=option, annotation=hints[f.name]))
    return params


def register(app: typer.Typer) -> None:
    """Add `warp rl` to the top-level app."""

    def rl_cmd(**options) -> None:
        from mergekit_warp.rl.train import train  # imported here: `warp --help` should not load torch

        with launch.worker_process(), user_errors():
            spec = launch.take_spec(options)
            cfg = RLConfig(**options)
            if launch.wanted(spec):  # --nproc N / --nnodes M: rerun this command under torchrun
                launch.check(spec, cfg.batch_size, cfg.device)
                raise typer.Exit(launch.relaunch(spec))
            out = train(cfg)
            if launch.is_rank_zero():
                print(out)

    params = _parameters() + launch.cli_parameters()
    rl_cmd.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    rl_cmd.__annotations__ = {p.name: p.annotation for p in params}
    rl_cmd.__doc__ = (
        "REINFORCE on a KL-regularised reward with an EMA anchor (WARP's RL stage). "
        "Writes OUT/ (policy, anchor/, metrics.jsonl, checkpoints/) atomically; resumable state lives in OUT.partial/."
    )
    app.command("rl")(rl_cmd)

