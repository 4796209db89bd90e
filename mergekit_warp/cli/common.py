"""Helpers shared by the thin CLI commands."""

from __future__ import annotations

import contextlib
import inspect
import sys
import typing
from collections.abc import Iterator

import typer

from mergekit_warp.errors import WarpError, disk_error


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn a `WarpError` (and a write that failed for want of space or permission) into one line on
    stderr and exit status 2, no traceback; Ctrl-C into exit status 130."""
    try:
        yield
    except WarpError as e:
        fail(e)
    except KeyboardInterrupt:
        print(
            "interrupted: nothing was published at the output path (rerun with --resume where the command has it)",
            file=sys.stderr,
        )
        raise typer.Exit(130) from None
    except Exception as e:
        err = disk_error(e)
        if err is None:
            raise
        fail(err)


def fail(e: Exception) -> None:
    msg = " ".join(str(e).split())  # one line, whatever the message held
    print(f"error: {msg}", file=sys.stderr)
    raise typer.Exit(2) from None


def options_from(
    model, short: dict[str, list[str]] | None = None, skip: tuple[str, ...] = ()
) -> list[inspect.Parameter]:
    """Typer options for the fields of pydantic `model` (name → --flag, type, default, description as
    help), so a command and its config cannot drift apart."""
    params = []
    for name, f in model.model_fields.items():
        if name in skip:
            continue
        flag = "--" + name.replace("_", "-")
        decls = (short or {}).get(name, [flag])
        kind = f.annotation
        if kind is bool:  # `short` adds switches, e.g. " /-q" for the off one
            decls = [f"{flag}/--no-{name.replace('_', '-')}", *(short or {}).get(name, [])]
        elif typing.get_origin(kind) is typing.Literal:
            kind = str  # choices are checked (and named in the error) by the model
        required = f.is_required()
        inner = [kind, *typing.get_args(kind)]  # Optional[list[str]]: a repeatable option of strings
        metavar = "TEXT" if any(typing.get_origin(a) is list for a in inner) else None
        option = typer.Option(
            ... if required else f.default, *decls, help=f.description, show_default=not required, metavar=metavar
        )
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind))
    return params


def with_parameters(fn, params: list[inspect.Parameter]):
    """`fn(**kwargs)` presented to Typer as a function of `params`."""
    fn.__signature__ = inspect.Signature(params)
    fn.__annotations__ = {p.name: p.annotation for p in params}
    return fn
