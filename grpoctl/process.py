"""What the process sets up before a command runs: its standard streams and its signals.

- A standard stream the caller closed (`2>&-`, `>&-`, `<&-`) gets /dev/null on its file
  descriptor. Otherwise the next file opened takes that number, and whatever writes to
  fd 1 or 2 (a C library, a subprocess, a stray print) lands inside an output file.
  Logs to a closed stderr then go nowhere; records sent to a closed stdout are an error
  (one line), never silently dropped; a closed stdin reads as empty.
- SIGTERM and SIGHUP (`kill`, a closed terminal, a batch scheduler's stop) are raised as
  KeyboardInterrupt where the process is, so they clean up as Ctrl-C does: no temporary
  file left beside an output, a loop's finished steps kept. Without this they end the
  process on the spot. A signal the caller ignores (`nohup`) stays ignored. The exit
  status is 128 + the signal's number, as for a process the signal ended.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import signal
import sys

# The termination signal being handled, if any (main() turns 130 into 128 + it).
terminated_by: int | None = None


class ClosedStdout(io.TextIOBase):
    """sys.stdout when the caller closed it: writing raises OSError(EBADF)."""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if not text:
            return 0
        raise OSError(errno.EBADF, "stdout is closed")


def reopen_closed_standard_streams() -> None:
    for fd, flags in ((0, os.O_RDONLY), (1, os.O_WRONLY), (2, os.O_WRONLY)):
        try:
            os.fstat(fd)
            continue
        except OSError:
            pass
        null = os.open(os.devnull, flags)
        if null != fd:  # the lowest free number is taken: fd itself, unless a lower one was free
            os.dup2(null, fd)
            os.close(null)
        if fd == 0:
            sys.stdin = open(0, closefd=False, encoding="utf-8")
        elif fd == 1:
            sys.stdout = ClosedStdout()
        else:
            sys.stderr = open(2, "w", closefd=False, encoding="utf-8")


def _interrupt(signum: int, frame) -> None:
    global terminated_by
    terminated_by = signum
    raise KeyboardInterrupt


@contextlib.contextmanager
def interrupt_on_termination_signals():
    """Within the block; the handlers before it are put back after (main() also runs
    inside test processes)."""
    previous = {}
    for name in ("SIGTERM", "SIGHUP"):
        number = getattr(signal, name, None)  # no SIGHUP on Windows
        if number is not None and signal.getsignal(number) is signal.SIG_DFL:
            previous[number] = signal.signal(number, _interrupt)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def exit_status(status):
    """A Ctrl-C's 130 becomes 128 + the termination signal's number, when that was it."""
    return 128 + terminated_by if status == 130 and terminated_by else status
