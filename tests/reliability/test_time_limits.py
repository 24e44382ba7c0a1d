"""Scoring time limits count CPU time, so rewards do not depend on the machine's load.

The per-item limit (`score --timeout`, default 2 s) used to be wall-clock time: on a
loaded machine (load 4 on 2 cores) an answer that a quiet machine scores in 1 s took
over 2 s and scored 0 ("math reward timed out"), so the same rollouts got different
rewards, and a run different weights, depending on what else the machine was doing.
Now the limit is the CPU time the worker spends on the item (scoring_pool), with a
wall-clock backstop of 30 x the limit (at least 10 s) for an item that waits instead
of computing.

These tests do not depend on the machine's speed: a "quick" item uses a fixed share of
the limit in CPU time (measured by itself with time.process_time), a "slow" one a large
multiple of it, and the machine is loaded on purpose by busy-loop processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from grpoctl import scoring_pool

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@contextlib.contextmanager
def busy_machine(processes: int = 3):
    """Load the CPUs with `processes` busy loops (ended, each by its own pid, on exit)."""
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
               for _ in range(processes)]
    try:
        time.sleep(0.2)  # let them start spinning
        yield
    finally:
        for p in burners:
            p.kill()
        for p in burners:
            p.wait()


def burn_cpu(seconds: float) -> float:
    """Compute until this process has used `seconds` more CPU time; the wall time taken."""
    start_wall, start_cpu = time.monotonic(), time.process_time()
    x = 0
    while time.process_time() - start_cpu < seconds:
        x += 1
    return time.monotonic() - start_wall


TIMEOUT = 0.2  # CPU seconds per item


def quick(item: int) -> tuple[int, float]:
    """Half the limit in CPU time: never over it, however slow its wall time."""
    return item, burn_cpu(TIMEOUT / 2)


def test_a_quick_item_is_not_timed_out_on_a_loaded_machine():
    """Each item needs half the limit in CPU time. With three busy loops and two workers
    on this machine each item takes longer than the limit in wall time (it did, measured:
    a wall-clock limit timed out most of them); counted in CPU time none is over."""
    with busy_machine(3):
        outcomes = scoring_pool.run_pool(quick, list(range(8)), workers=2, timeout=TIMEOUT,
                                         chunk_size=1)
    assert [o.status for o in outcomes] == ["ok"] * 8, [o.message for o in outcomes]
    assert [o.value[0] for o in outcomes] == list(range(8))
    walls = sorted(o.value[1] for o in outcomes)
    print(f"wall seconds per item (CPU limit {TIMEOUT} s): {[round(w, 2) for w in walls]}")


def forever(item: int):
    """Computes 50 x the limit (then returns: a fallback, never reached with the limit)."""
    burn_cpu(50 * TIMEOUT)
    return item


def test_a_cpu_burner_is_stopped_at_the_cpu_limit():
    """An item computing far past the limit is stopped in Python (SIGPROF, soft), and the
    worker goes on with the next item."""
    outcomes = scoring_pool.run_pool(lambda x: forever(x) if x == 1 else x, [0, 1, 2],
                                     workers=1, timeout=TIMEOUT)
    assert [(o.status, o.value) for o in outcomes] == [("ok", 0), ("timeout", None), ("ok", 2)]
    assert outcomes[1].message == f"used more than {TIMEOUT:g} s of CPU time"


def computes_deaf(item: int):
    """Computes with the limit's signals blocked, as C code (sympy, a regex) does."""
    if item == 1:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGPROF, signal.SIGALRM})
        while True:
            pass
    return item


def test_a_deaf_cpu_burner_is_killed_by_its_cpu_time_under_load():
    """The parent reads the worker's CPU time (/proc) and kills it past limit + grace;
    the rest of its chunk is scored by a new worker. Under load this takes longer in
    wall time, but the verdict and message are the same."""
    with busy_machine(2):
        outcomes = scoring_pool.run_pool(computes_deaf, [0, 1, 2, 3], workers=1,
                                         timeout=TIMEOUT, chunk_size=4)
    assert [(o.status, o.value) for o in outcomes] == \
        [("ok", 0), ("timeout", None), ("ok", 2), ("ok", 3)]
    hard = TIMEOUT + scoring_pool.HARD_GRACE_S
    assert outcomes[1].message == f"used {hard:g} s of CPU time without answering; worker killed"


def sleeps(item: int):
    """Waits (no CPU time): 1 s for item 1, for ever for item 2."""
    if item == 1:
        time.sleep(1.0)
    if item == 2:
        time.sleep(3600)
    if item == 3:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGPROF, signal.SIGALRM})
        time.sleep(3600)
    return item


def test_waiting_is_not_computing_and_the_wall_backstop_holds():
    """An item that sleeps 1 s, five times the CPU limit, is not timed out: it used no CPU.
    One that sleeps for ever is stopped by the wall-clock backstop (here 2 s, by default
    30 x the limit and at least 10 s): softly by SIGALRM, or by a kill when it blocks the
    signal; the items after it are still scored."""
    assert scoring_pool.wall_limit(2.0) == 60 and scoring_pool.wall_limit(0.01) == 10
    outcomes = scoring_pool.run_pool(sleeps, [0, 1, 2, 3, 4], workers=1, timeout=TIMEOUT,
                                     wall=2.0, chunk_size=5)
    assert [(o.status, o.value) for o in outcomes] == \
        [("ok", 0), ("ok", 1), ("timeout", None), ("timeout", None), ("ok", 4)]
    assert outcomes[2].message == "waited longer than 2 s without finishing"
    assert outcomes[3].message == f"stuck for {2 + scoring_pool.HARD_GRACE_S:g} s; worker killed"


def test_the_in_process_mode_counts_cpu_time_too():
    """--workers 0 (debugging): the soft CPU limit, in the calling process, whose signal
    handlers are put back afterwards."""
    before = signal.getsignal(signal.SIGPROF), signal.getsignal(signal.SIGALRM)
    outcomes = scoring_pool.run_pool(lambda x: forever(x) if x == 1 else x, [0, 1, 2],
                                     workers=0, timeout=TIMEOUT)
    assert [(o.status, o.value) for o in outcomes] == [("ok", 0), ("timeout", None), ("ok", 2)]
    assert outcomes[1].message == f"used more than {TIMEOUT:g} s of CPU time"
    assert (signal.getsignal(signal.SIGPROF), signal.getsignal(signal.SIGALRM)) == before


@pytest.mark.parametrize("load", [0, 3], ids=["quiet", "loaded"])
def test_score_gives_the_same_rewards_quiet_and_loaded(tmp_path, load):
    """`grpoctl score` as a real process on answers math-verify has to judge (not the
    plain-number fast path), with a short --timeout: the same rewards and no timeout
    whether or not three busy loops load the machine."""
    # Symbolic golds: a numeric gold is decided by exact arithmetic, never by math-verify.
    pairs = [(r"\frac{x}{2}", "0.5x"), (r"\sqrt{2}", r"\frac{2}{\sqrt{2}}"), ("x+1", "1+x"),
             (r"(x+1)^2", "x^2+2x+1"), (r"\frac{3}{4}x", "0.7x"), (r"2\pi", r"\pi+\pi"),
             (r"\{1,2\}", r"\{2,1\}")]
    records = [{"prompt_id": f"p{i}", "sample": 0, "completion": f"so \\boxed{{{pred}}}",
                "answer": gold} for i, (pred, gold) in enumerate(pairs)]
    src = tmp_path / "r.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    with busy_machine(load) if load else contextlib.nullcontext():
        proc = subprocess.run([sys.executable, "-m", "grpoctl", "score", str(src), "--timeout",
                               "0.5", "--workers", "2", "-q"], capture_output=True, env=ENV,
                              timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert "timed out" not in proc.stderr.decode(), proc.stderr.decode()
    rewards = [json.loads(line)["reward"] for line in proc.stdout.decode().splitlines()]
    assert rewards == [1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0]
