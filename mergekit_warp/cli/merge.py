"""`warp merge slerp|lerp|ema`, `warp liti`, `warp inspect`: parse, call one `merge.api` function,
print the result path (stdout) — progress goes to stderr."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from mergekit_warp.cli.common import user_errors
from mergekit_warp.errors import WarpError

merge_app = typer.Typer(help="Merge checkpoints (streaming; output is an HF folder).", no_args_is_help=True)

OUT = typer.Option(..., "-o", "--out", help="Output folder (must not exist unless --force).")
DTYPE = typer.Option(None, "--dtype", help="Output dtype: bf16, fp16 or fp32 (default: as the init stores it).")
SHARD = typer.Option("5GB", "--max-shard-size", help="Largest output shard, e.g. 5GB, 500MB.")
DEVICE = typer.Option("cpu", "--device", help="Where the math runs: cpu or cuda.")
FORCE = typer.Option(False, "--force", help="Replace an existing output folder.")
REVISION = typer.Option(None, "--revision", help="Hub revision for inputs given as hub ids.")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bar.")


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
        ..., help="Fine-tuned checkpoints (HF folders, .safetensors files or hub ids)."
    ),
    init: Path = typer.Option(..., "--init", help="The shared init the task vectors are taken from."),
    out: Path = OUT,
    lam: str = typer.Option(
        "0.5", "--lambda", help="Interpolation λ, or a per-layer list '0.3,0.5,0.7' (two models only)."
    ),
    lam_nonblock: float = typer.Option(
        None, "--lambda-nonblock", help="λ for embeddings/final norm/head (default: the list's mean)."
    ),
    granularity: str = typer.Option("block", "--granularity", help="One angle per: block, tensor or model."),
    dtype: str = DTYPE,
    max_shard_size: str = SHARD,
    device: str = DEVICE,
    force: bool = FORCE,
    revision: str = REVISION,
    quiet: bool = QUIET,
) -> None:
    """SLERP the task vectors of MODELS relative to --init (WARP); M > 2 uses the iterative rule."""
    from mergekit_warp.merge import api

    with user_errors():
        print(
            api.slerp(
                [str(m) for m in models],
                str(init),
                out,
                lam=_value("--lambda", lam),
                lam_nonblock=lam_nonblock,
                granularity=granularity,
                dtype=dtype,
                max_shard_size=max_shard_size,
                device=device,
                force=force,
                revision=revision,
                progress=not quiet,
            )
        )


@merge_app.command("lerp")
def lerp_cmd(
    models: list[Path] = typer.Argument(..., help="Checkpoints to average."),
    out: Path = OUT,
    weights: str = typer.Option(None, "--weights", help="Comma-separated weights, one per model (default: uniform)."),
    init: Path = typer.Option(None, "--init", help="Average task vectors relative to this init instead of weights."),
    dtype: str = DTYPE,
    max_shard_size: str = SHARD,
    device: str = DEVICE,
    force: bool = FORCE,
    revision: str = REVISION,
    quiet: bool = QUIET,
) -> None:
    """Weighted average of MODELS (model soup), or of their task vectors when --init is given."""
    from mergekit_warp.merge import api

    with user_errors():
        w = parse_values("--weights", weights)
        print(
            api.lerp(
                [str(m) for m in models],
                out,
                weights=None if w is None else (w if isinstance(w, list) else [w]),
                init=None if init is None else str(init),
                dtype=dtype,
                max_shard_size=max_shard_size,
                device=device,
                force=force,
                revision=revision,
                progress=not quiet,
            )
        )


@merge_app.command("ema")
def ema_cmd(
    checkpoints: list[Path] = typer.Argument(..., help="Checkpoints in training order C1 … Cn."),
    out: Path = OUT,
    mu: float = typer.Option(0.01, "--mu", help="EMA rate μ: θ ← (1 − μ)·θ + μ·θ_t."),
    dtype: str = DTYPE,
    max_shard_size: str = SHARD,
    device: str = DEVICE,
    force: bool = FORCE,
    revision: str = REVISION,
    quiet: bool = QUIET,
) -> None:
    """Exponential moving average over an ordered checkpoint sequence, starting at C1."""
    from mergekit_warp.merge import api

    with user_errors():
        print(
            api.ema(
                [str(c) for c in checkpoints],
                out,
                mu=mu,
                dtype=dtype,
                max_shard_size=max_shard_size,
                device=device,
                force=force,
                revision=revision,
                progress=not quiet,
            )
        )


def liti_cmd(
    merged: Path = typer.Argument(..., help="The merged (e.g. SLERP) checkpoint."),
    init: Path = typer.Option(..., "--init", help="The LITI target: the iteration's init, or θ_sft."),
    out: Path = OUT,
    eta: str = typer.Option("0.3", "--eta", help="η, or a per-layer list; η > 1 extrapolates."),
    eta_nonblock: float = typer.Option(
        None, "--eta-nonblock", help="η for embeddings/final norm/head (default: the list's mean)."
    ),
    dtype: str = DTYPE,
    max_shard_size: str = SHARD,
    device: str = DEVICE,
    force: bool = FORCE,
    revision: str = REVISION,
    quiet: bool = QUIET,
) -> None:
    """LITI: (1 − η)·θ_init + η·θ_merged."""
    from mergekit_warp.merge import api

    with user_errors():
        print(
            api.liti(
                str(merged),
                str(init),
                out,
                eta=_value("--eta", eta),
                eta_nonblock=eta_nonblock,
                dtype=dtype,
                max_shard_size=max_shard_size,
                device=device,
                force=force,
                revision=revision,
                progress=not quiet,
            )
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
    t = Table(title="task vectors δ_m = θ_m − θ_init per group")
    t.add_column("group", overflow="fold")
    t.add_column("params", justify="right")
    for i in range(m):
        t.add_column(f"‖δ{i + 1}‖", justify="right")
    for i, j in pairs:
        t.add_column(f"cos δ{i + 1},δ{j + 1}", justify="right")
        t.add_column(f"Ω{i + 1}{j + 1}°", justify="right")
    t.add_column("min cos θ", justify="right")

    def fmt(x: float | None, spec: str) -> str:
        return "—" if x is None else format(x, spec)

    for r in rows:
        wcos = [r["weight_cos"][a][b] for a in range(m + 1) for b in range(a + 1, m + 1)]
        cells = [r["group"], f"{r['numel']:,}", *(fmt(x, ".4g") for x in r["task_norms"])]
        for i, j in pairs:
            cells += [fmt(r["task_cos"][i][j], ".3f"), fmt(r["omega_deg"][i][j], ".1f")]
        wcos = [c for c in wcos if c is not None]
        cells.append(fmt(min(wcos), ".5f") if wcos else "")
        t.add_row(*cells)
    Console().print(t)


def register(app: typer.Typer) -> None:
    """Add `merge` (slerp, lerp, ema), `liti` and `inspect` to the top-level `warp` app."""
    app.add_typer(merge_app, name="merge")
    app.command("liti")(liti_cmd)
    app.command("inspect")(inspect_cmd)
