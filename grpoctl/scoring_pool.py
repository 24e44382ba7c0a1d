"""A small process pool that gives every item its own time limit, counted in CPU time.

Why not multiprocessing.Pool: a task stuck in C code (sympy on a pathological
answer) can neither be interrupted nor abandoned there. Here each worker is a
forked process (cheap to start, and it inherits already-imported modules and the
function to run, so nothing but the items is pickled). Items go out in chunks and
come back one by one, so the parent always knows which item a worker is on.

The limit counts the CPU time the worker spends on the item, not wall-clock time: a
machine that is busy with other work (a training run, other scorers: load 4 on 2
cores) slows an item down in wall time, but not in the CPU time it needs, so the
same item gets the same verdict on a quiet machine and a loaded one, and the same
rollouts the same rewards. Limits per item:
  soft  `timeout` CPU seconds: the worker's ITIMER_PROF (process CPU time) sends
        SIGPROF, which raises ItemTimeout inside the item; the worker carries on
        with the next one.
  hard  `timeout + HARD_GRACE_S` CPU seconds: the parent reads the worker's CPU time
        (/proc/PID/stat) and SIGKILLs a worker past it (C code ignores signals until
        it returns), counts the item as timed out, re-queues the rest of its chunk,
        and forks a replacement.
  wall  `wall_limit(timeout)` seconds (30 x timeout, at least 10 s): an item that
        waits instead of computing (sleep, I/O, a lock) uses no CPU time; SIGALRM
        interrupts it there, and the parent kills a worker silent for that long plus
        HARD_GRACE_S. Generous on purpose: only a stuck item reaches it.
Where /proc is missing (not Linux) the hard limit falls back to wall time.
A worker that dies (segfault, out-of-memory kill) is replaced the same way; its
current item counts as an error. Each worker's address space is capped at its
size when forked plus `memory_mb`, so a runaway item raises MemoryError instead of
taking the machine down.

`run_pool(func, items, ...)` returns one Outcome per item, in item order.
"""

from __future__ import annotations

import os
import resource
import signal
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

OK, TIMEOUT, ERROR = "ok", "timeout", "error"
HARD_GRACE_S = 1.0  # how long past the soft limit (CPU seconds) before a worker is killed
WALL_FACTOR = 30  # the wall-clock backstop: this many times the CPU limit ...
WALL_MIN_S = 10.0  # ... and at least this many seconds


def wall_limit(timeout: float) -> float:
    """The wall-clock backstop for a per-item CPU limit of `timeout` seconds."""
    return max(WALL_FACTOR * timeout, WALL_MIN_S)


@dataclass
class Outcome:
    """What happened to one item."""

    status: str  # OK | TIMEOUT | ERROR
    value: Any = None  # func's return value when status is OK
    message: str = ""  # what went wrong otherwise


class ItemTimeout(BaseException):
    """Raised in a worker by SIGPROF (CPU limit) or SIGALRM (wall-clock backstop). A
    BaseException, so `except Exception` in the library being timed (math-verify,
    sympy) does not swallow it."""


def _raise_timeout(signum, frame):
    raise ItemTimeout(signum)


def _run_one(func: Callable, item: Any, timeout: float, wall: float) -> tuple[str, Any, str]:
    try:
        # ITIMER_PROF counts this process's CPU time (user + system), ITIMER_REAL wall time.
        signal.setitimer(signal.ITIMER_PROF, timeout)
        signal.setitimer(signal.ITIMER_REAL, wall)
        try:
            return OK, func(item), ""
        finally:
            signal.setitimer(signal.ITIMER_PROF, 0)
            signal.setitimer(signal.ITIMER_REAL, 0)
    except ItemTimeout as e:
        if e.args and e.args[0] == signal.SIGALRM:
            return TIMEOUT, None, f"waited longer than {wall:g} s without finishing"
        return TIMEOUT, None, f"used more than {timeout:g} s of CPU time"
    except MemoryError:
        return ERROR, None, "ran out of memory"
    except RecursionError:
        return ERROR, None, "nested too deeply"
    except Exception as e:  # a library error on one item must not stop the others
        return ERROR, None, f"{type(e).__name__}: {str(e)[:200]}"


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) process `pid` has used, from /proc/PID/stat; None where
    it cannot be read (not Linux, or the process is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        # Fields after the command name (which may hold spaces and parentheses):
        # state is field 3, utime and stime fields 14 and 15 (1-based).
        fields = stat[stat.rindex(b")") + 2:].split()
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    except (OSError, ValueError, IndexError):
        return None


def _cap_memory(memory_mb: int | None) -> None:
    if not memory_mb:
        return
    try:
        with open("/proc/self/statm") as f:  # Linux: virtual size in pages, first field
            current = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        limit = current + memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
    except (OSError, ValueError):  # not Linux, or a hard limit already lower
        pass


def _stdout_to_stderr() -> None:
    """In a worker, stdout is the parent's record stream (`grpoctl score | ...`): whatever
    the scored code prints, from Python or C, goes to stderr instead."""
    import sys

    try:
        os.dup2(2, 1)
    except OSError:
        pass
    sys.stdout = sys.stderr


def _worker(conn, func: Callable, timeout: float, wall: float, memory_mb: int | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    for name in ("SIGTERM", "SIGHUP"):  # the parent's handlers (process.py) are not for here
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_DFL)
    _stdout_to_stderr()
    signal.signal(signal.SIGPROF, _raise_timeout)
    signal.signal(signal.SIGALRM, _raise_timeout)
    _cap_memory(memory_mb)
    try:
        while True:
            chunk = conn.recv()
            if chunk is None:
                return
            for index, item in chunk:
                conn.send((index, *_run_one(func, item, timeout, wall)))
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        return  # the parent went away
    finally:
        conn.close()


class _Slot:
    """One worker process and the chunk it is working through."""

    def __init__(self, ctx, func, timeout, wall, memory_mb):
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child_conn, func, timeout, wall, memory_mb),
                                daemon=True)
        self.proc.start()
        child_conn.close()
        self.chunk: list[tuple[int, Any]] = []
        self.pos = 0  # index in chunk of the item being worked on
        self.since = 0.0  # when that item started (chunk sent, or previous result came back)
        self.cpu_since: float | None = None  # the worker's CPU time then (None: no /proc)

    def start_item(self) -> None:
        self.since = time.monotonic()
        self.cpu_since = process_cpu_seconds(self.proc.pid)

    def give(self, chunk):
        self.chunk, self.pos = chunk, 0
        self.start_item()
        self.conn.send(chunk)

    def cpu_used(self, now: float) -> float:
        """CPU seconds spent on the current item (wall seconds where /proc is missing)."""
        if self.cpu_since is not None:
            cpu = process_cpu_seconds(self.proc.pid)
            if cpu is not None:
                return cpu - self.cpu_since
        return now - self.since

    def kill(self):
        self.proc.kill()
        self.proc.join()
        self.conn.close()


def default_workers() -> int:
    """All cores: os.cpu_count() (1 if unknown)."""
    return os.cpu_count() or 1


def run_pool(func: Callable[[Any], Any], items: Sequence[Any], *, workers: int | None = None,
             timeout: float = 2.0, chunk_size: int | None = None, memory_mb: int | None = 2048,
             on_result: Callable[[int, Outcome], None] | None = None,
             wall: float | None = None) -> list[Outcome]:
    """Run func(item) for every item in forked worker processes, each item time-limited.

    workers: processes (default os.cpu_count(); never more than there are chunks).
    timeout: soft per-item limit in CPU seconds; the hard kill comes HARD_GRACE_S CPU
        seconds later (see the module docstring).
    wall: the wall-clock backstop per item, for an item that waits rather than computes
        (default wall_limit(timeout)).
    chunk_size: items sent per message (default: about 4 chunks per worker, at most 32,
        so workers stay busy to the end while messages stay few).
    memory_mb: extra address space each worker may use beyond its forked size (None: no cap).
    on_result(index, outcome): called in the parent as each item finishes (progress, logs).
    func's return values must be picklable; func itself is inherited by fork, not pickled.
    """
    import multiprocessing
    import multiprocessing.connection

    n = len(items)
    outcomes: list[Outcome | None] = [None] * n
    if n == 0:
        return []
    wall = wall_limit(timeout) if wall is None else wall
    workers = default_workers() if workers is None else workers
    if workers == 0:
        return _run_in_process(func, items, timeout, wall, on_result)
    chunk_size = chunk_size or max(1, min(32, -(-n // (workers * 4))))
    pending = deque([(i, items[i]) for i in range(start, min(start + chunk_size, n))]
                    for start in range(0, n, chunk_size))
    ctx = multiprocessing.get_context("fork")
    hard_cpu, hard_wall = timeout + HARD_GRACE_S, wall + HARD_GRACE_S
    slots = [_Slot(ctx, func, timeout, wall, memory_mb)
             for _ in range(min(workers, len(pending)))]
    done = 0

    def finish(index: int, outcome: Outcome) -> None:
        nonlocal done
        outcomes[index] = outcome
        done += 1
        if on_result:
            on_result(index, outcome)

    def replace(slot_index: int, outcome: Outcome) -> None:
        """The current item of a slot is lost: record it, re-queue the rest, fork anew."""
        slot = slots[slot_index]
        slot.kill()
        finish(slot.chunk[slot.pos][0], outcome)
        rest = slot.chunk[slot.pos + 1:]
        if rest:
            pending.appendleft(rest)
        slots[slot_index] = _Slot(ctx, func, timeout, wall, memory_mb)

    def next_check(slot: _Slot, now: float) -> float:
        """Seconds until this slot's item could reach a hard limit: a single-threaded
        worker gains at most one CPU second per second, so no sooner than its CPU
        budget left (checked at least every 0.5 s, for threads)."""
        cpu_left = hard_cpu - slot.cpu_used(now)
        wall_left = slot.since + hard_wall - now
        return min(max(cpu_left, 0.02), wall_left, 0.5)

    try:
        while done < n:
            for slot in slots:
                if not slot.chunk and pending:
                    slot.give(pending.popleft())
            busy = [s for s in slots if s.chunk]
            now = time.monotonic()
            wait_s = max(0.0, min(next_check(s, now) for s in busy))
            ready = multiprocessing.connection.wait([s.conn for s in busy], timeout=wait_s)
            for k, slot in enumerate(slots):
                if slot.conn not in ready:
                    continue
                try:
                    index, status, value, message = slot.conn.recv()
                except (EOFError, OSError):
                    slot.proc.join(timeout=1.0)
                    code = slot.proc.exitcode
                    replace(k, Outcome(ERROR, message=f"worker died (exit code {code})"))
                    continue
                finish(index, Outcome(status, value, message))
                slot.pos += 1
                slot.start_item()
                if slot.pos == len(slot.chunk):
                    slot.chunk = []
            now = time.monotonic()
            for k, slot in enumerate(slots):
                if not slot.chunk:
                    continue
                if slot.cpu_used(now) > hard_cpu:
                    replace(k, Outcome(TIMEOUT, message=f"used {hard_cpu:g} s of CPU time "
                                                        f"without answering; worker killed"))
                elif now - slot.since > hard_wall:
                    replace(k, Outcome(TIMEOUT, message=f"stuck for {hard_wall:g} s; "
                                                        f"worker killed"))
    finally:  # idle workers are told to stop; busy ones (only after an error here) are killed
        for slot in slots:
            try:
                slot.conn.send(None)
            except OSError:
                pass
        for slot in slots:
            if slot.chunk:
                slot.proc.kill()
            slot.proc.join(timeout=1.0)
            if slot.proc.is_alive():
                slot.proc.kill()
                slot.proc.join()
            slot.conn.close()
    return outcomes  # type: ignore[return-value]


def _run_in_process(func, items, timeout, wall, on_result) -> list[Outcome]:
    """workers=0: no processes (for debugging). The soft limits work only on the main
    thread (signals), and there is no hard limit: an item stuck in C code hangs the
    caller. The CPU limit counts this whole process's CPU time, other threads included."""
    import threading

    on_main_thread = threading.current_thread() is threading.main_thread()
    outcomes = []
    if on_main_thread:
        previous = {sig: signal.signal(sig, _raise_timeout)
                    for sig in (signal.SIGPROF, signal.SIGALRM)}
    try:
        for index, item in enumerate(items):
            if on_main_thread:
                status, value, message = _run_one(func, item, timeout, wall)
            else:
                try:
                    status, value, message = OK, func(item), ""
                except Exception as e:
                    status, value, message = ERROR, None, f"{type(e).__name__}: {str(e)[:200]}"
            outcomes.append(Outcome(status, value, message))
            if on_result:
                on_result(index, outcomes[-1])
    finally:
        if on_main_thread:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return outcomes
