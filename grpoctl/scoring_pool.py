"""A small process pool that gives every item its own time limit.

Why not multiprocessing.Pool: a task stuck in C code (sympy on a pathological
answer) can neither be interrupted nor abandoned there. Here each worker is a
forked process (cheap to start, and it inherits already-imported modules and the
function to run, so nothing but the items is pickled). Items go out in chunks and
come back one by one, so the parent always knows which item a worker is on.

Two limits per item:
  soft  `timeout` seconds: SIGALRM in the worker raises ItemTimeout inside the item;
        the worker carries on with the next one.
  hard  `timeout + HARD_GRACE_S`: the parent SIGKILLs a worker that has not answered
        (C code ignores signals until it returns), counts the item as timed out,
        re-queues the rest of its chunk, and forks a replacement.
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
HARD_GRACE_S = 1.0  # how long past the soft limit before a silent worker is killed


@dataclass
class Outcome:
    """What happened to one item."""

    status: str  # OK | TIMEOUT | ERROR
    value: Any = None  # func's return value when status is OK
    message: str = ""  # what went wrong otherwise


class ItemTimeout(BaseException):
    """Raised in a worker by SIGALRM. A BaseException, so `except Exception` in the
    library being timed (math-verify, sympy) does not swallow it."""


def _raise_timeout(signum, frame):
    raise ItemTimeout()


def _run_one(func: Callable, item: Any, timeout: float) -> tuple[str, Any, str]:
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            return OK, func(item), ""
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except ItemTimeout:
        return TIMEOUT, None, f"took longer than {timeout:g} s"
    except MemoryError:
        return ERROR, None, "ran out of memory"
    except RecursionError:
        return ERROR, None, "nested too deeply"
    except Exception as e:  # a library error on one item must not stop the others
        return ERROR, None, f"{type(e).__name__}: {str(e)[:200]}"


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


def _worker(conn, func: Callable, timeout: float, memory_mb: int | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _stdout_to_stderr()
    signal.signal(signal.SIGALRM, _raise_timeout)
    _cap_memory(memory_mb)
    try:
        while True:
            chunk = conn.recv()
            if chunk is None:
                return
            for index, item in chunk:
                conn.send((index, *_run_one(func, item, timeout)))
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        return  # the parent went away
    finally:
        conn.close()


class _Slot:
    """One worker process and the chunk it is working through."""

    def __init__(self, ctx, func, timeout, memory_mb):
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child_conn, func, timeout, memory_mb),
                                daemon=True)
        self.proc.start()
        child_conn.close()
        self.chunk: list[tuple[int, Any]] = []
        self.pos = 0  # index in chunk of the item being worked on
        self.since = 0.0  # when that item started (chunk sent, or previous result came back)

    def give(self, chunk):
        self.chunk, self.pos, self.since = chunk, 0, time.monotonic()
        self.conn.send(chunk)

    def kill(self):
        self.proc.kill()
        self.proc.join()
        self.conn.close()


def default_workers() -> int:
    """All cores: os.cpu_count() (1 if unknown)."""
    return os.cpu_count() or 1


def run_pool(func: Callable[[Any], Any], items: Sequence[Any], *, workers: int | None = None,
             timeout: float = 2.0, chunk_size: int | None = None, memory_mb: int | None = 2048,
             on_result: Callable[[int, Outcome], None] | None = None) -> list[Outcome]:
    """Run func(item) for every item in forked worker processes, each item time-limited.

    workers: processes (default os.cpu_count(); never more than there are chunks).
    timeout: soft per-item limit in seconds; the hard kill comes HARD_GRACE_S later.
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
    workers = default_workers() if workers is None else workers
    if workers == 0:
        return _run_in_process(func, items, timeout, on_result)
    chunk_size = chunk_size or max(1, min(32, -(-n // (workers * 4))))
    pending = deque([(i, items[i]) for i in range(start, min(start + chunk_size, n))]
                    for start in range(0, n, chunk_size))
    ctx = multiprocessing.get_context("fork")
    hard_limit = timeout + HARD_GRACE_S
    slots = [_Slot(ctx, func, timeout, memory_mb) for _ in range(min(workers, len(pending)))]
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
        slots[slot_index] = _Slot(ctx, func, timeout, memory_mb)

    try:
        while done < n:
            for slot in slots:
                if not slot.chunk and pending:
                    slot.give(pending.popleft())
            busy = [s for s in slots if s.chunk]
            wait_s = max(0.0, min(s.since for s in busy) + hard_limit - time.monotonic())
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
                slot.since = time.monotonic()
                if slot.pos == len(slot.chunk):
                    slot.chunk = []
            now = time.monotonic()
            for k, slot in enumerate(slots):
                if slot.chunk and now - slot.since > hard_limit:
                    replace(k, Outcome(TIMEOUT,
                                       message=f"stuck for {hard_limit:g} s; worker killed"))
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


def _run_in_process(func, items, timeout, on_result) -> list[Outcome]:
    """workers=0: no processes (for debugging). The soft limit works only on the main
    thread (SIGALRM), and there is no hard limit: an item stuck in C code hangs the caller."""
    import threading

    on_main_thread = threading.current_thread() is threading.main_thread()
    outcomes = []
    if on_main_thread:
        previous = signal.signal(signal.SIGALRM, _raise_timeout)
    try:
        for index, item in enumerate(items):
            if on_main_thread:
                status, value, message = _run_one(func, item, timeout)
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
            signal.signal(signal.SIGALRM, previous)
    return outcomes
