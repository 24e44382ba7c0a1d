"""Crash safety: a `grpoctl loop` killed with SIGKILL again and again ends, after
`--resume`, with exactly the files, weights, optimizer state, metrics and evaluations
of a run that was never interrupted.

How the kills are placed. Not by the clock: a kill placed "0.3 s after start" or
"20 ms after a file appears" lands in another stage, or after the end of the run, on
a faster or slower machine (a fast 2-core machine once finished the run after 7 of
the 20 kills this test needs). Each attempt's process kills itself at an *event* of
its own run, chosen by a seeded random generator before the attempt starts:

  - Stage events, counted from the start of the attempt: the start of a call to
    `prepare_run_dir`, `Loop.load`, and the stage methods `rollout_stage`,
    `score_stage`, `advantage_stage`, `update_stage` (the replayed updates of a
    resume too), `save` (the checkpoint and the pruning of old ones) and `evaluate`.
  - Low-level events inside a stage: a file operation (`os.chmod` just after a
    temporary file or directory is made, `os.fsync`, `os.replace`, `os.rename`,
    `os.unlink`, `os.rmdir`: the steps of every atomic write, of the checkpoint's
    directory swap, of pruning, of the `done` file and the metrics line), a forward
    pass of the model (sampling, update, evaluation), an optimizer step, a reward call.

A plan is (signal, mode, event). The event is either the n-th stage event of the
attempt (a quarter of the attempts: startup, replays, catch-up evaluations) or the
n-th after the first that does new work (a stage whose file is missing, the step's
update, checkpoint or evaluation), so that each attempt moves the run on and the
kills reach every step. Mode "start" kills at the start of that event; "inside" at
the k-th low-level event after it (k seeded, spread over the events such a stage
has: see SPAN), or at the start of the next stage event if the stage has fewer;
"timer" (a secondary kind, not counted towards the minimum) starts a seeded 0-40 ms
threading.Timer there, so the kill falls wherever the run then is, inside C code
included, and at the start of the next stage event at the latest.

Why every planned kill lands. Before each attempt the test counts the stage events
the attempt is certain to reach (certain_events): load, then for each step not yet
done its four stages, its checkpoint and its evaluation when due (the last step has
both), or only the final evaluation when that is all that is left. The plan's event
is capped to fall within that count (next_plan). Finishing the run takes more
events than that, so no planned attempt can end it: the number of kills is the same
on a fast machine and a slow one (a machine can change where a timer falls, and so
what later kills hit, never how many there are). Two attempts send SIGINT (Ctrl-C)
instead: they must exit 130 with a message that says how to resume. Each kill's
place is printed (pytest -s): stage, step, event.

This is fault injection into real processes, not a mock: the real loop, model,
math-verify and file system run, and SIGKILL gives the process no chance to clean
up. The wrappers only count calls and pass them through.

Why a launcher. Every restart would pay the torch import (3-4 s here). The
launcher imports torch, transformers and grpoctl once, then forks one child per
attempt that installs the kill plan and runs the CLI's own `main()` with the
attempt's argv. The uninterrupted reference run is an ordinary `python -m grpoctl`
subprocess, with no wrapper in it, run alongside the attempts.

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

import torch
from safetensors.torch import load_file

STEPS, SAVE_EVERY, EVAL_EVERY = 8, 2, 3
ARGS = ["-G", "2", "--prompts-per-step", "4", "--steps", str(STEPS),
        "--save-every", str(SAVE_EVERY), "--keep-last", "2", "--max-new-tokens", "8",
        "--lr", "1e-3", "--seed", "1",
        # random text: rewards differ, so the weights move
        "--reward", "math", "--reward", "format:[a-z]=0.5",
        "--eval-limit", "2", "--eval-samples", "2",
        "--eval-every", str(EVAL_EVERY), "--quiet"]
MIN_KILLS = 20  # SIGKILLs at a chosen event (the timer kind not counted)
SIGINT_AT = (5, 13)  # attempts ended with Ctrl-C
SEED = 20251125
STARTUP, WORK = 4, 3  # how far into an attempt a kill's stage event may be: see next_plan
TIMING_KEYS = ("_s", "seconds")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

LAUNCHER = r'''
import importlib, json, os, signal, sys, threading, time
from grpoctl import cli, loop, models, rewards
for name in ("checkpoint", "display", "evaluate", "prompts", "rollout", "task", "update"):
    try:  # modules a run imports: paid once here, not in every child
        importlib.import_module("grpoctl." + name)
    except ImportError:
        pass
# The slow imports, paid once: transformers imports most of itself lazily, on first
# use, so load the model once; and math-verify with its sympy.
models.load_policy(sys.argv[1]), models.load_tokenizer(sys.argv[1])
rewards._load_math_verify()

# Low-level events per stage kind: an "inside" kill's k is spread over about this many
# (counted with the "trace" plan on this run: a checkpoint's files, the fsync of each
# and the swap, then the pruning and the step's done file; the forward passes of
# sampling; ... A stage that has fewer ends the plan at the next stage event).
SPAN = {"prepare": 2, "load": 6, "replay": 3, "rollout": 11, "score": 11, "advantage": 3,
        "update": 7, "checkpoint": 30, "eval": 9}


class Injector:
    """Counts the child's events and kills it with the planned signal at the planned one."""

    def __init__(self, plan, where):
        self.plan, self.where = plan, where
        self.pid = os.getpid()
        self.events = 0  # stage events so far
        # the event to kill at: plan["n"], or ("work") plan["n"] events after the first
        # that does new work (not a replay, a catch-up evaluation or a file read again)
        self.target = plan["n"] if plan["anchor"] == "start" else None
        self.kind = self.label = None  # the stage event in progress
        self.countdown = 0 if plan["mode"] == "trace" else None  # low-level events left before the kill ("inside")
        self.deadline = False  # kill at the next stage event (fallback of inside/timer)
        self.timer = None
        self.fired = False
        self.rolled_out = False
        self.lock = threading.Lock()

    def mine(self):  # not a forked scoring worker
        return not self.fired and os.getpid() == self.pid

    def stage(self, kind, label, output_exists=False):
        if not self.mine():
            return
        if kind == "rollout":
            self.rolled_out = True
        elif kind == "update" and not self.rolled_out:
            kind, label = "replay", label.replace("update", "replay")  # a finished step's update
        self.events += 1
        self.kind, self.label = kind, label
        if self.target is None and self.rolled_out and not output_exists and \
                self.plan["anchor"] in ("work", kind):
            self.target = self.events + self.plan["n"]  # the first new work (of that kind)
        if self.plan["mode"] == "trace":  # no kill: list the events (to set SPAN)
            return self.note({"stage": kind, "label": label, "n": self.events,
                              "new": self.target == self.events + self.plan["n"]})
        if self.deadline:
            return self.fire("start", fallback=True)
        if self.events != self.target:
            return
        mode = self.plan["mode"]
        if mode == "start":
            return self.fire("start")
        self.deadline = True
        if mode == "inside":
            self.countdown = 1 + int(self.plan["u"] * SPAN.get(kind, 4))
        else:
            self.timer = threading.Timer(self.plan["delay"], self.fire, ("timer",))
            self.timer.daemon = True
            self.timer.start()

    def low(self, what):
        if self.countdown is None or not self.mine():
            return
        if self.plan["mode"] == "trace":
            return self.note({"low": what() if callable(what) else what})
        self.countdown -= 1
        if self.countdown == 0:
            self.fire(what)

    def fire(self, point, fallback=False):
        with self.lock:
            if self.fired:
                return
            self.fired = True
        if callable(point):
            point = point()
        self.note({"stage": self.kind, "label": self.label, "point": point,
                   "mode": self.plan["mode"], "fallback": fallback, "n": self.events,
                   "target": self.target})
        os.kill(os.getpid(), self.plan["signal"])

    def note(self, record):
        record["t"] = round(time.monotonic() - STARTED, 3)
        fd = os.open(self.where, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.write(fd, (json.dumps(record) + "\n").encode())
        os.close(fd)


def fd_name(fd):
    try:
        return os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return str(fd)


def install(injector):
    """Wrap the stage methods and the low-level calls; each wrapper calls through."""
    outputs = {"rollout": "rollouts.jsonl", "score": "scored.jsonl",
               "advantage": "advantages.jsonl"}

    def stage_wrapper(fn, kind):
        def wrapper(*args, **kwargs):
            step = args[1] if len(args) > 1 and type(args[1]) is int else None
            label = kind if step is None else (f"load checkpoint {step}" if kind == "load"
                                               else f"{kind} step {step}")
            run = getattr(args[0], "run", None) if args else None
            exists = kind in outputs and isinstance(run, os.PathLike) and os.path.exists(
                os.path.join(run, f"step-{step:06d}", outputs[kind]))  # to be read again
            injector.stage(kind, label, exists)
            return fn(*args, **kwargs)
        return wrapper

    if hasattr(loop, "prepare_run_dir"):
        loop.prepare_run_dir = stage_wrapper(loop.prepare_run_dir, "prepare")
    for name, kind in (("load", "load"), ("rollout_stage", "rollout"), ("score_stage", "score"),
                       ("advantage_stage", "advantage"), ("update_stage", "update"),
                       ("save", "checkpoint"), ("evaluate", "eval")):
        setattr(loop.Loop, name, stage_wrapper(getattr(loop.Loop, name), kind))

    def low_wrapper(name, describe):
        real = getattr(os, name)
        def wrapper(*args, **kwargs):
            if injector.countdown is not None:
                injector.low(lambda: f"{name} {describe(args)}")
            return real(*args, **kwargs)
        setattr(os, name, wrapper)

    path_of = lambda args: os.path.basename(os.fspath(args[0])) if isinstance(
        args[0], (str, bytes, os.PathLike)) else fd_name(args[0])
    for name in ("chmod", "fsync", "replace", "rename", "unlink", "rmdir"):
        low_wrapper(name, path_of)
    if injector.plan["mode"] not in ("inside", "trace"):
        return
    import torch
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    def forward_hook(module, args):
        if type(module).__name__.endswith("ForCausalLM"):
            injector.low("forward")
    torch.nn.modules.module.register_module_forward_pre_hook(forward_hook)
    register_optimizer_step_pre_hook(
        lambda optimizer, args, kwargs: injector.low("optimizer step"))
    if hasattr(rewards, "format_reward"):
        real_format = rewards.format_reward
        def format_reward(*args, **kwargs):
            injector.low("reward")
            return real_format(*args, **kwargs)
        rewards.format_reward = format_reward


def reap(pid, deadline):
    """The child's wait status, or None if it is still running at the deadline."""
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.002)
    return None


for line in sys.stdin:
    job = json.loads(line)
    STARTED = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child: `grpoctl ARGV`, output appended to the log
        log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        if job["plan"]:
            install(Injector(job["plan"], job["where"]))
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
    status = reap(pid, start + job["timeout"])
    if status is None:  # hung: a failure, reported as such
        os.kill(pid, signal.SIGKILL)
        status = os.waitpid(pid, 0)[1]
    print(json.dumps({"exit": os.waitstatus_to_exitcode(status),
                      "seconds": time.monotonic() - start}), flush=True)
'''


def certain_events(run: Path) -> int:
    """Stage events the next attempt is certain to reach (0: the run is finished).

    Load; then for each step not yet done rollout, score, advantage and update, a
    checkpoint every SAVE_EVERY steps and an evaluation every EVAL_EVERY (both after
    the last step); or, with every step done, the final evaluation if it is missing.
    prepare, replayed updates, catch-up evaluations come on top: a lower bound.
    """
    done = 0
    while (run / f"step-{done + 1:06d}" / "done").exists():
        done += 1
    events = 1
    for step in range(done + 1, STEPS + 1):
        events += 4 + (step % SAVE_EVERY == 0 or step == STEPS) + \
            (step % EVAL_EVERY == 0 or step == STEPS)
    if done == STEPS:
        if STEPS in evaluated_steps(run):
            return 0
        events += 1
    return events


def evaluated_steps(run: Path) -> set[int]:
    steps = set()
    lines = (run / "eval.jsonl").read_text().splitlines() if (run / "eval.jsonl").exists() else []
    for line in lines:
        try:
            steps.add(json.loads(line)["step"])
        except ValueError:
            pass  # a line a kill cut short: that evaluation runs again
    return steps


def next_plan(rng: random.Random, attempt: int, run: Path) -> dict:
    """Attempt `attempt`'s kill, drawn from `rng` (the same draws whatever the run's state,
    so the sequence of draws is fixed): signal, mode, and where its stage event is:

    - anchor "start" (a fifth of the attempts, and all once only the final evaluation
      is left): event n of the attempt, 1 <= n <= STARTUP (prepare, load, then
      replays, catch-up evaluations or the next stage);
    - anchor "checkpoint" or "eval" (three tenths, when the next step has one): that
      one (n = 0); a kill at the run's final evaluation is made at its start, since
      the only events after it are its last writes;
    - anchor "work": n events after the first that does new work (0 <= n <= WORK), so
      that each attempt moves the run on a little and the kills reach every step.

    The event is certain (certain_events): within `certain` events, less one for the
    modes that may end at the next event; for "work", of the `certain` events at least
    certain - 4 come from the first new work on (the load and up to three stages whose
    files are read again come before it), so n <= certain - 5 (- 1).
    """
    certain = certain_events(run)
    assert certain > 1, "the run is finished: no kill is certain any more"
    sigint = attempt in SIGINT_AT
    mode = rng.choices(["start", "inside", "timer"], [0.3, 0.6, 0.1])[0]
    if sigint and mode == "timer":
        mode = "inside"  # the interrupts land where chosen, too
    u_anchor, u_kind, u_n = rng.random(), rng.random(), rng.random()
    late = mode != "start"  # may end at the next event
    most = certain - late - 5
    step = 1 + sum(1 for s in range(1, STEPS + 1) if (run / f"step-{s:06d}" / "done").exists())
    kind = "checkpoint" if u_kind < 0.5 else "eval"
    if u_anchor < 0.2 or most < 0:
        anchor, n = "start", 1 + int(u_n * min(STARTUP, certain - late))
    elif u_anchor < 0.5 and step % (SAVE_EVERY if kind == "checkpoint" else EVAL_EVERY) == 0 \
            or step == STEPS:
        anchor, n = kind, 0  # the next step has one
        if kind == "eval" and step == STEPS:
            mode = "start"
    else:
        anchor, n = "work", int(u_n * (min(WORK, most) + 1))
    return {"signal": int(signal.SIGINT if sigint else signal.SIGKILL), "mode": mode,
            "anchor": anchor, "n": n, "u": rng.random(), "delay": rng.uniform(0.0, 0.04)}


def without_timings(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.endswith(TIMING_KEYS)} for r in rows]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_tensors(a: Path, b: Path) -> None:
    expected, got = load_file(a), load_file(b)
    assert expected.keys() == got.keys(), a.name
    for name in expected:
        assert torch.equal(expected[name], got[name]), (a.name, name)


def test_sigkill_at_chosen_events_then_resume_equals_uninterrupted(tiny_model, tmp_path):
    run, log, where_log = tmp_path / "run", tmp_path / "attempts.log", tmp_path / "kills.jsonl"
    # Prompt files: the 64 the 8 steps draw from, 2 to evaluate on (reading a file is far
    # quicker than making the embedded task's 4000 prompts, which every attempt would pay)
    from grpoctl.prompts import load_prompts

    args = [*ARGS]
    for name, source, n in (("prompts", "arith:train", 64), ("eval-prompts", "arith:test", 2)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"prompt": p["text"], "answer": p["answer"]}) + "\n"
                                for p in load_prompts(source)[:n]))
        args += [f"--{name}", str(path)]
    # The uninterrupted run, alongside the attempts (a second core, when there is one).
    reference_run = tmp_path / "reference"
    reference = subprocess.Popen([sys.executable, "-m", "grpoctl", "loop", "--model",
                                  str(tiny_model), *args, "--run-dir", str(reference_run)],
                                 env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(tiny_model)], env=ENV,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    rng = random.Random(SEED)
    kills, timer_kills, interrupts = 0, 0, 0
    stages, points, places = Counter(), Counter(), []
    seconds = 0.0

    def attempt(plan: dict | None, timeout: float) -> dict:
        argv = ["loop", "--model", str(tiny_model), *args, "--run-dir", str(run)]
        if (run / "config.json").exists():
            argv.append("--resume")
        job = {"argv": argv, "log": str(log), "where": str(where_log), "plan": plan,
               "timeout": timeout}
        launcher.stdin.write(json.dumps(job) + "\n")
        launcher.stdin.flush()
        return json.loads(launcher.stdout.readline())

    finished = False
    try:
        attempts = 0
        while kills < MIN_KILLS or attempts <= max(SIGINT_AT):
            plan = next_plan(rng, attempts, run)
            attempts += 1
            result = attempt(plan, timeout=120)
            seconds += result["seconds"]
            assert result["exit"] == (130 if plan["signal"] == signal.SIGINT else
                                      -signal.SIGKILL), (plan, log.read_text()[-3000:])
            where = read_jsonl(where_log)[-1]
            assert plan["mode"] == "timer" or where["n"] == where["target"] + where["fallback"], \
                where  # the kill fell at the planned event (or the one after, as planned)
            if plan["signal"] == signal.SIGINT:
                assert "--resume" in log.read_text().strip().splitlines()[-1]
                interrupts += 1
                continue
            if plan["mode"] == "timer":  # where it fell depends on the machine: not counted
                timer_kills += 1
            else:
                kills += 1
            stages[where["stage"]] += 1
            points["next stage's start" if where["fallback"] else
                   "stage start" if where["point"] == "start" else
                   "timer" if where["point"] == "timer" else
                   "model/optimizer/reward" if where["point"] in ("forward", "optimizer step",
                                                                "reward") else
                   "file operation"] += 1
            places.append(f"{where['label']}: {where['point']} ({result['seconds']:.2f} s)")
        reached = len(list(run.glob("step-*/done")))
        final = attempt(None, timeout=300)  # no kill: --resume to the end
        assert final["exit"] == 0, log.read_text()[-3000:]
        finished = True
    finally:
        launcher.stdin.close()
        launcher.wait(timeout=60)
        if not finished:
            reference.kill()  # the test failed: no need for the reference
        reference_errors = reference.communicate(timeout=300)[1].decode(errors="replace")
    assert reference.returncode == 0, reference_errors

    print(f"\n{kills} SIGKILLs at chosen events, {timer_kills} by timer, {interrupts} SIGINTs "
          f"survived ({attempts} attempts, {seconds:.1f} s; {reached} of {STEPS} steps done "
          f"before the last, which took {final['seconds']:.1f} s);\n"
          f"killed during: {dict(stages)}\nat: {dict(points)}\n" + "; ".join(places))
    assert kills >= MIN_KILLS and interrupts == len(SIGINT_AT)
    # The kills fell in many different stages, at stage starts, in file writes and in
    # the middle of the computation.
    assert len(stages) >= 5, stages
    assert points["stage start"] and points["file operation"] >= 3, points
    assert points["model/optimizer/reward"], points

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
