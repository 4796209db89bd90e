"""`warp merge slerp|lerp|ema`, `warp liti`, `warp inspect`: parse, call one `merge.api` function,
print the result path (stdout) — progress goes to stderr."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from mergekit_warp.cli.common import user_errors
from mergekit_warp.errors import WarpError
from mergekit_warp.merge.methods.base import REQUIRED

merge_app = typer.Typer(
    rich_markup_mode=None, help="Merge checkpoints (streaming; output is an HF folder).", no_args_is_help=True
)

OUT = typer.Option(..., "-o", "--out", help="Output folder (must not exist unless --force).")
DTYPE = typer.Option(None, "--dtype", help="Output dtype: bf16, fp16 or fp32 (default: as the init stores it).")
DTYPE_FIRST = typer.Option(
    None, "--dtype", help="Output dtype: bf16, fp16 or fp32 (default: as the first checkpoint stores it)."
)
SHARD = typer.Option("5GB", "--max-shard-size", help="Largest output shard, e.g. 5GB, 500MB.")
MEMORY = typer.Option(
    "2GB",
    "--memory-budget",
    help="Input bytes held in memory at once: each unit (a transformer block for WARP's SLERP, else a tensor) "
    "that fits half of it is read from disk once, the next one while this one is merged; larger ones are "
    "streamed in chunks (0: stream everything).",
)
DEVICE = typer.Option("cpu", "--device", help="Where the math runs: cpu or cuda.")
FORCE = typer.Option(False, "--force", help="Replace an existing output folder.")
REVISION = typer.Option(None, "--revision", help="Hub revision for inputs given as hub ids.")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bar.")
RANK = typer.Option(
    None,
    "--rank",
    help="LoRA adapters: cut each layer's merged adapter (rank Σ r_m) to this rank by SVD; the relative error "
    "is printed and recorded.",
)
DENSIFY = typer.Option(
    False,
    "--densify",
    help="LoRA adapters: write the full model θ_init + δ instead of an adapter of --init (adapters are written "
    "in fp32 unless --dtype).",
)


def _repo_id(value: str | None) -> str | None:
    """--push-to-hub is checked before the merge, not after it."""
    if value is None:
        return None
    from mergekit_warp.io.hub import check_repo_id

    try:
        return check_repo_id(value)
    except WarpError as e:
        raise typer.BadParameter(str(e)) from None


PUSH = typer.Option(
    None,
    "--push-to-hub",
    help="Then upload the output to this hub model repo (as `warp push OUT REPO_ID`).",
    callback=_repo_id,
)


def _done(push_to_hub: str | None, out) -> None:
    """Print the output folder; with --push-to-hub, upload it and print the commit URL."""
    print(out)
    if push_to_hub:
        from mergekit_warp.io.hub import push

        print(push(out, push_to_hub))


def _output_options(dtype, max_shard_size, device, force, revision, quiet, memory_budget) -> dict:
    """The output, device and input options every merge command passes on to the library."""
    return dict(
        dtype=dtype,
        max_shard_size=max_shard_size,
        device=device,
        force=force,
        revision=revision,
        progress=not quiet,
        memory_budget=memory_budget,
    )


def parse_values(option: str, text: str | None) -> float | list[float] | None:
    """'0.5' → 0.5; '0.2,0.5,0.8' → [0.2, 0.5, 0.8] (a per-layer schedule)."""
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise WarpError(f"{option} {text!r}: give a number or a comma-separated list of numbers") from None
    return values[0] if len(values) == 1 else values


def _value(option: str, text: str) -> float | list[float]:
    v = parse_values(option, text)
    assert v is not None
    return v


@merge_app.command("slerp")
def slerp_cmd(
    models: list[Path] = typer.Argument(
        ..., help="Fine-tuned checkpoints (HF folders, .safetensors files or hub ids), or LoRA adapter folders."
    ),
    init: Optional[Path] = typer.Option(
        None,
        "--init",
        help="The shared init the task vectors are taken from (WARP); without it, the full weights "
        "of two models are interpolated (mergekit's slerp).",
    ),
    out: Path = OUT,
    lam: str = typer.Option(
        "0.5",
        "--lambda",
        help="With --init: interpolation λ, or a per-layer list '0.3,0.5,0.7' (two models only; any number of "
        "values, interpolated linearly from the first block to the last).",
    ),
    lam_nonblock: float = typer.Option(
        None, "--lambda-nonblock", help="With --init: λ for embeddings/final norm/head (default: the list's mean)."
    ),
    granularity: str = typer.Option(
        "block", "--granularity", help="With --init: one angle per block, tensor or model."
    ),
    t: Optional[float] = typer.Option(None, "--t", help="Without --init: 0 gives the first model, 1 the second (0.5)."),
    rank: Optional[int] = RANK,
    densify: bool = DENSIFY,
    dtype: str = DTYPE,
    max_shard_size: str = SHARD,
    memory_budget: str = MEMORY,
    push_to_hub: Optional[str] = PUSH,
    device: str = DEVICE,
    force: bool = FORCE,
    revision: str = REVISION,
    quiet: bool = QUIET,
) -> None:
    """SLERP of the task vectors of MODELS relative to --init (WARP; M > 2 by the iterative rule), or without
    --init of the full weights of two models, one angle per tensor (mergekit's slerp). MODELS may be LoRA
    adapters (peft folders) trained on --init: the merge is then exact and an adapter of rank Σ r_m
    (--rank cuts it, --densify writes the full model)."""
    from mergekit_warp.merge import api

    common = _output_options(dtype, max_shard_size, device, force, revision, quiet, memory_budget)
    with user_errors():
        if init is None:
            if rank is not None or densify:
                raise WarpError("--rank and --densify are for LoRA adapters, merged relative to --init (their base)")
            params = {"t": 0.5 if t is None else t}
            _done(push_to_hub, api.merge("slerp", [str(m) for m in models], out, params=params, **common))
            return
        if t is not None:
            raise WarpError("--t is the full-weight SLERP's parameter; with --init use --lambda")
        common.update(rank=rank, densify=densify)
        _done(
            push_to_hub,
            api.slerp(
                [str(m) for m in models],
                str(init),
                out,
                lam=_value("--lambda", lam),
                lam_nonblock=lam_nonblock,
                granularity=granularity,
                **common,
            ),
        )


@merge_app.command("lerp")
def lerp_cmd(
    models: list[Path] = typer.Argument(..., help="Checkpoints to average, or LoRA adapter folders (with --init)."),
    out: Path = OUT,
    weights: str = typer.Option(None, "--weights", help="Comma-separated weights, one per model (default: uniform)."),
    init: Path = typer.Option(None, "--init", help="Average task vectors relative to this init instead of weights."),
    rank: Optional[int] = RANK,
    densify: bool = DENSIFY,
    dtype: str = typer.Option(
        None, "--dtype", help="Output dtype: bf16, fp16 or fp32 (default: as --init, else the first model, stores it)."
    ),
    max_shard_size: str = SHARD,
    memory_budget: str = MEMORY,
    push_to_hub: Optional[str] = PUSH,
    device: str = DEVICE,
    force: bool = FORCE,
    revision: str = REVISION,
    quiet: bool = QUIET,
) -> None:
    """Weighted average of MODELS (model soup), or of their task vectors when --init is given (LoRA adapters
    trained on --init: an adapter, exactly)."""
    from mergekit_warp.merge import api

    with user_errors():
        w = parse_values("--weights", weights)
        _done(
            push_to_hub,
            api.lerp(
                [str(m) for m in models],
                out,
                weights=None if w is None else (w if isinstance(w, list) else [w]),
                init=None if init is None else str(init),
                rank=rank,
                densify=densify,
                **_output_options(dtype, max_shard_size, device, force, revision, quiet, memory_budget),
            ),
        )


@merge_app.command("ema")
def ema_cmd(
    checkpoints: list[Path] = typer.Argument(..., help="Checkpoints in training order C1 … Cn."),
    out: Path = OUT,
    mu: float = typer.Option(0.01, "--mu", help="EMA rate μ: θ ← (1 − μ)·θ + μ·θ_t."),
    dtype: str = DTYPE_FIRST,
    max_shard_size: str = SHARD,
    memory_budget: str = MEMORY,
    push_to_hub: Optional[str] = PUSH,
    device: str = DEVICE,
    force: bool = FORCE,
    revision: str = REVISION,
    quiet: bool = QUIET,
) -> None:
    """Exponential moving average over an ordered checkpoint sequence, starting at C1."""
    from mergekit_warp.merge import api

    with user_errors():
        _done(
            push_to_hub,
            api.ema(
                [str(c) for c in checkpoints],
                out,
                mu=mu,
                **_output_options(dtype, max_shard_size, device, force, revision, quiet, memory_budget),
            ),
        )


@merge_app.command("yaml")
def yaml_cmd(
    config: Path = typer.Argument(
        ...,
        help="A mergekit configuration: merge_method, base_model, models (with "
        "parameters), parameters, dtype/out_dtype, tokenizer_source: base.",
    ),
    out: Path = OUT,
    dtype: Optional[str] = typer.Option(
        None,
        "--dtype",
        help="Output dtype (default: the config's out_dtype/dtype, else as the reference input stores it).",
    ),
    max_shard_size: str = SHARD,
    memory_budget: str = MEMORY,
    push_to_hub: Optional[str] = PUSH,
    device: str = DEVICE,
    force: bool = FORCE,
    revision: Optional[str] = REVISION,
    quiet: bool = QUIET,
) -> None:
    """Run the merge a mergekit YAML describes, on warp's streaming engine (the `merge_config.yml` that warp
    writes beside its merges reproduces them bit for bit)."""
    from mergekit_warp.merge import api

    with user_errors():
        _done(
            push_to_hub,
            api.merge_yaml(
                config, out, **_output_options(dtype, max_shard_size, device, force, revision, quiet, memory_budget)
            ),
        )


def liti_cmd(
    merged: Path = typer.Argument(..., help="The merged (e.g. SLERP) checkpoint, or a LoRA adapter folder."),
    init: Path = typer.Option(..., "--init", help="The LITI target: the iteration's init, or θ_sft."),
    out: Path = OUT,
    eta: str = typer.Option(
        "0.3",
        "--eta",
        help="η, or a per-layer list (any number of values, interpolated linearly from the first block to the "
        "last); η > 1 extrapolates.",
    ),
    eta_nonblock: float = typer.Option(
        None, "--eta-nonblock", help="η for embeddings/final norm/head (default: the list's mean)."
    ),
    rank: Optional[int] = RANK,
    densify: bool = DENSIFY,
    dtype: str = DTYPE,
    max_shard_size: str = SHARD,
    memory_budget: str = MEMORY,
    push_to_hub: Optional[str] = PUSH,
    device: str = DEVICE,
    force: bool = FORCE,
    revision: str = REVISION,
    quiet: bool = QUIET,
) -> None:
    """LITI: (1 − η)·θ_init + η·θ_merged. MERGED may be a LoRA adapter trained on --init: the adapter η·δ
    (--densify: the model θ_init + η·δ; with --eta 1, the adapter applied to its base)."""
    from mergekit_warp.merge import api

    with user_errors():
        _done(
            push_to_hub,
            api.liti(
                str(merged),
                str(init),
                out,
                eta=_value("--eta", eta),
                eta_nonblock=eta_nonblock,
                rank=rank,
                densify=densify,
                **_output_options(dtype, max_shard_size, device, force, revision, quiet, memory_budget),
            ),
        )


def inspect_cmd(
    models: list[Path] = typer.Argument(..., help="Fine-tuned checkpoints."),
    init: Path = typer.Option(..., "--init", help="The shared init."),
    granularity: str = typer.Option("block", "--granularity", help="Groups: block, tensor or model."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    revision: str = REVISION,
    device: str = DEVICE,
) -> None:
    """Per group: task-vector norms, pairwise cosines and angle Ω, full-weight cosines (WARP fig. 11)."""
    from mergekit_warp.merge import api

    with user_errors():
        rows = api.inspect(
            [str(m) for m in models], str(init), granularity=granularity, revision=revision, device=device
        )
        if as_json:
            print(json.dumps(rows, indent=2))
        else:
            _table(rows, len(models))


def _table(rows: list[dict], m: int) -> None:
    from rich.console import Console
    from rich.table import Table

    pairs = [(i, j) for i in range(m) for j in range(i + 1, m)]
    t = Table(
        title="task vectors δ_m = θ_m − θ_init per group",
        caption="‖δ‖: how far each model moved; cos and Ω: the angle between two moves (WARP: ≈ 0 and ≈ 90°); "
        "max 1 − cos θ: the largest 1 − cosine between the full weights of any two checkpoints, init included "
        "(≈ 0: the weights barely turned)",
    )
    t.add_column("group", overflow="fold")
    t.add_column("params", justify="right")
    for i in range(m):
        t.add_column(f"‖δ{i + 1}‖", justify="right")
    for i, j in pairs:
        t.add_column(f"cos δ{i + 1},δ{j + 1}", justify="right")
        t.add_column(f"Ω{i + 1}{j + 1}°", justify="right")
    t.add_column("max 1 − cos θ", justify="right")

    def fmt(x: float | None, spec: str) -> str:
        return "—" if x is None else format(x, spec)

    for r in rows:
        wcos = [r["weight_cos"][a][b] for a in range(m + 1) for b in range(a + 1, m + 1)]
        cells = [r["group"], f"{r['numel']:,}", *(fmt(x, ".4g") for x in r["task_norms"])]
        for i, j in pairs:
            cells += [fmt(r["task_cos"][i][j], ".3f"), fmt(r["omega_deg"][i][j], ".1f")]
        wcos = [c for c in wcos if c is not None]
        cells.append(fmt(1 - min(wcos), ".2e") if wcos else "")
        t.add_row(*cells)
    Console().print(t)


def _typed_list(p, text: str) -> list:
    """A parameter's command-line text as values: one, or comma-separated (per model, or a gradient)."""
    from mergekit_warp.merge.methods.base import _typed

    return [_typed(p, v.strip()) for v in text.split(",")]


def _ident(name: str) -> str:
    """A parameter's name as a Python identifier (mergekit's `lambda` is a keyword)."""
    import keyword

    return name + "_" if keyword.iskeyword(name) else name


def method_command(m):
    """`warp merge NAME MODELS… [--base BASE] [--PARAM V] -o OUT`, built from a registered method's parameters:
    a per-model parameter takes one value or one per model (comma-separated); another takes a value, or
    a comma-separated list interpolated over depth (a gradient, as in mergekit's YAML)."""
    import inspect

    from mergekit_warp.cli.common import with_parameters

    def cmd(**o) -> None:
        from mergekit_warp.merge import api

        with user_errors():
            n = len(o["models"])
            top: dict = {}
            per_model: list[dict] = [{} for _ in range(n)]
            for p in m.params:
                if o[_ident(p.name)] is None:
                    continue
                values = _typed_list(p, o[_ident(p.name)])
                if p.per_model:
                    if len(values) not in (1, n):
                        raise WarpError(
                            f"--{p.name.replace('_', '-')}: {len(values)} values for {n} models; give "
                            "one value, or one per model"
                        )
                    for i in range(n):
                        per_model[i][p.name] = values[0] if len(values) == 1 else values[i]
                else:
                    top[p.name] = values[0] if len(values) == 1 else values
            base = o.get("base")
            _done(
                o["push_to_hub"],
                api.merge(
                    m.name,
                    [str(x) for x in o["models"]],
                    o["out"],
                    base=None if base is None else str(base),
                    params=top,
                    model_params=per_model if any(per_model) else None,
                    seed=o.get("seed", 0),
                    **_output_options(
                        *(
                            o[k]
                            for k in (
                                "dtype",
                                "max_shard_size",
                                "device",
                                "force",
                                "revision",
                                "quiet",
                                "memory_budget",
                            )
                        )
                    ),
                ),
            )

    def param(name: str, annotation, default) -> inspect.Parameter:
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)

    params = [
        param(
            "models",
            list[Path],
            typer.Argument(..., help="Checkpoints to merge (HF folders, .safetensors files or hub ids)."),
        )
    ]
    if m.base != "none":
        need = "required" if m.base == "required" else "optional"
        params.append(
            param(
                "base",
                Optional[Path],
                typer.Option(
                    None, "--base", "--init", help=f"The base model the task vectors are taken from ({need})."
                ),
            )
        )
    params.append(param("out", Path, OUT))
    for p in m.params:
        default = "required" if p.default is REQUIRED else f"default {p.default}"
        scope = "one value or one per model" if p.per_model else "a value"
        flags = ["--" + p.name.replace("_", "-")] + (["--weights"] if p.name == "weight" else [])
        params.append(
            param(_ident(p.name), Optional[str], typer.Option(None, *flags, help=f"{p.help} ({scope}; {default})"))
        )
    if m.random:
        params.append(
            param(
                "seed",
                int,
                typer.Option(
                    0,
                    "--seed",
                    help="Seed of the random drops (with the tensor name and position: same seed, same bytes).",
                ),
            )
        )
    params += [
        param("dtype", Optional[str], DTYPE),
        param("max_shard_size", str, SHARD),
        param("memory_budget", str, MEMORY),
        param("push_to_hub", Optional[str], PUSH),
        param("device", str, DEVICE),
        param("force", bool, FORCE),
        param("revision", Optional[str], REVISION),
        param("quiet", bool, QUIET),
    ]
    cmd.__doc__ = m.summary
    return with_parameters(cmd, params)


def register(app: typer.Typer) -> None:
    """Add `merge` (slerp, lerp, ema and every other registered method), `liti` and `inspect` to `warp`."""
    from mergekit_warp.merge.methods import REGISTRY

    for name, m in REGISTRY.items():
        if name not in ("slerp", "lerp", "ema", "liti"):  # those four have hand-written commands above
            merge_app.command(name)(method_command(m))
    app.add_typer(merge_app, name="merge")
    app.command("liti")(liti_cmd)
    app.command("inspect")(inspect_cmd)
