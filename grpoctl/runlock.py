"""One `loop` per run directory: a lock held for the run's life.

`lock_run_dir(RUN)` takes an exclusive `flock` on the directory itself (no lock file,
so a run that fails on bad input leaves its directory as empty as before). The kernel
drops the lock when the process ends, however it ends: a SIGKILLed run leaves no stale
lock, and `--resume` after it starts at once. A second `loop` on a directory whose run
is alive fails at once with one line naming the directory, before it reads or deletes
anything there (`--resume` deletes a killed write's temporary files, which a live run
may be writing).

Within one process the lock is re-entrant (the same directory locked twice is held
once), so a program that runs `run_loop` on a directory, then resumes it, works;
`release_run_dir` drops it when the run ends. Under torchrun only rank 0 prepares the
run directory, so only rank 0 holds the lock.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from grpoctl.errors import GrpoctlError

_held: dict[tuple[int, int], int] = {}  # (st_dev, st_ino) of a locked directory -> its fd


def lock_run_dir(run: Path) -> None:
    """Lock the run directory `run` (which must exist) for this process, or raise
    GrpoctlError if another process holds it."""
    try:
        fd = os.open(run, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise GrpoctlError(f"{run}: cannot open the run directory: {e.strerror}") from None
    key = _key(fd)
    if key in _held:  # this process holds it already
        os.close(fd)
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise GrpoctlError(f"{run}: another `grpoctl loop` is running in this run directory; "
                           "wait for it to end (or stop it), then --resume") from None
    except OSError as e:  # a file system without locks (some network mounts)
        os.close(fd)
        raise GrpoctlError(f"{run}: cannot lock the run directory: {e.strerror}") from None
    _held[key] = fd


def release_run_dir(run: Path) -> None:
    """Drop this process's lock on `run` (nothing if it holds none)."""
    try:
        fd = os.open(run, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        held = _held.pop(_key(fd), None)
    finally:
        os.close(fd)
    if held is not None:
        os.close(held)  # closing the descriptor releases the flock


def _key(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino
