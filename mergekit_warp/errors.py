"""Expected failures. Anything raised as `WarpError` is the user's to fix: the CLI prints its message
on one line (it must name the file/tensor/option and say what to do) and exits with status 2."""

from __future__ import annotations

import errno


class WarpError(Exception):
    """Bad input, bad option, or a refused output path."""


_DISK = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}


def disk_error(e: BaseException, output: object = None) -> WarpError | None:
    """The one-line WarpError for a write that failed for want of space or permission (an OSError, or
    the same condition reported by safetensors' Rust writer as text), naming the file or the `output`
    being written; None for anything else. Outputs are published atomically, so nothing half-written is
    left at the output path either way."""
    code = e.errno if isinstance(e, OSError) else None
    text = str(e)
    if code is None and ("No space left on device" in text or "StorageFull" in text):
        code = errno.ENOSPC
    if code not in _DISK:
        return None
    target = e.filename if isinstance(e, OSError) and e.filename else output
    full = code in (errno.ENOSPC, errno.EDQUOT)
    where = (f" while writing {target}" if full else f" on {target}") if target else ""
    fix = "free some space" if full else "choose a writable location"
    return WarpError(f"{_DISK[code]}{where}; {fix} (or choose another -o) and rerun: nothing was published there")


def build(cls, options: dict, where: str = ""):
    """`cls(**options)` for a pydantic model, with the first validation problem as a one-line WarpError
    naming the option: `--flag` (command-line options) or `WHERE.key` (a config section)."""
    from pydantic import ValidationError

    try:
        return cls(**options)
    except ValidationError as e:
        err = e.errors()[0]
        key = str(err["loc"][0]) if err["loc"] else ""
        name = (f"{where}.{key}" if where else "--" + key.replace("_", "-")) if key else where
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown option; check the spelling (see --help)"
        elif err["type"] == "missing":
            msg = "required"
        elif key and "input" in err:
            given = err["input"]  # a repeated option's values as they were typed: a,b
            shown = ",".join(map(str, given)) if isinstance(given, (list, tuple)) else given
            msg = f"{shown!r}: {msg}"
        raise WarpError(f"{name} {msg}".strip()) from None
