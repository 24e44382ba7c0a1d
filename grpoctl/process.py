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
- Committing an output (the rename that puts a finished file or directory in place) is
  one step a signal cannot split: `committing(path)` holds SIGINT/SIGTERM/SIGHUP back
  across it and records the path in `written`, so an interrupted command says truly
  whether its output was replaced ("interrupted after writing ck") or not ("nothing was
  written"), and a rerun does not apply an update twice.
- Every command grpoctl starts (`run_command`) runs in its own process group, and the
  whole group is killed and waited for on every exit path: a shell's grandchild
  (`sh -c 'python judge.py'`) never outlives the stage that started it.
- `run_main` runs the command line inside all this, and makes every way it can fail
  one line on stderr: a user's error, stdout on a full device, an interrupt.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import signal
import subprocess
import sys
from collections.abc import Callable

# The termination signal being handled, if any (main() turns 130 into 128 + it).
terminated_by: int | None = None

# The outputs this process has put in place (committing), in order: what an interrupt
# message names as written.
written: list[str] = []

# While > 0 a commit is under way: a signal is held in _pending until it ends.
_committing = 0
_pending: int | None = None


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
    global terminated_by, _pending
    if _committing:  # raised when the commit is done (committing)
        _pending = signum
        return
    if signum != signal.SIGINT:
        terminated_by = signum
    raise KeyboardInterrupt


def _is_temporary(path: str) -> bool:
    """Inside a `.NAME.*.tmp` directory: a part of an output not yet in place."""
    parts = os.path.abspath(path).split(os.sep)[:-1]
    return any(p.startswith(".") and p.endswith(".tmp") for p in parts)


@contextlib.contextmanager
def committing(path: str | os.PathLike):
    """Around the rename that puts the output `path` in place: a signal that arrives
    meanwhile is held back, and raised (as KeyboardInterrupt) only once the output is
    in place and recorded in `written`. Without this a SIGTERM just after the rename
    would report "nothing was written" over a replaced checkpoint."""
    global _committing, _pending
    _committing += 1
    try:
        yield
        if not _is_temporary(os.fspath(path)):
            written.append(os.fspath(path))
    finally:
        _committing -= 1
        if not _committing and _pending is not None:  # the held signal, now
            signum, _pending = _pending, None
            _interrupt(signum, None)


def interrupt_message() -> str:
    """What an interrupted command says about its outputs."""
    if not written:
        return "interrupted: nothing was written (outputs appear only when a command finishes)"
    names = ", ".join(dict.fromkeys(written))
    return (f"interrupted after writing {names} (complete: it is the new output, not the old; "
            "any other output of the command was not written)")


@contextlib.contextmanager
def interrupt_on_termination_signals():
    """Within the block; the handlers before it are put back after (main() also runs
    inside test processes)."""
    previous = {}
    for name in ("SIGTERM", "SIGHUP", "SIGINT"):
        number = getattr(signal, name, None)  # no SIGHUP on Windows
        # SIGINT's usual handler raises KeyboardInterrupt too; ours also holds it back
        # across a commit
        usual = signal.default_int_handler if name == "SIGINT" else signal.SIG_DFL
        if number is not None and signal.getsignal(number) is usual:
            previous[number] = signal.signal(number, _interrupt)
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def exit_status(status):
    """A Ctrl-C's 130 becomes 128 + the termination signal's number, when that was it."""
    return 128 + terminated_by if status == 130 and terminated_by else status


# --- stdout ------------------------------------------------------------------------


def one_line(text: str) -> str:
    """A message as one line: its lines joined, runs of whitespace made one space."""
    return " ".join(text.split())


def settle_stdout() -> OSError | None:
    """Flush stdout; if that fails (`> /dev/full`, a closed pipe), point file descriptor 1
    at /dev/null so that the interpreter's own flush at exit neither fails again nor
    prints "Exception ignored". Returns the error, or None."""
    try:
        sys.stdout.flush()
        return None
    except (OSError, ValueError) as e:  # ValueError: stdout already closed
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass  # a replaced sys.stdout (tests): nothing to redirect
        return e if isinstance(e, OSError) else OSError(str(e))


class WatchedStdout:
    """sys.stdout, remembering a failed write: tells `print` to a full device (an OSError
    of stdout) from an OSError elsewhere (a bug, which keeps its traceback)."""

    def __init__(self, stream):
        self.stream = stream
        self.error: OSError | None = None

    def _watch(self, name, *args):
        try:
            return getattr(self.stream, name)(*args)
        except OSError as e:
            self.error = e
            raise

    def write(self, text):
        return self._watch("write", text)

    def writelines(self, lines):
        return self._watch("writelines", lines)

    def flush(self):
        return self._watch("flush")

    def __getattr__(self, name):
        return getattr(self.stream, name)


# --- the command line's run ---------------------------------------------------------


def run_main(main: Callable[[], object],
             user_error: Callable[[Exception], tuple[str, int] | None]):
    """Run `main` (the command line; it returns its exit status) as this process's work,
    and return the exit status.

    Closed standard streams are reopened and SIGTERM/SIGHUP act as Ctrl-C first. An
    exception that `user_error` explains as (message, status) prints `error: MESSAGE`
    (one line) and exits with that status; any other keeps its traceback (a bug).
    stdout that cannot be written (`> /dev/full`) is one line too, status 2; a reader
    that went away (`| head`) ends the command quietly with status 1, as click does. An
    interrupt says which outputs were written, status 130 (128 + a termination signal).
    """
    reopen_closed_standard_streams()
    watched = sys.stdout = WatchedStdout(sys.stdout)
    try:
        with interrupt_on_termination_signals():
            _run(main, user_error, watched)  # ends in sys.exit
    except SystemExit as e:  # 130 for SIGTERM/SIGHUP too; say which it was
        return exit_status(e.code)
    finally:
        if sys.stdout is watched:
            sys.stdout = watched.stream


def _run(main, user_error, watched: WatchedStdout) -> None:
    def fail(message: str, status: int) -> None:
        settle_stdout()
        print(f"error: {one_line(message)}", file=sys.stderr)
        sys.exit(status)

    try:
        status = main()
        stdout_error = settle_stdout()  # what is still buffered, written now
        if isinstance(stdout_error, BrokenPipeError):
            sys.exit(1)
        if stdout_error is not None:
            fail(f"<stdout>: cannot write: {stdout_error.strerror or stdout_error}", 2)
    except KeyboardInterrupt:
        settle_stdout()
        print(interrupt_message(), file=sys.stderr)
        sys.exit(130)
    except OSError as e:  # stdout written directly (print) on a full device; else a bug
        if watched.error is not e:
            raise
        settle_stdout()
        if isinstance(e, BrokenPipeError):
            sys.exit(1)
        fail(f"<stdout>: cannot write: {e.strerror or e}", 2)
    except Exception as e:
        explained = user_error(e)
        if explained is None:
            raise
        fail(*explained)
    # A command line may catch a Ctrl-C itself and return 130 (typer does): say which
    # outputs, if any, were put in place before the signal
    if status == 130:
        print(interrupt_message(), file=sys.stderr)
    sys.exit(status if isinstance(status, int) else 0)


# --- commands grpoctl starts -------------------------------------------------------


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL every process of proc's group (proc leads it), then reap proc."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        proc.wait()


def run_command(command: str, stdin) -> tuple[int, bytes, bytes]:
    """Run a user's shell command with `stdin` (a file); return (status, stdout, stderr).

    The command gets its own process group (a new session), and the group is killed
    however this ends: the command done (a grandchild it left running in the
    background), an error, Ctrl-C or SIGTERM (KeyboardInterrupt). So nothing it
    started outlives the grpoctl command.
    """
    proc = subprocess.Popen(command, shell=True, stdin=stdin, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        while True:
            try:
                out, err = proc.communicate(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                # The shell ended, but what it left in the background keeps the pipes
                # open (communicate would wait for it): kill it, then read what is left.
                if proc.poll() is not None:
                    _kill_group(proc)
    finally:
        _kill_group(proc)
    return proc.returncode, out, err
