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


def disk_error(e: BaseException) -> WarpError | None:
    """The one-line WarpError for a write that failed for want of space or permission (an OSError, or
    the same condition reported by safetensors' Rust writer as text); None for anything else. Outputs
    are published atomically, so nothing half-written is left at the output path either way."""
    code = e.errno if isinstance(e, OSError) else None
    text = str(e)
    if code is None and ("No space left on device" in text or "StorageFull" in text):
        code = errno.ENOSPC
    if code not in _DISK:
        return None
    where = f" writing {e.filename}" if isinstance(e, OSError) and e.filename else ""
    fix = "free some space" if code in (errno.ENOSPC, errno.EDQUOT) else "choose a writable location"
    return WarpError(f"{_DISK[code]}{where}; {fix} (or choose another -o) and rerun: nothing was published")
