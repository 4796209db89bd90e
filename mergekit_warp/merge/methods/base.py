"""What a merge method is: data, not a class hierarchy."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from mergekit_warp.io.reader import CheckpointReader
from mergekit_warp.merge.engine import Combine
from mergekit_warp.progress import Bytes


@dataclass(frozen=True)
class Context:
    """What a method's `build` may use besides the readers."""

    device: torch.device
    chunk: int
    progress: Bytes


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    """One line with the formula (command help, model card)."""
    base: str
    """The reference input given apart from the models: 'required', 'optional' or 'none'."""
    roles: tuple[str, str]
    """Provenance names of the base and of the models (e.g. ('init', 'models'))."""
    check: Callable[[dict[str, Any], int, bool], tuple[dict[str, Any], list[str]]]
    """(params, number of models, base given?) → (checked params as recorded, notes); WarpError if bad."""
    build: Callable[[list[CheckpointReader], dict[str, Any], Context], Combine]
    """(readers: the base first when given, then the models; checked params; context) → the Combine."""
