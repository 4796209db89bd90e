"""Outputs that appear complete or not at all, and one writer per output at a time.

Every folder or file the toolkit writes goes through these three functions:

- `claim(out)`: an advisory lock (`flock`) on `.NAME.lock` beside `out`, held for the whole command
  that writes `out`; a second command on the same output gets a one-line error instead of racing it.
  Whoever holds the claim first repairs what a killed predecessor left behind (`recover`).
- `staged(out, replace=...)`: a hidden temporary sibling folder to write into; moved to `out` when
  the block succeeds, deleted when it fails (Ctrl-C and SIGTERM included).
- `write_atomic(path, text)`: the same for one small file (`os.replace`).

The names beside OUT, and how a kill at any instant is repaired by the next `claim(OUT)`:

    .OUT.lock          held while a command writes OUT
    .OUT.tmp-ID        being written                       → deleted (its writer is gone)
    .OUT.new-ID        complete, about to replace OUT       → moved to OUT if OUT is missing, else deleted
    .OUT.old-ID        the previous OUT, moved aside        → moved back if OUT is missing, else deleted

Replacing an existing OUT renames tmp → new, OUT → old (the commit point), new → OUT, then deletes
old: a kill before the commit point keeps the old OUT, a kill after it ends with the new one.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from mergekit_warp.errors import WarpError, disk_error

_KINDS = ("tmp", "new", "old")


def _sibling(out: Path, kind: str, tag: str) -> Path:
    return out.parent / f".{out.name}.{kind}-{tag}"


def _leftovers(out: Path, kind: str) -> list[Path]:
    """Siblings of `out` of one kind, oldest first (the tag ends with a nanosecond time)."""
    found = out.parent.glob(f".{glob.escape(out.name)}.{kind}-*") if out.parent.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.rsplit("-", 1)[-1]) if p.name.rsplit("-", 1)[-1].isdigit() else 0)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def recover(out: Path) -> list[str]:
    """Repair what a killed writer of `out` left (see the module docstring); returns what was done.
    Call it only while holding `claim(out)`: without the lock, a live writer's temp could be taken
    for a dead one's."""
    out = Path(out).absolute()
    done = []
    if not os.path.lexists(out):
        for kind, verb in (("new", "finished the interrupted replacement of"), ("old", "restored the previous")):
            cands = _leftovers(out, kind)
            if cands:
                cands[-1].rename(out)
                done.append(f"{verb} {out}")
                break
    for kind in _KINDS:
        for p in _leftovers(out, kind):
            _remove(p)
            done.append(f"removed {p.name}")
    return done


def _writable_error(folder: Path, e: OSError) -> WarpError:
    if e.errno == errno.ENOENT:
        return WarpError(f"the folder {folder} does not exist; create it first or choose another -o")
    why = {
        errno.EROFS: "read-only file system",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.ENOSPC: "no space left on device",
        errno.ENOTDIR: "not a folder",
    }.get(e.errno, e.strerror)
    return WarpError(f"cannot write in {folder} ({why}); choose another -o")


@contextlib.contextmanager
def claim(out: Path, wait: bool = False) -> Iterator[Path]:
    """Hold the advisory lock of `out` (absolute path yielded) for the block, after repairing what a
    killed predecessor left. A WarpError when the folder is not writable, or when another process
    holds the lock (`wait`: block until it is released instead)."""
    import fcntl

    out = Path(out).absolute()
    lock = out.parent / f".{out.name}.lock"
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise _writable_error(out.parent, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            who = f"process {holder}" if holder.isdigit() else "another process"
            raise WarpError(
                f"{out} is being written by {who} (lock {lock.name}); wait for it to finish or choose another -o"
            ) from None
        # The previous holder unlinks the lock file on release: if that happened between our open and
        # our flock, we locked a file nobody else will see. Retry on the current one.
        try:
            current = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        recover(out)
        yield out
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


@contextlib.contextmanager
def staged(out: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a new hidden folder beside `out`; when the block succeeds, move it to `out` (replacing an
    existing `out` only when `replace`), when it fails, delete it. Call it while holding `claim(out)`."""
    out = Path(out).absolute()
    tag = f"{os.getpid()}-{time.time_ns()}"
    tmp = _sibling(out, "tmp", tag)
    try:
        tmp.mkdir()
    except OSError as e:
        raise _writable_error(out.parent, e) from None
    try:
        yield tmp
        if not os.path.lexists(out):
            tmp.rename(out)
        elif not replace:
            raise WarpError(f"output {out} already exists; pass --force to replace it or choose another -o")
        else:
            new, old = _sibling(out, "new", tag), _sibling(out, "old", tag)
            tmp.rename(new)
            out.rename(old)  # the commit point: from here on, recovery completes the replacement
            new.rename(out)
            _remove(old)
    except BaseException as e:
        _remove(tmp)
        err = disk_error(e, out)
        if err is not None:
            raise err from None
        raise


def write_atomic(path: Path, text: str) -> None:
    """Write a small text file so that readers see the old content or the new, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{time.time_ns()}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        err = disk_error(e, path)
        if err is not None:
            raise err from None
        raise
