"""Crash safety: a `grpoctl loop` killed with SIGKILL again and again ends, after
`--resume`, with exactly the weights, optimizer state, metrics and evaluations of a
run that was never interrupted.

How the kills are placed. Each attempt starts `grpoctl loop` (fresh while the run
has no config.json, else with --resume) and kills it at a moment drawn from a seeded
random generator:
  - "startup" kills come a random 0-0.6 s after the process starts (loading the
    model, replaying updates from the last checkpoint, evaluating);
  - the other kills wait until the run's next stage file appears (a step's
    rollouts/scored/advantages/done file, or a checkpoint), then a random 0-30 ms
    more, so they land inside the following stage, mid-write included.
Two attempts are ended with SIGINT (Ctrl-C) instead: they must exit 130 with a
message that says how to resume.

Why a launcher. Every restart would pay the torch import (3-4 s here). The
launcher imports torch, transformers and grpoctl once, then forks one child per
attempt that runs the CLI's own `main()` with the attempt's argv: a real process,
killed by a real signal, minus the import time. The uninterrupted reference run is
an ordinary `python -m grpoctl` subprocess.

Both runs use OMP_NUM_THREADS=1: on a 2-core machine shared with other work,
torch's thread pool makes this tiny model's steps 30x slower, and equal thread
counts keep float reductions in the same order.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

STEPS, SAVE_EVERY = 14, 2  # enough stage files that 20+ kills land before the end
ARGS = ["-G", "2", "--prompts-per-step", "4", "--steps", str(STEPS),
        "--save-every", str(SAVE_EVERY), "--keep-last", "2", "--max-new-tokens", "8",
        "--lr", "1e-3", "--seed", "1",
        # random text: rewards differ, so the weights move
        "--reward", "math", "--reward", "format:[a-z]=0.5",
        "--eval-prompts", "arith:test", "--eval-limit", "2", "--eval-samples", "2",
        "--eval-every", "3", "--quiet"]
MIN_KILLS = 20
SEED = 20251125
TIMING_KEYS = ("_s", "seconds")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

LAUNCHER = r'''
import json, os, signal, sys, time
from grpoctl import checkpoint, cli, display, evaluate, loop, models, rewards, rollout, update
# The slow imports, paid once: transformers imports most of itself lazily, on first
# use, so load the model once; and math-verify with its sympy.
models.load_policy(sys.argv[1]), models.load_tokenizer(sys.argv[1])
rewards._load_math_verify()

def reap(pid, deadline, until_file=None):
    """Wait for the child to exit (its wait status) or, when given, for until_file (None)."""
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if until_file and os.path.exists(until_file):
            return None
        time.sleep(0.001)
    return None

for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:  # the child: `grpoctl ARGV`, output appended to the log
        log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        sys.argv = ["grpoctl", *job["argv"]]
        code = 0
        try:
            cli.main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    start = time.monotonic()
    status = None
    if job["after_file"]:
        status = reap(pid, start + 120, until_file=job["after_file"])
    if status is None:
        status = reap(pid, time.monotonic() + job["delay"])
    signalled = status is None
    if signalled:
        os.kill(pid, job["signal"])
        status = os.waitpid(pid, 0)[1]
        # The child may have exited between the last poll and the kill: the signal then
        # hit a zombie, and the status says how the child really ended.
        signalled = not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0)
    print(json.dumps({"signalled": signalled, "exit": os.waitstatus_to_exitcode(status),
                      "seconds": time.monotonic() - start}), flush=True)
'''


def stage_files(run: Path) -> list[tuple[str, Path]]:
    """(stage that writes it, file) still to come, in the order a run writes them."""
    files = []
    for step in range(1, STEPS + 1):
        d = run / f"step-{step:06d}"
        if (d / "done").exists():
            continue  # finished (and its checkpoint may be pruned by --keep-last)
        files += [("rollout", d / "rollouts.jsonl"), ("score", d / "scored.jsonl"),
                  ("advantage", d / "advantages.jsonl")]
        if step % SAVE_EVERY == 0:
            files.append(("update+checkpoint",
                          run / "checkpoints" / f"step-{step:06d}" / "trainer_state.json"))
        files.append(("update" if step % SAVE_EVERY else "done", d / "done"))
    return files


def stage_in_progress(run: Path) -> str:
    """The stage that writes the first file still missing: where the run was when killed."""
    missing = [stage for stage, path in stage_files(run) if not path.exists()]
    return missing[0] if missing else "final eval"


def without_timings(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.endswith(TIMING_KEYS)} for r in rows]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_tensors(a: Path, b: Path) -> None:
    expected, got = load_file(a), load_file(b)
    assert expected.keys() == got.keys(), a.name
    for name in expected:
        assert torch.equal(expected[name], got[name]), (a.name, name)


@pytest.fixture(scope="module")
def reference_run(tiny_model, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("reference") / "run"
    proc = subprocess.run([sys.executable, "-m", "grpoctl", "loop", "--model", str(tiny_model),
                           *ARGS, "--run-dir", str(run)], env=ENV, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    return run


def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(reference_run, tiny_model,
                                                                     tmp_path):
    run, log = tmp_path / "run", tmp_path / "attempts.log"
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(tiny_model)], env=ENV,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    rng = random.Random(SEED)
    kills, interrupts, where = 0, 0, Counter()

    def attempt(after_file: Path | None, delay: float, sig: int = signal.SIGKILL) -> dict:
        argv = ["loop", "--model", str(tiny_model), *ARGS, "--run-dir", str(run)]
        if (run / "config.json").exists():
            argv.append("--resume")
        job = {"argv": argv, "log": str(log), "after_file": str(after_file) if after_file else None,
               "delay": delay, "signal": int(sig)}
        launcher.stdin.write(json.dumps(job) + "\n")
        launcher.stdin.flush()
        return json.loads(launcher.stdout.readline())

    try:
        for i in range(60):
            if kills >= MIN_KILLS + 3:
                break
            upcoming = [path for _, path in stage_files(run) if not path.exists()]
            if not upcoming:
                break
            sig = signal.SIGINT if i in (5, 13) else signal.SIGKILL
            startup = rng.random() < 0.3
            if startup:  # kill during startup: model load, replay, evaluation
                result = attempt(None, rng.uniform(0.0, 0.6), sig)
            else:  # kill just after the next stage file appears
                result = attempt(upcoming[0], rng.uniform(0.0, 0.03), sig)
            if not result["signalled"]:
                assert result["exit"] == 0, log.read_text()[-3000:]
                break  # the run finished before the kill
            if sig == signal.SIGINT:
                assert result["exit"] == 130, log.read_text()[-3000:]
                assert "--resume" in log.read_text().strip().splitlines()[-1]
                interrupts += 1
            else:
                assert result["exit"] == -signal.SIGKILL
                kills += 1
                where["startup" if startup else stage_in_progress(run)] += 1

        final = attempt(None, 300.0)  # no kill: --resume to the end
        assert not final["signalled"] and final["exit"] == 0, log.read_text()[-3000:]
    finally:
        launcher.stdin.close()
        launcher.wait(timeout=60)

    print(f"\n{kills} SIGKILLs and {interrupts} SIGINTs survived; killed during: {dict(where)}")
    assert kills >= MIN_KILLS and interrupts == 2
    assert len(where) >= 3, where  # the kills fell in several different stages

    last = f"checkpoints/step-{STEPS:06d}"
    assert_same_tensors(reference_run / last / "model.safetensors",
                        run / last / "model.safetensors")
    assert_same_tensors(reference_run / last / "optimizer.safetensors",
                        run / last / "optimizer.safetensors")
    assert without_timings(read_jsonl(run / "metrics.jsonl")) == \
        without_timings(read_jsonl(reference_run / "metrics.jsonl"))
    assert without_timings(read_jsonl(run / "eval.jsonl")) == \
        without_timings(read_jsonl(reference_run / "eval.jsonl"))
    for step in range(1, STEPS + 1):
        for name in ("rollouts.jsonl", "scored.jsonl", "advantages.jsonl"):
            path = f"step-{step:06d}/{name}"
            assert (run / path).read_bytes() == (reference_run / path).read_bytes(), path
    # The same files, by name: only complete checkpoints, and no temporary file that a
    # killed write left (--resume deletes them).
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == \
        sorted(p.relative_to(reference_run) for p in reference_run.rglob("*"))
