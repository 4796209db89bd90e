"""One check for a device name, shared by `warp merge`, `warp rl`, `warp eval` and the pipeline config."""

from __future__ import annotations

import torch

from mergekit_warp.errors import WarpError


def resolve_device(device: str | torch.device, where: str = "--device") -> torch.device:
    """A torch device that exists on this machine (cpu, cuda, cuda:N, mps), or a WarpError whose
    message starts with `where` (the option or config key that named it)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise WarpError(f"{where} {device!r} is not a device name; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0 or (dev.index is not None and dev.index >= n):
            raise WarpError(
                f"{where} {device}: does not exist here ({n} CUDA device(s)); use cpu or an existing cuda:N"
            )
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise WarpError(f"{where} {device}: MPS is not available on this machine; use cpu")
    elif dev.type != "cpu":
        raise WarpError(f"{where} {device}: unsupported device type; use cpu, cuda, cuda:N or mps")
    return dev
